"""index.py: the tables behind a ``Snapshot``, built cold from every resource (``Tables.build``).

Pure: no I/O, no trio. Owns what the data path looks up (workloads by address, services by
vip:port, endpoints, identities, the policies selecting each workload) and the side indices an
update needs to find what a change touches (workloads by label and namespace, services by
selector label, policies by namespace). ``agent/state/delta.py`` updates these tables; the rule the
two share: tables are never changed once built, and an update gives exactly what a cold build
of the same resources gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Iterable

from agent.state.pmap import PMap
from agent.state.policies import CompiledPolicy, PolicySet, compile_policy
from controller.api import (ApiError, AuthorizationPolicy, Locality, Mesh, ObjectMeta, Resource, Service,
                            ServicePort, SpiffeId, Workload, canonical_ip, workload_spiffe_id)

ROOT_NAMESPACE = "nodemesh-system"   # policies here apply mesh-wide, subject to their selector
KINDS = (Mesh, Workload, Service, AuthorizationPolicy)

Key = tuple[str, str, str]           # Resource.key: (kind, namespace, name)
LabelKey = tuple[str, str, str]      # (namespace, label, value)
_NONE: frozenset = frozenset()


class SnapshotError(Exception):
    """The resources contradict each other in a way the data path cannot serve.

    ``objects`` names the resources involved (``Workload shop/web-1``, ...).
    """

    def __init__(self, message: str, objects: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.objects = objects


@dataclass(frozen=True)
class Endpoint:
    """One workload behind one Service port: where to connect and whom to expect there."""

    workload: Workload
    address: str          # the workload's first address
    port: int             # the Service port's targetPort
    node: str
    locality: Locality
    identity: SpiffeId

    @property
    def key(self) -> tuple[str, int]:
        """(address, port): how ``balancer.Stats`` and ``exclude`` name this endpoint."""
        return (self.address, self.port)


def resource_key(r: Resource) -> Key:
    return r.key


class Tables:
    """Every index of one snapshot. Read-only once built; an update makes new tables that share
    the unchanged maps, shards and sets with these (so never mutate one in place). Each table
    named in ``TABLES`` is a ``PMap`` (a plain dict while the cold build fills it)."""

    __slots__ = ("node", "mesh", "mesh_given", "workloads", "services", "policies", "local",
                 "workload_by_key", "service_by_key", "policy_by_key",
                 "by_ip", "identity", "by_vip_port", "vips",
                 "by_label", "by_ns", "by_selector", "endpoints", "service_ids",
                 "compiled", "policies_by_ns", "policy_of")

    node: str
    mesh: Mesh
    mesh_given: bool                                   # False: the default Mesh stands in
    workloads: tuple[Workload, ...] | None             # each sorted by key; None after an update
    services: tuple[Service, ...]
    policies: tuple[AuthorizationPolicy, ...]
    local: tuple[Workload, ...]                        # spec.node == node
    workload_by_key: PMap[Key, Workload]
    service_by_key: PMap[Key, Service]
    policy_by_key: PMap[Key, AuthorizationPolicy]
    by_ip: PMap[str, Workload]                         # canonical address -> owner
    identity: PMap[Key, SpiffeId]
    by_vip_port: PMap[tuple[str, int], tuple[Service, ServicePort]]
    vips: PMap[str, int]                               # canonical vip -> how many Services list it
    by_label: PMap[LabelKey, set[Key]]                 # workload keys; no empty sets
    by_ns: PMap[str, set[Key]]                         # workload keys per namespace
    by_selector: PMap[LabelKey, set[Key]]              # service keys whose selector has the label
    endpoints: PMap[tuple[Key, int], tuple[Endpoint, ...]]
    service_ids: PMap[Key, frozenset[SpiffeId]]
    compiled: PMap[Key, CompiledPolicy]
    policies_by_ns: PMap[str, tuple[AuthorizationPolicy, ...]]   # sorted by key; no empty tuples
    policy_of: PMap[Key, tuple[tuple[AuthorizationPolicy, ...], PolicySet]]   # selecting, compiled

    def copy(self) -> Tables:
        """A shallow copy: the same tables, to be replaced (not changed) by whoever updates it."""
        t = Tables.__new__(Tables)
        for name in Tables.__slots__:
            setattr(t, name, getattr(self, name))
        return t

    def resources(self) -> list[Resource]:
        """Every resource these tables were built from (the default Mesh only if it was given)."""
        head: list[Resource] = [self.mesh] if self.mesh_given else []
        return head + list(self.workload_by_key.values()) + list(self.services) + list(self.policies)

    # --- the cold build -----------------------------------------------------------------------

    @classmethod
    def build(cls, resources: Iterable[Resource], *, node: str) -> Tables:
        """Index ``resources`` for ``node``; raises ``SnapshotError`` as ``Snapshot.build`` says."""
        mesh: Mesh | None = None
        seen: dict[Key, Resource] = {}
        for r in resources:
            if not isinstance(r, KINDS):
                raise SnapshotError(f"unsupported resource {type(r).__name__}: {r!r:.80}")
            if r.key in seen:
                raise SnapshotError(f"{r.ref} appears twice", (r.ref,))
            seen[r.key] = r
            if isinstance(r, Mesh):
                if mesh is not None:
                    raise SnapshotError(f"two Meshes: {mesh.ref} and {r.ref}; there must be one",
                                        (mesh.ref, r.ref))
                mesh = r
        t = cls.__new__(cls)
        t.node, t.mesh_given = node, mesh is not None
        t.mesh = mesh or Mesh(metadata=ObjectMeta(name="default"))
        by_kind: dict[str, dict[Key, Resource]] = {"Workload": {}, "Service": {}, "AuthorizationPolicy": {},
                                                   "Mesh": {}}
        for k, r in seen.items():
            by_kind[k[0]][k] = r
        t.workload_by_key, t.service_by_key, t.policy_by_key = (
            _in_key_order(m) for m in (by_kind["Workload"], by_kind["Service"], by_kind["AuthorizationPolicy"]))
        t.workloads = tuple(t.workload_by_key.values())
        t.services = tuple(t.service_by_key.values())
        t.policies = tuple(t.policy_by_key.values())

        # one pass over the workloads: node, addresses and identity, namespace and labels
        t.by_ip, t.identity, t.by_label, t.by_ns, t.by_selector = {}, {}, {}, {}, {}
        ids: dict[tuple[str, str], SpiffeId] = {}
        local, by_label, by_ns = [], t.by_label, t.by_ns
        for key, w in t.workload_by_key.items():
            if w.spec.node == node:
                local.append(w)
            add_workload_addresses(t, w, ids)
            ns = w.metadata.namespace
            if (keys := by_ns.get(ns)) is None:
                keys = by_ns[ns] = set()
            keys.add(key)
            for k, v in w.metadata.labels.items():
                if (keys := by_label.get(lk := (ns, k, v))) is None:
                    keys = by_label[lk] = set()
                keys.add(key)
        t.local = tuple(local)
        t.by_vip_port, t.vips = {}, {}
        for s in t.services:
            add_service_addresses(t, s)

        for s in t.services:
            ns = s.metadata.namespace
            for k, v in s.spec.selector.items():
                t.by_selector.setdefault((ns, k, v), set()).add(s.key)
        t.endpoints, t.service_ids = {}, {}
        for s in t.services:
            set_endpoints(t, s)

        t.compiled = {}
        for p in t.policies:
            t.compiled[p.key] = compiled(p)
        by_ns: dict[str, list[AuthorizationPolicy]] = {}
        for p in t.policies:
            by_ns.setdefault(p.metadata.namespace, []).append(p)
        t.policies_by_ns = {ns: tuple(ps) for ns, ps in by_ns.items()}
        t.policy_of = {}
        memo: dict[tuple[Key, ...], PolicySet] = {}
        none = ((), memo.setdefault((), PolicySet.of(())))   # the row of a workload no policy can select
        root = ROOT_NAMESPACE in t.policies_by_ns
        for w in t.workloads:
            if root or w.metadata.namespace in t.policies_by_ns:
                choose_policies(t, w, memo)
            else:
                t.policy_of[w.key] = none
        for name in TABLES:
            setattr(t, name, PMap(getattr(t, name)))
        return t


TABLES = tuple(name for name in Tables.__slots__ if Tables.__annotations__[name].startswith("PMap["))


def _in_key_order(m: dict[Key, Resource]) -> dict[Key, Resource]:
    """``m`` (keys of one kind) sorted by key: by namespace, then by name. The same order as
    ``sorted(m)``, with string comparisons only (sorting 10^4 key tuples costs twice as much)."""
    groups: dict[str, list[Key]] = {}
    for k in m:
        if (g := groups.get(k[1])) is None:
            g = groups[k[1]] = []
        g.append(k)
    name = itemgetter(2)
    return {k: m[k] for ns in sorted(groups) for k in sorted(groups[ns], key=name)}


# --- steps shared by the cold build and the update (agent/state/delta.py) -----------------------

def identity_of(t: Tables, w: Workload, memo: dict[tuple[str, str], SpiffeId]) -> SpiffeId:
    """``w``'s SPIFFE ID in ``t``'s trust domain; raises ``SnapshotError`` if it is not valid."""
    k = (w.metadata.namespace, w.spec.service_account)
    ident = memo.get(k)
    if ident is None:
        try:
            ident = memo[k] = workload_spiffe_id(t.mesh.spec.trust_domain, w)
        except (ValueError, ApiError) as e:
            raise SnapshotError(f"{w.ref}: no valid SPIFFE ID: {e}", (w.ref,)) from e
    return ident


def add_workload_addresses(t: Tables, w: Workload, ids: dict[tuple[str, str], SpiffeId]) -> list[str]:
    """Index ``w``'s identity and addresses into ``t.identity`` and ``t.by_ip`` (which the caller
    owns); returns the canonical addresses. Raises ``SnapshotError`` for an
    invalid identity, an address that does not parse or one another workload owns."""
    ident = ids.get((w.metadata.namespace, w.spec.service_account))
    t.identity[w.key] = ident if ident is not None else identity_of(t, w, ids)
    ips, by_ip = [], t.by_ip
    for raw in w.spec.addresses:
        try:
            ip = canonical_ip(raw)
        except ValueError as e:
            raise SnapshotError(f"{w.ref}: address {raw!r} is not an IP address", (w.ref,)) from e
        other = by_ip.get(ip)
        if other is not None and other is not w:
            raise SnapshotError(f"address {ip} is claimed by both {other.ref} and {w.ref}",
                                (other.ref, w.ref))
        by_ip[ip] = w
        ips.append(ip)
    return ips


def add_service_addresses(t: Tables, s: Service) -> None:
    """Index ``s``'s vip:ports into ``t.by_vip_port`` and ``t.vips`` (which the caller owns).
    Raises ``SnapshotError`` for a vip that does not parse or is a workload address, a port
    listed twice, or a vip:port another Service claims."""
    listed = set()
    for raw in s.spec.addresses:
        try:
            vip = canonical_ip(raw)
        except ValueError as e:
            raise SnapshotError(f"{s.ref}: address {raw!r} is not an IP address", (s.ref,)) from e
        owner = t.by_ip.get(vip)
        if owner is not None:
            raise SnapshotError(f"address {vip} is both a vip of {s.ref} and an address of "
                                f"{owner.ref}", (s.ref, owner.ref))
        for sp in s.spec.ports:
            other = t.by_vip_port.get((vip, sp.port))
            if other is not None and other[0] is s:
                raise SnapshotError(f"{s.ref} lists port {sp.port} twice", (s.ref,))
            if other is not None:
                raise SnapshotError(f"{vip}:{sp.port} is claimed by both {other[0].ref} and "
                                    f"{s.ref}", (other[0].ref, s.ref))
            t.by_vip_port[(vip, sp.port)] = (s, sp)
        listed.add(vip)
    for vip in listed:
        t.vips[vip] = t.vips.get(vip, 0) + 1


def members(t: Tables, ns: str, selector: dict[str, str]) -> set[Key] | frozenset:
    """Keys of the workloads of ``ns`` whose labels include ``selector`` (empty: none). The
    answer may be one of ``t``'s own sets: do not change it."""
    sets = [t.by_label.get((ns, k, v), _NONE) for k, v in selector.items()]
    if not sets:
        return _NONE
    if len(sets) == 1:
        return sets[0]
    sets.sort(key=len)
    return sets[0].intersection(*sets[1:])


