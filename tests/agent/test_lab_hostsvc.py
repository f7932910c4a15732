"""Host services by cgroup, through the lab (root): ``hostsvc-1`` is a plain HTTP server in
node-1's own netns, in a cgroup of its own, enrolled as a Workload with ``spec.cgroup`` and no
netns. In each redirect mode it calls pods' Services through the mesh and pods call it, with the
same identity, policy and telemetry as a pod; unenrolling it removes its rules and hooks.

One lab per mode (bring-up is slow): the module fixture brings it up, the tests run in order on
it, and it is brought down (and checked clean) at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.lab import demo, net
from tests.agent.redirect.test_ebpf import ours_in_tree, sk_lookup_links
from tests.agent.test_lab import UP_BOUND, all_pids, assert_clean, lab, machine_state, nodemesh_cli, until

HOST = "hostsvc-1"
HOST_CGROUP = "/sys/fs/cgroup/unified/nmlab/hostsvc-1"
NODE1 = "/var/run/netns/nmlab-node-1"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
LAB_WAIT = 600.0          # seconds to wait for another user's lab to go away

def deny(name: str, app: str, caller: str) -> str:
    """A DENY AuthorizationPolicy on ``app``'s workloads for ``caller``'s principal, as YAML."""
    return json.dumps({"apiVersion": demo.API, "kind": "AuthorizationPolicy",
                       "metadata": {"name": name, "namespace": demo.NAMESPACE},
                       "spec": {"selector": {"app": app}, "action": "DENY",
                                "rules": [{"from": [{"principals": [demo.principal(caller)]}]}]}})


DENY_HOST_TO_WEB = deny("deny-hostsvc", "web", "hostsvc")
DENY_WEB_TO_HOST = deny("deny-web", "hostsvc", "web")


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def hostlab(request, tmp_path_factory):
    """A lab (2 nodes x 2 pods, the host service on node-1) in one redirect mode; waits for a
    lab someone else runs to go away first, and always brings its own down."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    deadline = time.monotonic() + LAB_WAIT
    while net.lab_state()["netns"] or net.lab_state()["links"]:
        if time.monotonic() > deadline:
            pytest.fail(f"a lab is already up on this machine ({net.lab_state()}); bring it down first")
        time.sleep(30)
    run = tmp_path_factory.mktemp(f"hostlab-{request.param}") / "lab"
    before = machine_state()
    try:
        lab("up", "--nodes", "2", "--pods-per-node", "2", "--redirect", request.param, run=run,
            timeout=UP_BOUND + 30)
        pids = list(all_pids(run).values())
        yield run, request.param, before, pids
    finally:
        lab("down", run=run, check=False)


def _records(run: Path, node: str) -> list[dict]:
    try:
        text = (run / "logs" / f"access-{node}.log").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _curl(run: Path, where: str, url: str) -> subprocess.CompletedProcess:
    return lab("exec", where, "--", "curl", "-sS", "--max-time", "5", url, run=run, check=False)


