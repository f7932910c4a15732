"""hbone.py: HBONE, Istio ambient's tunnel: HTTP/2 CONNECT over mutual TLS 1.3, port 15008.

Owns the CONNECT request shape (RFC 9113 §8.5), the TLS handshake and peer SPIFFE-ID checks
and the server's per-connection loop; the client's connection pool is hbone_pool.py, which
builds on this module (never the other way round). Decides nothing: the server hands each
request to a handler (which authorizes and connects), the client is told where to go and whom
to expect. HTTP/2 itself lives in h2conn.py.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from agent.base.constants import INBOUND_HBONE_PORT
from agent.identity import PeerIdentityError
from agent.identity import peer_identity as read_peer_identity
from agent.proxy.h2conn import H2Conn
from agent.proxy.h2errors import (
    NO_ERROR, ConnectionLost, HboneError, Headers, LocalProtocolError, ProtocolError, RemoteProtocolError,
    StreamReset,
)
from agent.proxy.h2stream import HboneStream
from agent.proxy.tlsio import TlsTransport

__all__ = [
    "HBONE_PORT", "ConnectFailed", "ConnectRefused", "ConnectRequest", "ConnectionLost",
    "HandshakeFailed", "HboneError", "HboneStream", "LocalProtocolError", "PeerNotAllowed",
    "ProtocolError", "RemoteProtocolError", "StreamReset", "format_authority", "format_forwarded",
    "handshake", "header", "parse_authority", "parse_forwarded", "peer_allowed", "peer_identity",
    "serve_hbone",
]

log = logging.getLogger(__name__)

HBONE_PORT = INBOUND_HBONE_PORT
ALPN = "h2"
SERVER_MAX_STREAMS = 1000

Connector = Callable[[str, int], Awaitable[trio.SocketStream]]
ExpectedPeer = Callable[[str], bool] | set[str] | frozenset[str]


# --- errors -----------------------------------------------------------------------------------

class ConnectFailed(HboneError):
    """The TCP connection to a node's HBONE port could not be made."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address, self.reason = address, reason

    def __str__(self) -> str:
        return f"cannot connect to {self.address}: {self.reason}"


class HandshakeFailed(HboneError):
    """The TLS handshake failed, or the peer did not negotiate ALPN "h2"."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address, self.reason = address, reason

    def __str__(self) -> str:
        return f"TLS handshake with {self.address} failed: {self.reason}"


class PeerNotAllowed(HboneError):
    """The peer's certificate does not carry an identity we accept (``peer`` may be None)."""

    def __init__(self, peer: str | None, reason: str) -> None:
        super().__init__(peer, reason)
        self.peer, self.reason = peer, reason

    def __str__(self) -> str:
        return f"peer {self.peer or '(no SPIFFE ID)'} not allowed: {self.reason}"


