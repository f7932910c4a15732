"""policy.py: pure authorization, ``(snapshot, connection facts) -> Allow | Deny``. No I/O, no trio.

Owns the decision order and the Istio matching semantics of AuthorizationPolicy rules. Policies are
compiled once per snapshot (``Snapshot.build`` calls ``compile_policy``), so a decision never parses
a CIDR or a principal; a policy that does not compile makes the whole snapshot invalid.

L7 conditions on L4 facts (``Facts.method is None`` but an operation uses methods/paths or their
``not`` forms), as Istio's TCP filter and ztunnel do, always failing closed:
  - ALLOW (and AUDIT): such an operation never matches, so L4 traffic is not allowed by it;
  - DENY: the L7 parts are ignored and the operation matches on its L4 parts (ports) alone.
So on an http port the proxy authorizes each request with method and path, not the connection.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Union

from controller.api import AuthorizationPolicy, Operation, Source, SpiffeId, Workload, parse_principal

if TYPE_CHECKING:
    from agent.state import Snapshot

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

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


# --- compiled form ------------------------------------------------------------------------------

class _Patterns:
    """Istio string match: exact, ``*`` (any), ``prefix*`` and ``*suffix``."""

    __slots__ = ("any", "exact", "prefixes", "suffixes")

    def __init__(self, values: Iterable[str]) -> None:
        exact, prefixes, suffixes, any_ = set(), [], [], False
        for v in values:
            if v == "*":
                any_ = True
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            elif v.startswith("*"):
                suffixes.append(v[1:])
            else:
                exact.add(v)
        self.any, self.exact = any_, frozenset(exact)
        self.prefixes, self.suffixes = tuple(prefixes), tuple(suffixes)

    def match(self, s: str) -> bool:
        return (self.any or s in self.exact or (bool(self.prefixes) and s.startswith(self.prefixes))
                or (bool(self.suffixes) and s.endswith(self.suffixes)))


def _patterns(values: tuple[str, ...]) -> _Patterns | None:
    return _Patterns(values) if values else None


def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...] | None:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values) if values else None


def _in(ip: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    return any(ip in n for n in nets)   # an IPv4 address is simply not in an IPv6 network


class _Source:
    """One ``from`` entry: every field it sets must match."""

    __slots__ = ("principals", "not_principals", "namespaces", "not_namespaces", "ip_blocks",
                 "not_ip_blocks")

    def __init__(self, s: Source) -> None:
        for p in s.principals + s.not_principals:
            if "*" not in p:
                parse_principal(p)   # raises InvalidSpiffeId for a malformed one
        self.principals, self.not_principals = _patterns(s.principals), _patterns(s.not_principals)
        self.namespaces, self.not_namespaces = _patterns(s.namespaces), _patterns(s.not_namespaces)
        self.ip_blocks, self.not_ip_blocks = _networks(s.ip_blocks), _networks(s.not_ip_blocks)

    def match(self, c: _Context) -> bool:
        # principals/namespaces need an identity; their not-forms hold for a plaintext source.
        if self.principals is not None and (c.principal is None or not self.principals.match(c.principal)):
            return False
        if self.not_principals is not None and c.principal is not None and self.not_principals.match(c.principal):
            return False
        if self.namespaces is not None and (c.namespace is None or not self.namespaces.match(c.namespace)):
            return False
        if self.not_namespaces is not None and c.namespace is not None and self.not_namespaces.match(c.namespace):
            return False
        if self.ip_blocks is not None and not _in(c.ip, self.ip_blocks):
            return False
        if self.not_ip_blocks is not None and _in(c.ip, self.not_ip_blocks):
            return False
        return True


class _Operation:
    """One ``to`` entry: every field it sets must match (see the module note on L7 over L4)."""

    __slots__ = ("ports", "not_ports", "methods", "not_methods", "paths", "not_paths", "has_l7")

    def __init__(self, o: Operation) -> None:
        self.ports = frozenset(o.ports) if o.ports else None
        self.not_ports = frozenset(o.not_ports) if o.not_ports else None
        self.methods = frozenset(o.methods) if o.methods else None
        self.not_methods = frozenset(o.not_methods) if o.not_methods else None
        self.paths, self.not_paths = _patterns(o.paths), _patterns(o.not_paths)
        self.has_l7 = bool(o.methods or o.not_methods or o.paths or o.not_paths)

    def match(self, c: _Context, deny: bool) -> bool:
        if self.ports is not None and c.port not in self.ports:
            return False
        if self.not_ports is not None and c.port in self.not_ports:
            return False
        if not self.has_l7:
            return True
        if c.method is None:        # L4 facts: DENY matches on its L4 parts, ALLOW/AUDIT never
            return deny
        if self.methods is not None and c.method not in self.methods:
            return False
        if self.not_methods is not None and c.method in self.not_methods:
            return False
        if self.paths is not None and not self.paths.match(c.path):
            return False
        if self.not_paths is not None and self.not_paths.match(c.path):
            return False
        return True


class _Rule:
    __slots__ = ("sources", "operations")

    def __init__(self, sources: tuple[_Source, ...], operations: tuple[_Operation, ...]) -> None:
        self.sources, self.operations = sources, operations

    def match(self, c: _Context, deny: bool) -> bool:
        """``from`` entries are ORed, and so are ``to`` entries; an empty list matches anything."""
        return ((not self.sources or any(s.match(c) for s in self.sources))
                and (not self.operations or any(o.match(c, deny) for o in self.operations)))


class CompiledPolicy:
    """An AuthorizationPolicy ready to evaluate; built once per snapshot by ``compile_policy``."""

    __slots__ = ("policy", "ref", "action", "rules")

    def __init__(self, policy: AuthorizationPolicy, rules: tuple[_Rule, ...]) -> None:
        self.policy = policy
        self.ref = f"{policy.metadata.namespace}/{policy.metadata.name}"
        self.action = policy.spec.action
        self.rules = rules

    def matching(self, c: _Context) -> Iterable[int]:
        """Indices of the rules that match, in order. No rules: nothing matches."""
        deny = self.action == "DENY"
        return (i for i, r in enumerate(self.rules) if r.match(c, deny))

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.action} {self.ref}, {len(self.rules)} rules)"


def compile_policy(policy: AuthorizationPolicy) -> CompiledPolicy:
    """Compile ``policy``'s rules. Raises ``ValueError`` for a CIDR that does not parse or an
    unknown action, ``InvalidSpiffeId`` for a principal that does not parse."""
    if policy.spec.action not in ("ALLOW", "DENY", "AUDIT"):
        raise ValueError(f"action must be ALLOW, DENY or AUDIT, got {policy.spec.action!r}")
    rules = tuple(_Rule(tuple(_Source(s) for s in r.from_), tuple(_Operation(o) for o in r.to))
                  for r in policy.spec.rules)
    return CompiledPolicy(policy, rules)


@dataclass(frozen=True)
class PolicySet:
    """The compiled policies that select one workload, split by action, each in snapshot order."""

    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[CompiledPolicy]) -> PolicySet:
        ps = tuple(policies)
        return cls(deny=tuple(p for p in ps if p.action == "DENY"),
                   allow=tuple(p for p in ps if p.action == "ALLOW"),
                   audit=tuple(p for p in ps if p.action == "AUDIT"))


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
