"""Snapshot.update equals Snapshot.build of the same resources, table by table, over random
sequences of adds, modifications and deletions of every kind (seeded, so failures replay)."""
from __future__ import annotations

import random

import pytest

from agent.state import delta, snapshot
from agent.state.index import ROOT_NAMESPACE, Tables
from agent.state.snapshot import Snapshot, SnapshotError
from controller.api import (AuthorizationPolicy, AuthorizationPolicySpec, Locality, Mesh, MeshSpec,
                            ObjectMeta, Operation, Rule, Service, ServicePort, ServiceSpec, Source, Workload,
                            WorkloadSpec)

NAMESPACES = ("a", "b", ROOT_NAMESPACE)
WORKLOAD_IPS = [f"10.0.0.{i}" for i in range(1, 41)] + ["fd00::1", "FD00::2", "fd00:0::3"]
VIPS = [f"10.96.0.{i}" for i in range(1, 31)] + ["fd00::a"]


def labels(rng: random.Random) -> dict[str, str]:
    pool = {"app": rng.choice(["x", "y"]), "version": rng.choice(["v1", "v2"]), "tier": "t"}
    return {k: v for k, v in pool.items() if rng.random() < 0.6}


def workload(rng: random.Random, ns: str, name: str) -> Workload:
    sa = rng.choice(["s1", "s2", "s1", "bad sa"]) if rng.random() < 0.05 else rng.choice(["s1", "s2"])
    ips = rng.sample(WORKLOAD_IPS, rng.choice([1, 1, 2]))
    if rng.random() < 0.02:
        ips = ["not-an-ip"]
    if rng.random() < 0.03:
        ips = [rng.choice(VIPS)]                                  # clashes with a vip
    return Workload(metadata=ObjectMeta(name=name, namespace=ns, labels=labels(rng)),
                    spec=WorkloadSpec(node=rng.choice(["n1", "n2"]), service_account=sa, addresses=tuple(ips),
                                      locality=Locality(zone=rng.choice(["", "z1"])), netns="/run/netns/p"))


def service(rng: random.Random, ns: str, name: str) -> Service:
    sel = labels(rng) or {"app": "x"}
    ports = rng.sample([80, 81, 9000], rng.choice([1, 2]))
    vips = rng.sample(VIPS, rng.choice([1, 1, 2]))
    if rng.random() < 0.03:
        vips = [rng.choice(WORKLOAD_IPS)]
    if rng.random() < 0.02:
        ports = [80, 80]
    return Service(metadata=ObjectMeta(name=name, namespace=ns),
                   spec=ServiceSpec(addresses=tuple(vips), selector=sel,
                                    ports=tuple(ServicePort(port=p, target_port=rng.choice([0, 8080]))
                                                for p in ports)))


def policy(rng: random.Random, ns: str, name: str) -> AuthorizationPolicy:
    source = rng.choice([Source(), Source(namespaces=("a",)), Source(principals=("cluster.local/ns/a/sa/s1",)),
                         Source(ip_blocks=("10.0.0.0/24",))])
    if rng.random() < 0.03:
        source = Source(ip_blocks=("10.0.0.0/33",))               # does not compile
    rules = rng.choice([(), (Rule(),), (Rule(from_=(source,), to=(Operation(ports=(8080,)),)),)])
    return AuthorizationPolicy(metadata=ObjectMeta(name=name, namespace=ns),
                               spec=AuthorizationPolicySpec(selector=labels(rng) if rng.random() < 0.7 else {},
                                                            action=rng.choice(["ALLOW", "DENY", "AUDIT"]),
                                                            rules=rules))


def mesh(rng: random.Random) -> Mesh:
    name = "other" if rng.random() < 0.05 else "default"
    td = "cluster.local" if rng.random() < 0.8 else "example.org"
    return Mesh(metadata=ObjectMeta(name=name),
                spec=MeshSpec(trust_domain=td, mtls=rng.choice(["STRICT", "PERMISSIVE"]),
                              default_action=rng.choice(["ALLOW", "DENY"])))


