"""The network-namespace lab: its plan (pure), its demo mesh and apps, and `nodemesh lab
up|status|exec|down` as a user runs it (root): real namespaces, real processes, nothing left behind.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.lab import apps, cgroups, demo, net, procs
from agent.lab.topology import PlanError, plan
from controller.api import Workload, parse_manifests
from tests.controller.conftest import free_port
from tests.controller.test_controller_process import nodemesh

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
UP_BOUND = 60.0        # seconds from `lab up` to every agent ready (measured: about 6 s for 2x2)


# --- the plan ---------------------------------------------------------------------------------

def test_plan_2x2_names_and_addresses():
    topo = plan(2, 2)
    assert [(n.name, n.netns, n.fabric_address, n.host_veth, n.pod_cidr, n.pod_gateway, n.zone) for n in topo.nodes] == [
        ("node-1", "nmlab-node-1", "10.10.0.11", "nmlab-n1", "10.10.1.0/24", "10.10.1.1", "lab-a"),
        ("node-2", "nmlab-node-2", "10.10.0.12", "nmlab-n2", "10.10.2.0/24", "10.10.2.1", "lab-b"),
    ]
    assert [(p.name, p.app, p.node, p.address, p.gateway, p.netns, p.cgroup, p.port) for p in topo.pods] == [
        ("web-1", "web", "node-1", "10.10.1.2", "10.10.1.1", "nmlab-web-1", "/sys/fs/cgroup/unified/nmlab/web-1", 8080),
        ("echo-1", "echo", "node-1", "10.10.1.3", "10.10.1.1", "nmlab-echo-1", "/sys/fs/cgroup/unified/nmlab/echo-1", 9000),
        ("client-1", "client", "node-1", "10.10.1.4", "10.10.1.1", "nmlab-client-1",
         "/sys/fs/cgroup/unified/nmlab/client-1", None),
        ("web-2", "web", "node-2", "10.10.2.2", "10.10.2.1", "nmlab-web-2", "/sys/fs/cgroup/unified/nmlab/web-2", 8080),
        ("echo-2", "echo", "node-2", "10.10.2.3", "10.10.2.1", "nmlab-echo-2", "/sys/fs/cgroup/unified/nmlab/echo-2", 9000),
    ]
    assert (topo.bridge, topo.controller_ip, topo.cgroup_parent) == ("nmlab-br", "10.10.0.1", "/sys/fs/cgroup/unified/nmlab")
    assert topo.pod("web-2").netns_path == "/var/run/netns/nmlab-web-2"
    assert topo.node("node-2").pods == (topo.pod("web-2"), topo.pod("echo-2"))
    assert [(h.name, h.node, h.address, h.node_netns, h.cgroup, h.port) for h in topo.hosts] == [
        ("hostsvc-1", "node-1", "10.10.0.11", "nmlab-node-1", "/sys/fs/cgroup/unified/nmlab/hostsvc-1", 8090)]


def test_plan_names_are_unique_prefixed_and_fit_the_kernel():
    topo = plan(12, 30)
    netns = [n.netns for n in topo.nodes] + [p.netns for p in topo.pods]
    addresses = [n.fabric_address for n in topo.nodes] + [n.pod_gateway for n in topo.nodes] + [p.address for p in topo.pods]
    assert len(set(netns)) == len(netns) and all(n.startswith("nmlab-") for n in netns)
    assert len(set(addresses)) == len(addresses) and all(a.startswith("10.10.") for a in addresses)
    links = [topo.bridge] + [n.host_veth for n in topo.nodes] + [p.node_veth for p in topo.pods]
    assert all(link.startswith("nmlab-") and len(link) <= 15 for link in links)   # IFNAMSIZ
    assert [n.zone for n in topo.nodes][:3] == ["lab-a", "lab-b", "lab-c"]


def test_plan_spreads_each_service_over_the_nodes():
    topo = plan(2, 1)
    assert [(p.name, p.node) for p in topo.pods] == [("web-1", "node-1"), ("client-1", "node-1"), ("echo-1", "node-2")]
    topo = plan(3, 2)
    assert {p.node for p in topo.pods if p.app == "web"} == {"node-1", "node-2", "node-3"}
    assert {p.node for p in topo.pods if p.app == "echo"} == {"node-1", "node-2", "node-3"}


def test_plan_takes_the_cgroup_root_and_rejects_bad_sizes():
    assert plan(1, 1, cgroup_root="/sys/fs/cgroup/").pod("web-1").cgroup == "/sys/fs/cgroup/nmlab/web-1"
    for nodes, pods in ((0, 1), (1, 0), (201, 1)):
        with pytest.raises(PlanError):
            plan(nodes, pods)


def test_demo_mesh_is_valid_and_follows_the_topology():
    topo = plan(2, 2)
    resources = parse_manifests(demo.manifest(topo), source="lab")
    kinds = [r.kind for r in resources]
    assert kinds == ["Mesh"] + ["Workload"] * 6 + ["Service"] * 3 + ["AuthorizationPolicy"] * 3
    assert resources[0].spec.mtls == "STRICT"
    workloads = {r.metadata.name: r for r in resources if isinstance(r, Workload)}
    web2 = workloads["web-2"].spec
    assert (web2.node, web2.addresses, web2.netns, web2.cgroup, web2.locality.zone, web2.locality.region) == (
        "node-2", ("10.10.2.2",), "/var/run/netns/nmlab-web-2", "/sys/fs/cgroup/unified/nmlab/web-2", "lab-b", "lab")
    assert workloads["client-1"].spec.service_account == "client"
    services = {r.metadata.name: r.spec for r in resources if r.kind == "Service"}
    assert services["web"].addresses == ("10.96.0.10",) and services["web"].ports[0].target_port == 8080
    assert services["echo"].addresses == ("10.96.0.20",) and services["echo"].ports[0].port == 9000
    # the host service: by cgroup, no netns, at node-1's own address
    host = workloads["hostsvc-1"].spec
    assert (host.node, host.addresses, host.netns, host.cgroup, host.ports) == (
        "node-1", ("10.10.0.11",), "", "/sys/fs/cgroup/unified/nmlab/hostsvc-1", (8090,))
    assert services["hostsvc"].addresses == ("10.96.0.30",) and services["hostsvc"].ports[0].target_port == 8090


# --- the demo apps ----------------------------------------------------------------------------

@pytest.fixture
def serve():
    servers = []

    def start(server):
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1]
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_http_app_answers_its_name_and_path_with_keep_alive(serve):
    port = serve(apps.http_server("127.0.0.1", free_port(), "web-9"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for path in ("/", "/a/b?c=1"):
        conn.request("GET", path)
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, f"web-9 {path}\n".encode())
        assert not r.will_close      # the same connection serves the next request
    conn.close()


def test_echo_app_echoes(serve):
    port = serve(apps.echo_server("127.0.0.1", free_port()))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello lab")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(100):
            got += chunk
    assert got == b"hello lab"


# --- the lab itself (root) --------------------------------------------------------------------

def lab(*args, run, check=True, timeout=120, **kw):
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    verb, rest = args[0], args[1:]
    if verb == "up" and "--timeout" not in rest:
        rest = (*rest, "--timeout", str(UP_BOUND))   # lab itself says which agent is not ready
    p = subprocess.run([sys.executable, "-m", "controller.cli", "lab", verb, "--dir", str(run), *rest],
                       capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check:
        assert p.returncode == 0, (f"lab {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
                                   + _log_tails(run))
    return p


def _log_tails(run: Path, lines: int = 40) -> str:
    """The end of each agent's log, for a failure message."""
    out = []
    for log in sorted((run / "logs").glob("agent-*.log")):
        out.append(f"\n--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    return "".join(out)


def machine_state() -> dict[str, set[str]]:
    """What the lab could leave behind: namespaces, host links, the cgroup subtree, netfilter
    rules, BPF programs attached to cgroups."""
    root = cgroups.find_root()
    parent = Path(root or "/nonexistent", "nmlab")
    bpf = subprocess.run(["bpftool", "cgroup", "tree", root or "/sys/fs/cgroup"], capture_output=True, text=True).stdout
    return {
        "netns": set(net.netns_list()),
        "links": set(net.links()),
        "cgroups": {str(p) for p in parent.rglob("*") if p.is_dir()} | ({str(parent)} if parent.exists() else set()),
        "iptables": set(subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout.splitlines()),
        "bpf": {line.split()[0] for line in bpf.splitlines() if line.startswith("/")},
    }


def lab_processes(run: Path) -> list[str]:
    """Processes that belong to a lab: started from its run dir, or a demo app."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run) in cmd or "agent.lab.apps" in cmd:
                out.append(f"{d.name} {cmd}")
    return out


@pytest.fixture
def lab_run(tmp_path):
    """A run dir on a machine with no lab; the lab is always brought down afterwards."""
    if net.lab_state()["netns"] or net.lab_state()["links"]:
        pytest.fail(f"a lab is already up on this machine ({net.lab_state()}); bring it down first (sudo scripts/lab down)")
    run = tmp_path / "lab"
    before = machine_state()
    yield run, before
    lab("down", run=run, check=False)


def assert_clean(run: Path, before: dict, pids: list[int]) -> None:
    """Nothing the lab made is left. Other work on the machine may add or remove its own
    namespaces or links meanwhile, so only differences that could be the lab's count."""
    after = machine_state()
    for what in before:
        changed = before[what] ^ after[what]
        assert not {x for x in changed if "nmlab" in x}, (what, sorted(before[what] - after[what]), sorted(after[what] - before[what]))
    assert not after["cgroups"]
    assert not lab_processes(run)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    assert not run.exists()


def all_pids(run: Path) -> dict[str, int]:
    return {name: procs.pid_of(run, name) for name in procs.names(run)}


@pytest.mark.root
def test_lab_up_twice_exec_status_and_down_leaves_nothing(lab_run):
    run, before = lab_run
    t0 = time.monotonic()
    out = lab("up", "--nodes", "2", "--pods-per-node", "2", run=run, timeout=UP_BOUND + 30).stdout
    took = time.monotonic() - t0
    assert took < UP_BOUND, f"lab up took {took:.1f}s"
    assert "service shop/web created" in out and "NODEMESH_CONFIG=" in out and "lab exec" in out
    pids = all_pids(run)
    assert sorted(pids) == ["agent-node-1", "agent-node-2", "app-echo-1", "app-echo-2", "app-hostsvc-1",
                            "app-web-1", "app-web-2", "controller"]
    assert all(pids.values())
    state = net.lab_state()
    assert state["netns"] == ["nmlab-client-1", "nmlab-echo-1", "nmlab-echo-2", "nmlab-node-1", "nmlab-node-2",
                              "nmlab-web-1", "nmlab-web-2"]
    assert state["links"] == ["nmlab-br", "nmlab-n1", "nmlab-n2"]

    again = lab("up", "--nodes", "2", "--pods-per-node", "2", run=run).stdout   # idempotent: nothing restarts
    assert "workload shop/web-2 unchanged" in again
    assert all_pids(run) == pids and net.lab_state() == state

    addr = lab("exec", "web-2", "--", "ip", "-4", "addr", "show", "eth0", run=run).stdout
    assert "inet 10.10.2.2/24" in addr
    cg = lab("exec", "echo-1", "--", "cat", "/proc/self/cgroup", run=run).stdout
    assert "0::/nmlab/echo-1" in cg.splitlines()
    cg = lab("exec", "hostsvc-1", "--", "cat", "/proc/self/cgroup", run=run).stdout   # the host service's cgroup,
    assert "0::/nmlab/hostsvc-1" in cg.splitlines()                                   # node-1's netns
    assert "inet 10.10.0.11/24" in lab("exec", "hostsvc-1", "--", "ip", "-4", "addr", "show", "eth0", run=run).stdout
    assert lab("exec", "client-1", "--", "sh", "-c", "cat; exit 7", run=run, check=False, input="through\n").returncode == 7
    assert lab("exec", "client-1", "--", "cat", run=run, input="through\n").stdout == "through\n"
    route = lab("exec", "node-1", "--", "ip", "route", run=run).stdout
    assert "10.10.2.0/24 via 10.10.0.12" in route
    for where in ("node-1", "client-1"):   # node to node over the fabric; pod -> its node -> fabric
        ready = lab("exec", where, "--", "curl", "-sS", "--max-time", "5", "http://10.10.0.12:15021/healthz/ready", run=run)
        assert "serving version" in ready.stdout
    assert lab("exec", "nope-1", "--", "true", run=run, check=False).returncode != 0

    status = lab("status", run=run).stdout
    assert f"running (pid {pids['agent-node-2']})" in status and "serving version" in status
    assert "web-2" in status and "NOT" not in status

    down = lab("down", run=run).stdout
    assert "stopped agent-node-1" in down and "controller" in down
    assert_clean(run, before, list(pids.values()))
    assert lab("down", run=run).returncode == 0          # twice is fine
    assert lab("status", run=run, check=False).returncode == 1


@pytest.mark.root
def test_down_after_a_crash_leaves_nothing(lab_run):
    run, before = lab_run
    lab("up", "--nodes", "2", "--pods-per-node", "1", run=run, timeout=UP_BOUND + 30)
    pids = all_pids(run)
    for pid in (pids["controller"], pids["agent-node-1"], pids["agent-node-2"]):
        os.kill(pid, signal.SIGKILL)
    # and a process the lab never started, still holding a pod netns
    stray = subprocess.Popen(["ip", "netns", "exec", "nmlab-web-1", "sleep", "300"], start_new_session=True)
    time.sleep(0.2)
    assert lab("status", run=run, check=False).returncode == 1       # status tells
    down = lab("down", run=run)
    stray.wait(timeout=10)
    assert down.returncode == 0 and "removed 5 netns" in down.stdout
    assert_clean(run, before, [*pids.values(), stray.pid])


@pytest.mark.root
@pytest.mark.parametrize("redirect", ["iptables", "ebpf"])
def test_mesh_end_to_end_through_the_lab(lab_run, redirect):
    """A client pod calls the web Service's VIP; a web pod answers through both agents (mTLS),
    the server side logs the client's SPIFFE identity, and the echo policy denies web -> echo.
    Depends on the agents' redirect (agent run --redirect), in each mode."""
    run, before = lab_run
    lab("up", "--nodes", "2", "--pods-per-node", "2", "--redirect", redirect, run=run, timeout=UP_BOUND + 30)
    pids = list(all_pids(run).values())

    got = lab("exec", "client-1", "--", "curl", "-sS", "--max-time", "10", "http://10.96.0.10/e2e", run=run).stdout
    assert got in ("web-1 /e2e\n", "web-2 /e2e\n")
    # the replica on the other node, by its address: HBONE between the agents
    got = lab("exec", "client-1", "--", "curl", "-sS", "--max-time", "10", "http://10.10.2.2:8080/far", run=run).stdout
    assert got == "web-2 /far\n"
    echo = "exec 3<>/dev/tcp/10.96.0.20/9000; echo hello >&3; head -1 <&3"
    assert lab("exec", "client-1", "--", "bash", "-c", echo, run=run).stdout == "hello\n"
    denied = lab("exec", "web-1", "--", "bash", "-c", echo, run=run, check=False)
    assert "hello" not in denied.stdout       # reset: the exit code depends on when bash sees it

    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in (run / "logs" / "access-node-2.log").read_text().splitlines()]
        inbound = [r for r in lines if r["reporter"] == "destination" and r["dst"]["workload"] == "web-2"]
        if inbound or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert inbound, lines
    assert inbound[-1]["src"]["identity"] == demo.spiffe_id("client")
    assert inbound[-1]["security"] == "mutual_tls" and inbound[-1]["decision"]["result"] == "allow"

    def denied_logged():   # the line is written as the handler finishes, maybe after bash saw the reset
        node1 = [json.loads(line) for line in (run / "logs" / "access-node-1.log").read_text().splitlines()]
        return any(r["decision"]["result"] == "deny" and r["src"]["workload"] == "web-1"
                   and r["dst"]["service"] and r["dst"]["service"].startswith("echo") for r in node1)
    until(denied_logged, "node-1's access log records web-1 -> echo as denied", timeout=10)
    lab("down", run=run)
    assert_clean(run, before, pids)      # the redirect hooks (rules, BPF attachments) went too


