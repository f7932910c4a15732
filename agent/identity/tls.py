"""tls.py: the mesh's TLS settings and the peer's identity on a connection.

Owns the stdlib ``ssl`` contexts: TLS 1.3 only, ALPN ``h2``, a peer certificate required in
both directions and verified against the trust bundle, hostname checking off (the identity is
the SPIFFE ID in the URI SAN, not a hostname). Reads the files it is given, writes none; no trio.
The peer's identity comes from the certificate OpenSSL verified, as ``ssl`` decodes it: no
cryptography on the data path.
"""
from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from controller.api.errors import InvalidSpiffeId
from controller.api.spiffe import SpiffeId

from agent.identity.errors import PeerIdentityError, PeerNotAllowed
from agent.identity.ids import parse_identity

ALPN = "h2"


class HasPeerCert(Protocol):
    """An ``ssl.SSLObject``/``ssl.SSLSocket`` or a ``trio.SSLStream`` (which forwards the call)."""

    def getpeercert(self, binary_form: bool = ...) -> dict | bytes | None: ...


def server_context(cert_file: Path, key_file: Path, bundle_pem: bytes) -> ssl.SSLContext:
    """A server context presenting ``cert_file``/``key_file``, requiring a client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, cert_file, key_file, bundle_pem)


def client_context(cert_file: Path, key_file: Path, bundle_pem: bytes) -> ssl.SSLContext:
    """A client context presenting ``cert_file``/``key_file``, verifying the server's chain only."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, cert_file, key_file, bundle_pem)


def _context(protocol: int, cert_file: Path, key_file: Path, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False          # before verify_mode: a client context insists on the order
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def peer_identity(conn: HasPeerCert) -> SpiffeId | str:
    """The peer's identity: a ``SpiffeId`` for a workload, the URI itself for a control-plane ID.

    Reads the peer certificate that the handshake verified (``getpeercert()``, the decoded form:
    ``ssl`` fills it only for a context that verifies peers, as ours do); it must carry exactly
    one URI SAN, a valid SPIFFE ID (SPIFFE X.509-SVID 2). Raises ``PeerIdentityError`` otherwise.
    """
    cert = conn.getpeercert()
    if cert is None:
        raise PeerIdentityError("the peer presented no certificate")
    if not cert:
        raise PeerIdentityError("the peer certificate was not verified (a context without CERT_REQUIRED)")
    sans = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(sans) != 1:
        raise PeerIdentityError(f"the peer certificate must carry exactly one URI SAN, got {sans}")
    try:
        return parse_identity(sans[0])
    except InvalidSpiffeId as e:
        raise PeerIdentityError(f"the peer's URI SAN is not a SPIFFE ID: {e.reason} ({sans[0]!r})") from None


def check_peer(peer: SpiffeId | str,
               allowed: Iterable[str] | Callable[[str], bool]) -> str:
    """Return the peer's URI if ``allowed`` (a set of URIs, or a predicate on the URI) admits it.

    Raises ``PeerNotAllowed(peer, allowed)`` otherwise.
    """
    uri = str(peer)
    if callable(allowed):
        if not allowed(uri):
            raise PeerNotAllowed(uri, allowed)
        return uri
    if isinstance(allowed, (str, bytes)):
        raise TypeError("allowed must be a collection of URIs or a predicate, not one string")
    allowed = frozenset(allowed)
    if uri not in allowed:
        raise PeerNotAllowed(uri, allowed)
    return uri
