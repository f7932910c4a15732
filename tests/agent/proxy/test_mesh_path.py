"""The node proxy's data path end to end in one process: two "nodes" on loopback addresses, a
real controller signing real certificates, HBONE between them, policy decided at the destination.

Workloads here are host-process ones (cgroup, no netns), so every socket lives on loopback:
client-1 127.0.1.2 and web-2 127.0.1.3 on node-1, web-1 127.0.1.1 on node-2. The original
destination is handed to the outbound handler by a stand-in listener (the redirect itself is
tested in the lab tests).
"""
from __future__ import annotations

import random
from functools import partial

import pytest
import trio

from agent.decide.balancer import Stats
from agent.decide.connection import OutboundDecider
from agent.identity import IdentityManager, SignResult
from agent.observe.record import ConnRecord
from agent.proxy.connections import Registry
from agent.proxy.delivery import Delivery
from agent.proxy.inbound import Inbound
from agent.proxy.outbound import Outbound, Pools
from agent.state.snapshot import Snapshot, StateHolder
from agent.sync.client import ControlPlane
from controller import api as capi
from tests.agent.sync.test_follow import joined_controlplane
from tests.controller.conftest import free_port

VIP, LOCAL_VIP = "10.96.0.10", "10.96.0.11"
APP = free_port()      # every web replica's app port, each on its own loopback address
HBONE = free_port()    # in-pod HBONE port (15008 in production), on each workload address
CLIENT = "spiffe://cluster.local/ns/shop/sa/client"
WEB = "spiffe://cluster.local/ns/shop/sa/web"


def wl(name, node, sa, ip, labels=None):
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": name, "namespace": "shop", "labels": labels or {"app": sa}},
            "spec": {"node": node, "serviceAccount": sa, "addresses": [ip], "ports": [APP],
                     "locality": {"region": "r", "zone": node}, "cgroup": f"/sys/fs/cgroup/{name}"}}


def svc(name, vip, selector):
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"addresses": [vip], "selector": selector, "ports": [{"port": 80, "targetPort": APP}],
                     "loadBalancer": {"algorithm": "round_robin", "localityFailover": False}}}


BASE = [
    {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "default"}, "spec": {}},
    wl("client-1", "node-1", "client", "127.0.1.2"),
    wl("web-1", "node-2", "web", "127.0.1.1", {"app": "web", "where": "remote"}),
    wl("web-2", "node-1", "web", "127.0.1.3", {"app": "web", "where": "local"}),
    svc("web", VIP, {"where": "remote"}),
    svc("web-local", LOCAL_VIP, {"where": "local"}),
]
DENY_WEB = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "action": "DENY", "rules": [{"from": [{"namespaces": ["shop"]}]}]}}


class Sink:
    """Collects the ConnRecords the proxy reports (agent/observe turns them into metrics and logs)."""

    def __init__(self):
        self.records: list[ConnRecord] = []
        self._read = 0
        self._event = trio.Event()

    def opened(self, rec):
        pass

    def closed(self, rec):
        self.records.append(rec)
        self._event.set()
        self._event = trio.Event()

    def report(self, batch):
        for opened, rec in batch:
            if not opened:
                self.closed(rec)

    async def next(self) -> ConnRecord:
        """The next closed connection's record, in order."""
        while len(self.records) <= self._read:
            await self._event.wait()
        self._read += 1
        return self.records[self._read - 1]


async def connect_in(netns, host, port, *, timeout):
    assert netns is None  # host-process workloads only in this test
    return await trio.open_tcp_stream(host, port)


