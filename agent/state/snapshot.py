"""snapshot.py: the immutable snapshot the proxy reads, swapped whole on each update.

``Snapshot.build`` is pure: it turns the controller's resources into indices so the data path
does dict lookups only, and refuses (``SnapshotError``) what the data path could not serve.
``Snapshot.update`` makes the next snapshot from this one and the objects that changed, sharing
what did not change (``agent/state/index.py`` holds the tables, ``agent/state/delta.py`` updates them); it
gives exactly what ``build`` gives. Policies are compiled here (``agent.state.policies.compile_policy``),
once per policy version. Only ``StateHolder`` knows about trio; everything else is plain data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Mapping

import trio  # StateHolder only

from agent.state.delta import NeedsColdBuild, update
from agent.state.index import ROOT_NAMESPACE, Endpoint, Key, SnapshotError, Tables, resource_key
from agent.state.policies import PolicySet
from controller.api import (AuthorizationPolicy, Mesh, Resource, Service, ServicePort, SpiffeId, Workload,
                            workload_spiffe_id)

__all__ = ["ROOT_NAMESPACE", "Endpoint", "Key", "Snapshot", "SnapshotError", "StateHolder"]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One consistent view of the mesh at controller resourceVersion ``version``, for ``node``.

    Build it with ``Snapshot.build`` (or ``update`` an older one); its tables are private and
    never change. Addresses are looked up in canonical text form (``str(ipaddress.ip_address(x))``,
    as sockets give them).
    """

    version: int
    node: str
    mesh: Mesh
    services: tuple[Service, ...]                       # sorted by namespace/name
    policies: tuple[AuthorizationPolicy, ...]
    local_workloads: tuple[Workload, ...]               # spec.node == node
    _t: Tables = field(repr=False)

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
        return cls._of(Tables.build(resources, node=node), version)

    def update(self, changes: Mapping[Key, Resource | None], *, version: int) -> Snapshot:
        """This snapshot's resources with ``changes`` applied (key -> the object now, or None for
        one deleted), at ``version``. Pure; ``self`` does not change.

        Equals ``Snapshot.build`` of the same resources and raises ``SnapshotError`` as it does;
        costs about what the change touches (a new trust domain, or a change that may not be
        valid, takes a full build).
        """
        try:
            return self._of(update(self._t, changes), version)
        except NeedsColdBuild:
            kept = [r for r in self._t.resources() if r.key not in changes]
            return Snapshot.build(kept + [r for r in changes.values() if r is not None],
                                  version=version, node=self.node)

    @classmethod
    def _of(cls, t: Tables, version: int) -> Snapshot:
        snap = cls(version=version, node=t.node, mesh=t.mesh, services=t.services, policies=t.policies,
                   local_workloads=t.local, _t=t)
        if t.workloads is not None:   # a cold build has them sorted already
            snap.__dict__["workloads"] = t.workloads
        return snap

    @cached_property
    def workloads(self) -> tuple[Workload, ...]:
        """Every Workload, sorted by namespace/name. An update does not keep this tuple (copying
        10^4 references per delta, and leaving them for the collector to walk, is its largest
        cost), so it is sorted on first use; ``workload_count`` counts them without that."""
        return tuple(sorted(self._t.workload_by_key.values(), key=resource_key))

    def workload_count(self) -> int:
        """How many Workloads (``len(self.workloads)``, without sorting them)."""
        return len(self._t.workload_by_key)

    # --- lookups for the data path --------------------------------------------------------------

    def service_at(self, ip: str, port: int) -> tuple[Service, ServicePort] | None:
        """The Service and port whose vip:port is ``ip:port``, or None."""
        m, k = self._t.by_vip_port, (ip, port)   # PMap.get, inlined: once per connection
        return m.shards[hash(k) & m.mask].get(k)

    def workload_at(self, ip: str) -> Workload | None:
        """The Workload that owns address ``ip``, or None."""
        m = self._t.by_ip
        return m.shards[hash(ip) & m.mask].get(ip)

    def workload(self, namespace: str, name: str) -> Workload | None:
        """The Workload ``namespace/name``, or None."""
        return self._t.workload_by_key.get(("Workload", namespace, name))

    def endpoints(self, service: Service, service_port: ServicePort) -> tuple[Endpoint, ...]:
        """The endpoints behind ``service_port`` of ``service``, ordered by workload namespace/name."""
        m, k = self._t.endpoints, (service.key, service_port.port)
        return m.shards[hash(k) & m.mask].get(k, ())

    def service_identities(self, service: Service) -> frozenset[SpiffeId]:
        """Every SPIFFE ID an endpoint of ``service`` may present (empty if it has none)."""
        return self._t.service_ids.get(service.key, frozenset())

    def identity_of(self, workload: Workload) -> SpiffeId:
        """``workload``'s SPIFFE ID in this mesh's trust domain (computed if not in the snapshot)."""
        m, k = self._t.identity, workload.key
        ident = m.shards[hash(k) & m.mask].get(k)
        return ident if ident is not None else workload_spiffe_id(self.mesh.spec.trust_domain, workload)

    def policies_for(self, workload: Workload) -> tuple[AuthorizationPolicy, ...]:
        """The policies that select ``workload``: mesh-wide ones (root namespace) first, then the
        workload's namespace, each by name. Empty for a workload not in the snapshot."""
        row = self._t.policy_of.get(workload.key)
        return row[0] if row is not None else ()

    def policy_set(self, workload: Workload) -> PolicySet | None:
        """The compiled form of ``policies_for``, split by action; None for a workload not in the
        snapshot (``agent.decide.authorize`` denies those)."""
        m, k = self._t.policy_of, workload.key
        row = m.shards[hash(k) & m.mask].get(k)
        return row[1] if row is not None else None


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
