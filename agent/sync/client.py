"""client.py: the agent's client of the controller API (the agent's one HTTP client).

Join with a token, get certificates signed, fetch the trust bundle, list + watch resources,
report the version served. The controller is verified with the trust bundle (hostnames as in
any HTTPS client); the agent authenticates with its node certificate once it has one.
Turns transport failures into ``Unreachable`` and API refusals into ``Refused``.

HTTP/1.1 with h11 over ``trio.SSLStream``, keep-alive connections reused one request at a
time; not httpx, whose import (httpcore, anyio, certifi, urllib.request, email, http.cookiejar,
pygments through its CLI) was ~3.5 MB of the idle agent's RSS for these few JSON calls. h11
is loaded anyway for the admin server. Timeouts apply to each connect, send and read, as
httpx's do.
"""
from __future__ import annotations

import json
import select
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlencode, urlsplit

import h11
import trio

PREFIX = "/apis/nodemesh.io/v1alpha1"
WATCH_READ_TIMEOUT = 60.0
MAX_IDLE = 4                     # keep-alive connections kept for reuse


class ControlPlaneError(Exception):
    pass


class Unreachable(ControlPlaneError):
    """The controller could not be reached (or the TLS handshake failed); try again later."""


class Refused(ControlPlaneError):
    """The controller answered with an error; ``code`` is the HTTP status."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{message} (HTTP {code})")
        self.code = code


@dataclass(frozen=True)
class Signed:
    chain_pem: bytes
    bundle_pem: bytes


class ControlPlane:
    def __init__(self, url: str, *, bundle_pem: bytes, credentials: tuple[Path, Path] | None = None,
                 timeout: float = 10.0):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"the controller URL must be https://HOST[:PORT], got {url!r}")
        self._host, self._port, self._authority = parts.hostname, parts.port or 443, parts.netloc
        self._base_path = parts.path
        self._timeout = timeout
        self._bundle, self._credentials = bundle_pem, credentials
        self._ctx = self._make_context()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    def _make_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self._bundle.decode())
        if self._credentials:
            ctx.load_cert_chain(*self._credentials)
        return ctx

    @property
    def bundle_pem(self) -> bytes:
        return self._bundle

    async def update(self, *, bundle_pem: bytes | None = None,
                     credentials: tuple[Path, Path] | None = None) -> None:
        """Use a new trust bundle and/or node credential for new requests (open connections,
        a watch included, are closed: their callers see ``Unreachable`` and connect again)."""
        self._bundle = bundle_pem or self._bundle
        self._credentials = credentials or self._credentials
        self._ctx = self._make_context()
        await self._close_all()

    async def aclose(self) -> None:
        await self._close_all()

    async def trust_domain(self) -> str:
        """The mesh's trust domain, from the (anonymous) health endpoint: needed to ask for a node identity."""
        return (await self._call("GET", "/healthz", prefix=""))["trustDomain"]

    async def join(self, token: str, csr_pem: bytes) -> Signed:
        r = await self._call("POST", "/join", json={"token": token, "csr": csr_pem.decode()})
        return Signed(r["certificate"].encode(), r["trustBundle"].encode())

    async def sign(self, csr_pem: bytes) -> Signed:
        r = await self._call("POST", "/certificates", json={"csr": csr_pem.decode()})
        return Signed(r["certificate"].encode(), r["trustBundle"].encode())

    async def trust_bundle(self) -> bytes:
        return (await self._call("GET", "/trustbundle"))["trustBundle"].encode()

    async def report(self, *, version: int, ready: bool, error: str = "") -> None:
        await self._call("POST", "/nodestatus", json={"version": version, "ready": ready, "error": error})

    async def watch(self, since: int | None) -> AsyncIterator[dict]:
        """Events after ``since`` (all current objects first as ADDED when None), until the stream ends."""
        target = PREFIX + "/watch" + ("" if since is None else "?" + urlencode({"resourceVersion": str(since)}))
        try:
            conn = await self._connect()
        except _TRANSPORT_ERRORS as e:
            raise self._unreachable(e) from None
        try:
            status = await conn.start(self._request("GET", target, None), self._timeout)
            if status != 200:
                raise _refused(status, await conn.read_all(self._timeout))
            pending = b""
            async for chunk in conn.body(WATCH_READ_TIMEOUT):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if pending.strip():
                yield json.loads(pending)
        except _TRANSPORT_ERRORS as e:
            raise self._unreachable(e) from None
        finally:
            await self._discard(conn)

    async def _call(self, method: str, path: str, *, prefix: str = PREFIX, json: object = None) -> dict:
        payload = json   # the keyword shadows the module in here
        try:
            conn = await self._reusable() or await self._connect()
        except _TRANSPORT_ERRORS as e:
            raise self._unreachable(e) from None
        try:
            status = await conn.start(self._request(method, prefix + path, payload), self._timeout)
            data = await conn.read_all(self._timeout)
        except BaseException as e:
            await self._discard(conn)
            if isinstance(e, _TRANSPORT_ERRORS):
                raise self._unreachable(e) from None
            raise
        if conn.reusable() and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            await self._discard(conn)
        if status >= 400:
            raise _refused(status, data)
        return _loads(data)

    # --- connections -------------------------------------------------------------------------

    def _request(self, method: str, target: str, payload: object) -> tuple[h11.Request, bytes]:
        headers = [("Host", self._authority), ("User-Agent", "nodemesh-agent"), ("Accept", "*/*")]
        data = b""
        if payload is not None:
            data = _dumps(payload).encode()
            headers.append(("Content-Type", "application/json"))
        if payload is not None or method in ("POST", "PUT"):
            headers.append(("Content-Length", str(len(data))))
        return h11.Request(method=method, target=self._base_path + target, headers=headers), data

    async def _reusable(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
            await self._discard(conn)
        return None

    async def _connect(self) -> _Connection:
        with trio.fail_after(self._timeout):
            tcp = await trio.open_tcp_stream(self._host, self._port)
            stream = trio.SSLStream(tcp, self._ctx, server_hostname=self._host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        conn = _Connection(stream)
        self._open.add(conn)
        return conn

    async def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        await trio.aclose_forcefully(conn.stream)

    async def _close_all(self) -> None:
        for conn in list(self._open):
            await self._discard(conn)

    def _unreachable(self, e: BaseException) -> Unreachable:
        if isinstance(e, trio.TooSlowError):
            e = TimeoutError("timed out")
        elif isinstance(e, trio.BrokenResourceError) and e.__cause__ is not None:
            e = e.__cause__   # the ssl.SSLError or OSError underneath
        return Unreachable(f"controller {self.url}: {e or type(e).__name__}")


_loads = json.loads
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                     h11.ProtocolError)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _Connection:
    """One HTTP/1.1 connection to the controller: one request at a time, then maybe the next."""

    def __init__(self, stream: trio.SSLStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    def alive(self) -> bool:
        """Idle and not closed by the controller (an idle socket that reads is at EOF)."""
        try:
            readable, _, _ = select.select([self.stream.transport_stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def reusable(self) -> bool:
        """After a complete exchange: ready for the next request (else the connection must go)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    async def start(self, request: tuple[h11.Request, bytes], timeout: float) -> int:
        """Send ``request`` (head, body); read the response head and return its status."""
        head, data = request
        with trio.fail_after(timeout):
            out = self.h11.send(head) + (self.h11.send(h11.Data(data=data)) if data else b"")
            await self.stream.send_all(out + self.h11.send(h11.EndOfMessage()))
        while True:
            event = await self._next(timeout)
            if isinstance(event, h11.Response):
                return event.status_code
            if not isinstance(event, h11.InformationalResponse):
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before the response")

    async def body(self, read_timeout: float) -> AsyncIterator[bytes]:
        """The response body as it arrives; each read waits at most ``read_timeout``."""
        while True:
            event = await self._next(read_timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in the response body")

    async def read_all(self, timeout: float) -> bytes:
        return b"".join([chunk async for chunk in self.body(timeout)])

    async def _next(self, timeout: float):
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(timeout):
                    self.h11.receive_data(await self.stream.receive_some(64 * 1024))
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the controller closed the connection")
            return event


def _refused(status: int, body: bytes) -> Refused:
    text = body.decode("utf-8", "replace")
    try:
        message = _loads(body).get("message") or text
    except (ValueError, AttributeError):
        message = text
    return Refused(status, message.strip())
