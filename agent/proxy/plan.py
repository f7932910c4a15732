"""plan.py: where an outgoing connection goes — pure, no I/O, no trio.

``plan_outbound(snapshot, source, ip, port)`` turns a workload's original destination into an
``Upstream`` (a Service VIP or a mesh workload's own address: endpoints to balance over) or a
``Passthrough`` (outside the mesh), or raises ``NoRoute``. ``ConnRecord`` is what the data path
fills in about one connection, for metrics and the access log.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.proxy import ProxyError
from agent.state import Endpoint, Snapshot
from controller.api import Workload


class NoRoute(ProxyError):
    """The connection cannot go anywhere; ``flags`` is the Envoy-style response flag (NR, UF, ...)."""

    def __init__(self, reason: str, flags: str = "NR") -> None:
        super().__init__(reason)
        self.reason, self.flags = reason, flags


@dataclass(frozen=True)
class Passthrough:
    ip: str
    port: int


@dataclass(frozen=True)
class Upstream:
    name: str                          # "shop/web" for a Service, "shop/web-1" for a workload address
    service: str                       # the destination_service label ("" for a workload address)
    endpoints: tuple[Endpoint, ...]
    algorithm: str
    locality_failover: bool


def plan_outbound(snap: Snapshot, source: Workload, ip: str, port: int, *, passthrough: bool) -> Passthrough | Upstream:
    """Decide where ``source``'s connection to ``ip:port`` goes.

    A Service VIP balances over the Service's endpoints on its targetPort; a mesh workload's own
    address goes to that workload on the same port; anything else passes through unchanged,
    unless ``passthrough`` is off (then NoRoute).
    """
    found = snap.service_at(ip, port)
    if found is not None:
        service, sp = found
        eps = snap.endpoints(service, sp)
        name = f"{service.metadata.namespace}/{service.metadata.name}"
        if not eps:
            raise NoRoute(f"service {name} has no endpoints", "UH")
        lb = service.spec.load_balancer
        return Upstream(name, f"{service.metadata.name}.{service.metadata.namespace}.svc", eps,
                        lb.algorithm, lb.locality_failover)
    target = snap.workload_at(ip)
    if target is not None:
        ep = Endpoint(workload=target, address=ip, port=port, node=target.spec.node,
                      locality=target.spec.locality, identity=snap.identity_of(target))
        return Upstream(f"{target.metadata.namespace}/{target.metadata.name}", "", (ep,), "random", False)
    if not passthrough:
        raise NoRoute(f"{ip}:{port} is outside the mesh and passthrough is off")
    return Passthrough(ip, port)


@dataclass
class ConnRecord:
    """Facts about one proxied connection, filled in as it goes (see agent/observe)."""

    reporter: str                      # "source" (outbound) or "destination" (inbound)
    src_address: str
    src_workload: Workload | None = None
    src_identity: str = ""
    dst_address: str = ""
    dst_service: str = ""
    dst_workload: Workload | None = None
    dst_identity: str = ""
    protocol: str = "tcp"              # tcp | hbone
    security: str = "none"             # mutual_tls | none
    decision: str = "allow"            # allow | deny
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    flags: str = "-"
    error: str | None = None
    request_bytes: int = 0             # source -> destination (Istio's tcp_received_bytes)
    response_bytes: int = 0            # destination -> source (Istio's tcp_sent_bytes)
    opened: bool = False               # counted as opened (telemetry sets it)
    start_wall: float = field(default_factory=time.time)
    start: float = field(default_factory=time.monotonic)
    end: float | None = None           # monotonic time it closed, when reported later than that
