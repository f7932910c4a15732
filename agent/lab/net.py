"""net.py: make and remove the lab's network namespaces, links, routes and its one netfilter rule.

Drives the kernel through the ``ip`` command (iproute2), never pyroute2 (the agent's redirect
package owns that). ``apply(topology)`` is idempotent: it reads what exists, creates what is
missing, and rewrites addresses and routes with ``replace``; running it twice changes nothing.
``teardown()`` needs no topology: it removes every ``nmlab-*`` netns and host link it finds, so it
also cleans up after a crash. Knows nothing of processes or cgroups.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from agent.lab.topology import BRIDGE, LAB_CIDR, PREFIX, SERVICE_CIDR, Node, Pod, Topology

# Bridged frames pass netfilter here (br_netfilter is built in), so a host whose FORWARD policy
# is DROP (Docker sets that) would cut the fabric; this rule lets lab traffic through, scoped to
# the lab bridge and the lab's addresses.
FORWARD_RULE = ("FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-s", LAB_CIDR, "-d", LAB_CIDR,
                "-m", "comment", "--comment", PREFIX, "-j", "ACCEPT")


class NetError(Exception):
    """An ``ip`` (or iptables) command failed; the message names the command and its error."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetError(f"'{' '.join(argv)}' failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *(("-n", ns) if ns else ()), *args, check=check)


def netns_list() -> list[str]:
    """Names of every named network namespace (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links(ns: str | None = None) -> list[str]:
    """Interface names in ``ns`` (the host netns when None)."""
    p = _ip("-j", "link", "show", ns=ns)
    return [link["ifname"] for link in json.loads(p.stdout or "[]")]


def lab_state() -> dict[str, list[str]]:
    """What of the lab exists in the kernel now: its netns and its host links (for tests and status)."""
    return {"netns": sorted(n for n in netns_list() if n.startswith(PREFIX)),
            "links": sorted(link for link in links() if link.startswith(PREFIX))}


# --- apply ------------------------------------------------------------------------------------

def apply(topo: Topology) -> None:
    """Make the kernel match ``topo``; strays named ``nmlab-*`` that ``topo`` lacks are removed."""
    existing = set(netns_list())
    wanted = {n.netns for n in topo.nodes} | {p.netns for p in topo.pods}
    for ns in sorted(existing - wanted):
        if ns.startswith(PREFIX + "-"):
            _delete_netns(ns)
    host_links = set(links())
    wanted_links = {topo.bridge} | {n.host_veth for n in topo.nodes}
    for link in sorted(host_links - wanted_links):
        if link.startswith(PREFIX + "-"):
            _ip("link", "del", link, check=False)
    _ensure_bridge(topo, host_links)
    _ensure_forward_rule()
    for node in topo.nodes:
        _ensure_node(topo, node, existing)
        node_links = set(links(node.netns))
        for pod in node.pods:
            _ensure_pod(node, pod, existing, node_links)
    for node in topo.nodes:
        for other in topo.nodes:
            if other is not node:
                _ip("route", "replace", other.pod_cidr, "via", other.fabric_address, ns=node.netns)


def apply_fabric(topo: Topology) -> None:
    """Only the fabric: the bridge and the node namespaces on it, with their fabric addresses,
    nothing behind them — stand-ins for the Vagrant VMs, which ``vagrant/provision/node.sh``
    then makes into nodes (tests/test_vagrant.py). Idempotent."""
    existing = set(netns_list())
    _ensure_bridge(topo, set(links()))
    _ensure_forward_rule()
    for node in topo.nodes:
        _ensure_node_link(topo, node, existing)


def _ensure_netns(name: str, existing: set[str]) -> None:
    if name not in existing:
        _ip("netns", "add", name)
        existing.add(name)
    _ip("link", "set", "lo", "up", ns=name)


def _ensure_bridge(topo: Topology, host_links: set[str]) -> None:
    if topo.bridge not in host_links:
        _ip("link", "add", topo.bridge, "type", "bridge")
    _ip("addr", "replace", f"{topo.controller_ip}/{topo.fabric_cidr.split('/')[1]}", "dev", topo.bridge)
    _ip("link", "set", topo.bridge, "up")


def _ensure_node(topo: Topology, node: Node, existing: set[str]) -> None:
    _ensure_node_inside(node, node.netns, "eth0", _ensure_node_link(topo, node, existing))


def _ensure_node_link(topo: Topology, node: Node, existing: set[str]) -> set[str]:
    """The node's netns on the fabric (its eth0, with its fabric address); returns its links."""
    _ensure_netns(node.netns, existing)
    inside = set(links(node.netns))
    if "eth0" not in inside:
        _ip("link", "del", node.host_veth, check=False)     # a half pair from a crash
        _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
    _ip("link", "set", node.host_veth, "master", topo.bridge, "up")
    _ip("addr", "replace", f"{node.fabric_address}/{topo.fabric_cidr.split('/')[1]}", "dev", "eth0", ns=node.netns)
    _ip("link", "set", "eth0", "up", ns=node.netns)
    return inside


