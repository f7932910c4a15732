"""Listeners.reconcile against real pod namespaces: three listeners per local workload, inside
its netns, each handing connections to the right handler with the right workload; closed when
the workload goes; failures reported, retried and picked up.

Root tests use the real ports 15001/15006/15008, only inside their own ``nmt-*`` namespaces
(``netns_lab`` deletes them all). The tests without root run fake listeners on ephemeral
host ports.
"""
from __future__ import annotations

import errno
import logging

import pytest
import trio

from agent.base.netns import ConnectError, ListenError, connect_in, listen_in, netns_cookie, socket_in
from agent.proxy.listeners import Handlers, Listeners, WorkloadListeners
from agent.state.snapshot import Snapshot
from controller.api import Workload, from_dict
from tests.agent.base.test_netns import netns_lab  # noqa: F401 (pytest fixture)

PORTS = (15001, 15006, 15008)
NODE = "node-1"


def workload(name: str, netns: str | None, *, node: str = NODE, ip: str = "10.10.1.2",
             ns: str = "shop", labels: dict | None = None) -> Workload:
    spec: dict = {"node": node, "serviceAccount": name, "addresses": [ip]}
    if netns is None:
        spec["cgroup"] = f"/sys/fs/cgroup/system.slice/{name}.service"
    else:
        spec["netns"] = netns
    return from_dict({"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
                      "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
                      "spec": spec})


def snapshot(*workloads: Workload, version: int = 1) -> Snapshot:
    return Snapshot.build(workloads, version=version, node=NODE)


