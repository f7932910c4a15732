"""The resource kinds as immutable dataclasses, and their canonical dict form (``to_dict``).

Owns the shape of Mesh, Workload, Service and AuthorizationPolicy and the camelCase, ordered,
defaults-filled output. Validation of untrusted input lives in ``decode.py``; nothing here
parses text or does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from controller.api.duration import parse_duration
from controller.api.meta import FrozenDict, ObjectMeta, freeze
from controller.api.rules import (DEFAULT_ALGORITHM, DEFAULT_LOCALITY_FAILOVER, DEFAULT_PROTOCOL,
                                  DEFAULT_SERVICE_ACCOUNT)

API_VERSION = "nodemesh.io/v1alpha1"


# --- Mesh ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    trust_domain: str = "cluster.local"
    mtls: str = "STRICT"                 # STRICT | PERMISSIVE
    default_action: str = "ALLOW"        # ALLOW | DENY
    certificate_ttl: str = "24h"         # Go duration, 10m..8760h

    @property
    def certificate_ttl_seconds(self) -> float:
        """``certificate_ttl`` in seconds."""
        return parse_duration(self.certificate_ttl)


# --- Workload -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


NO_LOCALITY = Locality()   # immutable, so one serves every workload without a locality


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    node: str
    addresses: tuple[str, ...]
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    locality: Locality = field(default_factory=Locality)
    netns: str = ""                      # a pod: its network namespace path
    cgroup: str = ""                     # a host process (or pod): its cgroup v2 path
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        freeze(self)


# --- Service ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ServicePort:
    port: int
    target_port: int = 0                 # 0 on construction means "same as port"
    name: str = ""
    protocol: str = DEFAULT_PROTOCOL     # one of rules.PROTOCOLS

    def __post_init__(self) -> None:
        if not self.target_port:
            object.__setattr__(self, "target_port", self.port)


@dataclass(frozen=True, kw_only=True)
class LoadBalancer:
    algorithm: str = DEFAULT_ALGORITHM   # one of rules.ALGORITHMS
    locality_failover: bool = DEFAULT_LOCALITY_FAILOVER


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    addresses: tuple[str, ...]
    selector: dict[str, str]
    ports: tuple[ServicePort, ...]
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)

    def __post_init__(self) -> None:
        freeze(self)


# --- AuthorizationPolicy ------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        freeze(self)


@dataclass(frozen=True, kw_only=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        freeze(self)


@dataclass(frozen=True)
class Rule:
    """Matches when every part matches; an empty ``from_`` or ``to`` matches anything."""

    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()

    def __post_init__(self) -> None:
        freeze(self)


@dataclass(frozen=True, kw_only=True)
class AuthorizationPolicySpec:
    selector: dict[str, str] = field(default_factory=FrozenDict)  # empty: every workload of the namespace
    action: str = "ALLOW"                # ALLOW | DENY | AUDIT
    rules: tuple[Rule, ...] = ()         # empty: matches nothing

    def __post_init__(self) -> None:
        freeze(self)


# --- the kinds ----------------------------------------------------------------------------------

class _KeyOnce:
    """(kind, namespace, name); namespace is "" for cluster-scoped kinds.

    Computed on first use and kept in the instance (resources never change): indexing a large
    mesh asks for keys hundreds of thousands of times.
    """

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        key = (obj.kind, obj.metadata.namespace if obj.namespaced else "", obj.metadata.name)
        obj.__dict__["key"] = key   # shadows this non-data descriptor from now on
        return key


class _Kind:
    kind: ClassVar[str]
    namespaced: ClassVar[bool]
    metadata: ObjectMeta

    key = _KeyOnce()

    @property
    def ref(self) -> str:
        """``Service shop/web`` or ``Mesh default``, as messages name the object."""
        if self.namespaced:
            return f"{self.kind} {self.metadata.namespace}/{self.metadata.name}"
        return f"{self.kind} {self.metadata.name}"


@dataclass(frozen=True)
class Mesh(_Kind):
    kind: ClassVar[str] = "Mesh"
    namespaced: ClassVar[bool] = False
    metadata: ObjectMeta
    spec: MeshSpec = field(default_factory=MeshSpec)


@dataclass(frozen=True)
class Workload(_Kind):
    kind: ClassVar[str] = "Workload"
    namespaced: ClassVar[bool] = True
    metadata: ObjectMeta
    spec: WorkloadSpec


@dataclass(frozen=True)
class Service(_Kind):
    kind: ClassVar[str] = "Service"
    namespaced: ClassVar[bool] = True
    metadata: ObjectMeta
    spec: ServiceSpec


@dataclass(frozen=True)
class AuthorizationPolicy(_Kind):
    kind: ClassVar[str] = "AuthorizationPolicy"
    namespaced: ClassVar[bool] = True
    metadata: ObjectMeta
    spec: AuthorizationPolicySpec = field(default_factory=AuthorizationPolicySpec)


Resource = Union[Mesh, Workload, Service, AuthorizationPolicy]
KIND_CLASSES: tuple[type, ...] = (Mesh, Workload, Service, AuthorizationPolicy)


# --- canonical dict form ------------------------------------------------------------------------

def to_dict(resource: Resource) -> dict[str, Any]:
    """The canonical form: apiVersion, kind, metadata, spec; camelCase, defaults filled in,
    keys in a stable order, plain dicts and lists (ready for JSON or YAML)."""
    spec = _SPEC_TO_DICT[type(resource)](resource.spec)  # type: ignore[index]
    return {"apiVersion": API_VERSION, "kind": resource.kind,
            "metadata": _meta_to_dict(resource.metadata, resource.namespaced), "spec": spec}


def _sorted(m: dict[str, str]) -> dict[str, str]:
    return {k: m[k] for k in sorted(m)}


def _meta_to_dict(m: ObjectMeta, namespaced: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name}
    if namespaced:
        out["namespace"] = m.namespace
    if m.labels:
        out["labels"] = _sorted(m.labels)
    if m.annotations:
        out["annotations"] = _sorted(m.annotations)
    for key, value in (("uid", m.uid), ("resourceVersion", m.resource_version),
                       ("creationTimestamp", m.creation_timestamp)):
        if value:
            out[key] = value
    return out


def _mesh_spec(s: MeshSpec) -> dict[str, Any]:
    return {"trustDomain": s.trust_domain, "mtls": s.mtls, "defaultAction": s.default_action,
            "certificateTTL": s.certificate_ttl}


def _workload_spec(s: WorkloadSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"node": s.node, "serviceAccount": s.service_account,
                           "addresses": list(s.addresses)}
    loc = {k: v for k, v in (("region", s.locality.region), ("zone", s.locality.zone),
                             ("subzone", s.locality.subzone)) if v}
    if loc:
        out["locality"] = loc
    if s.netns:
        out["netns"] = s.netns
    if s.cgroup:
        out["cgroup"] = s.cgroup
    out["ports"] = list(s.ports)
    return out


def _service_port(p: ServicePort) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name} if p.name else {}
    out.update(port=p.port, targetPort=p.target_port, protocol=p.protocol)
    return out


def _service_spec(s: ServiceSpec) -> dict[str, Any]:
    return {"addresses": list(s.addresses), "selector": _sorted(s.selector),
            "ports": [_service_port(p) for p in s.ports],
            "loadBalancer": {"algorithm": s.load_balancer.algorithm,
                             "localityFailover": s.load_balancer.locality_failover}}


# (camelCase key, attribute) in output order
SOURCE_FIELDS = (("principals", "principals"), ("notPrincipals", "not_principals"),
                 ("namespaces", "namespaces"), ("notNamespaces", "not_namespaces"),
                 ("ipBlocks", "ip_blocks"), ("notIpBlocks", "not_ip_blocks"))
OPERATION_FIELDS = (("ports", "ports"), ("notPorts", "not_ports"), ("methods", "methods"),
                    ("notMethods", "not_methods"), ("paths", "paths"), ("notPaths", "not_paths"))


def _parts(obj: object, names: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {key: list(getattr(obj, attr)) for key, attr in names if getattr(obj, attr)}


def _rule(r: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.from_:
        out["from"] = [_parts(s, SOURCE_FIELDS) for s in r.from_]
    if r.to:
        out["to"] = [_parts(o, OPERATION_FIELDS) for o in r.to]
    return out


def _policy_spec(s: AuthorizationPolicySpec) -> dict[str, Any]:
    out: dict[str, Any] = {"selector": _sorted(s.selector)} if s.selector else {}
    out.update(action=s.action, rules=[_rule(r) for r in s.rules])
    return out


_SPEC_TO_DICT = {Mesh: _mesh_spec, Workload: _workload_spec, Service: _service_spec,
                 AuthorizationPolicy: _policy_spec}