class Node:
    def __init__(self, name, controller, tmp_path, nursery):
        self.name, self.controller, self.nursery = name, controller, nursery
        self.tmp = tmp_path / name
        self.tmp.mkdir()
        self.sink, self.orig = Sink(), {}

    async def start(self, docs):
        self.cp = await joined_controlplane(self.controller, self.tmp, self.name)

        async def signer(uri, csr):
            s = await self.cp.sign(csr)
            return SignResult(s.chain_pem, s.bundle_pem)

        self.identity = IdentityManager(signer, rng=random.Random(1))
        await self.nursery.start(self.identity.run)
        self.holder = StateHolder(self.build(docs, 1))
        self.registry = Registry()
        await self.nursery.start(self.registry.run, self.holder)
        self.delivery = Delivery(self.holder, self.registry, self.sink, connect_in, connect_timeout=2.0)
        self.inbound = Inbound(self.delivery, self.identity, orig_dst=None)
        self.pools = Pools(self.delivery, self.nursery)
        self.outbound = Outbound(self.delivery, self.identity, self.pools, self._orig_dst, self.name,
                                 OutboundDecider(passthrough=True, stats=Stats(), rng=random.Random(2)),
                                 hbone_port=HBONE)
        for w in self.holder.current.local_workloads:
            await self.identity.certified(self.holder.current.identity_of(w).uri)
            await self.nursery.start(partial(trio.serve_tcp, lambda s, w=w: self.inbound.hbone(w, s), HBONE,
                                             host=w.spec.addresses[0]))

    def build(self, docs, version):
        return Snapshot.build([capi.from_dict(d) for d in docs], version=version, node=self.name)

    def publish(self, docs):
        self.holder.publish(self.build(docs, self.holder.current.version + 1))

    async def _orig_dst(self, workload, stream):
        return self.orig[stream.socket.getsockname()[1]]

    async def connect(self, workload_name: str, target: tuple[str, int]) -> trio.SocketStream:
        """What the workload's connect() to ``target`` becomes once redirected to its 15001."""
        w = self.holder.current.workload("shop", workload_name)
        ip = w.spec.addresses[0]
        listeners = await self.nursery.start(partial(trio.serve_tcp, lambda s: self.outbound.handle(w, s), 0, host=ip))
        port = listeners[0].socket.getsockname()[1]
        self.orig[port] = target
        return await trio.open_tcp_stream(ip, port)


async def app(nursery, host, seen):
    """The web app: echoes, remembers who connected."""
    async def handle(s):
        seen.append(s.socket.getsockname()[0])
        try:
            async for chunk in s:
                await s.send_all(chunk)
            await s.send_eof()
        except trio.BrokenResourceError:
            pass  # the proxy reset it (a policy change cut the connection)
    await nursery.start(partial(trio.serve_tcp, handle, APP, host=host))


async def round_trip(stream, data=b"hello") -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some()
        if not chunk:
            break
        got += chunk
    return got


async def closed_without_answer(stream) -> bool:
    try:
        await stream.send_all(b"hi")
        return await stream.receive_some() == b""
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True


@pytest.fixture
async def mesh(controller, tmp_path, nursery):
    admin = controller.client()
    await controller.call(admin.apply, BASE)
    seen: list[str] = []
    for host in ("127.0.1.1", "127.0.1.3"):
        await app(nursery, host, seen)
    node1, node2 = Node("node-1", controller, tmp_path, nursery), Node("node-2", controller, tmp_path, nursery)
    await node1.start(BASE)
    await node2.start(BASE)
    return node1, node2, seen


async def test_request_crosses_the_tunnel_with_both_identities(mesh):
    node1, node2, seen = mesh
    with trio.fail_after(10):
        s = await node1.connect("client-1", (VIP, 80))
        assert await round_trip(s, b"x" * 100_000) == b"x" * 100_000
        await s.send_eof()
        assert await s.receive_some() == b""
        dst = await node2.sink.next()
        src = await node1.sink.next()
    assert (dst.reporter, dst.src_identity, dst.dst_identity, dst.security, dst.decision) == \
        ("destination", CLIENT, WEB, "mutual_tls", "allow")
    assert dst.src_address == "127.0.1.2"  # Forwarded: for= carried the source
    assert (src.reporter, src.dst_identity, src.protocol, src.dst_service) == \
        ("source", WEB, "hbone", "web.shop.svc")
    assert src.request_bytes == src.response_bytes == 100_000
    assert dst.request_bytes == 100_000
    assert seen == ["127.0.1.1"]


async def test_many_connections_share_one_tls_connection(mesh):
    node1, node2, _ = mesh
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for i in range(20):
                async def one(i=i):
                    s = await node1.connect("client-1", (VIP, 80))
                    assert await round_trip(s, f"req {i}".encode()) == f"req {i}".encode()
                    await s.aclose()
                n.start_soon(one)
    assert list(node1.pools.stats()) == ["shop/client-1"]
    assert node1.pools.stats()["shop/client-1"].connections == 1


