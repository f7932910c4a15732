"""HBONE end to end: a real CA, TLS 1.3 mTLS and HTTP/2 CONNECT on 127.0.0.1."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct

import pytest
import trio
import trio.testing

from agent.base.constants import PROXY_MARK
from agent.proxy import hbone, hbone_pool
from agent.proxy.h2conn import STREAM_WINDOW, H2Conn
from agent.proxy.h2errors import CANCEL
from agent.proxy.relay import RelayError, open_marked_tcp_stream
from tests.agent.proxy.conftest import (
    CLIENT_ID, SERVER_ID, Pki, spiffe, start_hbone_server, start_tcp_server,
)

MiB = 1024 * 1024


def open_args(server, client_ctx, *, expected_peer=frozenset({SERVER_ID})):
    return dict(node_address=("127.0.0.1", server.port), source_identity=CLIENT_ID,
                expected_peer=expected_peer, ssl_context=client_ctx, forwarded_for="10.1.2.3")


async def receive_exactly(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def receive_all(stream) -> bytes:
    buf = bytearray()
    while data := await stream.receive_some():
        buf += data
    return bytes(buf)


async def test_request_crosses_the_tunnel_with_identity_authority_and_source(server, echo_port, client_ctx):
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await stream.send_all(b"hello through the tunnel")
            assert await receive_exactly(stream, 24) == b"hello through the tunnel"
            await stream.aclose()
    [req] = server.requests
    assert req.peer_identity == CLIENT_ID
    assert req.authority == f"127.0.0.1:{echo_port}"
    assert req.destination == ("127.0.0.1", echo_port)
    assert req.forwarded_for == "10.1.2.3"
    assert ("forwarded", "for=10.1.2.3") in req.headers


async def test_fifty_concurrent_streams_share_one_tls_connection(server, echo_port, client_ctx):
    opened = 0
    all_open = trio.Event()
    seen_stats = []

    async def one(pool, i):
        nonlocal opened
        stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
        opened += 1
        if opened == 50:
            seen_stats.append(pool.stats())
            all_open.set()
        await all_open.wait()
        msg = f"stream {i}".encode()
        await stream.send_all(msg)
        await stream.send_eof()
        assert await receive_all(stream) == msg
        await stream.aclose()

    with trio.fail_after(20):
        async with hbone_pool.open_hbone_pool() as pool:
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, pool, i)
            assert pool.stats() == hbone_pool.PoolStats(connections=1, streams=0)
    assert seen_stats == [hbone_pool.PoolStats(connections=1, streams=50)]
    assert server.tcp_accepted == 1
    assert len(server.requests) == 50


async def test_a_full_connection_makes_the_pool_dial_another(server, echo_port, client_ctx):
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool(max_streams_per_connection=2) as pool:
            streams = [await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
                       for _ in range(3)]
            assert pool.stats() == hbone_pool.PoolStats(connections=2, streams=3)
            await streams[0].aclose()
            streams.append(await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx)))
            assert pool.stats() == hbone_pool.PoolStats(connections=2, streams=3)
            # Another source identity never shares a connection.
            other = await pool.open(f"127.0.0.1:{echo_port}",
                                    **{**open_args(server, client_ctx), "source_identity": spiffe("ops", "x")})
            assert pool.stats().connections == 3
            for s in [*streams, other]:
                await s.aclose()
    assert server.tcp_accepted == 3


async def test_idle_connection_is_closed_and_forgotten(server, echo_port, client_ctx):
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool(idle_timeout=0.05) as pool:
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await stream.send_eof()
            assert await receive_all(stream) == b""
            await stream.aclose()
            await server.wait_for(lambda: server.connections_ended == 1)
            assert pool.stats() == hbone_pool.PoolStats(connections=0, streams=0)


async def _bulk(stream, size: int) -> None:
    """Send ``size`` random bytes and concurrently read the echo back; compare digests."""
    data = os.urandom(size)
    got = hashlib.sha256()
    received = 0

    async def sender():
        view = memoryview(data)
        for off in range(0, size, 1024 * 1024):
            await stream.send_all(view[off:off + 1024 * 1024])
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while chunk := await stream.receive_some():
            got.update(chunk)
            received += len(chunk)
    assert received == size
    assert got.digest() == hashlib.sha256(data).digest()
    await stream.aclose()


async def test_twenty_mib_each_way_through_one_stream(server, echo_port, client_ctx):
    with trio.fail_after(60):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await _bulk(stream, 20 * MiB)
    [server_stream] = server.streams
    assert server_stream.peak_buffered <= STREAM_WINDOW
    assert server.relay_errors == []


async def test_twenty_mib_each_way_across_several_streams(server, echo_port, client_ctx):
    with trio.fail_after(60):
        async with hbone_pool.open_hbone_pool() as pool:
            streams = [await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
                       for _ in range(4)]
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(_bulk, s, 5 * MiB)
    assert server.tcp_accepted == 1
    assert all(s.peak_buffered <= STREAM_WINDOW for s in server.streams)


async def test_a_reader_that_does_not_read_stops_the_sender_at_one_window(server, client_ctx):
    reading = trio.Event()
    accepted: list[hbone.HboneStream] = []
    total = 8 * MiB
    received = bytearray()

    async def slow_reader(req):
        stream = await req.accept()
        accepted.append(stream)
        await reading.wait()
        received.extend(await receive_all(stream))
        await stream.send_eof()

    server.handler = slow_reader
    sent = 0
    chunk = b"x" * (64 * 1024)
    with trio.fail_after(20):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open("127.0.0.1:9", **open_args(server, client_ctx))

            async def sender():
                nonlocal sent
                while sent < total:
                    await stream.send_all(chunk)
                    sent += len(chunk)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await trio.testing.wait_all_tasks_blocked()
                # Nothing read: the sender is held at exactly one stream window, and that is
                # all the server buffers (the window only reopens as the application reads).
                assert sent == STREAM_WINDOW
                assert accepted[0]._buffered == STREAM_WINDOW
                reading.set()
            assert await receive_all(stream) == b""
            await stream.aclose()
    assert len(received) == total
    assert accepted[0].peak_buffered <= STREAM_WINDOW


async def test_half_close_from_the_client_lets_the_upstream_still_reply(nursery, server, client_ctx):
    upstream_saw_eof = trio.Event()

    async def count_then_reply(stream):
        n = len(await receive_all(stream))
        upstream_saw_eof.set()
        await stream.send_all(f"got {n}".encode())
        await stream.send_eof()

    port = await start_tcp_server(nursery, count_then_reply)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{port}", **open_args(server, client_ctx))
            await stream.send_all(b"a" * 100_000)
            await stream.send_eof()
            await upstream_saw_eof.wait()
            assert await receive_all(stream) == b"got 100000"
            await stream.aclose()
    assert server.relay_errors == []


async def test_half_close_from_the_upstream_lets_the_client_still_send(nursery, server, client_ctx):
    got = []
    upstream_done = trio.Event()

    async def greet_then_listen(stream):
        await stream.send_all(b"banner")
        await stream.send_eof()
        got.append(await receive_all(stream))
        upstream_done.set()

    port = await start_tcp_server(nursery, greet_then_listen)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{port}", **open_args(server, client_ctx))
            assert await receive_all(stream) == b"banner"    # END_STREAM arrived
            await stream.send_all(b"still talking")
            await stream.send_eof()
            await upstream_done.wait()
            await stream.aclose()
    assert got == [b"still talking"]
    assert server.relay_errors == []


async def test_upstream_abort_resets_the_client_stream(nursery, server, client_ctx):
    async def abort_after_first_bytes(stream):
        await stream.receive_some(10)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()                                   # RST, not FIN

    port = await start_tcp_server(nursery, abort_after_first_bytes)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{port}", **open_args(server, client_ctx))
            await stream.send_all(b"hello")
            with pytest.raises(trio.BrokenResourceError) as e:
                await receive_all(stream)
            assert isinstance(e.value.__cause__, hbone.StreamReset)
            assert e.value.__cause__.error_code == CANCEL and e.value.__cause__.remote
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"more")
            await stream.aclose()
            assert pool.stats() == hbone_pool.PoolStats(connections=1, streams=0)
    [err] = server.relay_errors
    assert err.direction == "b_to_a"


async def test_client_close_mid_transfer_resets_the_server_stream_and_the_upstream(nursery, server, client_ctx):
    upstream_outcome = []
    upstream_done = trio.Event()

    async def firehose(stream):
        try:
            while True:
                await stream.send_all(b"z" * 65536)
        except trio.BrokenResourceError as e:
            upstream_outcome.append(e.__cause__)
        finally:
            upstream_done.set()

    port = await start_tcp_server(nursery, firehose)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            stream = await pool.open(f"127.0.0.1:{port}", **open_args(server, client_ctx))
            await receive_exactly(stream, 100_000)
            await stream.aclose()                              # RST_STREAM(CANCEL)
            await upstream_done.wait()
            await server.wait_for(lambda: len(server.relay_errors) == 1)
    assert isinstance(upstream_outcome[0], ConnectionResetError)
    err = server.relay_errors[0]
    assert isinstance(err, RelayError)
    assert isinstance(err.__cause__.__cause__, hbone.StreamReset)
    assert err.__cause__.__cause__.error_code == CANCEL


async def test_reject_403_is_connect_refused_and_the_connection_lives_on(server, echo_port, client_ctx):
    async def deny_first(req):
        if len(server.requests) == 1:
            await req.reject(403)
        else:
            await server.relay_to_destination(req)

    server.handler = deny_first
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            with pytest.raises(hbone.ConnectRefused) as e:
                await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            assert e.value.status == 403
            assert pool.stats() == hbone_pool.PoolStats(connections=1, streams=0)
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await stream.send_all(b"ok")
            assert await receive_exactly(stream, 2) == b"ok"
            await stream.aclose()
    assert server.tcp_accepted == 1


@pytest.mark.parametrize("behaviour", ["returns", "raises"])
async def test_handler_that_does_not_answer_gives_502_and_one_bad_stream_spares_the_rest(
        server, echo_port, client_ctx, behaviour, caplog):
    async def bad_then_good(req):
        if len(server.requests) == 1:
            if behaviour == "raises":
                raise RuntimeError("handler bug")
            return
        await server.relay_to_destination(req)

    server.handler = bad_then_good
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            with pytest.raises(hbone.ConnectRefused) as e:
                await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            assert e.value.status == 502
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await stream.send_all(b"fine")
            assert await receive_exactly(stream, 4) == b"fine"
            await stream.aclose()
    assert server.tcp_accepted == 1
    assert ("handler bug" in caplog.text) == (behaviour == "raises")


async def test_unexpected_server_identity_is_peer_not_allowed(server, echo_port, client_ctx):
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            for expected in ({spiffe("shop", "db")}, lambda peer: peer.endswith("/sa/db")):
                with pytest.raises(hbone.PeerNotAllowed) as e:
                    await pool.open(f"127.0.0.1:{echo_port}",
                                    **open_args(server, client_ctx, expected_peer=expected))
                assert e.value.peer == SERVER_ID
            assert pool.stats().connections == 0
            stream = await pool.open(f"127.0.0.1:{echo_port}",
                                     **open_args(server, client_ctx, expected_peer=lambda p: p == SERVER_ID))
            await stream.aclose()
    assert server.requests[0].peer_identity == CLIENT_ID
    assert len(server.requests) == 1


async def test_client_certificate_from_another_ca_fails_the_handshake(server, echo_port, ca, tmp_path, caplog):
    rogue = Pki(tmp_path, name="rogue")
    rogue_ctx = rogue.context(CLIENT_ID, server=False, trust=ca)    # trusts the server, not trusted back
    caplog.set_level(logging.INFO, logger="agent.proxy.hbone")
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            with pytest.raises(hbone.HboneError):
                await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, rogue_ctx))
            await server.wait_for(lambda: server.connections_ended == 1)
            assert pool.stats().connections == 0
    assert server.requests == []
    assert "handshake" in caplog.text


async def test_server_without_h2_alpn_fails_clearly(nursery, ca, echo_port, client_ctx):
    http1 = await start_hbone_server(nursery, ca.context(SERVER_ID, server=True, alpn=["http/1.1"]))
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            with pytest.raises(hbone.HandshakeFailed, match="ALPN"):
                await pool.open(f"127.0.0.1:{echo_port}", **open_args(http1, client_ctx))


async def test_unreachable_node_is_connect_failed_for_every_waiter(client_ctx):
    dials = 0

    async def refusing_connect(host, port):
        nonlocal dials
        dials += 1
        await trio.lowlevel.checkpoint()
        raise ConnectionRefusedError(111, "refused")

    errors = []

    async def attempt(pool):
        try:
            await pool.open("127.0.0.1:80", node_address=("127.0.0.1", 15008), source_identity=CLIENT_ID,
                            expected_peer={SERVER_ID}, ssl_context=client_ctx, forwarded_for="10.0.0.1")
        except hbone.ConnectFailed as e:
            errors.append(e)

    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool(connect=refusing_connect) as pool:
            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(attempt, pool)
    assert dials == 1
    assert len(errors) == 5 and len({id(e) for e in errors}) == 5


async def _raw_request(server, client_ctx, headers):
    tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
    tls = trio.SSLStream(tcp, client_ctx, https_compatible=True)
    await tls.do_handshake()
    conn = H2Conn(tls, client_side=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        statuses = []
        for h in headers:
            stream = conn.open_stream_nowait(h)
            statuses.append(dict(await stream.wait_response())[b":status"])
        await conn.aclose()
    return statuses


async def test_non_connect_is_405_and_bad_authority_is_400(server, client_ctx):
    with trio.fail_after(10):
        statuses = await _raw_request(server, client_ctx, [
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"10.0.0.1:80")],
            [(b":method", b"CONNECT"), (b":authority", b"web.shop.svc:80")],
            [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:99999")],
            [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1")],
        ])
    assert statuses == [b"405", b"400", b"400", b"400"]
    assert server.requests == []
    assert server.tcp_accepted == 1


async def test_default_connector_marks_its_sockets(echo_port):
    with trio.fail_after(5):
        stream = await open_marked_tcp_stream("127.0.0.1", echo_port)
        async with stream:
            mark = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert mark == (PROXY_MARK if os.geteuid() == 0 else 0)


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:80", ("10.0.0.1", 80)),
    ("[fd00::1]:443", ("fd00::1", 443)),
])
def test_parse_authority(text, expected):
    assert hbone.parse_authority(text) == expected


@pytest.mark.parametrize("text", ["web:80", "10.0.0.1", "10.0.0.1:0", "fd00::1:80", "[10.0.0.1]:80", ":80", ""])
def test_parse_authority_refuses_names_and_malformed(text):
    with pytest.raises(ValueError):
        hbone.parse_authority(text)


@pytest.mark.parametrize("ip", ["10.1.2.3", "fd00::7"])
def test_forwarded_round_trip(ip):
    assert hbone.parse_forwarded(hbone.format_forwarded(ip)) == ip


def test_parse_forwarded_variants():
    assert hbone.format_forwarded("fd00::7") == 'for="[fd00::7]"'
    assert hbone.parse_forwarded('proto=https;For="10.0.0.1:4711", for=10.9.9.9') == "10.0.0.1"
    assert hbone.parse_forwarded("by=10.0.0.1") is None
    assert hbone.parse_forwarded("for=unknown") is None


async def test_the_callers_tcp_stream_still_knows_the_peer_while_serving(nursery, ca, echo_port, client_ctx):
    """inbound.py reads the client's address from its TCP stream per request (the source IP
    when ``Forwarded`` is absent); serve_hbone's own TLS must leave that stream usable."""
    seen = []
    ended = trio.Event()
    ctx = ca.context(SERVER_ID, server=True)

    async def serve(tcp):
        async def handler(req):
            seen.append(tcp.socket.getpeername()[0])
            await req.reject(403)

        try:
            await hbone.serve_hbone(trio.SSLStream(tcp, ctx, server_side=True), handler)
        finally:
            seen.append(tcp.socket.fileno())     # closed by serve_hbone: -1
            ended.set()

    port = await start_tcp_server(nursery, serve)
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            with pytest.raises(hbone.ConnectRefused):
                await pool.open(f"127.0.0.1:{echo_port}", node_address=("127.0.0.1", port),
                                source_identity=CLIENT_ID, expected_peer={SERVER_ID},
                                ssl_context=client_ctx, forwarded_for="10.1.2.3")
        await ended.wait()
    assert seen == ["127.0.0.1", -1]


async def test_a_stream_reset_before_it_is_answered_stops_its_handler(server, echo_port, client_ctx):
    """Rapid reset: a CONNECT the client gives up on at once must not leave its handler (a dial
    upstream, say) running on the server."""
    started, stopped = trio.Event(), trio.Event()

    async def slow(req):
        started.set()
        try:
            await trio.sleep_forever()             # e.g. an upstream that never answers
        finally:
            stopped.set()

    server.handler = slow
    with trio.fail_after(10):
        async with hbone_pool.open_hbone_pool() as pool:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx)))
                await started.wait()
                nursery.cancel_scope.cancel()      # the client resets the stream
            await stopped.wait()                   # ... and the server's handler ends
            server.handler = None                  # the connection still serves others
            stream = await pool.open(f"127.0.0.1:{echo_port}", **open_args(server, client_ctx))
            await stream.send_all(b"next")
            assert await receive_exactly(stream, 4) == b"next"
            await stream.aclose()
    assert server.tcp_accepted == 1
