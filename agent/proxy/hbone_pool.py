"""hbone_pool.py: the HBONE client's connection pool (DESIGN "Tunnel: HBONE").

Owns pooled HTTP/2-over-mTLS connections per (source identity, expected peer, node address):
dialling (TCP, TLS handshake, peer SPIFFE-ID check), reuse within stream limits, closing idle
connections. Decides nothing: callers say where to go and whom to expect.
"""
from __future__ import annotations

import copy
import logging
import ssl
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from agent.proxy.h2conn import H2Conn
from agent.proxy.h2errors import CANCEL, NO_ERROR, HboneError, Headers, RemoteProtocolError
from agent.proxy.h2stream import HboneStream
from agent.proxy.hbone import (
    ConnectFailed, Connector, ConnectRefused, ExpectedPeer, PeerNotAllowed,
    format_authority, format_forwarded, handshake, header, parse_authority, peer_allowed,
)
from agent.proxy.relay import open_marked_tcp_stream
from agent.proxy.tlsio import TlsTransport

__all__ = ["HbonePool", "PoolStats", "open_hbone_pool"]

log = logging.getLogger("agent.proxy.hbone")     # one logger for the tunnel, as before

PoolKey = tuple[str, Hashable, tuple[str, int]]


@dataclass(frozen=True)
class PoolStats:
    connections: int
    streams: int


@dataclass(eq=False)
class _Dial:
    done: trio.Event = field(default_factory=trio.Event)
    error: HboneError | None = None


class HbonePool:
    """Pooled HBONE connections per (source identity, expected peer, node address).

    Make one with ``open_hbone_pool``. A connection is shared by up to
    ``max_streams_per_connection`` streams (or the server's limit if lower) and closed after
    ``idle_timeout`` seconds without streams.
    """

    def __init__(self, nursery: trio.Nursery, *, connect: Connector,
                 max_streams_per_connection: int, idle_timeout: float) -> None:
        self._nursery = nursery
        self._connect = connect
        self._max_streams = max_streams_per_connection
        self._idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[H2Conn]] = {}
        self._dials: dict[PoolKey, _Dial] = {}
        self._closed = False

    def stats(self) -> PoolStats:
        conns = [c for cs in self._conns.values() for c in cs if c.alive]
        return PoolStats(connections=len(conns), streams=sum(c.active_streams for c in conns))

    async def open(self, target: str, *, node_address: tuple[str, int], source_identity: str,
                   expected_peer: ExpectedPeer, ssl_context: ssl.SSLContext,
                   forwarded_for: str) -> HboneStream:
        """Open a CONNECT tunnel to ``target`` (``ip:port``) through the node at ``node_address``.

        Reuses a pooled connection with a free stream slot, else dials one (concurrent opens
        for the same key share a single dial). Returns the stream after the 200 response.
        Raises ConnectFailed, HandshakeFailed, PeerNotAllowed (server identity not expected),
        ConnectRefused(status), StreamReset or ConnectionLost; ValueError for a bad target.
        """
        ip, port = parse_authority(target)
        if self._closed:
            raise trio.ClosedResourceError("HBONE pool is closed")
        peer_key: Hashable = frozenset(expected_peer) if isinstance(expected_peer, (set, frozenset)) else expected_peer
        key: PoolKey = (source_identity, peer_key, (node_address[0], int(node_address[1])))
        conn = await self._checkout(key, ssl_context, expected_peer)
        # No checkpoint between choosing the connection and taking its slot.
        stream = conn.open_stream_nowait([
            header(":method", "CONNECT"), header(":authority", format_authority(ip, port)),
            header("forwarded", format_forwarded(forwarded_for)),
        ])
        try:
            response = await stream.wait_response()
        except BaseException:
            stream.abort(CANCEL)
            raise
        status = _status(response)
        if status != 200:
            stream.abort(NO_ERROR if stream.received_eof else CANCEL)
            raise ConnectRefused(status)
        return stream

    async def _checkout(self, key: PoolKey, ssl_context: ssl.SSLContext,
                        expected_peer: ExpectedPeer) -> H2Conn:
        while True:
            for conn in self._conns.get(key, ()):
                limit = min(self._max_streams, conn.peer_max_streams)
                if conn.accepting_streams and conn.active_streams < limit:
                    return conn
            dial = self._dials.get(key)
            if dial is not None:
                await dial.done.wait()
                if dial.error is not None:
                    raise copy.copy(dial.error) from dial.error
                continue            # dialled (or the dialler was cancelled): look again
            dial = self._dials[key] = _Dial()
            try:
                return await self._dial(key, ssl_context, expected_peer)
            except HboneError as e:
                dial.error = e
                raise
            finally:
                del self._dials[key]
                dial.done.set()

    async def _dial(self, key: PoolKey, ssl_context: ssl.SSLContext,
                    expected_peer: ExpectedPeer) -> H2Conn:
        host, port = key[2]
        address = format_authority(host, port)
        try:
            tcp = await self._connect(host, port)
        except OSError as e:
            raise ConnectFailed(address, repr(e)) from e
        tls = TlsTransport.over(tcp, ssl_context, server_side=False)
        try:
            identity = await handshake(tls, address)
            if not peer_allowed(expected_peer, identity):
                raise PeerNotAllowed(identity, f"not the identity expected at {address}")
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        conn = H2Conn(tls, client_side=True)
        await self._nursery.start(self._run_conn, key, conn)
        return conn

    async def _run_conn(self, key: PoolKey, conn: H2Conn, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._conns.setdefault(key, []).append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_idle, key, conn)
                try:
                    await conn.run(task_status=task_status)
                except HboneError as e:
                    log.info("HBONE connection to %s ended: %s", key[2], e)
                nursery.cancel_scope.cancel()
        finally:
            self._forget(key, conn)

    async def _close_when_idle(self, key: PoolKey, conn: H2Conn) -> None:
        # Woken only when the last stream ends, not per stream: sleeps to the deadline, then
        # looks whether the connection stayed idle all along.
        while conn.alive:
            await conn.wait_idle()
            since = conn.idle_since
            if since is None:
                continue
            if trio.current_time() < since + self._idle_timeout:
                await trio.sleep_until(since + self._idle_timeout)
                continue
            self._forget(key, conn)      # first, so no open() picks it while it closes
            await conn.aclose()
            return

    def _forget(self, key: PoolKey, conn: H2Conn) -> None:
        conns = self._conns.get(key, [])
        if conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    async def _aclose(self) -> None:
        self._closed = True
        conns = [c for cs in self._conns.values() for c in cs]
        self._conns.clear()
        for conn in conns:
            await conn.aclose()


def _status(headers: Headers) -> int:
    for k, v in headers:
        if k == b":status":
            try:
                return int(v)
            except ValueError:
                break
    raise RemoteProtocolError("response without a valid :status")


@asynccontextmanager
async def open_hbone_pool(*, connect: Connector = open_marked_tcp_stream,
                          max_streams_per_connection: int = 100,
                          idle_timeout: float = 60.0) -> AsyncIterator[HbonePool]:
    """Run an HBONE client pool; on exit every pooled connection is closed (GOAWAY)."""
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        pool = HbonePool(nursery, connect=connect, max_streams_per_connection=max_streams_per_connection,
                         idle_timeout=idle_timeout)
        try:
            yield pool
        except Exception as e:          # re-raised below, unwrapped by the nursery
            body_error = e
        finally:
            with trio.CancelScope(shield=True):
                await pool._aclose()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