class ConnectRefused(HboneError):
    """The far node answered the CONNECT with a non-200 status (403 denied, 5xx upstream)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

    def __str__(self) -> str:
        return f"CONNECT refused with status {self.status}"


# --- the request shape --------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)      # pure, and asked on every request (ipaddress is slow)
def parse_authority(authority: str) -> tuple[str, int]:
    """Split an HBONE ``:authority`` (``ip:port``, ``[v6]:port``) into (ip, port).

    Raises ValueError for anything else: HBONE addresses workloads by IP, never by name.
    """
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"authority {authority!r}: brackets are for IPv6 only")
    elif ":" in host:
        raise ValueError(f"authority {authority!r}: IPv6 must be bracketed")
    ip = str(ipaddress.ip_address(host))
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r}: port out of range")
    return ip, port


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def format_forwarded(ip: str) -> str:
    """``Forwarded`` value carrying the source IP (RFC 7239 §6: IPv6 quoted and bracketed)."""
    return f'for="[{ip}]"' if ":" in ip else f"for={ip}"


@functools.lru_cache(maxsize=1024)
def parse_forwarded(value: str) -> str | None:
    """The source IP of the first ``for=`` in a ``Forwarded`` value, or None if absent/invalid."""
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        name, _, token = pair.strip().partition("=")
        if name.strip().lower() != "for":
            continue
        token = token.strip().strip('"')
        if token.startswith("["):
            token = token[1:].partition("]")[0]
        elif token.count(":") == 1:
            token = token.partition(":")[0]     # ip:port
        try:
            return str(ipaddress.ip_address(token))
        except ValueError:
            return None
    return None


def peer_identity(tls: trio.SSLStream | TlsTransport) -> str:
    """The peer's SPIFFE ID: the one URI SAN of its verified certificate (agent.identity reads it).

    Raises PeerNotAllowed when the peer sent no certificate or not exactly one URI SAN.
    """
    try:
        peer = read_peer_identity(tls)
    except PeerIdentityError as e:
        raise PeerNotAllowed(None, str(e)) from None
    return peer if isinstance(peer, str) else peer.uri


async def handshake(tls: trio.SSLStream | TlsTransport, address: str) -> str:
    """Complete the TLS handshake, insist on h2 ALPN; the peer's identity. Raises
    HandshakeFailed, or PeerNotAllowed (no single SPIFFE URI SAN)."""
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as e:
        raise HandshakeFailed(address, repr(e.__cause__ or e)) from e
    proto = tls.selected_alpn_protocol()
    if proto != ALPN:
        raise HandshakeFailed(address, f"ALPN negotiated {proto!r}, HBONE needs {ALPN!r}")
    return peer_identity(tls)


def peer_allowed(expected: ExpectedPeer, identity: str) -> bool:
    """Whether ``identity`` is one ``expected`` accepts (a set of SPIFFE IDs, or a predicate)."""
    return identity in expected if isinstance(expected, (set, frozenset)) else bool(expected(identity))


def header(name: str, value: str) -> tuple[bytes, bytes]:
    """One HTTP/2 header field from text (latin-1, as HTTP field values are)."""
    return name.encode("latin-1"), value.encode("latin-1")


# --- server -----------------------------------------------------------------------------------

@dataclass(eq=False)
class ConnectRequest:
    """One CONNECT on an inbound HBONE connection. The handler answers it exactly once:
    ``accept()`` (200, returns the tunnel's stream) or ``reject(status)``."""

    authority: str
    forwarded_for: str | None
    peer_identity: str
    headers: tuple[tuple[str, str], ...]
    _stream: HboneStream = field(repr=False)
    _answered: int | None = field(default=None, repr=False)

    @property
    def destination(self) -> tuple[str, int]:
        return parse_authority(self.authority)

    @property
    def answered(self) -> int | None:
        """The status sent so far, or None."""
        return self._answered

    async def accept(self) -> HboneStream:
        """Answer 200 and return the stream (raises BrokenResourceError if the client left)."""
        self._answer(200)
        await self._stream.send_headers([(b":status", b"200")])
        return self._stream

    async def reject(self, status: int) -> None:
        """Answer ``status`` (403 denied, 502/503 upstream failure) and end the stream."""
        if not 300 <= status <= 599:
            raise ValueError(f"reject needs an error status, got {status}")
        self._answer(status)
        await _reject(self._stream, status)

    def _answer(self, status: int) -> None:
        if self._answered is not None:
            raise LocalProtocolError(f"request already answered with {self._answered}")
        self._answered = status


async def _reject(stream: HboneStream, status: int) -> None:
    stream.send_headers_nowait([(b":status", str(status).encode())], end_stream=True)
    # The client may still be sending: RST_STREAM(NO_ERROR) tells it to stop (RFC 9113 §8.1).
    stream.abort(NO_ERROR, reset=not stream.received_eof)
    await trio.lowlevel.checkpoint()


async def serve_hbone(tls_stream: trio.SSLStream,
                      handler: Callable[[ConnectRequest], Awaitable[None]], *,
                      max_concurrent_streams: int = SERVER_MAX_STREAMS) -> None:
    """Serve one inbound HBONE connection until the client closes it.

    Completes the TLS handshake, reads the client's SPIFFE ID, then runs ``handler(request)``
    in its own task for every CONNECT stream. Answers by itself: 405 to a non-CONNECT
    request, 400 to a missing or invalid ``:authority`` (or an extended CONNECT), 502 when a
    handler returns without answering or raises. Never raises for the connection's own
    failures: they end it and are logged.
    """
    address = _remote_address(tls_stream)
    # The same TLS connection (context, side, verification), with its record I/O in C.
    taken = TlsTransport.take_over(tls_stream)
    tls: trio.SSLStream | TlsTransport = taken or tls_stream
    try:
        peer = await handshake(tls, address)
        log.debug("HBONE connection from %s as %s", address, peer)
        error: HboneError | None = None
        async with trio.open_nursery() as nursery:
            def on_request(stream: HboneStream, headers: Headers) -> None:
                request = _parse_request(stream, headers, peer)
                if request is not None:
                    nursery.start_soon(_run_handler, handler, request, address)

            conn = H2Conn(tls, client_side=False, max_concurrent_streams=max_concurrent_streams,
                          on_request=on_request)
            try:
                await conn.run()
            except HboneError as e:     # caught here, not around the nursery (no ExceptionGroup)
                error = e
            finally:
                nursery.cancel_scope.cancel()   # the connection is gone: so are its streams
        if error is not None:
            raise error
    except HboneError as e:
        log.info("HBONE connection from %s ended: %s", address, e)
    finally:
        await trio.aclose_forcefully(tls)
        if taken is not None:       # the caller's TCP stream, still open for its addresses
            await trio.aclose_forcefully(tls_stream.transport_stream)


def _parse_request(stream: HboneStream, raw: Headers, peer: str) -> ConnectRequest | None:
    """Answer a malformed request on the spot (None), else describe the CONNECT."""
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    status = None
    if pseudo.get(":method") != "CONNECT":
        status = 405
    elif ":scheme" in pseudo or ":path" in pseudo or ":protocol" in pseudo:
        status = 400      # RFC 9113 §8.5: ordinary CONNECT has :authority only
    else:
        try:
            parse_authority(pseudo.get(":authority", ""))
        except ValueError:
            status = 400
    if status is not None:
        log.info("HBONE request from %s refused with %d: %s", peer, status, pseudo)
        stream.send_headers_nowait([(b":status", str(status).encode())], end_stream=True)
        stream.abort(NO_ERROR, reset=not stream.received_eof)
        return None
    forwarded = next((v for k, v in headers if k == "forwarded"), None)
    return ConnectRequest(
        authority=pseudo[":authority"],
        forwarded_for=parse_forwarded(forwarded) if forwarded is not None else None,
        peer_identity=peer,
        headers=tuple((k, v) for k, v in headers if not k.startswith(":")),
        _stream=stream,
    )


async def _run_handler(handler: Callable[[ConnectRequest], Awaitable[None]],
                       request: ConnectRequest, address: str) -> None:
    stream = request._stream
    # A stream the client resets (or loses) before it is answered ends its handler at once:
    # a flood of CONNECTs reset right away must not leave as many dials running upstream.
    # Once answered, the handler's relay sees the reset itself (and logs it).
    scope = trio.CancelScope()
    stream.on_broken = lambda: scope.cancel() if request.answered is None else None
    try:
        with scope:
            await handler(request)
        if request.answered is None and not scope.cancelled_caught:
            await request.reject(502)
    # The handler is the caller's code; one bad stream must not take the connection down.
    except Exception:
        log.exception("HBONE handler for %s from %s (%s) failed", request.authority,
                      request.peer_identity, address)
        if request.answered is None and stream.broken is None:
            try:
                await request.reject(502)
            except (trio.BrokenResourceError, trio.ClosedResourceError, HboneError):
                pass
    finally:
        await stream.aclose()     # resets the stream unless it finished cleanly both ways


def _remote_address(tls: trio.SSLStream) -> str:
    try:
        host, port = tls.transport_stream.socket.getpeername()[:2]
        return format_authority(host, port)
    except (AttributeError, OSError):
        return "?"

