"""state.py: the immutable snapshot the proxy reads, swapped whole on each update.

``Snapshot.build`` is pure: it turns the controller's resources into indices so the data path
does dict lookups only, and refuses (``SnapshotError``) what the data path could not serve.
Policies are compiled here (``agent.policy.compile_policy``), once per snapshot. Only
``StateHolder`` knows about trio; everything else is plain data.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

import trio   # StateHolder only

from agent.policy import CompiledPolicy, PolicySet, compile_policy
from controller.api import (ApiError, AuthorizationPolicy, Locality, Mesh, ObjectMeta, Resource, Service,
                            ServicePort, SpiffeId, Workload, workload_spiffe_id)

ROOT_NAMESPACE = "nodemesh-system"   # policies here apply mesh-wide, subject to their selector

Key = tuple[str, str, str]           # Resource.key: (kind, namespace, name)


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


def _canonical_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One consistent view of the mesh at controller resourceVersion ``version``, for ``node``.

    Build it with ``Snapshot.build``; the index fields are private and never change. Addresses
    are looked up in canonical text form (``str(ipaddress.ip_address(x))``, as sockets give them).
    """

    version: int
    node: str
    mesh: Mesh
    workloads: tuple[Workload, ...] = ()                # sorted by namespace/name
    services: tuple[Service, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    local_workloads: tuple[Workload, ...] = ()          # spec.node == node
    _workload_by_key: dict[Key, Workload] = field(default_factory=dict, repr=False)
    _workload_by_ip: dict[str, Workload] = field(default_factory=dict, repr=False)
    _service_by_vip_port: dict[tuple[str, int], tuple[Service, ServicePort]] = field(
        default_factory=dict, repr=False)
    _endpoints: dict[tuple[Key, int], tuple[Endpoint, ...]] = field(default_factory=dict, repr=False)
    _service_identities: dict[Key, frozenset[SpiffeId]] = field(default_factory=dict, repr=False)
    _identity: dict[Key, SpiffeId] = field(default_factory=dict, repr=False)
    _policies: dict[Key, tuple[AuthorizationPolicy, ...]] = field(default_factory=dict, repr=False)
    _policy_sets: dict[Key, PolicySet] = field(default_factory=dict, repr=False)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def empty(cls, *, node: str, version: int = 0) -> Snapshot:
        """No resources and the default Mesh: what an agent serves before its first update."""
        return cls.build((), version=version, node=node)

    @classmethod
    def build(cls, resources: Iterable[Resource], *, version: int, node: str) -> Snapshot:
        """Index ``resources`` for ``node``. Pure.

        Raises ``SnapshotError`` naming the objects for: the same object twice; two Meshes; an
        unknown kind; an address that does not parse; two Workloads claiming one address; two
        Services (or two ports of one Service) claiming one vip:port; a Service vip that is also
        a Workload address (the outbound path could not tell which was meant); an identity that
        is not a valid SPIFFE ID; a policy whose principals or CIDRs do not compile. The agent
        keeps its last good snapshot when this raises.
        """
        mesh: Mesh | None = None
        seen: dict[Key, Resource] = {}
        for r in resources:
            if not isinstance(r, (Mesh, Workload, Service, AuthorizationPolicy)):
                raise SnapshotError(f"unsupported resource {type(r).__name__}: {r!r:.80}")
            if r.key in seen:
                raise SnapshotError(f"{r.ref} appears twice", (r.ref,))
            seen[r.key] = r
            if isinstance(r, Mesh):
                if mesh is not None:
                    raise SnapshotError(f"two Meshes: {mesh.ref} and {r.ref}; there must be one",
                                        (mesh.ref, r.ref))
                mesh = r
        mesh = mesh or Mesh(metadata=ObjectMeta(name="default"))
        ordered = sorted(seen.values(), key=lambda r: r.key)
        workloads = tuple(r for r in ordered if isinstance(r, Workload))
        services = tuple(r for r in ordered if isinstance(r, Service))
        policies = tuple(r for r in ordered if isinstance(r, AuthorizationPolicy))

        by_ip, identity, first_ip = _index_workloads(workloads, mesh)
        by_vip_port = _index_services(services, by_ip)
        endpoints, service_ids = _endpoints(services, workloads, first_ip, identity)
        selected, sets = _select_policies(policies, workloads)
        return cls(version=version, node=node, mesh=mesh, workloads=workloads, services=services,
                   policies=policies,
                   local_workloads=tuple(w for w in workloads if w.spec.node == node),
                   _workload_by_key={w.key: w for w in workloads}, _workload_by_ip=by_ip,
                   _service_by_vip_port=by_vip_port, _endpoints=endpoints,
                   _service_identities=service_ids, _identity=identity, _policies=selected,
                   _policy_sets=sets)

    # --- lookups for the data path --------------------------------------------------------------

    def service_at(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """The Service and port whose vip:port is ``ip:port``, or None."""
        return self._service_by_vip_port.get((ip, port))

    def workload_at(self, ip: str) -> Workload | None:
        """The Workload that owns address ``ip``, or None."""
        return self._workload_by_ip.get(ip)

    def workload(self, namespace: str, name: str) -> Workload | None:
        """The Workload ``namespace/name``, or None."""
        return self._workload_by_key.get(("Workload", namespace, name))

    def endpoints(self, service: Service, service_port: ServicePort) -> tuple[Endpoint, ...]:
        """The endpoints behind ``service_port`` of ``service``, ordered by workload namespace/name."""
        return self._endpoints.get((service.key, service_port.port), ())

    def service_identities(self, service: Service) -> frozenset[SpiffeId]:
        """Every SPIFFE ID an endpoint of ``service`` may present (empty if it has none)."""
        return self._service_identities.get(service.key, frozenset())

    def identity_of(self, workload: Workload) -> SpiffeId:
        """``workload``'s SPIFFE ID in this mesh's trust domain (computed if not in the snapshot)."""
        ident = self._identity.get(workload.key)
        return ident if ident is not None else workload_spiffe_id(self.mesh.spec.trust_domain, workload)

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The policies that select ``workload``: mesh-wide ones (root namespace) first, then the
        workload's namespace, each by name. Empty for a workload not in the snapshot."""
        return self._policies.get(workload.key, ())

    def policy_set(self, workload: Workload) -> PolicySet | None:
        """The compiled form of ``policies_for``, split by action; None for a workload not in the
        snapshot (``policy.authorize`` denies those)."""
        return self._policy_sets.get(workload.key)


# --- build steps --------------------------------------------------------------------------------

def _index_workloads(workloads: tuple[Workload, ...], mesh: Mesh
                     ) -> tuple[dict[str, Workload], dict[Key, SpiffeId], dict[Key, str]]:
    by_ip: dict[str, Workload] = {}
    identity: dict[Key, SpiffeId] = {}
    first_ip: dict[Key, str] = {}
    for w in workloads:
        try:
            identity[w.key] = workload_spiffe_id(mesh.spec.trust_domain, w)
        except (ValueError, ApiError) as e:
            raise SnapshotError(f"{w.ref}: no valid SPIFFE ID: {e}", (w.ref,)) from e
        for raw in w.spec.addresses:
            try:
                ip = _canonical_ip(raw)
            except ValueError as e:
                raise SnapshotError(f"{w.ref}: address {raw!r} is not an IP address", (w.ref,)) from e
            other = by_ip.get(ip)
            if other is not None and other is not w:
                raise SnapshotError(f"address {ip} is claimed by both {other.ref} and {w.ref}",
                                    (other.ref, w.ref))
            by_ip[ip] = w
            first_ip.setdefault(w.key, ip)
    return by_ip, identity, first_ip


def _index_services(services: tuple[Service, ...], by_ip: dict[str, Workload]
                    ) -> dict[tuple[str, int], tuple[Service, ServicePort]]:
    out: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
    for s in services:
        for raw in s.spec.addresses:
            try:
                vip = _canonical_ip(raw)
            except ValueError as e:
                raise SnapshotError(f"{s.ref}: address {raw!r} is not an IP address", (s.ref,)) from e
            owner = by_ip.get(vip)
            if owner is not None:
                raise SnapshotError(f"address {vip} is both a vip of {s.ref} and an address of "
                                    f"{owner.ref}", (s.ref, owner.ref))
            for sp in s.spec.ports:
                other = out.get((vip, sp.port))
                if other is not None and other[0] is s:
                    raise SnapshotError(f"{s.ref} lists port {sp.port} twice", (s.ref,))
                if other is not None:
                    raise SnapshotError(f"{vip}:{sp.port} is claimed by both {other[0].ref} and "
                                        f"{s.ref}", (other[0].ref, s.ref))
                out[(vip, sp.port)] = (s, sp)
    return out


def _endpoints(services: tuple[Service, ...], workloads: tuple[Workload, ...],
               first_ip: dict[Key, str], identity: dict[Key, SpiffeId]
               ) -> tuple[dict[tuple[Key, int], tuple[Endpoint, ...]], dict[Key, frozenset[SpiffeId]]]:
    """A Workload backs a Service when they share the namespace and the selector's labels are a
    subset of the workload's (an empty selector selects nothing, as in Kubernetes). One endpoint
    per workload and port, at the workload's first address; declared workload ports are not
    consulted (like a numeric targetPort in Kubernetes)."""
    endpoints: dict[tuple[Key, int], tuple[Endpoint, ...]] = {}
    ids: dict[Key, frozenset[SpiffeId]] = {}
    # (namespace, label, value) -> positions in ``workloads``: a selector is the intersection of
    # its labels' sets, so matching costs the size of the answer, not services x workloads.
    by_label: dict[tuple[str, str, str], set[int]] = {}
    for i, w in enumerate(workloads):
        for k, v in w.metadata.labels.items():
            by_label.setdefault((w.metadata.namespace, k, v), set()).add(i)
    for s in services:
        sets = [by_label.get((s.metadata.namespace, k, v), set()) for k, v in s.spec.selector.items()]
        chosen = set.intersection(*sorted(sets, key=len)) if sets else set()
        members = [workloads[i] for i in sorted(chosen)]
        ids[s.key] = frozenset(identity[w.key] for w in members)
        for sp in s.spec.ports:
            endpoints[(s.key, sp.port)] = tuple(
                Endpoint(workload=w, address=first_ip[w.key], port=sp.target_port, node=w.spec.node,
                         locality=w.spec.locality, identity=identity[w.key]) for w in members)
    return endpoints, ids


def _select_policies(policies: tuple[AuthorizationPolicy, ...], workloads: tuple[Workload, ...]
                     ) -> tuple[dict[Key, tuple[AuthorizationPolicy, ...]], dict[Key, PolicySet]]:
    compiled: dict[Key, CompiledPolicy] = {}
    for p in policies:
        try:
            compiled[p.key] = compile_policy(p)
        except (ValueError, ApiError) as e:
            raise SnapshotError(f"{p.ref} does not compile: {e}", (p.ref,)) from e
    # mesh-wide first so a DENY from the root namespace is the one named when both match
    ordered = sorted(policies, key=lambda p: (p.metadata.namespace != ROOT_NAMESPACE, p.key))
    selected: dict[Key, tuple[AuthorizationPolicy, ...]] = {}
    sets: dict[Key, PolicySet] = {}
    for w in workloads:
        ns = w.metadata.namespace
        chosen = tuple(p for p in ordered
                       if p.metadata.namespace in (ns, ROOT_NAMESPACE)
                       and _selects(p.spec.selector, w.metadata.labels))
        selected[w.key] = chosen
        sets[w.key] = PolicySet.of(compiled[p.key] for p in chosen)
    return selected, sets


# --- the holder ---------------------------------------------------------------------------------

class StateHolder:
    """Holds the current snapshot for trio tasks (trio's ``_sync.py`` pattern: a new Event for
    each publish; they're cheap).

    Readers take ``snap = holder.current`` once per connection and keep it (one snapshot per
    connection); only the live-connection registry waits for newer ones.
    """

    def __init__(self, initial: Snapshot) -> None:
        self.current = initial
        self._published = trio.Event()

    def publish(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` current and wake every ``wait_newer`` caller. Never blocks."""
        self.current = snapshot
        event, self._published = self._published, trio.Event()
        event.set()

    async def wait_newer(self, version: int) -> Snapshot:
        """Return the current snapshot as soon as its version is greater than ``version``."""
        while self.current.version <= version:
            await self._published.wait()
        return self.current
