"""The splice relay engine over real TCP sockets on 127.0.0.1: the relay's contract (exact
counts, half-close, reset on error or cancellation), many pairs at once, and back-pressure."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import trio

from agent.proxy.relay import RelayCounters, RelayError, RelayResult
from agent.proxy.splice import SpliceEngine

from tests.agent.proxy.test_relay import read_to_eof, tcp_pair


@pytest.fixture
async def engine(nursery):
    e = SpliceEngine()
    await nursery.start(e.run)
    assert e.available
    yield e


async def test_counts_are_exact_and_eof_propagates_both_ways(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    result: list[RelayResult] = []
    received: dict[str, bytes] = {}

    async def peer(name, stream, payload):
        await stream.send_all(payload)
        await stream.send_eof()
        received[name] = await read_to_eof(stream)

    async def run():
        result.append(await engine.relay(a, b, counters=counters))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(peer, "app", app, b"x" * 3_234_567)
            nursery.start_soon(peer, "upstream", upstream, b"y" * 7_654)
    assert result == [RelayResult(a_to_b=3_234_567, b_to_a=7_654)]
    assert received == {"app": b"y" * 7_654, "upstream": b"x" * 3_234_567}
    assert len(engine) == 0
    for s in (app, a, b, upstream):
        await s.aclose()


async def test_half_close_keeps_the_other_direction_open(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: engine.relay(a, b, counters=counters))
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


async def test_a_reset_on_one_side_resets_both_and_reports_counts(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    errors: list[RelayError] = []

    async def run():
        with pytest.raises(RelayError) as e:
            await engine.relay(a, b)
        errors.append(e.value)

    with trio.fail_after(10):
        await app.send_all(b"12345")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            assert await upstream.receive_some(100) == b"12345"
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await upstream.aclose()                                   # RST
            with pytest.raises(trio.BrokenResourceError):             # the app is reset too
                await read_to_eof(app)
    [err] = errors
    assert err.direction == "b_to_a"
    assert (err.a_to_b, err.b_to_a) == (5, 0)
    assert isinstance(err.__cause__, ConnectionError)
    await app.aclose()


async def test_cancelling_the_relay_resets_both_sides(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.relay, a, b)
                await app.send_all(b"ping")
                assert await upstream.receive_some(100) == b"ping"
                scope.cancel()                   # what the registry does on a policy change
        for peer in (app, upstream):
            with pytest.raises(trio.BrokenResourceError):
                await read_to_eof(peer)
    assert len(engine) == 0
    await app.aclose()
    await upstream.aclose()


async def test_many_pairs_at_once_keep_their_bytes_apart(engine):
    async def one(i: int) -> None:
        (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.relay, a, b)
            for turn in range(20):
                message = f"{i}:{turn}:".encode() * 50
                await app.send_all(message)
                got = b""
                while len(got) < len(message):
                    got += await upstream.receive_some(65536)
                assert got == message
                await upstream.send_all(got[::-1])
                back = b""
                while len(back) < len(message):
                    back += await app.receive_some(65536)
                assert back == message[::-1]
            await app.send_eof()
            await upstream.send_eof()
            assert await read_to_eof(app) == b"" and await read_to_eof(upstream) == b""
        for s in (app, a, b, upstream):
            await s.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
    assert len(engine) == 0


async def test_a_slow_reader_holds_the_writer_back_without_losing_bytes(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    payload = bytes(range(256)) * 40_000                     # 10 MB
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: engine.relay(a, b, counters=counters))

            async def send():
                await app.send_all(payload)
                await app.send_eof()
            nursery.start_soon(send)
            await trio.sleep(0.3)                             # nobody reads: buffers fill up
            held = counters.a_to_b
            assert held < len(payload)                        # the relay is held back...
            got = await read_to_eof(upstream)                 # ...and catches up when read
            assert got == payload
            await upstream.send_eof()
            assert await read_to_eof(app) == b""
    assert counters.a_to_b == len(payload)
    for s in (app, a, b, upstream):
        await s.aclose()


async def test_without_the_engine_thread_the_trio_relay_does_the_job():
    engine = SpliceEngine()                                   # never started
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.relay, a, b)
            await app.send_all(b"hello")
            await app.send_eof()
            assert await read_to_eof(upstream) == b"hello"
            await upstream.send_eof()
            assert await read_to_eof(app) == b""
    for s in (app, a, b, upstream):
        await s.aclose()


async def test_stopping_the_engine_ends_pairs_in_flight():
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    engine = SpliceEngine()
    outcome: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as engine_scope:
                async with trio.open_nursery() as inner:
                    await inner.start(engine.run)

                    async def run():
                        try:
                            await engine.relay(a, b)
                        except RelayError as e:
                            outcome.append(e)
                    outer.start_soon(run)
                    await app.send_all(b"x")
                    assert await upstream.receive_some(10) == b"x"
                    engine_scope.cancel()                     # the agent shutting down
    assert len(outcome) == 1 and "shutting down" in str(outcome[0])
    assert not engine.available
    for s in (app, upstream):
        await s.aclose()


async def test_a_stale_event_of_an_ended_pair_does_not_touch_the_next_owner_of_its_fd(engine):
    """One poll batch: pair 1 ends (its sockets closed at once, as the fast path does) and a
    connection accepted later in the same batch reuses one of its fd numbers. Pair 1's other
    event in that batch must not be applied to the new pair."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def tcp_pair_raw():
        peer = socket.create_connection(srv.getsockname())
        ours, _ = srv.accept()
        ours.setblocking(False)
        return peer, ours

    ended: list[str] = []
    keep: list[socket.socket] = []
    pa1, a1 = tcp_pair_raw()
    pb1, b1 = tcp_pair_raw()

    def fin1(pair):
        ended.append("P1")
        a1.close()
        b1.close()
    engine.adopt(a1, b1, RelayCounters(), fin1, closing=True)
    stall, fresh = socket.socket(), socket.socket()
    for lst in (stall, fresh):
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)

    def on_stall(conn):
        keep.append(conn)
        time.sleep(0.5)                          # holds the engine while events pile up

    def on_fresh(conn):
        peer, up = tcp_pair_raw()
        keep.extend((peer, conn, up))
        engine.adopt(conn, up, RelayCounters(), lambda pair: ended.append("P2"), closing=True)
    engine.listen(stall, on_stall)
    engine.listen(fresh, on_fresh)
    keep.append(socket.create_connection(stall.getsockname()))
    await trio.sleep(0.1)                        # the engine thread sleeps in on_stall
    reset = struct.pack("ii", 1, 0)
    # the peers' numbers are taken again at once, so the new connection's sockets get pair 1's
    pb1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    pb1.close()
    holds = [os.open("/dev/null", os.O_RDONLY)]
    keep.append(socket.create_connection(fresh.getsockname()))
    time.sleep(0.05)
    pa1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    pa1.close()
    holds.append(os.open("/dev/null", os.O_RDONLY))
    await trio.sleep(1.0)
    assert ended == ["P1"]                       # the new pair lives on
    engine.unlisten(stall)
    engine.unlisten(fresh)
    for s in keep + [srv]:
        s.close()
    for fd in holds:
        os.close(fd)


