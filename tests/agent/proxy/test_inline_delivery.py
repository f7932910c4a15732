"""Inline delivery (HboneStream.set_sink, used by the relay towards a TCP socket) and the
relay's send without a checkpoint (HboneStream.send_nowait): order, exact counts, backpressure."""
from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from agent.proxy import hbone, hbone_pool
from agent.proxy.relay import RelayCounters, RelayError, open_marked_tcp_stream, relay
from tests.agent.proxy.conftest import SERVER_ID, start_tcp_server
from tests.agent.proxy.test_h2conn import pair  # noqa: F401  (a fixture)

MiB = 1024 * 1024


class Sink:
    """A sink that records its offers and takes ``take(offer_index, data)`` bytes of each."""

    def __init__(self, take=lambda i, data: len(data)) -> None:
        self.offers: list[bytes] = []
        self.taken = bytearray()
        self._take = take

    def __call__(self, data) -> int:
        data = bytes(data)
        n = self._take(len(self.offers), data)
        self.offers.append(data)
        self.taken += data[:n]
        return n


async def _receiving(stream, sink: Sink, out: bytearray) -> None:
    stream.set_sink(sink)
    try:
        while data := await stream.receive_some():
            out.extend(data)
    finally:
        stream.set_sink(None)


@asynccontextmanager
async def _sinking(pair, sink: Sink):
    """A new stream of ``pair`` whose server end is read to EOF by a task with ``sink`` set;
    yields (client end, server end, what the task read). Leaving waits for that task."""
    stream = await pair.open()
    [server_stream] = pair.server_streams
    read = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receiving, server_stream, sink, read)
        await trio.testing.wait_all_tasks_blocked()
        yield stream, server_stream, read


async def test_a_waiting_receiver_is_not_woken_what_its_sink_takes_counts_as_read(pair):
    sink = Sink()
    async with _sinking(pair, sink) as (stream, server_stream, read):
        for i in range(3):
            await stream.send_all(bytes([i]) * 1000)
            await trio.testing.wait_all_tasks_blocked()
        assert sink.offers == [bytes([i]) * 1000 for i in range(3)]
        assert read == b"" and server_stream._buffered == 0
        assert pair.server._unacked[server_stream.stream_id] == 3000          # read, acknowledged in a batch later
        await stream.send_eof()
    assert read == b""
    assert server_stream._sink is None


async def test_what_the_sink_does_not_take_is_read_after_in_order(pair):
    # The first offer is taken in part, later ones (the receiver is busy or woken) not at all.
    sink = Sink(lambda i, data: 100 if i == 0 else 0)
    payload = os.urandom(50_000)
    async with _sinking(pair, sink) as (stream, _, read):
        for off in range(0, len(payload), 5000):
            await stream.send_all(payload[off:off + 5000])
        await stream.send_eof()
    assert bytes(sink.taken) + bytes(read) == payload
    assert len(sink.taken) == 100


async def test_frames_of_one_read_are_offered_in_one_piece(pair):
    sink = Sink()
    async with _sinking(pair, sink) as (stream, _, read):
        h2 = pair.client._h2
        h2.send_data(stream.stream_id, b"a" * 10)
        h2.send_data(stream.stream_id, b"b" * 10)
        pair.client.write_out()                        # two DATA frames, one write
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_eof()
    assert sink.offers == [b"a" * 10 + b"b" * 10]
    assert read == b""


async def test_no_offer_while_the_receiver_is_not_waiting(pair):
    stream = await pair.open()
    [server_stream] = pair.server_streams
    sink = Sink()
    server_stream.set_sink(sink)
    await stream.send_all(b"x" * 1000)
    await trio.testing.wait_all_tasks_blocked()
    assert sink.offers == [] and server_stream._buffered == 1000
    assert await server_stream.receive_some() == b"x" * 1000


async def test_send_nowait_sends_at_once_or_sends_nothing(pair):
    stream = await pair.open()
    [server_stream] = pair.server_streams
    await trio.testing.wait_all_tasks_blocked()
    before = len(pair.client_wire.writes)
    assert stream.send_nowait(b"x" * 1000)
    assert len(pair.client_wire.writes) == before + 1
    pair.client_wire.block()
    assert stream.send_nowait(b"y" * 10)               # taken: queued behind the kernel
    assert not stream.send_nowait(b"z" * 10)           # backed up: nothing more queued
    assert pair.client_wire.unsent == 9 + 10
    pair.client_wire.unblock()
    await stream.send_all(b"z" * 10)
    too_big = b"w" * (pair.client.send_window(stream.stream_id) + 1)
    assert not stream.send_nowait(too_big)             # beyond the window: send_all's job
    read = bytearray()
    while len(read) < 1020:
        read += await server_stream.receive_some()
    assert read == b"x" * 1000 + b"y" * 10 + b"z" * 10
    await stream.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        stream.send_nowait(b"late")


