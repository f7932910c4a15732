"""Fixtures for the observability shell: a real HTTP server on 127.0.0.1, port 0."""
from __future__ import annotations

import functools
import logging

import httpx
import pytest
import trio

from agent.observe.httpd import serve_http


@pytest.fixture
async def serve(nursery):
    """``await serve(routes, **kw)`` starts serve_http on 127.0.0.1:0 and returns the port."""
    async def start(routes, **kw) -> int:
        return await nursery.start(functools.partial(serve_http, routes, "127.0.0.1", 0, **kw))
    return start


async def http(method: str, port: int, path: str, **kw) -> httpx.Response:
    """One request with httpx, in a worker thread, bounded by 10 s."""
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(
            lambda: httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=5, **kw))


async def raw(port: int, data: bytes, *, timeout: float = 5) -> bytes:
    """Send ``data`` (then EOF) on a fresh TCP connection and read until the server closes it.
    With no data, send nothing and keep the connection open: only the server can end it."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if data:
                await stream.send_all(data)
                await stream.send_eof()
            out = bytearray()
            while chunk := await stream.receive_some(65536):
                out += chunk
            return bytes(out)


@pytest.fixture
def restore_log_levels():
    """Put every nodemesh logger's own level back after a test that changes them."""
    names = ["nodemesh"] + [n for n, lg in logging.root.manager.loggerDict.items()
                            if isinstance(lg, logging.Logger) and n.startswith("nodemesh.")]
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (name == "nodemesh" or name.startswith("nodemesh.")):
            lg.setLevel(saved.get(name, logging.NOTSET))
