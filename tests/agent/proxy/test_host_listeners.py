"""HostListeners.reconcile on loopback (no root): host workloads (cgroup, no netns) share one
outbound listener, whose connections are told apart by the injected ``origin``, and get inbound
listeners on their own addresses, each handing connections to its owner; closed when the
workload goes; readiness and status as for pods. Ephemeral ports on 127.0.0.x stand in for
15001/15006/15008 and the workloads' addresses.
"""
from __future__ import annotations

import trio

from agent.proxy.host_listeners import HostListeners, is_host_workload
from agent.proxy.listeners import Handlers
from tests.agent.proxy.test_listeners import hello, snapshot, workload
from tests.controller.conftest import free_port


class Calls:
    def __init__(self) -> None:
        self.got: list[tuple] = []
        self.origins: dict[int, tuple] = {}          # client port -> (workload key, dst)

    def handlers(self) -> Handlers:
        async def outbound(w, stream, dst):
            self.got.append(("outbound", w.metadata.name, dst))
            await stream.send_all(f"outbound {w.metadata.name} {dst[0]}:{dst[1]}".encode())

        def inbound(kind):
            async def handle(w, stream):
                self.got.append((kind, w.metadata.name, stream.socket.getsockname()[0]))
                await stream.send_all(f"{kind} {w.metadata.name}".encode())
            return handle
        return Handlers(outbound, inbound("plain"), inbound("hbone"))

    def origin(self, sock):
        try:
            return self.origins[sock.getpeername()[1]]
        except KeyError:
            raise OSError("not redirected") from None     # as NoOriginalDestination is


async def dial_from(port: int, on_port) -> trio.SocketStream:
    """Connect to 127.0.0.1:``port`` from a bound source port, after ``on_port(source port)``."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    on_port(sock.getsockname()[1])
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_host_workloads_share_outbound_and_own_their_addresses():
    ports = (free_port(), free_port(), free_port())
    calls = Calls()
    a = workload("web", None, ip="127.0.0.2")
    b = workload("db", None, ip="127.0.0.3")
    pod = workload("pod", "/var/run/netns/nope", ip="10.10.1.9")
    assert is_host_workload(a) and not is_host_workload(pod)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            host = HostListeners(calls.handlers(), calls.origin, ports=ports)
            await n.start(host.run)
            snap = snapshot(a, b, pod)
            assert not host.ready(snap)
            await host.reconcile(snap)
            assert host.ready(snap)
            assert set(host.status()) == {"shop/web", "shop/db"}       # the pod is listeners.py's
            assert host.status()["shop/web"].ports == ports and host.status()["shop/web"].netns == ""
            assert set(host.inbound_sockets(a)) == {"127.0.0.2"}

            assert await hello(None, ports[1], "127.0.0.2") == "plain web"
            assert await hello(None, ports[2], "127.0.0.3") == "hbone db"

            # outbound: the origin (the redirector's cgroup id / mark lookup) says who and where
            stream = await dial_from(ports[0], lambda p: calls.origins.update({p: (("shop", "db"), ("10.96.0.10", 80))}))
            assert await stream.receive_some(100) == b"outbound db 10.96.0.10:80"
            await stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", ports[0])    # unknown origin: dropped
            assert await stream.receive_some(100) == b""
            await stream.aclose()

            # db goes: its listeners close, web's and the shared one stay
            await host.reconcile(snapshot(a, version=2))
            assert set(host.status()) == {"shop/web"}
            try:
                await hello(None, ports[2], "127.0.0.3")
                raise AssertionError("db's listener is still open")
            except OSError:
                pass
            assert await hello(None, ports[2], "127.0.0.2") == "hbone web"
            await host.reconcile(snapshot(pod, version=3))               # no host workload left
            assert host.status() == {} and host.ready(snapshot(pod, version=3))
            try:
                await trio.open_tcp_stream("127.0.0.1", ports[0])
                raise AssertionError("the shared outbound listener is still open")
            except OSError:
                pass
            n.cancel_scope.cancel()


async def test_an_address_not_on_this_host_is_reported_and_retried():
    ports = (free_port(), free_port(), free_port())
    calls = Calls()
    w = workload("far", None, ip="192.0.2.77")                   # TEST-NET-1: not ours
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            host = HostListeners(calls.handlers(), calls.origin, ports=ports, retry_interval=0.05)
            await n.start(host.run)
            snap = snapshot(w)
            await host.reconcile(snap)
            st = host.status()["shop/far"]
            assert not host.ready(snap) and st.ports == (ports[0],) and "192.0.2.77" in st.error
            n.cancel_scope.cancel()
