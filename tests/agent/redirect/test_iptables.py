"""agent/redirect/iptables.py for host workloads: the plan (pure), and against the real kernel
in a throwaway ``nmt-*`` netns standing in for the host namespace (the redirector runs in a
child process entered into it), with a client process in a throwaway cgroup.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from agent.redirect.iptables import (HOST_IN_CHAIN, HOST_MARK_BASE, HOST_OUT_CHAIN, HostEntry, host_mark,
                                     plan_host_rules)
from controller.api import ObjectMeta, Workload
from controller.api.resources import WorkloadSpec

ROOT = str(Path(__file__).resolve().parents[3])


def host_workload(name: str, ip: str, cgroup: str, ports=(8090,)) -> Workload:
    return Workload(ObjectMeta(name, "shop"), WorkloadSpec(node="n", addresses=(ip,), cgroup=cgroup, ports=ports))


def test_host_plan_redirects_by_cgroup_marks_syns_and_captures_only_declared_ports():
    a = HostEntry(host_workload("a", "10.0.0.11", "/sys/fs/cgroup/a.service", ports=(8090, 8091)), "a.service",
                  host_mark(1))
    b = HostEntry(host_workload("b", "10.0.0.12", "/sys/fs/cgroup/b.service", ports=()), "b.service", host_mark(2))
    rules = plan_host_rules([a, b]).splitlines()
    assert f"-A {HOST_OUT_CHAIN} -p tcp -m cgroup --path a.service -j REDIRECT --to-ports 15001" in rules
    assert f"-A {HOST_OUT_CHAIN} -d 10.0.0.12/32 -m cgroup --path b.service -j RETURN" in rules
    assert any("--path b.service" in r and "--set-xmark 0x4e4d0002/0xffffffff" in r for r in rules)
    dnat = [r for r in rules if r.startswith(f"-A {HOST_IN_CHAIN} -d ")]
    assert dnat == [f"-A {HOST_IN_CHAIN} -d 10.0.0.11/32 -p tcp -m tcp --dport {p} -j DNAT "
                    f"--to-destination 10.0.0.11:15006" for p in (8090, 8091)]   # b declares no ports
    # the proxy's own sockets pass before any workload's rule
    assert rules.index(f"-A {HOST_OUT_CHAIN} -m mark --mark 0x539 -j RETURN") < \
        min(i for i, r in enumerate(rules) if "REDIRECT" in r)
    assert host_mark(1) == HOST_MARK_BASE + 1 and 0x539 not in {host_mark(i) for i in range(1, 100)}
    with pytest.raises(ValueError):
        host_mark(0)


CHILD = r"""
import json, socket, subprocess, sys, trio
from agent.redirect.iptables import IptablesRedirector
from tests.agent.redirect.test_iptables import host_workload
cg, ip, client = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
async def main():
    r = IptablesRedirector()
    w = host_workload("svc", ip, cg)
    await r.start([w])
    await r.enrol(w)
    await r.enrol(w)                                   # idempotent
    out["check"] = [f.level for f in r.check(w)]
    out["fwmark"] = open("/proc/sys/net/ipv4/tcp_fwmark_accept").read().strip()
    lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 15001)); lst.listen(); lst.settimeout(10)
    proc = subprocess.Popen(client)
    conn, _ = await trio.to_thread.run_sync(lst.accept)
    out["origin"] = r.host_origin(conn)
    proc.wait(10); conn.close(); lst.close()
    await r.unenrol(w)
    out["after"] = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.count("NODEMESH")
    out["fwmark_after"] = open("/proc/sys/net/ipv4/tcp_fwmark_accept").read().strip()
    await r.stop()
trio.run(main)
print(json.dumps(out))
"""


@pytest.mark.root
def test_host_workload_is_redirected_told_apart_by_its_mark_and_removed(tmp_path):
    from agent.redirect.cgroup import cgroup2_mounts
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.fail("no cgroup2 mounted")
    tag = secrets.token_hex(4)
    ns, cg = f"nmt-{tag}", os.path.join(mounts[0], f"nmt-{tag}")
    ip = f"10.251.{secrets.randbelow(256)}.1"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True, timeout=20)  # noqa: E731
    try:
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "add", "nmtv0", "type", "veth", "peer", "name", "nmtv1")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "nmtv0")
        for dev in ("nmtv0", "nmtv1"):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "route", "add", "default", "dev", "nmtv0")
        os.mkdir(cg)
        client = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "client", sys.executable, "-c",
                  "import socket; socket.create_connection(('10.96.0.9', 80), timeout=5).close()"]
        p = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", sys.executable, "-c", CHILD, cg, ip, *client],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT})
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.splitlines()[-1])
        assert out["check"] == ["ok"] and out["fwmark"] == "1"
        assert out["origin"] == [["shop", "svc"], ["10.96.0.9", 80]]
        assert out["after"] == 0 and out["fwmark_after"] == "0"     # chains gone, sysctl restored
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if os.path.isdir(cg):
            os.rmdir(cg)