# --- through the relay, over real sockets ------------------------------------------------------

async def _tunnel(nursery, ca, client_ctx, upstream_handler):
    """An HBONE server relaying each stream to a TCP upstream run by ``upstream_handler``;
    returns (pool-open kwargs, relay results, relay counters)."""
    upstream_port = await start_tcp_server(nursery, upstream_handler)
    counters: list[RelayCounters] = []
    errors: list[RelayError] = []

    async def handler(req) -> None:
        upstream = await open_marked_tcp_stream("127.0.0.1", upstream_port)
        async with upstream:
            stream = await req.accept()
            counters.append(RelayCounters())
            try:
                await relay(stream, upstream, counters=counters[-1])
            except RelayError as e:
                errors.append(e)

    async def on_tcp(tcp):
        await hbone.serve_hbone(trio.SSLStream(tcp, ctx, server_side=True), handler)

    ctx = ca.context(SERVER_ID, server=True)
    port = await start_tcp_server(nursery, on_tcp)
    kw = dict(node_address=("127.0.0.1", port), source_identity="spiffe://cluster.local/ns/shop/sa/frontend",
              expected_peer=frozenset({SERVER_ID}), ssl_context=client_ctx, forwarded_for="10.0.0.1")
    return kw, counters, errors


async def test_a_slow_tcp_consumer_holds_the_sender_back_and_loses_nothing(nursery, ca, client_ctx):
    reading = trio.Event()
    got = bytearray()
    upstream_done = trio.Event()

    async def slow_upstream(stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await reading.wait()
        while data := await stream.receive_some(65536):
            got.extend(data)
        await stream.send_eof()
        upstream_done.set()

    kw, counters, errors = await _tunnel(nursery, ca, client_ctx, slow_upstream)
    total = 24 * MiB
    payload = os.urandom(total)           # random: a lost or reordered chunk shows
    sent = 0
    with trio.fail_after(30):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open("127.0.0.1:9", **kw)

            async def sender():
                nonlocal sent
                for off in range(0, total, 64 * 1024):
                    await stream.send_all(payload[off:off + 64 * 1024])
                    sent += 64 * 1024
                await stream.send_eof()

            async with trio.open_nursery() as inner:
                inner.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked()
                # Held back: one stream window plus what the sockets on the way hold.
                assert sent < total
                assert counters[0].a_to_b < total
                reading.set()
            assert await stream.receive_some() == b""
            await stream.aclose()
        await upstream_done.wait()
    assert bytes(got) == payload
    assert errors == []
    assert (counters[0].a_to_b, counters[0].b_to_a) == (total, 0)


async def test_request_response_counts_are_exact_both_ways(nursery, ca, client_ctx):
    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()

    kw, counters, errors = await _tunnel(nursery, ca, client_ctx, echo)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open("127.0.0.1:9", **kw)
            for i in range(200):
                message = bytes([i % 256]) * (1 + i * 37)
                await stream.send_all(message)
                back = bytearray()
                while len(back) < len(message):
                    back += await stream.receive_some()
                assert back == message
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
    expected = sum(1 + i * 37 for i in range(200))
    await trio.testing.wait_all_tasks_blocked()
    assert errors == []
    assert (counters[0].a_to_b, counters[0].b_to_a) == (expected, expected)


async def test_an_upstream_reset_during_inline_delivery_is_a_relay_error(nursery, ca, client_ctx):
    async def resetting(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()             # RST: the relay's next write fails

    kw, counters, errors = await _tunnel(nursery, ca, client_ctx, resetting)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open("127.0.0.1:9", **kw)
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(1000):
                    await stream.send_all(b"x" * 1000)
                    await trio.sleep(0.001)
                await stream.receive_some()
            await stream.aclose()
        while not errors:
            await trio.sleep(0.01)
    assert isinstance(errors[0], RelayError)