async def test_denied_at_the_destination_and_open_connections_are_cut(mesh):
    node1, node2, _ = mesh
    with trio.fail_after(10):
        open_conn = await node1.connect("client-1", (VIP, 80))
        assert await round_trip(open_conn) == b"hello"
        node2.publish(BASE + [DENY_WEB])
        # The open connection is closed by the policy change ...
        cut = await node2.sink.next()
        assert (cut.decision, cut.policy, cut.rule) == ("deny", "shop/deny-web", 0)
        assert await closed_without_answer(open_conn)
        # ... and a new one is refused with the policy named.
        s = await node1.connect("client-1", (VIP, 80))
        assert await closed_without_answer(s)
        denied = await node2.sink.next()
    assert (denied.decision, denied.policy, denied.rule, denied.flags) == ("deny", "shop/deny-web", 0, "DENY")


async def test_same_node_fast_path_is_authorized_the_same_way(mesh):
    node1, node2, seen = mesh
    with trio.fail_after(10):
        s = await node1.connect("client-1", (LOCAL_VIP, 80))
        assert await round_trip(s) == b"hello"
        await s.aclose()
        rec = await node1.sink.next()
        assert (rec.protocol, rec.dst_identity, rec.decision) == ("tcp", WEB, "allow")
        assert node1.pools.stats() == {}  # no tunnel, no TLS to ourselves
        node1.publish(BASE + [DENY_WEB])
        s = await node1.connect("client-1", (LOCAL_VIP, 80))
        assert await closed_without_answer(s)
        rec = await node1.sink.next()
    assert (rec.decision, rec.policy) == ("deny", "shop/deny-web")
    assert seen == ["127.0.1.3"]


async def test_failed_endpoint_is_retried_on_another(mesh):
    node1, node2, seen = mesh
    # web-9 claims an address where nothing listens: its connects fail and web-1 takes over.
    docs = BASE + [wl("web-9", "node-2", "web", "127.0.1.9", {"app": "web", "where": "remote"})]
    node1.publish(docs)
    with trio.fail_after(10):
        for _ in range(4):
            s = await node1.connect("client-1", (VIP, 80))
            assert await round_trip(s) == b"hello"
            await s.aclose()
    assert seen == ["127.0.1.1"] * 4


async def test_traffic_flows_while_the_controller_is_unreachable(mesh, controller):
    node1, node2, _ = mesh
    for node in (node1, node2):
        node.cp = ControlPlane("https://127.0.0.1:9", bundle_pem=controller.d.bundle.read_bytes())
    with trio.fail_after(10):
        s = await node1.connect("client-1", (VIP, 80))
        assert await round_trip(s) == b"hello"


async def test_unknown_destination_passes_through_or_is_refused(mesh):
    node1, _, seen = mesh
    with trio.fail_after(10):
        s = await node1.connect("client-1", ("127.0.1.3", APP))   # a mesh workload's own address
        assert await round_trip(s) == b"hello"
        node1.outbound.decider.passthrough = False
        s = await node1.connect("client-1", ("127.0.9.9", 1))
        assert await closed_without_answer(s)
        rec = await node1.sink.next()
        while rec.dst_address != "127.0.9.9:1":
            rec = await node1.sink.next()
    assert rec.flags == "NR"


async def test_root_rotation_mid_traffic(mesh, controller):
    node1, node2, _ = mesh
    with trio.fail_after(15):
        s = await node1.connect("client-1", (VIP, 80))
        assert await round_trip(s, b"before") == b"before"
        admin = controller.client()
        await controller.call(admin.rotate_ca, 0)   # no propagation delay: the test pushes bundles itself
        for node in (node1, node2):            # what the agent's bundle refresh does
            await node.identity.update_bundle(await node.cp.trust_bundle())
        node2.identity.forget(WEB)             # web-1 now gets a new-root certificate ...
        await node2.identity.certified(WEB)    # ... while client-1 keeps its old-root one
        assert await round_trip(s, b"during") == b"during"   # the open connection carries on
        await s.aclose()
        node1.pools.retain(Snapshot.empty(node="node-1"))    # drop the pooled TLS connection
        s2 = await node1.connect("client-1", (VIP, 80))
        assert await round_trip(s2, b"after") == b"after"    # old-root client, new-root server
        assert node1.pools.stats()["shop/client-1"].connections == 1           # a new handshake did it