def random_change(rng: random.Random, current: dict) -> tuple:
    kind = rng.choices(["Workload", "Service", "AuthorizationPolicy", "Mesh"], [6, 3, 3, 1])[0]
    if kind == "Mesh":
        m = mesh(rng)
        key = m.key
        return (key, None) if rng.random() < 0.2 else (key, m)
    ns = rng.choice(NAMESPACES)
    name = f"{kind[0].lower()}{rng.randrange(6)}"
    key = (kind, ns, name)
    if key in current and rng.random() < 0.25:
        return key, None
    make = {"Workload": workload, "Service": service, "AuthorizationPolicy": policy}[kind]
    return key, make(rng, ns, name)


def tables(t: Tables) -> dict:
    """Every table in comparable form (compiled policies compared by the policy they compile)."""
    out = {name: getattr(t, name) for name in Tables.__slots__ if name != "workloads"}   # None after an update:
    out["compiled"] = {k: c.policy for k, c in t.compiled.items()}
    out["policy_of"] = {k: (chosen, tuple(tuple(c.policy for c in part) for part in (ps.deny, ps.allow, ps.audit)))
                        for k, (chosen, ps) in t.policy_of.items()}
    return out


def check_same(a: Snapshot, b: Snapshot) -> None:
    for name in ("version", "node", "mesh", "workloads", "services", "policies", "local_workloads"):
        assert getattr(a, name) == getattr(b, name), name   # (Snapshot.workloads sorts them then)
    assert a.workload_count() == b.workload_count() == len(a.workloads)
    ta, tb = tables(a._t), tables(b._t)
    for name in ta:
        assert ta[name] == tb[name], name


def cold(current: dict, version: int) -> Snapshot:
    return Snapshot.build(list(current.values()), version=version, node="n1")


@pytest.mark.parametrize("seed", range(12))
def test_update_equals_cold_build(seed, monkeypatch):
    incremental = []

    def counted(t, changes):
        out = delta.update(t, changes)
        incremental.append(1)
        return out

    monkeypatch.setattr(snapshot, "update", counted)
    rng = random.Random(seed)
    current: dict = {}                       # what the last good snapshot was built from
    snap = cold(current, 0)
    rejected = applied = 0
    for step in range(1, 301):
        changes: dict = {}
        for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
            key, r = random_change(rng, {**current, **changes})
            changes[key] = r
        proposed = {k: v for k, v in {**current, **changes}.items() if v is not None}
        try:
            want = cold(proposed, step)
        except SnapshotError as e:
            with pytest.raises(SnapshotError) as got:
                snap.update(changes, version=step)
            assert sorted(got.value.objects) == sorted(e.objects)
            if "two Meshes" not in e.message:    # the only message that names objects in input order
                assert got.value.message == e.message
            rejected += 1
            continue
        new = snap.update(changes, version=step)
        check_same(new, want)
        snap, current = new, proposed
        applied += 1
    assert applied > 100 and rejected > 5
    assert len(incremental) > applied / 2     # most updates did not fall back to a cold build


def test_update_shares_what_did_not_change():
    rng = random.Random(99)
    clean, used = {}, set()
    for i in range(12):
        w = workload(rng, "a", f"w{i}")
        ips = set(w.spec.addresses)
        if w.spec.service_account != "bad sa" and ips <= set(WORKLOAD_IPS) and not ips & used:
            clean[w.key], used = w, used | ips
    snap = cold(clean, 1)
    key, w = next(iter(clean.items()))
    moved = Workload(metadata=ObjectMeta(name=w.metadata.name, namespace="a", labels={"app": "z"}), spec=w.spec)
    new = snap.update({key: moved}, version=2)
    assert new._t.service_by_key is snap._t.service_by_key      # untouched tables are shared
    assert new._t.policies_by_ns is snap._t.policies_by_ns
    assert new.workload("a", w.metadata.name) is moved
    assert snap.workload("a", w.metadata.name) is w               # the old snapshot never changes
    assert snap.update({}, version=3)._t is snap._t
