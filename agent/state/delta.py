"""delta.py: new snapshot tables from old ones and a few changed objects, in time that follows
the change, not the mesh (``update``).

Pure: no I/O, no trio. Tables are ``PMap``s, edited through an ``Editor`` that copies only the
shards it writes (``agent/pmap.py``), so no delta copies a whole 10^4-entry table. The rule:
``update(Tables.build(R), C)`` equals ``Tables.build(R with C applied)``, field by field. Only
the tables a change touches are edited (the rest are shared with the old tables, which never
change), a set in an index is copied only when its members change, and only the services,
endpoints and policy choices that a changed object can reach are recomputed. Whatever this module does not decide itself
(any clash, an invalid identity, address or policy, a second Mesh, a new trust domain) raises
``NeedsColdBuild``: the caller then builds cold, which also names the error.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Iterable, Mapping, TypeVar

from agent.state.index import (KINDS, ROOT_NAMESPACE, TABLES, Key, SnapshotError, Tables,
                               add_service_addresses, add_workload_addresses, choose_policies, compiled,
                               members, resource_key, set_endpoints)
from agent.state.pmap import Editor, PMap, finish
from controller.api import AuthorizationPolicy, Mesh, ObjectMeta, Resource, Service, Workload, canonical_ip

R = TypeVar("R", Workload, Service, AuthorizationPolicy)


class NeedsColdBuild(Exception):
    """The update cannot be made (or proven valid) incrementally; build from every resource."""


def update(old: Tables, changes: Mapping[Key, Resource | None]) -> Tables:
    """``old`` with ``changes`` applied: key -> the object now, or None for one deleted.

    Raises ``NeedsColdBuild`` (never ``SnapshotError``) for anything it does not handle.
    """
    if not changes:
        return old
    ws: dict[Key, Workload | None] = {}
    ss: dict[Key, Service | None] = {}
    ps: dict[Key, AuthorizationPolicy | None] = {}
    meshes: dict[Key, Mesh | None] = {}
    groups: dict[str, dict] = {"Workload": ws, "Service": ss, "AuthorizationPolicy": ps, "Mesh": meshes}
    for key, r in changes.items():
        group = groups.get(key[0])
        if group is None or (r is not None and (not isinstance(r, KINDS) or r.key != key)):
            raise NeedsColdBuild(f"not a supported resource of key {key}")
        group[key] = r
    t = old.copy()
    try:
        if meshes:
            _mesh(t, meshes)
        if ws or ss:
            _addresses(old, t, ws, ss)
        if ws:
            _workload_indices(old, t, ws)
        if ss:
            _service_indices(old, t, ss)
        if ws or ss:
            _endpoints(old, t, ws, ss)
        if ws or ps:
            _policies(old, t, ws, ps)
    except SnapshotError as e:
        raise NeedsColdBuild(str(e)) from e
    for name in TABLES:
        setattr(t, name, finish(getattr(t, name)))
    return t


def _mesh(t: Tables, meshes: dict[Key, Mesh | None]) -> None:
    present = {t.mesh.key: t.mesh} if t.mesh_given else {}
    for key, m in meshes.items():
        if m is None:
            present.pop(key, None)
        else:
            present[key] = m
    if len(present) > 1:
        raise NeedsColdBuild("two Meshes")
    mesh = next(iter(present.values()), None)
    t.mesh_given = mesh is not None
    mesh = mesh or Mesh(metadata=ObjectMeta(name="default"))
    if mesh.spec.trust_domain != t.mesh.spec.trust_domain:
        raise NeedsColdBuild("the trust domain changed: every identity changes")
    t.mesh = mesh


def _sorted_update(items: tuple[R, ...], changes: Mapping[Key, R | None],
                   keep: Callable[[R], bool] = lambda r: True) -> tuple[R, ...]:
    """``items`` (sorted by key) with ``changes`` applied and only the items ``keep`` accepts."""
    out = list(items)
    for key, r in changes.items():
        i = bisect_left(out, key, key=resource_key)
        here = i < len(out) and out[i].key == key
        if r is not None and keep(r):
            if here:
                out[i] = r
            else:
                out.insert(i, r)
        elif here:
            del out[i]
    return tuple(out)


def _by_key(table: PMap[Key, R], changes: Mapping[Key, R | None]) -> Editor[Key, R]:
    out = table.edit()
    for key, r in changes.items():
        if r is None:
            out.pop(key, None)
        else:
            out[key] = r
    return out


def _addresses(old: Tables, t: Tables, ws: dict[Key, Workload | None], ss: dict[Key, Service | None]) -> None:
    """Addresses, identities and vips: take the old objects out, put the new ones in, check
    every clash among them and against what stayed."""
    if ws:
        t.by_ip, t.identity = old.by_ip.edit(), old.identity.edit()
    if ss:
        t.by_vip_port, t.vips = old.by_vip_port.edit(), old.vips.edit()
    for key in ws:
        w = old.workload_by_key.get(key)
        if w is not None:
            for raw in w.spec.addresses:
                ip = canonical_ip(raw)
                if t.by_ip.get(ip) is w:
                    del t.by_ip[ip]
            t.identity.pop(key, None)
    for key in ss:
        s = old.service_by_key.get(key)
        if s is not None:
            vips = {canonical_ip(raw) for raw in s.spec.addresses}
            for vip in vips:
                for sp in s.spec.ports:
                    if t.by_vip_port.get((vip, sp.port), (None,))[0] is s:
                        del t.by_vip_port[(vip, sp.port)]
                left = t.vips[vip] - 1
                if left:
                    t.vips[vip] = left
                else:
                    del t.vips[vip]
    ids: dict = {}
    new_ips: list[str] = []
    for w in ws.values():
        if w is not None:
            new_ips += add_workload_addresses(t, w, ids)
    for s in ss.values():
        if s is not None:
            add_service_addresses(t, s)
    if any(ip in t.vips for ip in new_ips):
        raise NeedsColdBuild("a new workload address is a vip")


class _CopyOnWrite:
    """Edits of a table of sets shared with old tables: each touched set is copied once."""

    def __init__(self, table: PMap) -> None:
        self.table, self._copied = table.edit(), set()

    def add(self, k: object, v: Key) -> None:
        self._own(k).add(v)

    def discard(self, k: object, v: Key) -> None:
        s = self._own(k)
        s.discard(v)
        if not s:
            del self.table[k]
            self._copied.discard(k)

    def _own(self, k: object) -> set:
        if k not in self._copied:
            self.table[k] = set(self.table.get(k, ()))
            self._copied.add(k)
        return self.table[k]


def _workload_indices(old: Tables, t: Tables, ws: dict[Key, Workload | None]) -> None:
    t.workloads = None   # Snapshot.workloads sorts them when asked
    t.local = _sorted_update(old.local, ws, keep=lambda w: w.spec.node == old.node)
    t.workload_by_key = _by_key(old.workload_by_key, ws)
    by_label, by_ns = _CopyOnWrite(old.by_label), _CopyOnWrite(old.by_ns)
    for key, new in ws.items():   # only what differs: a label kept is no edit (no set copied)
        was = old.workload_by_key.get(key)
        before, after = _label_keys(was), _label_keys(new)
        for lk in before - after:
            by_label.discard(lk, key)
        for lk in after - before:
            by_label.add(lk, key)
        ns_was, ns_now = (None if w is None else w.metadata.namespace for w in (was, new))
        if ns_was != ns_now:
            if ns_was is not None:
                by_ns.discard(ns_was, key)
            if ns_now is not None:
                by_ns.add(ns_now, key)
    t.by_label, t.by_ns = by_label.table, by_ns.table


def _label_keys(w: Workload | None) -> set:
    if w is None:
        return set()
    ns = w.metadata.namespace
    return {(ns, k, v) for k, v in w.metadata.labels.items()}


def _service_indices(old: Tables, t: Tables, ss: dict[Key, Service | None]) -> None:
    t.services = _sorted_update(old.services, ss)
    t.service_by_key = _by_key(old.service_by_key, ss)
    by_selector = _CopyOnWrite(old.by_selector)
    for key, new in ss.items():
        before, after = (set() if s is None else {(s.metadata.namespace, k, v) for k, v in s.spec.selector.items()}
                         for s in (old.service_by_key.get(key), new))
        for lk in before - after:
            by_selector.discard(lk, key)
        for lk in after - before:
            by_selector.add(lk, key)
    t.by_selector = by_selector.table


def _endpoints(old: Tables, t: Tables, ws: dict[Key, Workload | None], ss: dict[Key, Service | None]) -> None:
    """Recompute the changed services and every service whose selector a changed workload's old
    or new labels could satisfy."""
    touched = set(ss)
    for key, new in ws.items():
        for w in (old.workload_by_key.get(key), new):
            if w is not None:
                ns = w.metadata.namespace
                for k, v in w.metadata.labels.items():
                    touched.update(t.by_selector.get((ns, k, v), ()))
    t.endpoints, t.service_ids = old.endpoints.edit(), old.service_ids.edit()
    for key in sorted(touched):
        was = old.service_by_key.get(key)
        if was is not None:
            for sp in was.spec.ports:
                t.endpoints.pop((key, sp.port), None)
            t.service_ids.pop(key, None)
        now = t.service_by_key.get(key)
        if now is not None:
            set_endpoints(t, now)


def _selected_by(t: Tables, p: AuthorizationPolicy) -> Iterable[Key]:
    """Keys of the workloads (in ``t``) that ``p``'s namespace and selector reach."""
    ns = p.metadata.namespace
    for n in (t.by_ns if ns == ROOT_NAMESPACE else (ns,)):
        yield from (t.by_ns.get(n, ()) if not p.spec.selector else members(t, n, p.spec.selector))


