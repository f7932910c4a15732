"""plan.py: where an outgoing connection goes — pure, no I/O, no trio.

``plan_outbound(snapshot, source, ip, port)`` turns a workload's original destination into an
``Upstream`` (a Service VIP or a mesh workload's own address: endpoints to balance over) or a
``Passthrough`` (outside the mesh), or raises ``NoRoute``.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.decide import DecisionError
from agent.state.snapshot import Endpoint, Snapshot
from controller.api import Workload


class NoRoute(DecisionError):
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
