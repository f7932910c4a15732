"""ca.py: the mesh certificate authority at run time — signing CSRs, the trust bundle, rotation.

Files (under the data dir, see datadir.py): ``ca/ca.crt`` + ``ca/ca.key`` sign (a root, or an
intermediate below a user's root); ``ca/bundle.crt`` holds every trusted root, the current
one first (clients verify the controller with it); ``ca/retired.yaml`` lists roots replaced by
``rotate`` and the time until which they stay trusted (the last expiry of anything they
signed); after that they drop out of the bundle served. Decides what to sign; the caller
(identity_api.py) decides who may ask. No HTTP, no store.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import yaml

from controller import pki
from controller.pki import Certificate, Csr

ROOT_TTL = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Signed:
    cert: Certificate
    chain_pem: bytes      # leaf first, then the intermediate if the signer is one
    bundle_pem: bytes     # trust anchors to verify peers with
    issuer_serial: str


class CertificateAuthority:
    def __init__(self, signer_cert: Path, signer_key: Path, bundle: Path, retired: Path):
        self._paths = (signer_cert, signer_key, bundle, retired)
        self.reload()

    @classmethod
    def from_datadir(cls, d) -> "CertificateAuthority":
        return cls(d.signer_cert, d.signer_key, d.bundle, d.retired)

    def reload(self) -> None:
        signer_cert, signer_key, bundle, _ = self._paths
        self._recover()
        self.issuer = pki.load_issuer(signer_cert, signer_key)
        self.anchors = pki.load_certs(bundle)
        self._bundle_pem = bundle.read_bytes()
        self._retired_roots = self._read_retired()

    @property
    def self_signed(self) -> bool:
        return self.issuer.cert.issuer == self.issuer.cert.subject

    @property
    def issuer_serial(self) -> str:
        return pki.serial_hex(self.issuer.cert)

    def bundle_pem(self, now: dt.datetime) -> bytes:
        """The trust bundle: the anchors, less retired roots whose grace period is over."""
        over = {pki.serial_hex(c) for c, until in self._retired_roots if until <= now} - {self.issuer_serial}
        if not over:
            return self._bundle_pem
        return b"".join(pki.cert_pem(c) for c in self.anchors if pki.serial_hex(c) not in over)

    def sign(self, csr: Csr, *, now: dt.datetime, ttl: dt.timedelta, server: bool = True,
             client: bool = True, common_name: str = "") -> Signed:
        cert = pki.issue(self.issuer, csr.public_key, now=now, ttl=ttl, uris=(csr.uri,),
                         server=server, client=client, common_name=common_name)
        chain = pki.cert_pem(cert) + (b"" if self.self_signed else pki.cert_pem(self.issuer.cert))
        return Signed(cert, chain, self.bundle_pem(now), self.issuer_serial)

    def rotate(self, *, now: dt.datetime, old_valid_until: dt.datetime, common_name: str) -> pki.Issuer:
        """Make a new root the signer; the old one stays trusted until ``old_valid_until``.

        Only for a self-signed CA made by ``controller init`` (a user's intermediate is rotated
        by the user). Returns the new issuer; callers re-issue the controller's own certificates.
        """
        if not self.self_signed:
            raise pki.PkiError("this controller signs with an intermediate of your own CA; rotate it "
                               "there and restart with the new --ca-cert/--ca-key")
        signer_cert, signer_key, bundle, retired = self._paths
        old = self.issuer.cert
        entries = [(c, until) for c, until in self._retired_roots if until > now]
        entries.append((old, max(old_valid_until, now)))
        new = pki.create_root(common_name, now=now, ttl=ROOT_TTL)
        # Crash-safe order: the old root is listed as retired (still trusted) first; the new
        # signer is staged next to the live files; then _finish swaps them in. reload() finishes
        # a staged rotation, or drops a half-staged one (the old root keeps signing, trusted).
        pki.write_file(retired, yaml.safe_dump([
            {"until": until.strftime("%Y-%m-%dT%H:%M:%SZ"), "cert": pki.cert_pem(c).decode()}
            for c, until in entries]).encode(), secret=False)
        pki.write_file(_staged(signer_cert), pki.cert_pem(new.cert), secret=False)
        pki.write_file(_staged(signer_key), pki.key_pem(new.key), secret=True)
        self._finish()
        self.reload()
        return new

    def _finish(self) -> None:
        """Swap a staged signer in (key, then certificate) and rebuild the bundle file."""
        signer_cert, signer_key, bundle, _ = self._paths
        if _staged(signer_key).exists():
            _staged(signer_key).replace(signer_key)
        _staged(signer_cert).replace(signer_cert)
        new = pki.load_cert(signer_cert)
        keep = {pki.serial_hex(c) for c, _ in self._read_retired()}
        kept = [c for c in pki.load_certs(bundle) if pki.serial_hex(c) in keep and c != new]
        pki.write_file(bundle, b"".join(pki.cert_pem(c) for c in [new, *kept]), secret=False)

    def _recover(self) -> None:
        """After a crash during ``rotate``: finish it if the new signer was fully staged."""
        signer_cert, signer_key, _, _ = self._paths
        cert, key = _staged(signer_cert), _staged(signer_key)
        if not cert.exists():
            key.unlink(missing_ok=True)
            return
        staged = pki.load_cert(cert)
        live_key = key if key.exists() else signer_key
        if staged.public_key().public_numbers() == pki.load_key(live_key).public_key().public_numbers():
            self._finish()
        else:
            cert.unlink()
            key.unlink(missing_ok=True)

    def retired(self) -> list[tuple[Certificate, dt.datetime]]:
        """Roots replaced by rotation, with the time until which they stay trusted."""
        return list(self._retired_roots)

    def _read_retired(self) -> list[tuple[Certificate, dt.datetime]]:
        path = self._paths[3]
        if not path.exists():
            return []
        out = []
        for entry in yaml.safe_load(path.read_text()) or []:
            until = dt.datetime.strptime(entry["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
            out.append((pki.cert_from_pem(entry["cert"].encode()), until))
        return out


def _staged(path: Path) -> Path:
    return path.with_name(path.name + ".new")
