"""The fast path (same-node plaintext on the splice engine's thread) in the two-node mesh of
test_mesh_path: it serves local endpoints itself with the same authorization, hands everything
else (a remote endpoint, a failed connect) to the trio handler with the original destination,
reports every connection, and a policy change cuts its connections too."""
from __future__ import annotations

import socket

import pytest
import trio

from agent.observe.telemetry import record_of
from agent.proxy.fastpath import FastPath
from agent.proxy.splice import SpliceEngine
from tests.agent.proxy.test_mesh_path import (BASE, DENY_WEB, LOCAL_VIP, VIP, WEB, closed_without_answer,
                                              mesh, round_trip, svc, wl)  # noqa: F401 (mesh: fixture)


class Fast:
    """node-1's outbound served by a FastPath: one listener per (workload, original destination)."""

    def __init__(self, node, nursery):
        self.node, self.nursery = node, nursery
        self.engine = SpliceEngine()
        self.orig: dict[int, tuple[str, int]] = {}
        self.handed: list[tuple[str, int] | None] = []
        self.picked: list = []
        self.path = FastPath(node.outbound, self.engine, lambda s: self.orig[s.getsockname()[1]],
                             self._hand_over)

    def _hand_over(self, workload, stream, dst, picked):
        self.handed.append(dst)
        self.picked.append(picked)
        self.nursery.start_soon(self._serve, workload, stream, dst, picked)

    async def _serve(self, workload, stream, dst, picked):
        async with stream:
            await self.node.outbound.handle(workload, stream, dst, picked)

    async def connect(self, workload_name: str, target: tuple[str, int]) -> trio.SocketStream:
        w = self.node.holder.current.workload("shop", workload_name)
        sock = trio.socket.socket()
        await sock.bind((w.spec.addresses[0], 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        self.orig[port] = target
        self.path.serve(w, trio.SocketListener(sock))
        return await trio.open_tcp_stream(w.spec.addresses[0], port)


@pytest.fixture
async def fast(mesh, nursery):
    node1, node2, seen = mesh
    f = Fast(node1, nursery)
    await nursery.start(f.engine.run)
    return f, node1, node2, seen


async def test_a_local_endpoint_is_served_on_the_engine_thread(fast):
    f, node1, _, seen = fast
    with trio.fail_after(10):
        s = await f.connect("client-1", (LOCAL_VIP, 80))
        assert await round_trip(s, b"y" * 300_000) == b"y" * 300_000
        await s.send_eof()
        assert await s.receive_some() == b""
        rec = await node1.sink.next()
    assert f.handed == []                                  # no trio task took it
    assert (rec.reporter, rec.protocol, rec.dst_identity, rec.dst_service, rec.decision, rec.flags) == \
        ("source", "tcp", WEB, "web-local.shop.svc", "allow", "-")
    assert rec.request_bytes == rec.response_bytes == 300_000
    assert rec.dst_address.startswith("127.0.1.3:")
    assert node1.pools.stats() == {} and seen == ["127.0.1.3"]
    assert len(node1.registry) == 0 and len(f.engine) == 0
    # reported in a batch, but the access log's duration ends when the connection did
    assert rec.start <= rec.end
    assert record_of(rec)["duration_ms"] == round((rec.end - rec.start) * 1000)


async def test_a_remote_endpoint_is_handed_to_the_trio_path_with_its_destination(fast):
    f, node1, node2, seen = fast
    with trio.fail_after(10):
        s = await f.connect("client-1", (VIP, 80))
        assert await round_trip(s) == b"hello"
        await s.aclose()
        rec = await node1.sink.next()
    assert f.handed == [(VIP, 80)]
    assert (rec.protocol, rec.security, rec.dst_identity) == ("hbone", "mutual_tls", WEB)
    assert seen == ["127.0.1.1"]


async def test_a_denied_connection_is_reset_and_reported_with_the_policy(fast):
    f, node1, _, seen = fast
    node1.publish(BASE + [DENY_WEB])
    with trio.fail_after(10):
        try:
            s = await f.connect("client-1", (LOCAL_VIP, 80))
        except OSError:
            pass      # reset so soon that the client's connect() itself reports it
        else:
            assert await closed_without_answer(s)
        rec = await node1.sink.next()
    assert (rec.decision, rec.policy, rec.rule, rec.flags) == ("deny", "shop/deny-web", 0, "DENY")
    assert f.handed == [] and seen == []


async def test_a_policy_change_cuts_an_open_fast_path_connection(fast):
    f, node1, _, _ = fast
    with trio.fail_after(10):
        s = await f.connect("client-1", (LOCAL_VIP, 80))
        assert await round_trip(s) == b"hello"
        while len(node1.registry) == 0:                   # tracked like any other
            await trio.sleep(0.01)
        node1.publish(BASE + [DENY_WEB])
        rec = await node1.sink.next()
        assert await closed_without_answer(s)
    assert (rec.decision, rec.policy, rec.flags) == ("deny", "shop/deny-web", "DENY")
    assert rec.reason.startswith("closed by a policy change")
    assert rec.request_bytes == rec.response_bytes == 5


async def test_each_snapshot_decides_anew_for_the_next_connection(fast):
    # the fast path keeps plan and decision for one snapshot; a new one is decided on again
    f, node1, _, _ = fast
    with trio.fail_after(10):
        for docs, allowed in ((BASE, True), (BASE + [DENY_WEB], False), (BASE, True)):
            node1.publish(docs)
            try:
                s = await f.connect("client-1", (LOCAL_VIP, 80))
            except OSError:
                assert not allowed                           # reset before connect() returned
            else:
                if allowed:
                    assert await round_trip(s) == b"hello"
                    await s.aclose()
                else:
                    assert await closed_without_answer(s)
            rec = await node1.sink.next()
            assert rec.decision == ("allow" if allowed else "deny")
    assert f.handed == []


async def test_a_failed_local_connect_falls_back_and_another_endpoint_answers(fast):
    f, node1, _, seen = fast
    # web-8 is local too, but nothing listens there: the fast path's connect is refused, the
    # trio handler gets the connection and retries on web-2.
    node1.publish(BASE + [wl("web-8", "node-1", "web", "127.0.1.8", {"app": "web", "where": "local"})])
    with trio.fail_after(10):
        for _ in range(4):
            s = await f.connect("client-1", (LOCAL_VIP, 80))
            assert await round_trip(s) == b"hello"
            await s.aclose()
    assert seen == ["127.0.1.3"] * 4
    assert (LOCAL_VIP, 80) in f.handed                  # round robin sent some to web-8 first


async def test_stopping_serving_closes_the_listener(fast):
    f, node1, _, _ = fast
    w = node1.holder.current.workload("shop", "client-1")
    sock = trio.socket.socket()
    await sock.bind((w.spec.addresses[0], 0))
    sock.listen(4)
    port = sock.getsockname()[1]
    stop = f.path.serve(w, trio.SocketListener(sock))
    stop()
    with trio.fail_after(5):
        while True:
            try:
                with socket.create_connection((w.spec.addresses[0], port), timeout=1):
                    pass
            except (ConnectionRefusedError, ConnectionResetError):   # reset: queued as it closed
                break
            await trio.sleep(0.02)


async def test_the_balancer_chooses_once_per_connection(fast):
    f, node1, _, seen = fast
    # round robin over a local and a remote replica: the fast path's choice is the one used,
    # a remote one handed over with it, so the rotation alternates
    node1.publish(BASE + [svc("web-all", "10.96.0.12", {"app": "web"})])
    with trio.fail_after(15):
        for _ in range(6):
            s = await f.connect("client-1", ("10.96.0.12", 80))
            assert await round_trip(s) == b"hello"
            await s.aclose()
    assert sorted(seen) == ["127.0.1.1"] * 3 + ["127.0.1.3"] * 3
    assert [p.endpoint.address for p in f.picked] == ["127.0.1.1"] * 3


async def test_connections_open_at_shutdown_are_still_reported(mesh, nursery):
    node1, _, _ = mesh
    f = Fast(node1, nursery)
    with trio.fail_after(10):
        async with trio.open_nursery() as engine_nursery:
            await engine_nursery.start(f.engine.run)
            s = await f.connect("client-1", (LOCAL_VIP, 80))
            assert await round_trip(s) == b"hello"
            while len(node1.registry) == 0:
                await trio.sleep(0.01)
            engine_nursery.cancel_scope.cancel()     # the agent stops with it open
        rec = await node1.sink.next()                # its close is still counted and logged
    assert rec.request_bytes == rec.response_bytes == 5
    assert "shutting down" in (rec.error or "")
