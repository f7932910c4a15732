"""agent/base/netns.py against real network namespaces: sockets made from the host namespace
live in the pod's, carry the proxy's mark, and fail with errors that say what to check.

Every namespace is ``nmt-<random>``, made by ``ip netns add`` and deleted by the ``netns_lab``
fixture's finalizer, which also checks that none is left behind. Real proxy ports are used only
inside these namespaces, never in the host's.
"""
from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import sys
import threading

import pytest
import trio

from agent.base.constants import PROXY_MARK
from agent.base.netns import (ConnectError, ListenError, NetnsError, connect_in, listen_in, netns_cookie,
                              netns_path, socket_in)

NETNS_DIR = "/var/run/netns"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def listnetns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class NetnsLab:
    """Test namespaces: every name handed out (made or only reserved) is deleted at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def reserve(self) -> str:
        """A netns path that does not exist (yet); ``create`` it later."""
        name = f"nmt-{secrets.token_hex(4)}"
        self.names.append(name)
        return f"{NETNS_DIR}/{name}"

    def create(self, path: str) -> str:
        name = os.path.basename(path)
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        return path

    def add(self) -> str:
        """A new namespace with ``lo`` up; returns its path."""
        return self.create(self.reserve())

    def link(self, a: str, a_ip: str, b: str, b_ip: str, prefix: int = 24) -> None:
        """A veth pair between namespaces ``a`` and ``b``, addressed and up."""
        na, nb = os.path.basename(a), os.path.basename(b)
        ip("link", "add", "nmtv0", "netns", na, "type", "veth", "peer", "name", "nmtv1", "netns", nb)
        for ns, dev, addr in ((na, "nmtv0", a_ip), (nb, "nmtv1", b_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")

    def cleanup(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        left = set(self.names) & listnetns()
        assert not left, f"test namespaces left behind: {sorted(left)}"


@pytest.fixture
def netns_lab():
    lab = NetnsLab()
    try:
        yield lab
    finally:
        lab.cleanup()


async def run_in(path: str, code: str) -> str:
    """Run python ``code`` in a separate process inside netns ``path`` (``ip netns exec``)."""
    p = await trio.run_process(["ip", "netns", "exec", os.path.basename(path), sys.executable, "-c", code],
                               capture_stdout=True, capture_stderr=True, check=False)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode().strip()


def host_cookie() -> int:
    with socket.socket() as s:
        return netns_cookie(s)


# --- no namespace needed ------------------------------------------------------------------------

def test_netns_path_takes_names_and_paths():
    assert netns_path("web-1") == "/var/run/netns/web-1"
    assert netns_path("/var/run/netns/web-1") == "/var/run/netns/web-1"
    assert netns_path("/proc/42/ns/net") == "/proc/42/ns/net"
    assert netns_path("/run/netns/x") == "/run/netns/x"


def test_socket_in_none_is_the_agents_namespace():
    with socket_in(None) as a, socket_in("") as b:
        assert netns_cookie(a) == netns_cookie(b) == host_cookie()


def test_missing_netns_is_a_typed_error_and_is_not_created(tmp_path):
    missing = f"{NETNS_DIR}/nmt-missing-{secrets.token_hex(4)}"
    for fork in (False, True):
        with pytest.raises(NetnsError) as err:
            socket_in(missing, fork=fork)
        e = err.value
        assert isinstance(e, OSError) and e.errno == errno.ENOENT and e.netns == missing
        assert str(e) == f"no such network namespace {missing}: is the pod running?"
        assert not os.path.exists(missing)   # pyroute2 would create it with its default flags
    with pytest.raises(NetnsError, match="no such network namespace /var/run/netns/nmt-x: "):
        socket_in("nmt-x")                   # a bare name is looked up where `ip netns` keeps them
    with pytest.raises(NetnsError, match=r"/proc/999999999/ns/net: has the process exited\?"):
        socket_in("/proc/999999999/ns/net")


async def test_async_wrappers_raise_the_same_typed_error():
    missing = f"{NETNS_DIR}/nmt-missing-{secrets.token_hex(4)}"
    with trio.fail_after(5):
        with pytest.raises(NetnsError, match="is the pod running"):
            await listen_in(missing, "127.0.0.1", 15001)
        with pytest.raises(NetnsError, match="is the pod running"):
            await connect_in(missing, "127.0.0.1", 15001, timeout=1)


def test_error_messages_name_address_and_namespace():
    e = ConnectError(("10.0.0.1", 8080), "refused", "/var/run/netns/a", errno.ECONNREFUSED)
    assert str(e) == "connect to 10.0.0.1:8080 in /var/run/netns/a failed: refused"
    assert str(ConnectError(("fd00::1", 80), "timeout")) == "connect to [fd00::1]:80 failed: timeout"
    assert str(ListenError("/var/run/netns/a", ("0.0.0.0", 15001), "Address already in use")) == \
        "cannot listen on 0.0.0.0:15001 in /var/run/netns/a: Address already in use"


# --- real namespaces ----------------------------------------------------------------------------

@pytest.mark.root
def test_not_a_network_namespace(tmp_path):
    f = tmp_path / "not-a-netns"
    f.write_text("")
    for fork in (False, True):
        with pytest.raises(NetnsError, match="is not a network namespace") as err:
            socket_in(str(f), fork=fork)
        assert err.value.errno == errno.EINVAL


@pytest.mark.root
async def test_listener_inside_netns_is_reachable_there_and_not_from_the_host(netns_lab):
    ns = netns_lab.add()
    with trio.fail_after(10):
        listener = await listen_in(ns, "127.0.0.1", 15001)
        async with listener:
            assert netns_cookie(listener) != host_cookie()
            client = ("import socket; s = socket.create_connection(('127.0.0.1', 15001), timeout=5); "
                      "s.sendall(b'hello from the pod'); s.shutdown(socket.SHUT_WR); "
                      "print(s.getsockname()[0]); print(s.recv(100).decode())")
            async with trio.open_nursery() as nursery:
                out: list[str] = []

                async def run_client() -> None:
                    out.append(await run_in(ns, client))
                nursery.start_soon(run_client)
                stream = await listener.accept()
                async with stream:
                    got = b""
                    while chunk := await stream.receive_some(100):
                        got += chunk
                    assert got == b"hello from the pod"
                    assert stream.socket.getpeername()[0] == "127.0.0.1"
                    await stream.send_all(b"hi")
            assert out == ["127.0.0.1\nhi"]

            # the host's 127.0.0.1:15001 is another namespace's loopback: our listener never sees it
            try:
                with socket.create_connection(("127.0.0.1", 15001), timeout=1):
                    pass                   # something of the host's own listens there; not ours:
            except OSError:
                pass
            with trio.move_on_after(0.3) as nothing:
                await listener.accept()
            assert nothing.cancelled_caught


@pytest.mark.root
def test_socket_in_takes_name_path_and_proc_pid(netns_lab):
    ns = netns_lab.add()
    name = os.path.basename(ns)
    with socket_in(ns) as s:
        cookie = netns_cookie(s)
    assert cookie != host_cookie()
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "30"])
    try:
        proc_path = f"/proc/{sleeper.pid}/ns/net"
        for _ in range(100):               # until ip has exec'd sleep inside the namespace
            if os.stat(proc_path).st_ino == os.stat(ns).st_ino:
                break
            threading.Event().wait(0.02)
        for target in (name, ns, proc_path):
            for fork in (False, True):
                with socket_in(target, fork=fork) as s:
                    assert netns_cookie(s) == cookie, (target, fork)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.root
def test_only_the_calling_thread_enters_and_it_comes_back(netns_lab):
    ns = netns_lab.add()
    home = host_cookie()
    seen: dict[str, int] = {}

    def worker() -> None:
        with socket_in(ns) as s:
            seen["in"] = netns_cookie(s)
        with socket.socket() as s:       # same thread, plain socket: back in the agent's namespace
            seen["after"] = netns_cookie(s)
        seen["same_ns_file"] = int(os.stat("/proc/thread-self/ns/net").st_ino
                                   == os.stat("/proc/self/ns/net").st_ino)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["in"] != home and seen["after"] == home and seen["same_ns_file"] == 1
    assert host_cookie() == home


@pytest.mark.root
def test_netns_cookie_differs_between_namespaces(netns_lab):
    a, b = netns_lab.add(), netns_lab.add()
    with socket_in(a) as a1, socket_in(a, socket.AF_INET, socket.SOCK_DGRAM) as a2, socket_in(b) as b1:
        assert netns_cookie(a1) == netns_cookie(a2)
        assert len({netns_cookie(a1), netns_cookie(b1), host_cookie()}) == 3


@pytest.mark.root
async def test_connect_in_source_address_is_the_pods_and_the_socket_is_marked(netns_lab):
    pod, peer = netns_lab.add(), netns_lab.add()
    netns_lab.link(pod, "198.18.0.1", peer, "198.18.0.2")    # RFC 2544 benchmarking range
    with trio.fail_after(10):
        listener = await listen_in(peer, "198.18.0.2", 15008)
        async with listener:
            stream = await connect_in(pod, "198.18.0.2", 15008, timeout=5)
            accepted = await listener.accept()
            async with stream, accepted:
                assert stream.socket.getsockname()[0] == "198.18.0.1"
                assert accepted.socket.getpeername() == stream.socket.getsockname()
                assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == PROXY_MARK
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                assert netns_cookie(stream) != netns_cookie(accepted) != host_cookie()
                await stream.send_all(b"ping")
                assert await accepted.receive_some(10) == b"ping"

            unmarked = await connect_in(pod, "198.18.0.2", 15008, mark=None, timeout=5)
            async with unmarked, await listener.accept():
                assert unmarked.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0


@pytest.mark.root
async def test_connect_in_over_the_pods_own_loopback(netns_lab):
    ns = netns_lab.add()
    with trio.fail_after(10):
        async with await listen_in(ns, "127.0.0.1", 15006) as listener:
            stream = await connect_in(ns, "127.0.0.1", 15006, timeout=5)
            async with stream, await listener.accept() as accepted:
                assert stream.socket.getsockname()[0] == "127.0.0.1"
                assert netns_cookie(stream) == netns_cookie(listener) == netns_cookie(accepted)


@pytest.mark.root
async def test_connect_in_typed_errors(netns_lab):
    ns = netns_lab.add()
    name = os.path.basename(ns)
    ip("-n", name, "route", "add", "unreachable", "203.0.113.0/24")
    with trio.fail_after(15):
        with pytest.raises(ConnectError) as err:       # nothing listens on the pod's 15006
            await connect_in(ns, "127.0.0.1", 15006, timeout=2)
        e = err.value
        assert (e.reason, e.address, e.netns, e.errno) == ("refused", ("127.0.0.1", 15006), ns, errno.ECONNREFUSED)
        assert isinstance(e, OSError)

        with pytest.raises(ConnectError) as err:       # no route at all: only lo is up
            await connect_in(ns, "198.51.100.7", 80, timeout=2)
        assert err.value.reason == "unreachable" and err.value.errno == errno.ENETUNREACH

        with pytest.raises(ConnectError) as err:       # an "unreachable" route
            await connect_in(ns, "203.0.113.9", 80, timeout=2)
        assert err.value.reason == "unreachable" and err.value.errno == errno.EHOSTUNREACH

        # timeout: a listener whose accept queue is full drops further SYNs
        full = socket_in(ns)
        full.bind(("127.0.0.1", 15001))
        full.listen(0)
        held = []
        try:
            with pytest.raises(ConnectError) as err:
                for _ in range(5):
                    held.append(await connect_in(ns, "127.0.0.1", 15001, timeout=0.5))
            assert err.value.reason == "timeout" and err.value.errno == errno.ETIMEDOUT
            assert str(err.value) == f"connect to 127.0.0.1:15001 in {ns} failed: timeout"
        finally:
            for s in held:
                await s.aclose()
            full.close()


@pytest.mark.root
async def test_listen_in_port_taken_in_the_pod_but_free_elsewhere(netns_lab):
    a, b = netns_lab.add(), netns_lab.add()
    with trio.fail_after(10):
        async with await listen_in(a, "0.0.0.0", 15008), await listen_in(b, "0.0.0.0", 15008):
            with pytest.raises(ListenError) as err:
                await listen_in(a, "0.0.0.0", 15008)
            assert err.value.errno == errno.EADDRINUSE and err.value.address == ("0.0.0.0", 15008)
            assert err.value.netns == a and "Address already in use" in str(err.value)


@pytest.mark.root
def test_a_socket_in_a_pod_costs_no_pyroute2_import(netns_lab):
    """setns goes straight to libc: pyroute2 (~11 MB of the agent's RSS) stays out of the
    process unless the forked path is asked for."""
    path = netns_lab.add()
    code = ("import sys, socket; from agent.base.netns import socket_in, netns_cookie; "
            f"s = socket_in({path!r}); host = socket.socket(); "
            "assert netns_cookie(s) != netns_cookie(host), 'not in the pod'; "
            "print('pyroute2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
