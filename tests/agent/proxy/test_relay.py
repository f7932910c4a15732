"""The byte relay over real TCP sockets on 127.0.0.1: counts, half-close, abort on error."""
from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio

from agent.proxy.relay import READ_SIZES, RelayCounters, RelayError, RelayResult, relay


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    return client, server


async def read_to_eof(stream) -> bytes:
    buf = bytearray()
    while data := await stream.receive_some(65536):
        buf += data
    return bytes(buf)


async def test_counts_are_exact_and_eof_propagates_both_ways():
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    result: list[RelayResult] = []
    received: dict[str, bytes] = {}

    async def peer(name, stream, payload):
        await stream.send_all(payload)
        await stream.send_eof()
        received[name] = await read_to_eof(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(result, relay(a, b, counters=counters)))
            nursery.start_soon(peer, "app", app, b"x" * 1_234_567)
            nursery.start_soon(peer, "upstream", upstream, b"y" * 7_654)
    assert result == [RelayResult(a_to_b=1_234_567, b_to_a=7_654)]
    assert (counters.a_to_b, counters.b_to_a) == (1_234_567, 7_654)
    assert received == {"app": b"y" * 7_654, "upstream": b"x" * 1_234_567}
    for s in (app, a, b, upstream):
        await s.aclose()


async def _collect(out, coro):
    out.append(await coro)


async def test_half_close_keeps_the_other_direction_open_and_counters_move_live():
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, a, b, counters=counters))
            await app.send_all(b"request")
            await app.send_eof()
            assert await read_to_eof(upstream) == b"request"       # upstream saw EOF...
            assert counters.a_to_b == 7 and counters.b_to_a == 0   # counted before the EOF went out
            await upstream.send_all(b"late reply")                  # ...and can still answer
            assert await app.receive_some(100) == b"late reply"
            await upstream.send_eof()
            assert await app.receive_some(100) == b""
    assert (counters.a_to_b, counters.b_to_a) == (7, 10)
    for s in (app, a, b, upstream):
        await s.aclose()


async def test_an_error_on_one_side_aborts_both_and_reports_counts():
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    with trio.fail_after(10):
        await app.send_all(b"12345")
        async with trio.open_nursery() as nursery:
            async def run():
                with pytest.raises(RelayError) as e:
                    await relay(a, b)
                errors.append(e.value)
            errors: list[RelayError] = []
            nursery.start_soon(run)
            assert await upstream.receive_some(100) == b"12345"
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await upstream.aclose()                                   # RST
            # The app side is reset too, not left waiting on a half-dead relay.
            with pytest.raises(trio.BrokenResourceError):
                await read_to_eof(app)
    [err] = errors
    assert err.direction == "b_to_a"
    assert (err.a_to_b, err.b_to_a) == (5, 0)
    assert isinstance(err.__cause__, trio.BrokenResourceError)
    await app.aclose()


class RecordingStream(trio.abc.HalfCloseableStream):
    """Hands out a scripted payload and records the read sizes asked for."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.asked, self.sent, self.eof = payload, [], bytearray(), False

    async def receive_some(self, max_bytes=None):
        await trio.lowlevel.checkpoint()
        self.asked.append(max_bytes)
        data, self.payload = self.payload[:max_bytes], self.payload[max_bytes:]
        return data

    async def send_all(self, data):
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def send_eof(self):
        await trio.lowlevel.checkpoint()
        self.eof = True

    async def wait_send_all_might_not_block(self):
        await trio.lowlevel.checkpoint()

    async def aclose(self):
        await trio.lowlevel.checkpoint()


async def test_reads_grow_when_they_fill_the_buffer():
    size = 1024 + 16 * 1024 + 3 * 256 * 1024 + 10
    a, b = RecordingStream(b"p" * size), RecordingStream(b"")
    with trio.fail_after(5):
        result = await relay(a, b)
    assert result == RelayResult(size, 0)
    assert a.asked[:4] == [READ_SIZES[0], READ_SIZES[1], READ_SIZES[2], READ_SIZES[2]]
    assert len(b.sent) == size and b.eof and a.eof
