"""The CA toolkit: what goes into certificates, and that bad files are refused by name."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.api import spiffe
from controller import auth, pki

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def test_workload_certificate_carries_exactly_the_spiffe_id():
    root = pki.create_root("test root", now=NOW, ttl=dt.timedelta(days=10))
    key = pki.generate_key()
    cert = pki.issue(root, key.public_key(), now=NOW, ttl=dt.timedelta(hours=24),
                     uris=("spiffe://cluster.local/ns/shop/sa/web",))
    assert pki.uri_sans(cert) == ["spiffe://cluster.local/ns/shop/sa/web"]
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(root.cert)


def test_leaf_never_outlives_its_issuer():
    root = pki.create_root("short root", now=NOW, ttl=dt.timedelta(hours=2))
    cert = pki.issue(root, pki.generate_key().public_key(), now=NOW, ttl=dt.timedelta(days=1),
                     uris=("spiffe://cluster.local/ns/a/sa/b",))
    assert cert.not_valid_after_utc == root.cert.not_valid_after_utc


def test_mismatched_key_and_non_ca_are_refused(tmp_path):
    root = pki.create_root("r", now=NOW, ttl=dt.timedelta(days=1))
    other = pki.create_root("o", now=NOW, ttl=dt.timedelta(days=1))
    pki.write_file(tmp_path / "ca.crt", pki.cert_pem(root.cert), secret=False)
    pki.write_file(tmp_path / "other.key", pki.key_pem(other.key), secret=True)
    with pytest.raises(pki.PkiError, match="is not the key of"):
        pki.load_issuer(tmp_path / "ca.crt", tmp_path / "other.key")
    leaf_key = pki.generate_key()
    leaf = pki.issue(root, leaf_key.public_key(), now=NOW, ttl=dt.timedelta(hours=1), dns_names=("x",))
    pki.write_file(tmp_path / "leaf.crt", pki.cert_pem(leaf), secret=False)
    pki.write_file(tmp_path / "leaf.key", pki.key_pem(leaf_key), secret=True)
    with pytest.raises(pki.PkiError, match="not a CA certificate"):
        pki.load_issuer(tmp_path / "leaf.crt", tmp_path / "leaf.key")
    (tmp_path / "junk.crt").write_text("hello")
    with pytest.raises(pki.PkiError, match="junk.crt: not a PEM certificate"):
        pki.load_cert(tmp_path / "junk.crt")
    assert oct((tmp_path / "other.key").stat().st_mode & 0o777) == "0o600"


def test_callers_are_told_apart_by_uri_san():
    root = pki.create_root("r", now=NOW, ttl=dt.timedelta(days=1))

    def der(uri):
        from cryptography.hazmat.primitives import serialization
        c = pki.issue(root, pki.generate_key().public_key(), now=NOW, ttl=dt.timedelta(hours=1), uris=(uri,))
        return c.public_bytes(serialization.Encoding.DER)

    assert auth.caller_from_cert(der(spiffe.admin_uri("cluster.local", "alice")), "cluster.local") == auth.Caller(auth.Role.ADMIN, "alice")
    assert auth.caller_from_cert(der(spiffe.node_uri("cluster.local", "n1")), "cluster.local") == auth.Caller(auth.Role.NODE, "n1")
    # Another trust domain's admin is nobody here.
    assert auth.caller_from_cert(der(spiffe.admin_uri("evil.org", "alice")), "cluster.local").role is auth.Role.ANONYMOUS
    with pytest.raises(auth.AuthError) as e:
        auth.authorize(auth.Caller(auth.Role.NODE, "n1"), auth.Verb.WRITE)
    assert e.value.code == 403
    with pytest.raises(auth.AuthError) as e:
        auth.authorize(auth.ANONYMOUS, auth.Verb.READ)
    assert e.value.code == 401