def _policies(old: Tables, t: Tables, ws: dict[Key, Workload | None],
              ps: dict[Key, AuthorizationPolicy | None]) -> None:
    touched = {key for key, w in ws.items() if w is not None}
    if ps:
        t.policies = _sorted_update(old.policies, ps)
        t.policy_by_key = _by_key(old.policy_by_key, ps)
        t.compiled = old.compiled.edit()
        namespaces = set()
        for key, new in ps.items():
            t.compiled.pop(key, None)
            if new is not None:
                t.compiled[key] = compiled(new)
            namespaces.add(key[1])
            for p in (old.policy_by_key.get(key), new):
                if p is not None:
                    touched.update(_selected_by(t, p))
        t.policies_by_ns = old.policies_by_ns.edit()
        for ns in namespaces:
            mine = _sorted_update(old.policies_by_ns.get(ns, ()), {k: p for k, p in ps.items() if k[1] == ns})
            if mine:
                t.policies_by_ns[ns] = mine
            else:
                t.policies_by_ns.pop(ns, None)
    t.policy_of = old.policy_of.edit()
    for key, w in ws.items():
        if w is None:
            t.policy_of.pop(key, None)
    memo: dict = {}
    for key in touched:
        w = t.workload_by_key.get(key)
        if w is not None:
            choose_policies(t, w, memo)