def _ensure_node_inside(node: Node, ns: str | None, fabric_dev: str, inside: set[str]) -> None:
    """The node's own side, in ``ns`` (None: this netns, a VM being the node): forwarding, the
    VIP route and the pod bridge."""
    _run(*(("ip", "netns", "exec", ns) if ns else ()), "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # A host's own processes reach Service VIPs by its default route; a node netns has none, so
    # the VIP range goes to the fabric link: a host service's connect() to a VIP then gets as far
    # as the iptables redirect (which runs after the route lookup), and anything not redirected
    # stays in the lab (nothing on the fabric answers for a VIP).
    _ip("route", "replace", SERVICE_CIDR, "dev", fabric_dev, "src", node.fabric_address, ns=ns)
    if node.pod_bridge not in inside:
        _ip("link", "add", node.pod_bridge, "type", "bridge", ns=ns)
    _ip("addr", "replace", f"{node.pod_gateway}/{node.pod_cidr.split('/')[1]}", "dev", node.pod_bridge, ns=ns)
    _ip("link", "set", node.pod_bridge, "up", ns=ns)


def _ensure_pod(node: Node, pod: Pod, existing: set[str], node_links: set[str], ns: str | None = "") -> None:
    ns = node.netns if ns == "" else ns           # the node's netns, or None: this one (a VM)
    _ensure_netns(pod.netns, existing)
    if "eth0" not in links(pod.netns):
        if pod.node_veth in node_links:
            _ip("link", "del", pod.node_veth, ns=ns)
        _ip("link", "add", pod.node_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns, ns=ns)
    _ip("link", "set", pod.node_veth, "master", node.pod_bridge, "up", ns=ns)
    _ip("addr", "replace", f"{pod.address}/{node.pod_cidr.split('/')[1]}", "dev", "eth0", ns=pod.netns)
    _ip("link", "set", "eth0", "up", ns=pod.netns)
    _ip("route", "replace", "default", "via", pod.gateway, "dev", "eth0", ns=pod.netns)


def _ensure_forward_rule() -> None:
    if _run("iptables", "-w", "-C", *FORWARD_RULE, check=False).returncode != 0:
        _run("iptables", "-w", "-I", FORWARD_RULE[0], "1", *FORWARD_RULE[1:])


# --- one node, here (a VM of vagrant/) ------------------------------------------------------------

def apply_node_here(topo: Topology, name: str) -> None:
    """Make this netns node ``name`` of ``topo``: its pods behind a pod bridge here, routes to
    the other nodes' pods by their fabric addresses, the VIP route. For a host (a VM) that has
    ``node.fabric_address`` already, as vagrant/ gives each node VM; idempotent like ``apply``.
    Raises NetError when no interface here has that address."""
    node = topo.node(name)
    addrs = json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]")
    dev = next((a["ifname"] for a in addrs for i in a.get("addr_info", ()) if i.get("local") == node.fabric_address),
               None)
    if dev is None:
        raise NetError(f"no interface here has {node.fabric_address}, {name}'s address on the fabric "
                       f"{topo.fabric_cidr}: is this host {name}? (see vagrant/topology.rb)")
    existing = set(netns_list())
    _ensure_node_inside(node, None, dev, set(links()))
    here = set(links())
    for pod in node.pods:
        _ensure_pod(node, pod, existing, here, ns=None)
    for other in topo.nodes:
        if other is not node:
            _ip("route", "replace", other.pod_cidr, "via", other.fabric_address)


def teardown_node_here(topo: Topology, name: str) -> list[str]:
    """Undo ``apply_node_here``: the pods' netns, the pod bridge and the routes. Tolerates
    anything already gone; returns what it removed."""
    node = topo.node(name)
    removed = []
    existing = set(netns_list())
    for ns in (p.netns for p in node.pods):     # this node's pods only: /var/run/netns is the host's
        if ns in existing:
            _delete_netns(ns)
            removed.append(f"netns {ns}")
    if _ip("link", "del", node.pod_bridge, check=False).returncode == 0:
        removed.append(f"link {node.pod_bridge}")
    for other in topo.nodes:
        if other is not node:
            _ip("route", "del", other.pod_cidr, check=False)
    _ip("route", "del", SERVICE_CIDR, check=False)
    return removed


# --- teardown ---------------------------------------------------------------------------------

def teardown() -> list[str]:
    """Remove every ``nmlab-*`` netns (killing what still runs inside), host link and our
    netfilter rule. Tolerates anything already gone; returns what it removed."""
    removed = []
    for ns in netns_list():
        if ns.startswith(PREFIX + "-"):
            _delete_netns(ns)
            removed.append(f"netns {ns}")
    for link in links():
        if link.startswith(PREFIX + "-") and _ip("link", "del", link, check=False).returncode == 0:
            removed.append(f"link {link}")
    for _ in range(16):
        if _run("iptables", "-w", "-D", *FORWARD_RULE, check=False).returncode != 0:
            break
        removed.append("iptables rule")
    return removed


def _delete_netns(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (a netns outlives its name while a process holds it),
    then delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and _ip("netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.05)
    _ip("netns", "del", ns, check=False)
