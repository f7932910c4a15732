"""policies.py: AuthorizationPolicies compiled once per policy version, ready to match. Pure.

Owns Istio's matching semantics for one rule (principals, namespaces, ipBlocks, ports, methods,
paths and their ``not`` forms; the string patterns exact, ``*``, ``prefix*``, ``*suffix``) and
the L7-over-L4 rule below. ``Snapshot.build`` compiles every policy while indexing, so a
decision never parses a CIDR or a principal and a policy that does not compile makes the whole
snapshot invalid. The decision order over the compiled rules is ``agent.decide.authorize``'s.

L7 conditions on L4 facts (``MatchContext.method is None`` but an operation uses methods/paths
or their ``not`` forms), as Istio's TCP filter and ztunnel do, always failing closed:
  - ALLOW (and AUDIT): such an operation never matches, so L4 traffic is not allowed by it;
  - DENY: the L7 parts are ignored and the operation matches on its L4 parts (ports) alone.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Protocol, Union

from controller.api import AuthorizationPolicy, Operation, Source, parse_principal

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class MatchContext(Protocol):
    """The facts one decision matches rules against (``agent.decide.authorize`` builds it once
    per decision): the source principal and namespace (None for a plaintext source), its
    address, the destination port, and the request's method and path (None for L4)."""

    principal: str | None
    namespace: str | None
    ip: IPAddress
    port: int
    method: str | None
    path: str | None


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

    def match(self, c: MatchContext) -> bool:
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

    def match(self, c: MatchContext, deny: bool) -> bool:
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

    def match(self, c: MatchContext, deny: bool) -> bool:
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

    def matching(self, c: MatchContext) -> Iterable[int]:
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
