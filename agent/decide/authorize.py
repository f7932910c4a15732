"""authorize.py: pure authorization, ``(snapshot, connection facts) -> Allow | Deny``. No I/O, no trio.

Owns the decision order (Istio's: DENY, then ALLOW, then the mesh default; AUDIT only listed).
The rules were compiled once per policy version into the snapshot (``agent.state.policies``, which
owns the matching semantics); a decision only walks them. On an L4 connection an operation with
methods or paths never ALLOWs and DENYs on its ports alone, so on an http port the proxy
authorizes each request with method and path, not the connection.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.state.policies import IPAddress
from controller.api import SpiffeId, Workload

if TYPE_CHECKING:
    from agent.state.snapshot import Snapshot

MESH_DEFAULT = "mesh/default"   # Deny.policy when the mesh's defaultAction denies


# --- facts and decisions ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _source_ip(text: str) -> IPAddress:
    """The parsed source address (cached: the same few sources connect again and again)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # a dual-stack socket's ::ffff:a.b.c.d is the IPv4 source
    return ip


@dataclass(frozen=True)
class Facts:
    """What the proxy knows about one connection (or, with method and path, one HTTP request).

    ``source_identity`` None means a plaintext source. ``port`` is the destination workload's port
    (a Service's targetPort). ``path`` is the request path without its query. Raises ``ValueError``
    for an unparsable ``source_ip`` or when only one of method and path is given.
    """

    destination: Workload
    port: int
    source_identity: SpiffeId | None
    source_ip: str
    method: str | None = None
    path: str | None = None
    ip: IPAddress = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.method is None) != (self.path is None):
            raise ValueError(f"give both method and path or neither, got method={self.method!r} "
                             f"path={self.path!r}")
        object.__setattr__(self, "ip", _source_ip(self.source_ip))


@dataclass(frozen=True)
class Match:
    """One rule of one policy that matched: ``policy`` is ``"ns/name"``, ``rule`` its index."""

    policy: str
    rule: int


@dataclass(frozen=True)
class Allow:
    """Allowed. ``matched`` is the ALLOW rule that allowed it (None when the mesh default did);
    ``audits`` are the AUDIT rules that matched, for the access log."""

    reason: str
    audits: tuple[Match, ...] = ()
    matched: Match | None = None


@dataclass(frozen=True)
class Deny:
    """Denied by ``policy`` (``"ns/name"``; ``""`` when no ALLOW policy matched, ``"mesh/default"``
    for the mesh's defaultAction) and its ``rule`` index (None when no rule decided)."""

    policy: str
    rule: int | None
    reason: str


class _Context:
    """Per-decision view of the facts, computed once: the principal string, namespace, ip."""

    __slots__ = ("principal", "namespace", "ip", "port", "method", "path")

    def __init__(self, f: Facts) -> None:
        ident = f.source_identity
        self.principal = ident.principal if ident is not None else None
        self.namespace = ident.namespace if ident is not None else None
        self.ip, self.port, self.method, self.path = f.ip, f.port, f.method, f.path


# --- the decision -------------------------------------------------------------------------------

def authorize(snapshot: Snapshot, facts: Facts) -> Allow | Deny:
    """Decide ``facts`` against the policies that select ``facts.destination`` in ``snapshot``.

    Order, as Istio's: any matching DENY rule denies (the first in snapshot order is named);
    else, if ALLOW policies select the workload, one of their rules must match; else the mesh's
    ``defaultAction``. AUDIT rules never decide; those that match are listed in ``Allow.audits``.
    The snapshot's view of the destination (found by namespace/name) is used; a destination not
    in the snapshot is denied. Never raises.
    """
    dest = facts.destination
    policies = snapshot.policy_set(dest)
    if policies is None:
        return Deny("", None, f"destination {dest.ref} is not in snapshot version {snapshot.version}")
    c = _Context(facts)
    for p in policies.deny:
        for i in p.matching(c):
            return Deny(p.ref, i, f"denied by DENY policy {p.ref} rule {i}")
    audits = tuple(Match(p.ref, i) for p in policies.audit for i in p.matching(c))
    if policies.allow:
        for p in policies.allow:
            for i in p.matching(c):
                return Allow(f"allowed by ALLOW policy {p.ref} rule {i}", audits, Match(p.ref, i))
        considered = ", ".join(p.ref for p in policies.allow)
        return Deny("", None, f"no ALLOW policy matched (considered: {considered})")
    action = snapshot.mesh.spec.default_action
    if action == "ALLOW":
        return Allow(f"no ALLOW policy selects {dest.ref}; mesh defaultAction ALLOW", audits)
    return Deny(MESH_DEFAULT, None, f"no ALLOW policy selects {dest.ref}; mesh defaultAction {action}")
