"""agent/redirect/ebpf.py against the real kernel: a test pod (netns + cgroup v2 + a veth to a
peer netns), a client process placed in the pod's cgroup and netns, and the redirector's programs
attached to them.

Every namespace is ``nmt-<random>``, every cgroup ``<cgroup2>/nmt-<random>``, addresses are
10.250.x.y/30 inside those namespaces only; the ``pod`` fixture's finalizer removes them and any
program of ours left on the cgroup, even when a test fails. The redirector keeps its record of
attached cgroups in the test's tmp_path, never in /run.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from agent.redirect import bpfmaps
from controller.api import ObjectMeta, Workload
from controller.api.resources import WorkloadSpec

SERVICE_VIP = ("10.96.0.10", 80)
ENETUNREACH, ECONNREFUSED = 101, 111
CLIENT = r"""
import socket, sys
host, port, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(5)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
try:
    s.connect((host, port))
    print("connected", s.getsockname()[0], s.getsockname()[1], flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=20)


@dataclass
class Pod:
    name: str
    netns: str            # /var/run/netns/<name>
    peer: str             # /var/run/netns/<peer name>
    cgroup_dir: str       # on the cgroup2 mount
    ip: str
    peer_ip: str
    workload: Workload

    def client_argv(self, host: str, port: int, mark: int = 0) -> list[str]:
        """Run CLIENT in the pod: into the cgroup first, then into the netns (KERNEL-NOTES)."""
        script = (f'echo $$ > {self.cgroup_dir}/cgroup.procs && '
                  f'exec ip netns exec {self.name} {sys.executable} -c "$0" "$@"')
        return ["sh", "-c", script, CLIENT, host, str(port), str(mark)]

    async def connect(self, host: str, port: int, mark: int = 0) -> list[str]:
        """Connect from inside the pod; the words the client printed ("error", errno) or
        ("connected", ip, port)."""
        p = await trio.run_process(self.client_argv(host, port, mark), capture_stdout=True,
                                   capture_stderr=True, check=False)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout.decode().split()


