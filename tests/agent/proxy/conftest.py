"""Fixtures for the proxy tests: a real CA and SPIFFE certificates, TLS 1.3 contexts, an echo
upstream and an HBONE server, all on 127.0.0.1."""
from __future__ import annotations

import datetime as dt
import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from agent.proxy import hbone
from agent.proxy.relay import RelayError, open_marked_tcp_stream, relay
from controller import pki

NOW = dt.datetime.now(dt.timezone.utc)


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


CLIENT_ID = spiffe("shop", "frontend")
SERVER_ID = spiffe("shop", "web")


class Pki:
    """A root CA in tmp_path and TLS contexts for workload identities it signs."""

    def __init__(self, directory: Path, name: str = "root") -> None:
        self.dir = directory
        self.name = name
        self.root = pki.create_root(f"test {name}", now=NOW, ttl=dt.timedelta(days=1))
        self.ca_file = directory / f"{name}-ca.crt"
        pki.write_file(self.ca_file, pki.cert_pem(self.root.cert), secret=False)
        self._n = 0

    def _leaf(self, uri: str) -> tuple[Path, Path]:
        self._n += 1
        key = pki.generate_key()
        cert = pki.issue(self.root, key.public_key(), now=NOW, ttl=dt.timedelta(hours=1), uris=(uri,))
        crt, k = self.dir / f"{self.name}-{self._n}.crt", self.dir / f"{self.name}-{self._n}.key"
        pki.write_file(crt, pki.cert_pem(cert), secret=False)
        pki.write_file(k, pki.key_pem(key), secret=True)
        return crt, k

    def context(self, uri: str, *, server: bool, trust: Pki | None = None,
                alpn: list[str] = ["h2"]) -> ssl.SSLContext:  # noqa: B006
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(*self._leaf(uri))
        ctx.load_verify_locations((trust or self).ca_file)
        ctx.set_alpn_protocols(alpn)
        return ctx


@pytest.fixture
def ca(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def client_ctx(ca: Pki) -> ssl.SSLContext:
    return ca.context(CLIENT_ID, server=False)


async def start_tcp_server(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close; a reset ends it quietly."""
    try:
        while data := await stream.receive_some(256 * 1024):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await start_tcp_server(nursery, echo)


@dataclass
class HboneServer:
    """A test HBONE server: by default each CONNECT is relayed to its authority."""

    ctx: ssl.SSLContext | None = None
    port: int = 0
    requests: list[hbone.ConnectRequest] = field(default_factory=list)
    streams: list[hbone.HboneStream] = field(default_factory=list)
    relay_errors: list[RelayError] = field(default_factory=list)
    tcp_accepted: int = 0
    connections_ended: int = 0
    handler: Callable[[hbone.ConnectRequest], Awaitable[None]] | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait (event-driven, no polling) until ``predicate()`` holds."""
        while not predicate():
            await self._changed.wait()

    async def relay_to_destination(self, req: hbone.ConnectRequest) -> None:
        try:
            upstream = await open_marked_tcp_stream(*req.destination)
        except OSError:
            await req.reject(503)
            return
        async with upstream:
            stream = await req.accept()
            self.streams.append(stream)
            self._notify()
            try:
                await relay(stream, upstream)
            except RelayError as e:
                self.relay_errors.append(e)
                self._notify()

    async def _handle(self, req: hbone.ConnectRequest) -> None:
        self.requests.append(req)
        self._notify()
        await (self.handler or self.relay_to_destination)(req)

    async def _serve(self, tcp: trio.SocketStream) -> None:
        self.tcp_accepted += 1
        self._notify()
        try:
            await hbone.serve_hbone(trio.SSLStream(tcp, self.ctx, server_side=True), self._handle)
        finally:
            self.connections_ended += 1
            self._notify()


async def start_hbone_server(nursery: trio.Nursery, ctx: ssl.SSLContext) -> HboneServer:
    server = HboneServer(ctx=ctx)
    server.port = await start_tcp_server(nursery, server._serve)
    return server


@pytest.fixture
async def server(nursery: trio.Nursery, ca: Pki) -> HboneServer:
    return await start_hbone_server(nursery, ca.context(SERVER_ID, server=True))
