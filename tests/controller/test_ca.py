"""Root rotation on disk: the bundle keeps the old root for its grace period, and a crash at any
step of a rotation leaves a CA that starts (finished, or not begun) with the old root trusted."""
from __future__ import annotations

import datetime as dt

import pytest
import yaml

from controller import datadir, pki
from controller.ca import CertificateAuthority, _staged

NOW = dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def d(tmp_path):
    d = datadir.DataDir(tmp_path / "c")
    datadir.initialise(d, trust_domain="cluster.local", server_names=("127.0.0.1",))
    return d


def serials(pem: bytes) -> list[str]:
    return [pki.serial_hex(c) for c in _certs(pem)]


def _certs(pem: bytes):
    from cryptography import x509
    return x509.load_pem_x509_certificates(pem)


def test_rotation_keeps_the_old_root_until_its_last_leaf_expires(d):
    ca = CertificateAuthority.from_datadir(d)
    old = ca.issuer_serial
    ca.rotate(now=NOW, old_valid_until=NOW + dt.timedelta(hours=2), common_name="new")
    new = ca.issuer_serial
    assert new != old
    assert serials(ca.bundle_pem(NOW)) == [new, old]
    assert serials(ca.bundle_pem(NOW + dt.timedelta(hours=3))) == [new]      # grace over
    assert serials(d.bundle.read_bytes()) == [new, old]                         # what clients read
    assert not _staged(d.signer_cert).exists() and not _staged(d.signer_key).exists()


@pytest.mark.parametrize("crash_after", ["retired", "staged_cert", "staged_both", "key_swapped"])
def test_a_crash_during_rotation_recovers(d, crash_after):
    ca = CertificateAuthority.from_datadir(d)
    old = ca.issuer_serial
    new = pki.create_root("new", now=NOW, ttl=dt.timedelta(days=10))
    pki.write_file(d.retired, yaml.safe_dump([{"until": (NOW + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                               "cert": pki.cert_pem(ca.issuer.cert).decode()}]).encode(), secret=False)
    if crash_after != "retired":
        pki.write_file(_staged(d.signer_cert), pki.cert_pem(new.cert), secret=False)
    if crash_after in ("staged_both", "key_swapped"):
        pki.write_file(_staged(d.signer_key), pki.key_pem(new.key), secret=True)
    if crash_after == "key_swapped":
        _staged(d.signer_key).replace(d.signer_key)

    after = CertificateAuthority.from_datadir(d)          # what a restarted controller does
    finished = crash_after in ("staged_both", "key_swapped")
    assert after.issuer_serial == (pki.serial_hex(new.cert) if finished else old)
    assert old in serials(after.bundle_pem(NOW))                      # old root still trusted
    # the signer is never dropped from the bundle, even once its "retired" grace has passed
    assert after.issuer_serial in serials(after.bundle_pem(NOW + dt.timedelta(days=1)))
    assert not _staged(d.signer_cert).exists() and not _staged(d.signer_key).exists()