def _cgroup2() -> str:
    from agent.redirect.ebpf import cgroup2_mounts
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.fail("no cgroup2 is mounted: the ebpf mode needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    return mounts[0]


@pytest.fixture
def pod():
    pytest.importorskip("bcc")
    from agent.redirect.ebpf import _detach_ours
    tag = secrets.token_hex(4)
    name, peer = f"nmt-{tag}", f"nmt-{tag}p"
    mount = _cgroup2()
    cg = os.path.join(mount, f"nmt-{tag}")
    net = secrets.randbelow(256)
    ip, peer_ip = f"10.250.{net}.1", f"10.250.{net}.2"
    spec_cgroup = f"/sys/fs/cgroup/nmt-{tag}"        # as a user writes it; mapped onto cgroup2
    w = Workload(ObjectMeta(name, "nmt"), WorkloadSpec(node="test", addresses=(ip,),
                                                       netns=f"/var/run/netns/{name}", cgroup=spec_cgroup))
    try:
        for ns in (name, peer):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", "nmtv0", "netns", name, "type", "veth", "peer", "name", "nmtv1", "netns", peer)
        for ns, dev, addr in ((name, "nmtv0", ip), (peer, "nmtv1", peer_ip)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        os.mkdir(cg)
        yield Pod(name, f"/var/run/netns/{name}", f"/var/run/netns/{peer}", cg, ip, peer_ip, w)
    finally:
        left = _detach_ours(cg) if os.path.isdir(cg) else 0
        for ns in (name, peer):
            _run("ip", "netns", "del", ns, check=False)
        if os.path.isdir(cg):
            if os.path.exists(f"{cg}/cgroup.kill"):
                with open(f"{cg}/cgroup.kill", "w") as f:
                    f.write("1")
            for _ in range(50):
                try:
                    os.rmdir(cg)
                    break
                except OSError:
                    import time
                    time.sleep(0.05)
        assert not os.path.exists(cg), f"cgroup {cg} left behind"
        assert left == 0, f"{left} program(s) of ours were still attached to {cg}"


def ours_in_tree(cg: str) -> list[str]:
    """Names of nodemesh programs `bpftool cgroup tree` shows at or below ``cg``."""
    out = _run("bpftool", "-j", "cgroup", "tree", cg).stdout
    names = []
    for entry in json.loads(out or "[]"):
        for p in entry.get("programs", []):
            if p.get("name", "").startswith("nm_"):
                names.append(p["name"])
    return names


def sk_lookup_links(netns: str) -> int:
    ino = os.stat(netns).st_ino
    links = json.loads(_run("bpftool", "-j", "link", "list").stdout or "[]")
    return sum(1 for ln in links if ln.get("type") == "netns" and ln.get("netns_ino") == ino
               and ln.get("attach_type") in ("sk_lookup", 36))


def redirector(tmp_path):
    from agent.redirect.ebpf import EbpfRedirector
    return EbpfRedirector(instance="test", state_dir=str(tmp_path))


async def accept_from_pod(pod: Pod, listener: trio.SocketListener, host: str, port: int, mark: int = 0):
    """Run the pod client against host:port while accepting once on ``listener``; returns
    (client words, accepted stream; the client has closed its end)."""
    result: dict = {}

    async def client():
        result["words"] = await pod.connect(host, port, mark)

    async with trio.open_nursery() as n:
        n.start_soon(client)
        result["stream"] = await listener.accept()
    return result["words"], result["stream"]


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.root
async def test_outbound_connect_lands_on_15001_with_original_destination(pod, tmp_path):
    from agent.base.netns import listen_in, netns_cookie
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([pod.workload])
        try:
            await red.enrol(pod.workload)
            listener = await listen_in(pod.netns, "0.0.0.0", 15001)
            words, stream = await accept_from_pod(pod, listener, *SERVICE_VIP)
            assert words[0] == "connected", words
            peer = stream.socket.getpeername()
            assert (words[1], int(words[2])) == peer                  # the key the proxy uses
            # SO_NETNS_COOKIE works on the accepted socket too, and equals the listener's
            assert netns_cookie(stream.socket) == netns_cookie(listener.socket)
            assert red.original_destination_sync(stream.socket) == SERVICE_VIP
            # read once: the entry is deleted after reading
            from agent.redirect.origdst import NoOriginalDestination
            with pytest.raises(NoOriginalDestination):
                red.original_destination_sync(stream.socket)

            # the proxy's own sockets (SO_MARK 0x539) and the pod's own address are not redirected
            assert await pod.connect(*SERVICE_VIP, mark=0x539) == ["error", str(ENETUNREACH)]
            assert await pod.connect(pod.ip, 9) == ["error", str(ECONNREFUSED)]
            assert all(f.level == "ok" for f in red.check(pod.workload) if "sk_lookup" not in f.message
                       and "15006" not in f.message), red.check(pod.workload)

            await red.unenrol(pod.workload)
            assert await pod.connect(*SERVICE_VIP) == ["error", str(ENETUNREACH)]
            assert ours_in_tree(pod.cgroup_dir) == []
            assert sk_lookup_links(pod.netns) == 0
            listener.socket.close()
        finally:
            await red.stop()


@pytest.mark.root
async def test_original_destination_async_and_missing(pod, tmp_path):
    from agent.base.netns import connect_in, listen_in
    from agent.redirect.origdst import NoOriginalDestination
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([])
        try:
            await red.enrol(pod.workload)
            listener = await listen_in(pod.netns, "0.0.0.0", 15001)
            words, stream = await accept_from_pod(pod, listener, "10.96.7.7", 443)
            assert await red.original_destination(pod.workload, stream) == ("10.96.7.7", 443)
            # a connection to 15001 that connect4 never saw: typed error
            async with trio.open_nursery() as n:
                n.start_soon(lambda: connect_in(pod.netns, "127.0.0.1", 15001, timeout=5))
                direct = await listener.accept()
            with pytest.raises(NoOriginalDestination):
                await red.original_destination(pod.workload, direct)
            await direct.aclose()
            listener.socket.close()
        finally:
            await red.stop()


@pytest.mark.root
async def test_ipv4_mapped_connect6_is_redirected_native_ipv6_untouched(pod, tmp_path):
    from agent.base.netns import listen_in
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([])
        try:
            await red.enrol(pod.workload)
            listener = await listen_in(pod.netns, "0.0.0.0", 15001)
            words, stream = await accept_from_pod(pod, listener, "::ffff:10.96.0.10", 80)
            assert words[0] == "connected", words
            assert red.original_destination_sync(stream.socket) == SERVICE_VIP
            # native IPv6: not redirected (no route in the pod: unreachable, not our listener)
            assert (await pod.connect("fd00::10", 80))[0] == "error"
            listener.socket.close()
        finally:
            await red.stop()


@pytest.mark.root
async def test_enrol_twice_is_once_and_stop_removes_everything(pod, tmp_path):
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([pod.workload])
        try:
            await red.enrol(pod.workload)
            await red.enrol(pod.workload)
            assert sorted(ours_in_tree(pod.cgroup_dir)) == ["nm_connect4", "nm_connect6", "nm_sockops"]
            assert sk_lookup_links(pod.netns) == 1
            findings = red.check(pod.workload)
            assert [f.level for f in findings if f.level == "FAIL"] == [], findings
            await red.unenrol(pod.workload)
            await red.unenrol(pod.workload)          # not enrolled: no-op
            await red.enrol(pod.workload)
        finally:
            await red.stop()
        assert ours_in_tree(pod.cgroup_dir) == []
        assert sk_lookup_links(pod.netns) == 0
        assert not (tmp_path / "test.json").exists()
        assert await pod.connect(*SERVICE_VIP) == ["error", str(ENETUNREACH)]


@pytest.mark.root
async def test_crashed_redirector_leftovers_removed_by_next_start(pod, tmp_path):
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([pod.workload])
        await red.enrol(pod.workload)
        assert ours_in_tree(pod.cgroup_dir)
        # "crash": drop it without stop (a real crash also closes the sk_lookup link's fd)
        for e in red._enrolled.values():
            os.close(e.link_fd)
        del red
        gc.collect()
        assert ours_in_tree(pod.cgroup_dir)                    # cgroup attachments outlive us
        again = redirector(tmp_path)
        await again.start([])
        try:
            assert ours_in_tree(pod.cgroup_dir) == []
            assert await pod.connect(*SERVICE_VIP) == ["error", str(ENETUNREACH)]
        finally:
            await again.stop()


@pytest.mark.root
async def test_a_sweep_leaves_another_agents_fresh_attachments_alone(pod, tmp_path):
    """Two agents on one machine (the lab's nodes): node-b's record names a cgroup it used in an
    earlier run; node-a enrols that cgroup now. node-b's start must not detach node-a's
    programs (it once did: they share names), only its own earlier ones."""
    from agent.redirect.ebpf import EbpfRedirector
    with trio.fail_after(60):
        old_b = EbpfRedirector(instance="node-b", state_dir=str(tmp_path))
        await old_b.start([pod.workload])
        await old_b.enrol(pod.workload)                       # b's earlier run used the pod...
        await old_b.unenrol(pod.workload)
        old_b._write_state({pod.cgroup_dir})                  # ...and crashed before forgetting it
        a = EbpfRedirector(instance="node-a", state_dir=str(tmp_path))
        await a.start([pod.workload])
        await a.enrol(pod.workload)                           # the pod is node-a's now
        b = EbpfRedirector(instance="node-b", state_dir=str(tmp_path))
        try:
            await b.start([])                                 # sweeps b's recorded cgroups
            assert sorted(ours_in_tree(pod.cgroup_dir)) == ["nm_connect4", "nm_connect6", "nm_sockops"]
        finally:
            await b.stop()
            await a.stop()
            old_b._bpf.cleanup()


@pytest.mark.root
async def test_restarted_redirector_takes_over_enrolled_cgroup(pod, tmp_path):
    from agent.base.netns import listen_in
    old = redirector(tmp_path)
    with trio.fail_after(30):
        await old.start([pod.workload])
        await old.enrol(pod.workload)
        new = redirector(tmp_path)
        await new.start([pod.workload])
        try:
            await new.enrol(pod.workload)                  # flags 0: replaces the old programs
            assert sorted(ours_in_tree(pod.cgroup_dir)) == ["nm_connect4", "nm_connect6", "nm_sockops"]
            listener = await listen_in(pod.netns, "0.0.0.0", 15001)
            words, stream = await accept_from_pod(pod, listener, *SERVICE_VIP)
            assert new.original_destination_sync(stream.socket) == SERVICE_VIP
            listener.socket.close()
        finally:
            await new.stop()
            await old.stop()
        assert ours_in_tree(pod.cgroup_dir) == []


@pytest.mark.root
async def test_inbound_from_outside_goes_to_15006_hbone_and_in_pod_do_not(pod, tmp_path):
    from agent.base.netns import connect_in, listen_in
    red = redirector(tmp_path)
    with trio.fail_after(30):
        await red.start([pod.workload])
        try:
            await red.enrol(pod.workload)
            plain = await listen_in(pod.netns, "0.0.0.0", 15006)
            hbone = await listen_in(pod.netns, "0.0.0.0", 15008)
            app = await listen_in(pod.netns, "0.0.0.0", 8080)
            red.register_inbound_socket(pod.workload, plain)

            async def dial_and_accept(from_ns, listener, port):
                async with trio.open_nursery() as n:
                    n.start_soon(lambda: connect_in(from_ns, pod.ip, port, mark=None, timeout=5))
                    return await listener.accept()

            s = await dial_and_accept(pod.peer, plain, 8080)       # outside -> 15006
            assert await red.original_destination(pod.workload, s) == (pod.ip, 8080)
            await s.aclose()
            s = await dial_and_accept(pod.peer, hbone, 15008)      # HBONE: straight to 15008
            await s.aclose()
            s = await dial_and_accept(pod.netns, app, 8080)        # from inside the pod: the app
            await s.aclose()
            assert all(f.level == "ok" for f in red.check(pod.workload)), red.check(pod.workload)

            await red.unenrol(pod.workload)
            s = await dial_and_accept(pod.peer, app, 8080)         # unenrolled: the app
            await s.aclose()
            for lst in (plain, hbone, app):
                lst.socket.close()
        finally:
            await red.stop()


def _table_type(b, table: str, kind: str):
    """The ctypes type bcc derives for a map's Key or Leaf, from clang's description (what
    ``b[table].Key`` is; taken directly because bcc 0.26 cannot wrap a sockhash: "Unknown table
    type 18")."""
    from bcc import BPF, lib
    desc = (lib.bpf_table_key_desc if kind == "Key" else lib.bpf_table_leaf_desc)(b.module, table.encode())
    return BPF._decode_table_type(json.loads(desc.decode()))


@pytest.mark.root
def test_ctypes_mirrors_match_the_c_layout():
    """bcc derives each map's key/leaf ctypes type from clang's layout of bpf/include/origdst.h."""
    pytest.importorskip("bcc")
    from agent.redirect.ebpf_build import compile_here
    b, _ = compile_here()
    try:
        for table, kind, mirror in (("origdst_by_peer", "Key", bpfmaps.OrigdstKey),
                                    ("origdst_by_peer", "Leaf", bpfmaps.Origdst),
                                    ("origdst_by_cookie", "Leaf", bpfmaps.Origdst),
                                    ("own_addrs", "Key", bpfmaps.OwnAddrKey),
                                    ("host_inbound", "Key", bpfmaps.HostPortKey)):
            c = _table_type(b, table, kind)
            assert ctypes.sizeof(c) == ctypes.sizeof(mirror), (table, kind)
            c_fields = [f[0] for f in c._fields_ if not f[0].startswith("__pad")]
            assert c_fields == [f[0] for f in mirror._fields_], (table, kind)
            for fname in c_fields:
                assert getattr(c, fname).offset == getattr(mirror, fname).offset, (table, kind, fname)
                assert getattr(c, fname).size == getattr(mirror, fname).size, (table, kind, fname)
    finally:
        b.cleanup()


def test_cgroup_dir_maps_the_hybrid_layout():
    from agent.redirect.base import RedirectError
    from agent.redirect.ebpf import cgroup2_mounts, cgroup_dir
    hybrid = ["/sys/fs/cgroup/unified"]
    assert cgroup_dir("/sys/fs/cgroup/system.slice/web.service", hybrid) == \
        "/sys/fs/cgroup/unified/system.slice/web.service"
    assert cgroup_dir("/sys/fs/cgroup/unified/pods/a", hybrid) == "/sys/fs/cgroup/unified/pods/a"
    assert cgroup_dir("pods/a", hybrid) == "/sys/fs/cgroup/unified/pods/a"
    assert cgroup_dir("/sys/fs/cgroup/pods/a", ["/sys/fs/cgroup"]) == "/sys/fs/cgroup/pods/a"
    for bad, mounts in (("", hybrid), ("/elsewhere/x", hybrid), ("/sys/fs/cgroup/x", [])):
        with pytest.raises(RedirectError):
            cgroup_dir(bad, mounts)
    text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\ntmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
    assert cgroup2_mounts(text) == ["/sys/fs/cgroup/unified"]


def test_cflags_carry_the_parameters():
    pytest.importorskip("bcc")
    from agent.redirect.ebpf import cflags
    flags = cflags()
    assert "-DOUTBOUND_PORT=15001" in flags and "-DPROXY_MARK=0x539" in flags
    assert "-DINBOUND_HBONE_PORT=15008" in flags and "-DINBOUND_PLAIN_PORT=15006" in flags


@pytest.mark.root
def test_the_agent_compiles_in_a_child_and_never_holds_bcc(tmp_path):
    """bcc and LLVM stay in a short-lived child (~100 MB of RSS otherwise): after start the
    agent's process has the programs and maps as descriptors, and no bcc module."""
    pytest.importorskip("bcc")
    root = str(Path(__file__).resolve().parents[3])
    code = ("import sys, trio\n"
            "from agent.redirect.ebpf import EbpfRedirector\n"
            f"r = EbpfRedirector(instance='childcheck', state_dir={str(tmp_path)!r})\n"
            "trio.run(r.start, [])\n"
            "assert set(r._progs) == {'nm_connect4', 'nm_connect6', 'nm_sockops', 'nm_sk_lookup'}\n"
            "assert all(fd >= 0 for fd in [*r._progs.values(), *r._maps.values()])\n"
            "print('bcc' in sys.modules)\n"
            "trio.run(r.stop)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
