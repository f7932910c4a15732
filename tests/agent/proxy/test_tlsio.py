"""TlsTransport: mTLS over a non-blocking socket, synchronous writes, finished writes, EOF."""
from __future__ import annotations

import hashlib
import os
import socket
import ssl

import pytest
import trio
import trio.testing

from agent.proxy.tlsio import TlsTransport
from tests.agent.proxy.conftest import CLIENT_ID, SERVER_ID, Pki, start_tcp_server

MiB = 1024 * 1024


async def connected(ca: Pki):
    a, b = socket.socketpair()
    server = TlsTransport(a, ca.context(SERVER_ID, server=True), server_side=True)
    client = TlsTransport(b, ca.context(CLIENT_ID, server=False), server_side=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return client, server


async def test_handshake_verifies_both_sides_and_small_writes_need_no_task(ca):
    with trio.fail_after(5):
        client, server = await connected(ca)
        assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == "h2"
        assert client.getpeercert(binary_form=True) and server.getpeercert(binary_form=True)
        assert client.version() == "TLSv1.3"
        assert client.try_send(b"hello") is True          # taken by the kernel at once
        assert await server.receive_some(100) == b"hello"
        await client.aclose()                             # close_notify
        assert await server.receive_some(100) == b""
        await server.aclose()


async def test_a_write_the_kernel_cannot_take_is_finished_later(ca):
    with trio.fail_after(20):
        client, server = await connected(ca)
        client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        data = os.urandom(4 * MiB)
        assert client.try_send(data) is False             # the rest is the writer's to finish
        got = hashlib.sha256()
        received = 0

        async def read():
            nonlocal received
            while received < len(data):
                chunk = await server.receive_some()
                got.update(chunk)
                received += len(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await client.finish_send()
        assert got.digest() == hashlib.sha256(data).digest()
        await client.aclose()
        await server.aclose()


async def test_a_peer_from_another_ca_fails_the_handshake(ca, tmp_path):
    rogue = Pki(tmp_path, name="rogue")       # the client trusts the server; not trusted back
    a, b = socket.socketpair()
    server = TlsTransport(a, ca.context(SERVER_ID, server=True), server_side=True)
    client = TlsTransport(b, rogue.context(CLIENT_ID, server=False, trust=ca), server_side=False)
    failures = []

    async def handshake_then_read(tls):
        try:
            await tls.do_handshake()
            await tls.receive_some()          # TLS 1.3: the client hears of it on first read
        except trio.BrokenResourceError as e:
            failures.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake_then_read, server)
            nursery.start_soon(handshake_then_read, client)
    assert len(failures) == 2
    assert "TLS handshake failed" in str(failures[0]) and "CERTIFICATE_VERIFY_FAILED" in str(failures[0])
    assert isinstance(failures[1].__cause__, ssl.SSLError)


async def test_take_over_only_a_fresh_ssl_stream_over_tcp(nursery, ca):
    ctx = ca.context(SERVER_ID, server=True)
    port = await start_tcp_server(nursery, lambda s: trio.sleep_forever())
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = TlsTransport.take_over(trio.SSLStream(tcp, ctx, server_side=True))
    assert isinstance(tls, TlsTransport) and tls._ssl.server_side and tls._ssl.context is ctx
    tls.close()
    memory = trio.testing.memory_stream_pair()[0]
    assert TlsTransport.take_over(trio.SSLStream(memory, ctx, server_side=True)) is None


async def test_connections_share_one_pair_of_read_buffers(ca):
    """An idle connection holds no read buffer of its own (they are 256 KiB each)."""
    with trio.fail_after(5):
        one, two = await connected(ca)
        three, four = await connected(ca)
        assert not any(hasattr(t, "_plain_view") or hasattr(t, "_cipher_view") for t in (one, four))
        # Interleaved reads on several connections still each get their own bytes.
        assert one.try_send(b"a" * 5000) and three.try_send(b"b" * 7000)
        assert await four.receive_some() == b"b" * 7000
        assert await two.receive_some() == b"a" * 5000
        for t in (one, two, three, four):
            await t.aclose()


def _records(sender: TlsTransport, *payloads: bytes) -> list[bytearray]:
    """The TLS records ``sender`` makes for each payload, not sent yet."""
    out = []
    for p in payloads:
        sender._ssl.write(p)
        out.append(bytearray(sender._out.read()))
    return out


async def test_a_tampered_record_after_good_data_is_an_error_not_an_eof(ca):
    with trio.fail_after(5):
        client, server = await connected(ca)
        good, bad = _records(client, b"good", b"evil")
        bad[-1] ^= 1                                      # one bit of the tag
        client._sock.sendall(bytes(good + bad))
        client._sock.shutdown(socket.SHUT_WR)
        assert await server.receive_some(100) == b"good"  # what was intact comes first
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some(100)
        with pytest.raises(trio.BrokenResourceError):     # and stays an error
            await server.receive_some(100)
        await client.aclose()
        await server.aclose()


async def test_a_tcp_close_without_close_notify_is_a_truncation(ca):
    with trio.fail_after(5):
        client, server = await connected(ca)
        assert client.try_send(b"partial")
        client._sock.shutdown(socket.SHUT_WR)             # FIN, no close_notify
        assert await server.receive_some(100) == b"partial"
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some(100)
        await client.aclose()
        await server.aclose()


async def test_close_notify_behind_data_ends_the_stream_without_waiting_for_tcp(ca):
    with trio.fail_after(5):
        client, server = await connected(ca)
        [data] = _records(client, b"bye")
        try:
            client._ssl.unwrap()                          # close_notify, the TCP stays open
        except ssl.SSLWantReadError:
            pass
        client._sock.sendall(bytes(data) + client._out.read())
        assert await server.receive_some(100) == b"bye"
        with trio.fail_after(1):                          # not held until a FIN that never comes
            assert await server.receive_some(100) == b""
        client._sock.close()
        await server.aclose()