def nodemesh_cli(run: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS},
           "NODEMESH_CONFIG": str(run / "config.yaml")}
    return nodemesh(*args, env=env, stdin=stdin)


def curl_web(run: Path, path: str) -> subprocess.CompletedProcess:
    return lab("exec", "client-1", "--", "curl", "-sS", "--max-time", "5", f"http://10.96.0.10{path}",
               run=run, check=False)


def until(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.2)


DENY_CLIENT = """
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {app: web}
  action: DENY
  rules: [{from: [{principals: [cluster.local/ns/shop/sa/client]}]}]
"""

SPREAD_WEB = """
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  addresses: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
  loadBalancer: {algorithm: round_robin, localityFailover: false}
"""


@pytest.mark.root
def test_policy_spread_failover_and_wrk_through_the_lab(lab_run):
    """What a user tries first: a DENY applied blocks within seconds and removing it restores;
    requests spread over the replicas; a dead replica does not fail new connections; wrk works."""
    run, before = lab_run
    lab("up", "--nodes", "2", "--pods-per-node", "2", run=run, timeout=UP_BOUND + 30)
    pids = list(all_pids(run).values())
    assert curl_web(run, "/").returncode == 0

    nodemesh_cli(run, "apply", "-f", "-", stdin=DENY_CLIENT)
    until(lambda: curl_web(run, "/denied").returncode != 0, "the DENY policy blocks client -> web")
    nodemesh_cli(run, "delete", "ap", "deny-client", "-n", "shop")
    until(lambda: curl_web(run, "/again").returncode == 0, "removing the policy restores client -> web")

    # Without locality preference, round robin spreads over both replicas (one per node).
    nodemesh_cli(run, "apply", "-f", "-", stdin=SPREAD_WEB)
    until(lambda: {curl_web(run, f"/spread{i}").stdout.split(" ")[0] for i in range(6)} == {"web-1", "web-2"},
          "requests reach both replicas")

    # Kill web-2's app: its pod no longer answers, new connections still succeed (retried on web-1).
    os.kill(procs.pid_of(run, "app-web-2"), signal.SIGKILL)
    answers = [curl_web(run, f"/after-kill{i}") for i in range(8)]
    assert all(a.returncode == 0 and a.stdout.startswith("web-1 ") for a in answers), \
        [(a.returncode, a.stdout, a.stderr) for a in answers]

    # An unmodified load generator through the mesh.
    wrk = lab("exec", "client-1", "--", "wrk", "-t1", "-c4", "-d2s", "http://10.96.0.10/", run=run).stdout
    assert "Requests/sec" in wrk and "Socket errors" not in wrk and "Non-2xx" not in wrk, wrk
    lab("down", run=run)
    assert_clean(run, before, pids)