class Recorder:
    """Handlers that greet with "<kind> <ns>/<name>", then echo until EOF; each call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Workload, int]] = []   # (kind, workload, netns cookie)
        self.fail: set[str] = set()                          # kinds whose handler raises

    def handlers(self) -> Handlers:
        return Handlers(outbound=self._handler("outbound"), inbound_plain=self._handler("inbound_plain"),
                        inbound_hbone=self._handler("inbound_hbone"))

    def _handler(self, kind: str):
        async def handle(w: Workload, stream: trio.SocketStream) -> None:
            self.calls.append((kind, w, netns_cookie(stream)))
            if kind in self.fail:
                raise RuntimeError(f"{kind} handler exploded")
            await stream.send_all(f"{kind} {w.metadata.namespace}/{w.metadata.name}\n".encode())
            while data := await stream.receive_some(1024):
                await stream.send_all(data)
        return handle


async def hello(netns: str | None, port: int, host: str = "127.0.0.1") -> str:
    """Connect from inside ``netns``, half-close, return everything the server said."""
    stream = await connect_in(netns, host, port, mark=None, timeout=2)
    async with stream:
        await stream.send_eof()
        got = b""
        while chunk := await stream.receive_some(1024):
            got += chunk
    return got.decode()


GREETINGS = ("outbound", "inbound_plain", "inbound_hbone")


async def start(nursery: trio.Nursery, recorder: Recorder, **kw) -> Listeners:
    listeners = Listeners(recorder.handlers(), **kw)
    await nursery.start(listeners.run)
    return listeners


# --- with real namespaces -----------------------------------------------------------------------

@pytest.mark.root
async def test_three_listeners_per_workload_inside_its_netns(nursery, netns_lab):
    ns1, ns2 = netns_lab.add(), netns_lab.add()
    w1, w2 = workload("web-1", ns1), workload("web-2", ns2, ip="10.10.1.3")
    other_node = workload("web-9", ns1, node="node-2", ip="10.10.2.9")
    host_proc = workload("cron", None, ip="10.10.1.9")
    rec = Recorder()
    listeners = await start(nursery, rec)
    snap = snapshot(w1, w2, other_node, host_proc)
    with trio.fail_after(10):
        await listeners.reconcile(snap)
        assert listeners.status() == {
            "shop/web-1": WorkloadListeners(ports=PORTS, error="", netns=ns1),
            "shop/web-2": WorkloadListeners(ports=PORTS, error="", netns=ns2)}
        assert listeners.ready(snap)
        for ns, w in ((ns1, w1), (ns2, w2)):
            for port, kind in zip(PORTS, GREETINGS):
                assert await hello(ns, port) == f"{kind} shop/{w.metadata.name}\n"
        # each handler got the snapshot's Workload object, on a stream inside that workload's netns
        cookies = {}
        for ns in (ns1, ns2):
            with socket_in(ns) as s:
                cookies[ns] = netns_cookie(s)
        assert [(k, w, c) for k, w, c in rec.calls] == [
            (kind, w, cookies[w.spec.netns]) for w in (w1, w2) for kind in GREETINGS]
        assert all(w is snap.workload("shop", w.metadata.name) for _, w, _ in rec.calls)


@pytest.mark.root
async def test_removed_workload_closes_its_listeners_not_its_connections(nursery, netns_lab):
    ns1, ns2 = netns_lab.add(), netns_lab.add()
    w1, w2 = workload("web-1", ns1), workload("web-2", ns2, ip="10.10.1.3")
    listeners = await start(nursery, Recorder())
    with trio.fail_after(10):
        await listeners.reconcile(snapshot(w1, w2))
        open_conn = await connect_in(ns2, "127.0.0.1", 15001, mark=None, timeout=2)
        assert await open_conn.receive_some(100) == b"outbound shop/web-2\n"

        only_w1 = snapshot(w1, version=2)
        await listeners.reconcile(only_w1)
        for port in PORTS:
            with pytest.raises(ConnectError) as err:
                await connect_in(ns2, "127.0.0.1", port, timeout=2)
            assert err.value.reason == "refused"
            assert await hello(ns1, port) == f"{GREETINGS[PORTS.index(port)]} shop/web-1\n"
        assert set(listeners.status()) == {"shop/web-1"}
        assert listeners.ready(only_w1)

        async with open_conn:                 # the connection accepted before is still served
            await open_conn.send_all(b"still here")
            assert await open_conn.receive_some(100) == b"still here"


@pytest.mark.root
async def test_missing_netns_is_reported_and_picked_up_when_it_appears(nursery, netns_lab):
    ns1, later = netns_lab.add(), netns_lab.reserve()
    w1, w2 = workload("web-1", ns1), workload("web-2", later, ip="10.10.1.3")
    listeners = await start(nursery, Recorder(), retry_interval=0.05)
    snap = snapshot(w1, w2)
    with trio.fail_after(10):
        await listeners.reconcile(snap)
        status = listeners.status()
        assert status["shop/web-1"] == WorkloadListeners(ports=PORTS, error="", netns=ns1)
        assert status["shop/web-2"].ports == ()
        assert status["shop/web-2"].error == f"no such network namespace {later}: is the pod running?"
        assert not listeners.ready(snap)
        assert await hello(ns1, 15008) == "inbound_hbone shop/web-1\n"   # the others are served

        netns_lab.create(later)             # the pod starts: the periodic retry opens its listeners
        await listeners.wait_ready(snap)
        assert listeners.status()["shop/web-2"] == WorkloadListeners(ports=PORTS, error="", netns=later)
        assert await hello(later, 15006) == "inbound_plain shop/web-2\n"


@pytest.mark.root
async def test_next_reconcile_retries_a_failed_workload(nursery, netns_lab):
    later = netns_lab.reserve()
    snap = snapshot(workload("web-1", later))
    listeners = await start(nursery, Recorder(), retry_interval=3600)   # no periodic retry here
    with trio.fail_after(10):
        await listeners.reconcile(snap)
        assert "is the pod running?" in listeners.status()["shop/web-1"].error
        netns_lab.create(later)
        await listeners.reconcile(snap)
        assert listeners.ready(snap)
        assert await hello(later, 15001) == "outbound shop/web-1\n"


@pytest.mark.root
async def test_netns_path_change_moves_the_listeners(nursery, netns_lab):
    old, new = netns_lab.add(), netns_lab.add()
    listeners = await start(nursery, Recorder())
    with trio.fail_after(10):
        await listeners.reconcile(snapshot(workload("web-1", old)))
        assert await hello(old, 15001) == "outbound shop/web-1\n"
        moved = snapshot(workload("web-1", new), version=2)
        await listeners.reconcile(moved)
        assert listeners.ready(moved)
        assert listeners.status()["shop/web-1"].netns == new
        with pytest.raises(ConnectError, match="refused"):
            await connect_in(old, "127.0.0.1", 15001, timeout=2)
        assert await hello(new, 15001) == "outbound shop/web-1\n"


@pytest.mark.root
async def test_reconcile_is_idempotent_and_keeps_the_opening_workload(nursery, netns_lab):
    ns = netns_lab.add()
    opened: list[tuple[str, int]] = []

    async def counting_listen_in(netns: str, host: str, port: int) -> trio.SocketListener:
        opened.append((netns, port))
        return await listen_in(netns, host, port)

    rec = Recorder()
    listeners = await start(nursery, rec, open_listener=counting_listen_in)
    first = workload("web-1", ns)
    relabelled = workload("web-1", ns, labels={"app": "web", "version": "v2"})
    with trio.fail_after(10):
        await listeners.reconcile(snapshot(first))
        await listeners.reconcile(snapshot(first))
        await listeners.reconcile(snapshot(relabelled, version=2))   # same netns: nothing reopened
        assert opened == [(ns, p) for p in PORTS]
        assert await hello(ns, 15001) == "outbound shop/web-1\n"
        assert rec.calls[-1][1] is first       # the workload that opened it; handlers look up the rest


@pytest.mark.root
async def test_a_failing_handler_never_takes_the_listener_down(nursery, netns_lab, caplog):
    ns = netns_lab.add()
    rec = Recorder()
    rec.fail.add("inbound_plain")
    listeners = await start(nursery, rec)
    with trio.fail_after(10):
        await listeners.reconcile(snapshot(workload("web-1", ns)))
        with caplog.at_level(logging.ERROR, logger="nodemesh.agent.listeners"):
            for _ in range(3):
                assert await hello(ns, 15006) == ""      # the handler raised; the stream is closed
        assert [k for k, _, _ in rec.calls] == ["inbound_plain"] * 3
        assert sum("inbound_plain handler failed" in r.message for r in caplog.records) == 3
        assert await hello(ns, 15001) == "outbound shop/web-1\n"
        assert listeners.status()["shop/web-1"].ports == PORTS


# --- without root: fake listeners on ephemeral host ports ---------------------------------------

class FakeOpener:
    """Opens ordinary listeners on 127.0.0.1:0 (never the real ports in the host namespace) and
    remembers which one stands for (netns, port); ports in ``busy`` fail like a taken port."""

    def __init__(self) -> None:
        self.busy: set[int] = set()
        self.real: dict[tuple[str, int], int] = {}
        self.listeners: list[trio.SocketListener] = []

    async def __call__(self, netns: str, host: str, port: int) -> trio.SocketListener:
        if port in self.busy:
            raise ListenError(netns, (host, port), "Address already in use", errno.EADDRINUSE)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.real[(netns, port)] = listener.socket.getsockname()[1]
        self.listeners.append(listener)
        return listener


async def test_partial_failure_is_reported_and_retried(nursery):
    opener = FakeOpener()
    opener.busy.add(15006)
    listeners = await start(nursery, Recorder(), open_listener=opener, retry_interval=0.05)
    snap = snapshot(workload("web-1", "/var/run/netns/fake-1"))
    with trio.fail_after(5):
        await listeners.reconcile(snap)
        st = listeners.status()["shop/web-1"]
        assert st.ports == (15001, 15008)
        assert st.error == "cannot listen on 0.0.0.0:15006 in /var/run/netns/fake-1: Address already in use"
        assert not listeners.ready(snap)
        assert await hello(None, opener.real[("/var/run/netns/fake-1", 15001)]) == "outbound shop/web-1\n"

        opener.busy.clear()
        await listeners.wait_ready(snap)
        assert listeners.status()["shop/web-1"] == WorkloadListeners(PORTS, "", "/var/run/netns/fake-1")
        assert await hello(None, opener.real[("/var/run/netns/fake-1", 15006)]) == "inbound_plain shop/web-1\n"
        assert len(opener.listeners) == 3     # the two that worked were not reopened


async def test_ready_semantics():
    listeners = Listeners(Recorder().handlers(), open_listener=FakeOpener())
    assert listeners.ready(snapshot())                                           # nothing local
    assert listeners.ready(snapshot(workload("far", "/var/run/netns/x", node="node-2")))
    assert listeners.ready(snapshot(workload("cron", None)))                      # host process
    assert not listeners.ready(snapshot(workload("web-1", "/var/run/netns/x")))  # not reconciled
    with pytest.raises(RuntimeError, match="must be started"):
        await listeners.reconcile(snapshot())


async def test_stopping_run_closes_every_listener():
    opener = FakeOpener()
    listeners = Listeners(Recorder().handlers(), open_listener=opener)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(listeners.run)
            await listeners.reconcile(snapshot(workload("web-1", "/var/run/netns/a"),
                                               workload("web-2", "/var/run/netns/b", ip="10.10.1.3")))
            assert len(opener.listeners) == 6
            nursery.cancel_scope.cancel()
    assert all(lst.socket.fileno() == -1 for lst in opener.listeners)
    assert listeners.status() == {}


def test_ports_must_be_three_distinct():
    with pytest.raises(ValueError, match="three different ports"):
        Listeners(Recorder().handlers(), ports=(15001, 15001, 15008))
