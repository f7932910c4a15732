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

    def rotate(self, *, now: dt.datetime, activate_at: dt.datetime, common_name: str) -> Certificate:
        """Start a rotation: a new root is trusted from now (it joins the bundle) and signs from
        ``activate_at``, once every agent has fetched the new bundle — so a new-root certificate
        never meets a peer that does not trust it yet. ``activate`` completes it.

        Only for a self-signed CA made by ``controller init`` (a user's intermediate is rotated
        by the user). Returns the new root. Crash-safe order: the new signer is staged beside the
        live files, the bundle gains the new root, and ``ca/rotation.yaml`` (the commit point)
        comes last; ``reload`` drops a rotation that did not reach it.
        """
        if not self.self_signed:
            raise pki.PkiError("this controller signs with an intermediate of your own CA; rotate it "
                               "there and restart with the new --ca-cert/--ca-key")
        if self.pending() is not None:
            raise pki.PkiError(f"a rotation is already under way: root {pki.serial_hex(self.pending()[0])} "
                               f"signs from {self.pending()[1]:%Y-%m-%dT%H:%M:%SZ}")
        signer_cert, signer_key, bundle, _ = self._paths
        new = pki.create_root(common_name, now=now, ttl=ROOT_TTL)
        pki.write_file(_staged(signer_cert), pki.cert_pem(new.cert), secret=False)
        pki.write_file(_staged(signer_key), pki.key_pem(new.key), secret=True)
        pki.write_file(bundle, self._bundle_pem.rstrip(b"\n") + b"\n" + pki.cert_pem(new.cert), secret=False)
        pki.write_file(self._rotation, yaml.safe_dump({"activateAt": _iso(activate_at)}).encode(), secret=False)
        self.reload()
        return new.cert

    def pending(self) -> tuple[Certificate, dt.datetime] | None:
        """The staged root of a rotation under way and when it starts signing, or None."""
        if not self._rotation.exists():
            return None
        at = _parse(yaml.safe_load(self._rotation.read_text())["activateAt"])
        return pki.load_cert(_staged(self._paths[0])), at

    def activate(self, *, now: dt.datetime, old_valid_until: dt.datetime) -> pki.Issuer | None:
        """If a pending rotation is due, make its root the signer; the old root stays trusted
        until ``old_valid_until`` (the last expiry of what it signed). Returns the new issuer."""
        pending = self.pending()
        if pending is None or now < pending[1]:
            return None
        signer_cert, signer_key, _, retired = self._paths
        old = self.issuer.cert
        entries = [(c, until) for c, until in self._retired_roots
                   if until > now and pki.serial_hex(c) != pki.serial_hex(old)]
        entries.append((old, max(old_valid_until, now)))
        pki.write_file(retired, yaml.safe_dump([{"until": _iso(until), "cert": pki.cert_pem(c).decode()}
                                                for c, until in entries]).encode(), secret=False)
        self._finish()
        self._rotation.unlink()
        self.reload()
        return self.issuer

    @property
    def _rotation(self) -> Path:
        return self._paths[0].with_name("rotation.yaml")

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
        """After a crash: finish an activation that had begun swapping; drop a rotation that
        never reached its commit point; keep a committed one pending."""
        signer_cert, signer_key, _, _ = self._paths
        cert, key = _staged(signer_cert), _staged(signer_key)
        if not cert.exists():
            key.unlink(missing_ok=True)
            self._rotation.unlink(missing_ok=True)    # activation finished, only the marker was left
            return
        staged = pki.load_cert(cert)
        if not key.exists() and staged.public_key().public_numbers() == \
                pki.load_key(signer_key).public_key().public_numbers():
            self._finish()                             # the key was swapped, the certificate not yet
            self._rotation.unlink(missing_ok=True)
        elif not self._rotation.exists():
            cert.unlink()                              # never committed: the old root signs on
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
            until = _parse(entry["until"])
            out.append((pki.cert_from_pem(entry["cert"].encode()), until))
        return out


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def _staged(path: Path) -> Path:
    return path.with_name(path.name + ".new")