@pytest.mark.parametrize("fin", ["with the data", "later"])
async def test_data_and_fin_in_one_segment_or_apart_give_exact_counts(engine, fin):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    raw = upstream.socket
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: engine.relay(a, b, counters=counters))
            await app.send_all(b"q" * 1000)
            assert await upstream.receive_some(5000) == b"q" * 1000
            if fin == "with the data":                      # corked: the FIN rides on the data
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                await raw.send(b"r" * 1024)
                raw.shutdown(socket.SHUT_WR)
            else:
                await upstream.send_all(b"r" * 1024)
                assert await app.receive_some(5000) == b"r" * 1024
                await trio.sleep(0.05)
                await upstream.send_eof()
            got = await read_to_eof(app)
            await app.send_eof()
            assert await read_to_eof(upstream) == b""
    assert got == (b"r" * 1024 if fin == "with the data" else b"")
    assert (counters.a_to_b, counters.b_to_a) == (1000, 1024)
    for s in (app, a, b, upstream):
        await s.aclose()


async def test_a_long_transfer_after_a_half_close_arrives_whole(engine):
    (app, a), (b, upstream) = await tcp_pair(), await tcp_pair()
    counters = RelayCounters()
    payload = os.urandom(1 << 16) * 80                      # 5 MiB, more than any pipe holds
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: engine.relay(a, b, counters=counters))
            await app.send_all(b"GET")
            await app.send_eof()
            assert await read_to_eof(upstream) == b"GET"

            async def answer():
                await upstream.send_all(payload)
                await upstream.send_eof()
            nursery.start_soon(answer)
            assert await read_to_eof(app) == payload
    assert (counters.a_to_b, counters.b_to_a) == (3, len(payload))
    for s in (app, a, b, upstream):
        await s.aclose()