def set_endpoints(t: Tables, s: Service) -> None:
    """A Workload backs a Service when they share the namespace and the selector's labels are a
    subset of the workload's (an empty selector selects nothing, as in Kubernetes). One endpoint
    per workload and port, at the workload's first address, ordered by workload key; declared
    workload ports are not consulted (like a numeric targetPort in Kubernetes). Writes
    ``t.endpoints`` and ``t.service_ids``, which the caller owns."""
    by_key, identity = t.workload_by_key, t.identity
    chosen = [by_key[k] for k in sorted(members(t, s.metadata.namespace, s.spec.selector))]
    t.service_ids[s.key] = frozenset(identity[w.key] for w in chosen)
    facts = [(w, canonical_ip(w.spec.addresses[0]), w.spec.node, w.spec.locality, identity[w.key])
             for w in chosen]   # the address is valid: the workloads are indexed
    new, set_ = object.__new__, object.__setattr__
    for sp in s.spec.ports:
        port, eps = sp.target_port, []
        for w, ip, node, locality, ident in facts:   # Endpoint(...) without the frozen __init__'s cost
            ep = new(Endpoint)                       # (fields in order, as __init__ sets them)
            set_(ep, "workload", w)
            set_(ep, "address", ip)
            set_(ep, "port", port)
            set_(ep, "node", node)
            set_(ep, "locality", locality)
            set_(ep, "identity", ident)
            eps.append(ep)
        t.endpoints[(s.key, sp.port)] = tuple(eps)


def compiled(p: AuthorizationPolicy) -> CompiledPolicy:
    try:
        return compile_policy(p)
    except (ValueError, ApiError) as e:
        raise SnapshotError(f"{p.ref} does not compile: {e}", (p.ref,)) from e


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def choose_policies(t: Tables, w: Workload, memo: dict[tuple[Key, ...], PolicySet]) -> None:
    """The policies selecting ``w``: mesh-wide ones (root namespace) first so a DENY from there is
    the one named when both match, then ``w``'s namespace, each by key. Writes ``t.policy_of``
    (which the caller owns); ``memo`` shares equal PolicySets."""
    labels, ns = w.metadata.labels, w.metadata.namespace
    root = t.policies_by_ns.get(ROOT_NAMESPACE, ())
    mine = t.policies_by_ns.get(ns, ()) if ns != ROOT_NAMESPACE else ()
    chosen = tuple(p for p in root + mine if _selects(p.spec.selector, labels)) if root or mine else ()
    keys = tuple(p.key for p in chosen)
    ps = memo.get(keys)
    if ps is None:
        ps = memo[keys] = PolicySet.of(t.compiled[k] for k in keys)
    t.policy_of[w.key] = (chosen, ps)
