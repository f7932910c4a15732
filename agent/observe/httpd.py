"""httpd.py: a tiny HTTP/1.1 server on trio and h11 for the agent's admin, metrics and readiness
ports — plain HTTP, GET and HEAD, plus POST where a route allows it.

Owns connections: request framing, size and idle limits, keep-alive, 404/405 answers. Knows
nothing of what the routes serve. One bad connection never takes the listener down: every
per-connection task ends in one ``except``. (The controller has its own server; the agent may
not import it.)
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Union
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger("nodemesh.agent.httpd")

Reply = tuple[int, str, bytes]                      # (status, content type, body)
Handler = Callable[[], Union[Reply, Awaitable[Reply]]]

MAX_REQUEST_BYTES = 64 * 1024                       # request line + headers, and separately the body
IDLE_TIMEOUT = 30.0                                 # to receive one whole request


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]                         # names lower-cased
    body: bytes


@dataclass(frozen=True)
class Route:
    """A route that needs the request, or allows POST. A plain ``Handler`` serves GET only."""

    get: Callable[[Request], Union[Reply, Awaitable[Reply]]]
    post: Callable[[Request], Union[Reply, Awaitable[Reply]]] | None = None


Routes = Mapping[str, Union[Handler, Route]]


def json_reply(value, status: int = 200) -> Reply:
    """``value`` as indented JSON (for people reading admin output)."""
    return status, "application/json", json.dumps(value, indent=2, default=str).encode() + b"\n"


def text_reply(text: str, status: int = 200) -> Reply:
    return status, "text/plain; charset=utf-8", text.encode() + b"\n"


async def serve_http(
    routes: Routes,
    host: str,
    port: int,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (exact paths; the query string is not part of the match) until cancelled.

    Start it with ``nursery.start``: it calls ``task_status.started(bound_port)`` once listening,
    so ``port`` may be 0. Unknown paths get 404 with the known paths; a method the route does
    not allow gets 405 with ``Allow``; a handler that raises gets 500 (and is logged).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def connection(stream: trio.SocketStream) -> None:
        await _connection(routes, stream, idle_timeout, max_request_bytes)

    await trio.serve_listeners(connection, listeners)


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _connection(routes: Routes, stream: trio.SocketStream, idle_timeout: float, limit: int) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    try:
        while True:
            with trio.fail_after(idle_timeout):
                request = await _read_request(conn, stream, limit)
            if request is None:
                return
            status, ctype, body, extra = await _dispatch(routes, request)
            await _send(conn, stream, status, ctype, body, extra, head_only=request.method == "HEAD")
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
        log.exception("HTTP connection failed")
    finally:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await stream.aclose()


async def _read_request(conn: h11.Connection, stream, limit: int) -> Request | None:
    head, body = None, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
            # h11 limits only a head still incomplete; one that arrived whole is measured here
            if len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers) > limit:
                raise _Reject(431, f"request head larger than {limit} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise _Reject(413, f"request body larger than {limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            break
    parts = urlsplit(head.target.decode("latin-1"))
    return Request(
        method=head.method.decode("ascii", "replace").upper(),
        path=parts.path,
        query=parse_qs(parts.query, keep_blank_values=True),
        headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
        body=bytes(body),
    )


async def _dispatch(routes: Routes, req: Request) -> tuple[int, str, bytes, list[tuple[str, str]]]:
    route = routes.get(req.path)
    if route is None:
        status, ctype, body = json_reply({"error": f"no such path: {req.path}",
                                          "paths": sorted(routes)}, 404)
        return status, ctype, body, []
    allowed = ["GET", "HEAD"] + (["POST"] if isinstance(route, Route) and route.post else [])
    if req.method not in allowed:
        status, ctype, body = json_reply({"error": f"method {req.method} not allowed on {req.path}",
                                          "allow": allowed}, 405)
        return status, ctype, body, [("allow", ", ".join(allowed))]
    try:
        if isinstance(route, Route):
            result = (route.post if req.method == "POST" else route.get)(req)
        else:
            result = route()
        if inspect.isawaitable(result):
            result = await result
        status, ctype, body = result
    except Exception as e:
        log.exception("handler for %s %s failed", req.method, req.path)
        status, ctype, body = json_reply({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
    return status, ctype, body, []


async def _send(conn: h11.Connection, stream, status: int, ctype: str, body: bytes,
                extra: list[tuple[str, str]], *, head_only: bool) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(body))),
               ("cache-control", "no-store")] + extra
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    if body and not head_only:
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _reject(conn: h11.Connection, stream, status: int, message: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    _, ctype, body = json_reply({"error": message}, status)
    try:
        await stream.send_all(conn.send(h11.Response(
            status_code=status,
            headers=[("content-type", ctype), ("content-length", str(len(body))), ("connection", "close")])))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
