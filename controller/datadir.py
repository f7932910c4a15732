"""datadir.py: the controller's data directory and ``controller init``.

Layout (mode 0700; private keys 0600)::

    controller.yaml        trust domain and the server names the certificate covers
    ca/ca.crt ca/ca.key    the signing CA: a root made here, or the user's (--ca-cert/--ca-key)
    ca/bundle.crt          trust anchors: what clients and agents verify with
    ca/retired.yaml        roots replaced by rotation, trusted until their last leaf expires
    tls/controller.crt tls/controller.key   the API's server certificate (chain)
    admin/admin.crt admin/admin.key         the admin client credential the CLI uses
    store.db               the SQLite store of resources
    identity.db            join tokens and the ledger of issued certificates

Owns creating and reading these files; knows nothing of HTTP or the store's contents.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller import pki
from controller.api.spiffe import admin_uri, controller_uri

DEFAULT_DATA_DIR = Path("/var/lib/nodemesh/controller")
ROOT_TTL = dt.timedelta(days=3650)
SERVER_TTL = dt.timedelta(days=365)
ADMIN_TTL = dt.timedelta(days=365)


class DataDirError(Exception):
    """The data directory is missing, half-made or unreadable; the message says what to do."""


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def config(self) -> Path: return self.path / "controller.yaml"
    @property
    def signer_cert(self) -> Path: return self.path / "ca" / "ca.crt"
    @property
    def signer_key(self) -> Path: return self.path / "ca" / "ca.key"
    @property
    def bundle(self) -> Path: return self.path / "ca" / "bundle.crt"
    @property
    def retired(self) -> Path: return self.path / "ca" / "retired.yaml"
    @property
    def server_cert(self) -> Path: return self.path / "tls" / "controller.crt"
    @property
    def server_key(self) -> Path: return self.path / "tls" / "controller.key"
    @property
    def admin_cert(self) -> Path: return self.path / "admin" / "admin.crt"
    @property
    def admin_key(self) -> Path: return self.path / "admin" / "admin.key"
    @property
    def store(self) -> Path: return self.path / "store.db"
    @property
    def identity_db(self) -> Path: return self.path / "identity.db"

    def exists(self) -> bool:
        return self.config.exists()


@dataclass(frozen=True)
class Settings:
    """What ``controller init`` decided and ``controller run`` reads back."""

    trust_domain: str
    server_names: tuple[str, ...] = field(default_factory=tuple)


def default_server_names() -> tuple[str, ...]:
    return ("localhost", "127.0.0.1", "::1", socket.gethostname())


def initialise(
    d: DataDir,
    *,
    trust_domain: str,
    server_names: tuple[str, ...],
    ca_cert: Path | None = None,
    ca_key: Path | None = None,
    ca_bundle: Path | None = None,
    now: dt.datetime | None = None,
) -> bool:
    """Create the data dir, CA, server and admin credentials. Returns False if already done.

    Never overwrites: an initialised dir is left exactly as it is. With ``ca_cert``/``ca_key``
    the user's CA signs; if it is an intermediate, ``ca_bundle`` must hold the root(s).
    """
    if d.exists():
        return False
    now = now or dt.datetime.now(dt.timezone.utc)
    if (ca_cert is None) != (ca_key is None):
        raise DataDirError("--ca-cert and --ca-key go together: give both or neither")
    try:
        issuer = (pki.load_issuer(ca_cert, ca_key) if ca_cert
                  else pki.create_root(f"nodemesh root CA {trust_domain}", now=now, ttl=ROOT_TTL))
        self_signed = issuer.cert.issuer == issuer.cert.subject
        if not self_signed and ca_bundle is None:
            raise DataDirError(f"{ca_cert} is an intermediate CA: give its root(s) with --ca-bundle FILE")
        anchors = pki.load_certs(ca_bundle) if ca_bundle else [issuer.cert]
    except pki.PkiError as e:
        raise DataDirError(str(e)) from None
    d.path.mkdir(parents=True, exist_ok=True)
    d.path.chmod(0o700)
    pki.write_file(d.signer_cert, pki.cert_pem(issuer.cert), secret=False)
    pki.write_file(d.signer_key, pki.key_pem(issuer.key), secret=True)
    pki.write_file(d.bundle, b"".join(pki.cert_pem(c) for c in anchors), secret=False)
    settings = Settings(trust_domain, tuple(server_names))
    issue_own_certificates(d, issuer, settings, now=now)
    # Written last: its presence means "initialised".
    body = yaml.safe_dump({"trustDomain": trust_domain, "serverNames": list(server_names),
                           "createdAt": now.strftime("%Y-%m-%dT%H:%M:%SZ")}, sort_keys=False)
    pki.write_file(d.config, body.encode(), secret=False)
    return True


def issue_own_certificates(d: DataDir, issuer: pki.Issuer, settings: Settings, *, now: dt.datetime) -> None:
    """(Re-)issue the controller's server certificate and the admin credential from ``issuer``."""
    chain_tail = b"" if issuer.cert.issuer == issuer.cert.subject else pki.cert_pem(issuer.cert)
    names = settings.server_names
    key = pki.generate_key()
    cert = pki.issue(issuer, key.public_key(), now=now, ttl=SERVER_TTL, common_name="nodemesh controller",
                     uris=(controller_uri(settings.trust_domain),),
                     dns_names=tuple(n for n in names if not _is_ip(n)),
                     ip_addresses=tuple(n for n in names if _is_ip(n)), client=False)
    pki.write_file(d.server_key, pki.key_pem(key), secret=True)
    pki.write_file(d.server_cert, pki.cert_pem(cert) + chain_tail, secret=False)

    key = pki.generate_key()
    cert = pki.issue(issuer, key.public_key(), now=now, ttl=ADMIN_TTL, common_name="nodemesh admin",
                     uris=(admin_uri(settings.trust_domain, "admin"),), server=False)
    pki.write_file(d.admin_key, pki.key_pem(key), secret=True)
    pki.write_file(d.admin_cert, pki.cert_pem(cert) + chain_tail, secret=False)


def load_settings(d: DataDir) -> Settings:
    if not d.exists():
        raise DataDirError(f"{d.path} is not an initialised controller data dir; run "
                           f"'nodemesh controller init --data-dir {d.path}' first")
    try:
        raw = yaml.safe_load(d.config.read_text())
        return Settings(trust_domain=str(raw["trustDomain"]), server_names=tuple(raw.get("serverNames") or ()))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise DataDirError(f"{d.config}: unreadable ({e})") from None


def server_ssl_context(d: DataDir, bundle_pem: bytes | None = None) -> ssl.SSLContext:
    """TLS 1.3 server context; asks for (but does not demand) a client certificate.

    A presented certificate must chain to a trusted root or the handshake fails; a missing one
    is left for the API to answer 401, so agents can still join with a token.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(d.server_cert, d.server_key)
    if bundle_pem is not None:
        ctx.load_verify_locations(cadata=bundle_pem.decode())
    else:
        ctx.load_verify_locations(cafile=d.bundle)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
