"""Root rotation on disk: the new root is trusted before it signs, the old one stays trusted for
its grace period, and a crash at any step leaves a CA that starts with every root it needs."""
from __future__ import annotations

import datetime as dt

import pytest
import yaml
from cryptography import x509

from controller import datadir, pki
from controller.ca import CertificateAuthority, _staged

NOW = dt.datetime.now(dt.timezone.utc)
H = dt.timedelta(hours=1)


@pytest.fixture
def d(tmp_path):
    d = datadir.DataDir(tmp_path / "c")
    datadir.initialise(d, trust_domain="cluster.local", server_names=("127.0.0.1",))
    return d


def serials(pem: bytes) -> list[str]:
    return [pki.serial_hex(c) for c in x509.load_pem_x509_certificates(pem)]


def test_two_phase_rotation(d):
    ca = CertificateAuthority.from_datadir(d)
    old = ca.issuer_serial
    new = pki.serial_hex(ca.rotate(now=NOW, activate_at=NOW + H, common_name="new"))
    assert ca.issuer_serial == old                                   # phase 1: trusted, not signing
    assert serials(ca.bundle_pem(NOW)) == [old, new] == serials(d.bundle.read_bytes())
    assert ca.activate(now=NOW + H / 2, old_valid_until=NOW + 3 * H) is None
    assert CertificateAuthority.from_datadir(d).pending() is not None  # survives a restart
    assert ca.activate(now=NOW + H, old_valid_until=NOW + 3 * H) is not None
    assert ca.issuer_serial == new and ca.pending() is None           # phase 2: the new root signs
    assert serials(ca.bundle_pem(NOW + H)) == [new, old]
    assert serials(ca.bundle_pem(NOW + 4 * H)) == [new]               # the old root's grace is over
    assert not _staged(d.signer_cert).exists() and not _staged(d.signer_key).exists()


@pytest.mark.parametrize("crash", ["staged_only", "committed", "retired_written", "key_swapped", "marker_left"])
def test_a_crash_during_rotation_recovers(d, crash):
    ca = CertificateAuthority.from_datadir(d)
    old = ca.issuer_serial
    new = pki.create_root("new", now=NOW, ttl=dt.timedelta(days=10))
    pki.write_file(_staged(d.signer_cert), pki.cert_pem(new.cert), secret=False)
    pki.write_file(_staged(d.signer_key), pki.key_pem(new.key), secret=True)
    if crash != "staged_only":
        pki.write_file(d.bundle, d.bundle.read_bytes() + pki.cert_pem(new.cert), secret=False)
        pki.write_file(d.signer_cert.with_name("rotation.yaml"),
                       yaml.safe_dump({"activateAt": NOW.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode(), secret=False)
    if crash in ("retired_written", "key_swapped", "marker_left"):
        pki.write_file(d.retired, yaml.safe_dump([{"until": (NOW + H).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                                   "cert": pki.cert_pem(ca.issuer.cert).decode()}]).encode(),
                       secret=False)
    if crash in ("key_swapped", "marker_left"):
        _staged(d.signer_key).replace(d.signer_key)
    if crash == "marker_left":
        _staged(d.signer_cert).replace(d.signer_cert)

    after = CertificateAuthority.from_datadir(d)            # what a restarted controller does
    if crash in ("committed", "retired_written"):
        assert after.pending() is not None and after.issuer_serial == old
        after.activate(now=NOW, old_valid_until=NOW + H)     # and the rotation can still finish
    expected = old if crash == "staged_only" else pki.serial_hex(new.cert)
    assert after.issuer_serial == expected and after.pending() is None
    assert old in serials(after.bundle_pem(NOW))             # the old root is trusted throughout
    assert after.issuer_serial in serials(after.bundle_pem(NOW + dt.timedelta(days=1)))
    assert not _staged(d.signer_cert).exists() and not _staged(d.signer_key).exists()
