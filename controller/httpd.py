"""httpd.py: a small HTTP/1.1 server on trio and h11, for the controller's API and metrics.

Owns connections: TLS handshake, request framing, keep-alive, body limits, streaming
(chunked) responses, and handing each request with its verified peer certificate to one
handler. Knows nothing of routes, resources or auth. One bad connection never takes the
listener down: every per-connection task ends in one ``except``.
"""
from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger("nodemesh.httpd")

MAX_BODY = 16 * 1024 * 1024
ANONYMOUS_MAX_BODY = 64 * 1024   # a caller without a client certificate can only join: a CSR and a token
IDLE_TIMEOUT = 60.0
HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer_cert: bytes | None  # DER of the verified client certificate, if one was presented
    peer_addr: str

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self):
        """The body decoded as JSON; raises HttpError(400) with the parser's position."""
        try:
            return json.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, "BadRequest", f"request body is not valid JSON: {e}") from None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, value) -> "Response":
        return cls(status, json.dumps(value, separators=(",", ":")).encode() + b"\n")


@dataclass
class StreamResponse:
    """A response whose body is produced over time (a watch); sent chunked."""

    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "application/x-ndjson"


class HttpError(Exception):
    """An error the handler answers with a Kubernetes-style Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None,
                 headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details
        self.headers = headers or []

    def response(self) -> Response:
        status = {"apiVersion": "v1", "kind": "Status", "status": "Failure",
                  "code": self.code, "reason": self.reason, "message": self.message}
        if self.details:
            status["details"] = self.details
        r = Response.json(self.code, status)
        r.headers = list(self.headers)
        return r


Handler = Callable[[Request], Awaitable["Response | StreamResponse"]]


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    ssl_context: Callable[[], ssl.SSLContext] | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on host:port until cancelled.

    ``ssl_context`` is called for each new connection, so a rotated certificate applies to new
    connections at once. Calls ``task_status.started(bound_port)`` once listening, so callers
    may pass port 0.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)

    async def accept(stream):
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context(), server_side=True, https_compatible=True)
        await _connection(handler, stream)

    await trio.serve_listeners(accept, listeners)


async def _connection(handler: Handler, stream: trio.abc.Stream) -> None:
    peer_addr = _peer_addr(stream)
    try:
        peer_cert = None
        if isinstance(stream, trio.SSLStream):
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            peer_cert = stream.getpeercert(binary_form=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            request = await _read_request(conn, stream, peer_cert, peer_addr)
            if request is None:
                return
            try:
                response = await handler(request)
            except HttpError as e:
                response = e.response()
            await _send(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return
    except _Reject as e:
        await _reject(conn, stream, e.status, e.message)
    except h11.RemoteProtocolError as e:
        await _reject(conn, stream, e.error_status_hint, f"malformed HTTP request: {e}")
    except Exception:  # one bad connection must never take the listener down
        log.exception("connection from %s failed", peer_addr)
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


async def _read_request(conn, stream, peer_cert, peer_addr) -> Request | None:
    head = None
    body = bytearray()
    with trio.fail_after(IDLE_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                limit = MAX_BODY if peer_cert else ANONYMOUS_MAX_BODY
                if len(body) > limit:
                    raise _Reject(413, f"request body larger than {limit} bytes"
                                       + ("" if peer_cert else " (without a client certificate)"))
            elif isinstance(event, h11.EndOfMessage):
                break
    target = head.target.decode("latin-1")
    parts = urlsplit(target)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
    return Request(
        method=head.method.decode("ascii"),
        path=parts.path,
        query=parse_qs(parts.query),
        headers=headers,
        body=bytes(body),
        peer_cert=peer_cert,
        peer_addr=peer_addr,
    )


async def _send(conn: h11.Connection, stream, response) -> None:
    if isinstance(response, StreamResponse):
        headers = [("content-type", response.content_type), ("cache-control", "no-cache")]
        await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
        try:
            async for chunk in response.chunks:
                await stream.send_all(conn.send(h11.Data(data=chunk)))
        finally:
            aclose = getattr(response.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return
    headers = [("content-type", response.content_type),
               ("content-length", str(len(response.body)))] + list(response.headers)
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
    if response.body:
        await stream.send_all(conn.send(h11.Data(data=response.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _reject(conn: h11.Connection, stream, status: int, message: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = HttpError(status, "BadRequest", message).response().body
    try:
        await stream.send_all(conn.send(h11.Response(
            status_code=status,
            headers=[("content-type", "application/json"), ("content-length", str(len(body))),
                     ("connection", "close")])))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass


def _peer_addr(stream) -> str:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        host, port = inner.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "?"
