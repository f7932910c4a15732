"""topology.py: the lab's shape as a value — every name and address, decided before anything is made.

``plan(nodes, pods_per_node)`` is pure (no I/O): ``net.py`` applies what it returns, ``demo.py``
turns it into mesh resources, and the tests check it directly. Address scheme (all inside the
lab's own namespaces, never an outside address):

    10.10.0.0/24    the fabric: bridge ``nmlab-br`` in the host netns is 10.10.0.1 (the
                    controller listens there); node N's fabric address is 10.10.0.(10+N)
    10.10.N.0/24    node N's pods: the node's pod bridge is 10.10.N.1, pods 10.10.N.2, .3, ...
    10.96.0.0/16    Service VIPs (web 10.96.0.10, echo 10.96.0.20, hostsvc 10.96.0.30); only
                    redirected: answered nowhere (a node netns routes them to its fabric link,
                    as a host's default route would, so host processes can connect() to them)

A host service (``hostsvc-1`` on node-1) is a plain process in the node's own netns, in a cgroup
of its own under the lab's tree, with no netns: a Workload by ``spec.cgroup`` whose address is
the node's fabric address, as a systemd service on a real host would be.

Every kernel object starts with ``nmlab`` (netns ``nmlab-node-N`` / ``nmlab-<pod>``, host links
``nmlab-br`` / ``nmlab-nN``, cgroups under ``<cgroup root>/nmlab``), so ``lab down`` finds
leftovers by name even when the run dir is gone.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

PREFIX = "nmlab"
BRIDGE = "nmlab-br"
FABRIC_CIDR = "10.10.0.0/24"
LAB_CIDR = "10.10.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"       # Service VIPs: in node netns routed to the fabric link (net.py)
CONTROLLER_IP = "10.10.0.1"
CGROUP_ROOT = "/sys/fs/cgroup/unified"
MAX_NODES = 200                     # 10.10.0.(10+N) and 10.10.N.0/24 both need N <= 244
MAX_PODS_PER_NODE = 200             # 10.10.N.2 .. and the client pod on node-1
APPS = ("web", "echo")              # app pods alternate between these, across nodes
APP_PORTS = {"web": 8080, "echo": 9000}
CLIENT_POD = "client-1"             # an extra pod on node-1 that runs nothing: `lab exec` into it
HOST_SERVICE = "hostsvc"            # the host service's app (and service account) on node-1
HOST_SERVICE_PORT = 8090


class PlanError(ValueError):
    """The requested lab cannot be built (a size out of range)."""


@dataclass(frozen=True)
class Pod:
    name: str               # "web-1"
    app: str                # "web" | "echo" | "client"
    node: str               # "node-1"
    index: int              # 1-based position behind its node (eth0 of the pod is 10.10.N.(1+index))
    address: str            # "10.10.1.2"
    gateway: str            # the node's pod-bridge address, "10.10.1.1"
    netns: str              # "nmlab-web-1"
    cgroup: str             # "/sys/fs/cgroup/unified/nmlab/web-1"
    port: int | None        # the app's port; None for the client pod

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def node_veth(self) -> str:
        """The pod's veth end inside its node's netns (the pod's own end is ``eth0``)."""
        return f"{PREFIX}-p{self.index}"


@dataclass(frozen=True)
class HostService:
    """A process in its node's netns and its own cgroup: a host workload (cgroup, no netns)."""

    name: str               # "hostsvc-1"
    app: str                # "hostsvc"
    node: str               # "node-1"
    address: str            # the node's fabric address, "10.10.0.11"
    node_netns: str         # "nmlab-node-1": where it runs
    cgroup: str             # "/sys/fs/cgroup/unified/nmlab/hostsvc-1"
    port: int               # 8090

    @property
    def node_netns_path(self) -> str:
        return f"/var/run/netns/{self.node_netns}"


@dataclass(frozen=True)
class Node:
    name: str               # "node-1"
    number: int             # 1
    netns: str              # "nmlab-node-1"
    fabric_address: str     # "10.10.0.11"
    host_veth: str          # "nmlab-n1": its end in the host netns, on the bridge
    pod_cidr: str           # "10.10.1.0/24"
    pod_gateway: str        # "10.10.1.1", on the node's pod bridge
    zone: str               # "lab-a"
    pods: tuple[Pod, ...]

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def pod_bridge(self) -> str:
        """The bridge inside the node netns that the node's pods hang off."""
        return f"{PREFIX}-pods"


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    bridge: str = BRIDGE
    controller_ip: str = CONTROLLER_IP
    fabric_cidr: str = FABRIC_CIDR
    cgroup_parent: str = f"{CGROUP_ROOT}/{PREFIX}"
    hosts: tuple[HostService, ...] = ()

    @property
    def pods(self) -> tuple[Pod, ...]:
        return tuple(p for n in self.nodes for p in n.pods)

    def host(self, name: str) -> HostService:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def zone_of(number: int) -> str:
    """node-1 -> lab-a, node-2 -> lab-b, ..., node-27 -> lab-aa."""
    letters = ""
    n = number
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return f"lab-{letters}"


def plan(nodes: int = 2, pods_per_node: int = 2, cgroup_root: str = CGROUP_ROOT, *,
         fabric: str = FABRIC_CIDR, controller_ip: str = CONTROLLER_IP) -> Topology:
    """The whole lab for ``nodes`` nodes with ``pods_per_node`` app pods each.

    ``fabric`` is the network the nodes share (node N is its host 10+N) and ``controller_ip``
    the controller's address on it: the lab bridge's by default, or a Vagrant private network
    (vagrant/topology.rb), where each node is a VM; everything behind the nodes is the same.

    App pods alternate web, echo, web, ... counting across nodes, so replicas of each Service
    spread over the nodes (2x2: node-1 web-1 echo-1, node-2 web-2 echo-2). node-1 also gets
    ``client-1``, the pod to call the Services from, and the host service ``hostsvc-1`` (a
    process in node-1's own netns, by cgroup). Raises PlanError for sizes out of range.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise PlanError(f"--nodes must be 1..{MAX_NODES}, got {nodes}")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise PlanError(f"--pods-per-node must be 1..{MAX_PODS_PER_NODE}, got {pods_per_node}")
    try:
        net = ipaddress.ip_network(fabric)
        ipaddress.ip_address(controller_ip)
    except ValueError as e:
        raise PlanError(f"--fabric / --controller-ip: {e}") from None
    if net.version != 4 or net.num_addresses < 16 + nodes:
        raise PlanError(f"--fabric {fabric} must be an IPv4 network with room for {nodes} nodes at hosts 11..{10 + nodes}")
    parent = f"{cgroup_root.rstrip('/')}/{PREFIX}"
    counters = {app: 0 for app in APPS}
    out = []
    for n in range(1, nodes + 1):
        node_name = f"node-{n}"
        gateway = f"10.10.{n}.1"
        specs = []
        for i in range(pods_per_node):
            app = APPS[((n - 1) * pods_per_node + i) % len(APPS)]
            counters[app] += 1
            specs.append((f"{app}-{counters[app]}", app, APP_PORTS[app]))
        if n == 1:
            specs.append((CLIENT_POD, "client", None))
        pods = tuple(Pod(name=name, app=app, node=node_name, index=i, address=f"10.10.{n}.{1 + i}",
                         gateway=gateway, netns=f"{PREFIX}-{name}", cgroup=f"{parent}/{name}", port=port)
                     for i, (name, app, port) in enumerate(specs, start=1))
        out.append(Node(name=node_name, number=n, netns=f"{PREFIX}-{node_name}", fabric_address=str(net.network_address + 10 + n),
                        host_veth=f"{PREFIX}-n{n}", pod_cidr=f"10.10.{n}.0/24", pod_gateway=gateway,
                        zone=zone_of(n), pods=pods))
    first = out[0]
    host = HostService(name=f"{HOST_SERVICE}-1", app=HOST_SERVICE, node=first.name, address=first.fabric_address,
                       node_netns=first.netns, cgroup=f"{parent}/{HOST_SERVICE}-1", port=HOST_SERVICE_PORT)
    return Topology(nodes=tuple(out), cgroup_parent=parent, hosts=(host,), controller_ip=controller_ip,
                    fabric_cidr=str(net))
