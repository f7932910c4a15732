"""Pure parts: CSRs, chain checks (agent.identity.x509) and renewal timing (agent.identity.renewal)."""
from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import BadBundle, BadCertificate, x509
from agent.identity.renewal import BACKOFF_CAP, backoff, renew_at
from controller import pki
from tests.agent.identity.conftest import NODE, TTL, WEB, spki


def test_csr_carries_one_uri_san_p256_sha256_and_no_key():
    key_pem = x509.new_key_pem()
    csr_pem = x509.csr_pem(WEB, key_pem)
    assert b"PRIVATE KEY" not in csr_pem
    csr = cx509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp256r1"
    (ext,) = list(csr.extensions)
    assert list(ext.value) == [cx509.UniformResourceIdentifier(WEB)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert spki(csr.public_key()) == spki(key.public_key())


def test_each_key_is_new():
    assert x509.new_key_pem() != x509.new_key_pem()


def test_check_chain_accepts_a_good_chain(signed, epoch):
    key_pem, chain, bundle = signed
    leaf = x509.check_chain(WEB, chain, bundle, key_pem, epoch)
    assert leaf.not_after == epoch + TTL
    assert leaf.not_before == epoch - dt.timedelta(minutes=5)
    assert leaf.serial == cx509.load_pem_x509_certificate(chain).serial_number


def test_check_chain_accepts_an_intermediate_sent_with_the_leaf(root, epoch):
    inter_key = pki.generate_key()
    name = cx509.Name([cx509.NameAttribute(cx509.NameOID.COMMON_NAME, "intermediate")])
    inter_cert = (cx509.CertificateBuilder().subject_name(name).issuer_name(root.cert.subject)
                  .public_key(inter_key.public_key()).serial_number(cx509.random_serial_number())
                  .not_valid_before(epoch - dt.timedelta(minutes=5))
                  .not_valid_after(epoch + dt.timedelta(days=30))
                  .add_extension(cx509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .add_extension(pki._key_usage(ca=True), critical=True)
                  .add_extension(cx509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
                  .add_extension(cx509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                                 critical=False)
                  .sign(root.key, hashes.SHA256()))
    inter = pki.Issuer(inter_cert, inter_key)
    key_pem = x509.new_key_pem()
    key = serialization.load_pem_private_key(key_pem, password=None)
    leaf = pki.issue(inter, key.public_key(), now=epoch, ttl=TTL, uris=(NODE,))
    bundle = pki.cert_pem(root.cert)
    assert x509.check_chain(NODE, pki.cert_pem(leaf) + pki.cert_pem(inter_cert), bundle, key_pem, epoch)
    with pytest.raises(BadCertificate, match="does not chain"):
        x509.check_chain(NODE, pki.cert_pem(leaf), bundle, key_pem, epoch)  # intermediate missing


def test_check_chain_rejects_another_key(signed, epoch):
    _, chain, bundle = signed
    with pytest.raises(BadCertificate) as err:
        x509.check_chain(WEB, chain, bundle, x509.new_key_pem(), epoch)
    assert err.value.uri == WEB and "public key" in err.value.reason


def test_check_chain_rejects_another_identity(signed, epoch):
    key_pem, chain, bundle = signed
    other = WEB.replace("web", "db")
    with pytest.raises(BadCertificate) as err:
        x509.check_chain(other, chain, bundle, key_pem, epoch)
    assert err.value.uri == other and "exactly one URI SAN" in err.value.reason


def test_check_chain_rejects_another_ca(signed, epoch):
    key_pem, chain, _ = signed
    other = pki.create_root("other", now=epoch, ttl=dt.timedelta(days=30))
    with pytest.raises(BadCertificate, match="does not chain"):
        x509.check_chain(WEB, chain, pki.cert_pem(other.cert), key_pem, epoch)


@pytest.mark.parametrize("offset", [-dt.timedelta(minutes=6), TTL, TTL + dt.timedelta(seconds=1)])
def test_check_chain_rejects_outside_validity(signed, epoch, offset):
    key_pem, chain, bundle = signed
    with pytest.raises(BadCertificate, match="not valid at"):
        x509.check_chain(WEB, chain, bundle, key_pem, epoch + offset)


def test_check_chain_rejects_garbage(signed, epoch):
    key_pem, _, bundle = signed
    with pytest.raises(BadCertificate, match="not PEM"):
        x509.check_chain(WEB, b"hello", bundle, key_pem, epoch)


def test_bundle_must_be_ca_certificates(signed, root, epoch):
    _, chain, _ = signed
    other = pki.create_root("other", now=epoch, ttl=dt.timedelta(days=30))
    assert x509.check_bundle(pki.cert_pem(root.cert) + pki.cert_pem(other.cert)) == 2
    with pytest.raises(BadBundle, match="not a CA"):
        x509.check_bundle(chain)
    with pytest.raises(BadBundle, match="not PEM"):
        x509.check_bundle(b"")


# --- renewal timing ------------------------------------------------------------------------

def test_renew_at_is_half_life_with_at_most_5_percent_jitter():
    nb = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    na = nb + dt.timedelta(hours=24)
    rng = random.Random(1)
    moments = [renew_at(nb, na, rng) for _ in range(2000)]
    lo, hi = nb + dt.timedelta(hours=12 - 1.2), nb + dt.timedelta(hours=12 + 1.2)
    assert all(lo <= m <= hi for m in moments)
    # really jittered: spread over most of the window, on both sides of half life
    assert min(moments) < nb + dt.timedelta(hours=11) and max(moments) > nb + dt.timedelta(hours=13)
    assert len(set(moments)) > 1900


def test_renew_at_is_deterministic_for_a_seeded_rng():
    nb = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    na = nb + dt.timedelta(hours=1)
    assert renew_at(nb, na, random.Random(7)) == renew_at(nb, na, random.Random(7))


def test_backoff_doubles_from_one_second_and_caps_at_60():
    rng = random.Random(3)
    for attempt in range(12):
        ceiling = min(2.0 ** attempt, 60.0)
        waits = [backoff(attempt, rng) for _ in range(300)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), attempt
        assert max(waits) - min(waits) > ceiling / 4     # jittered, not constant
    assert backoff(10_000, rng) <= BACKOFF_CAP