def _in_node1(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={NODE1}", *argv], capture_output=True, text=True, timeout=20)


def _plain(url: str) -> subprocess.CompletedProcess:
    """curl from the machine's own netns (10.10.0.1 on the lab bridge): outside the mesh."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return subprocess.run(["curl", "-sS", "--max-time", "5", url], capture_output=True, text=True, timeout=20, env=env)


@pytest.mark.root
def test_host_service_calls_pods_as_itself_and_policy_applies(hostlab):
    run, mode, _, _ = hostlab
    got = _curl(run, HOST, "http://10.96.0.10/from-host")
    assert got.returncode == 0 and got.stdout in ("web-1 /from-host\n", "web-2 /from-host\n"), (got.stdout, got.stderr)
    # web-2 on the other node, by address: HBONE from the host namespace, as the host workload
    got = _curl(run, HOST, "http://10.10.2.2:8080/far")
    assert got.stdout == "web-2 /far\n", got.stderr

    def seen():
        return [r for r in _records(run, "node-2") if r["reporter"] == "destination"
                and r["dst"]["workload"] == "web-2" and r["src"]["identity"] == demo.spiffe_id("hostsvc")]
    inbound = until(seen, "node-2 logs web-2's connection from the host service's identity")
    assert inbound[-1]["security"] == "mutual_tls" and inbound[-1]["decision"]["result"] == "allow"
    assert inbound[-1]["src"]["workload"] == HOST and inbound[-1]["src"]["address"] == "10.10.0.11"
    source = until(lambda: [r for r in _records(run, "node-1") if r["reporter"] == "source"
                            and r["src"]["workload"] == HOST and r["dst"]["address"] == "10.10.2.2:8080"],
                   "node-1 logs the host service's outbound connection")
    assert source[-1]["src"]["identity"] == demo.spiffe_id("hostsvc")

    nodemesh_cli(run, "apply", "-f", "-", stdin=DENY_HOST_TO_WEB)
    try:
        until(lambda: _curl(run, HOST, "http://10.96.0.10/denied").returncode != 0,
              "a DENY naming the host workload's principal blocks it")
        assert _curl(run, "client-1", "http://10.96.0.10/client").returncode == 0    # only the host service
        until(lambda: any(r["decision"]["result"] == "deny" and r["decision"]["policy"] == "shop/deny-hostsvc"
                          and r["src"]["identity"] == demo.spiffe_id("hostsvc")
                          for n in ("node-1", "node-2") for r in _records(run, n)),
              "the denial is logged with the policy")
    finally:
        nodemesh_cli(run, "delete", "ap", "deny-hostsvc", "-n", "shop")
    until(lambda: _curl(run, HOST, "http://10.96.0.10/again").returncode == 0, "removing the DENY restores it")


@pytest.mark.root
def test_pods_call_the_host_service_over_mtls_and_policy_applies(hostlab):
    run, mode, _, _ = hostlab
    got = _curl(run, "web-2", "http://10.96.0.30/from-pod")          # node-2 -> node-1's host namespace
    assert got.stdout == "hostsvc-1 /from-pod\n", got.stderr
    got = _curl(run, "client-1", "http://10.96.0.30/same-node")      # node-1's own pod: no TLS hop
    assert got.stdout == "hostsvc-1 /same-node\n", got.stderr

    def seen():
        return [r for r in _records(run, "node-1") if r["reporter"] == "destination"
                and r["dst"]["workload"] == HOST and r["src"]["identity"] == demo.spiffe_id("web")]
    inbound = until(seen, "node-1 logs the host service's connection from web-2's identity")
    assert inbound[-1]["security"] == "mutual_tls" and inbound[-1]["decision"]["result"] == "allow"
    assert inbound[-1]["dst"]["identity"] == demo.spiffe_id("hostsvc")

    # plaintext from outside the mesh to its declared port is captured (15006: refused, STRICT);
    # the host's other ports (the agent's readiness, say) are not
    assert _plain("http://10.10.0.11:8090/outside").returncode != 0
    assert "serving version" in _plain("http://10.10.0.11:15021/healthz/ready").stdout
    until(lambda: any(r["reporter"] == "destination" and r["dst"]["workload"] == HOST
                      and "STRICT" in r["decision"]["reason"] for r in _records(run, "node-1")),
          "node-1 logs the refused plaintext connection")

    nodemesh_cli(run, "apply", "-f", "-", stdin=DENY_WEB_TO_HOST)
    try:
        until(lambda: _curl(run, "web-2", "http://10.96.0.30/denied").returncode != 0,
              "a DENY on the host workload blocks web")
        assert _curl(run, "client-1", "http://10.96.0.30/client").stdout == "hostsvc-1 /client\n"
    finally:
        nodemesh_cli(run, "delete", "ap", "deny-web", "-n", "shop")
    until(lambda: _curl(run, "web-2", "http://10.96.0.30/again").returncode == 0, "removing the DENY restores it")


@pytest.mark.root
def test_unenrol_and_down_remove_the_host_rules_and_hooks(hostlab):
    run, mode, before, pids = hostlab
    if mode == "iptables":
        assert "NODEMESH_HOST" in _in_node1("iptables-save").stdout
        assert _in_node1("cat", "/proc/sys/net/ipv4/tcp_fwmark_accept").stdout.strip() == "1"
    else:
        assert sorted(ours_in_tree(HOST_CGROUP)) == ["nm_connect4", "nm_connect6", "nm_sockops"]
        assert sk_lookup_links(NODE1) == 1
    check = _in_node1("curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/check").stdout
    mine = [f for f in json.loads(check)["findings"] if f["message"].startswith(f"shop/{HOST}:")]
    assert mine and all(f["level"] == "ok" for f in mine), mine

    nodemesh_cli(run, "delete", "workload", HOST, "-n", "shop")
    if mode == "iptables":
        until(lambda: "NODEMESH" not in _in_node1("iptables-save").stdout, "the host chains are removed")
        assert _in_node1("cat", "/proc/sys/net/ipv4/tcp_fwmark_accept").stdout.strip() == "0"
    else:
        until(lambda: not ours_in_tree(HOST_CGROUP) and sk_lookup_links(NODE1) == 0,
              "the host cgroup's programs and the host netns's sk_lookup link are removed")
    # no longer meshed: plaintext reaches the service itself, and its calls are not redirected
    until(lambda: _plain("http://10.10.0.11:8090/direct").stdout == "hostsvc-1 /direct\n",
          "plaintext reaches the unenrolled host service directly")
    assert _curl(run, HOST, "http://10.96.0.10/unmeshed").returncode != 0      # a VIP routes nowhere

    nodemesh_cli(run, "apply", "-f", str(run / "mesh.yaml"))          # enrolled again ...
    until(lambda: _curl(run, HOST, "http://10.96.0.10/back").returncode == 0, "the host service is enrolled again")
    lab("down", run=run)                                               # ... and down removes it all
    assert_clean(run, before, pids)
