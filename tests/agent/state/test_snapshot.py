"""Snapshot.build indices from a DESIGN-like mesh, the contradictions it refuses, StateHolder."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from agent.state.snapshot import ROOT_NAMESPACE, Endpoint, Snapshot, SnapshotError, StateHolder
from controller.api import (AuthorizationPolicy, AuthorizationPolicySpec, Locality, Mesh, ObjectMeta, Rule,
                            Service, ServicePort, ServiceSpec, Source, SpiffeId, parse_manifests)

MESH = """
apiVersion: nodemesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: example.org, mtls: STRICT, defaultAction: ALLOW}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec: {node: node-1, netns: /run/netns/p, serviceAccount: web, addresses: [10.10.1.2, "fd00::1:2"],
       locality: {region: eu-west, zone: eu-west-1a}, ports: [8080]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v2}}
spec: {node: node-2, netns: /run/netns/p, serviceAccount: web, addresses: [10.10.2.2],
       locality: {region: eu-west, zone: eu-west-1b}, ports: [8080]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: frontend-1, namespace: shop, labels: {app: frontend}}
spec: {node: node-1, netns: /run/netns/p, serviceAccount: frontend, addresses: [10.10.1.3],
       locality: {region: eu-west, zone: eu-west-1a}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: echo-1, namespace: shop, labels: {app: echo}}
spec: {node: node-2, netns: /run/netns/p, serviceAccount: echo, addresses: [10.10.2.3],
       locality: {region: eu-west, zone: eu-west-1b}, ports: [9000]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-x, namespace: ops, labels: {app: web}}
spec: {node: node-2, netns: /run/netns/p, serviceAccount: tools, addresses: [10.10.2.9]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  addresses: [10.96.0.10, "FD00::A"]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: http}
  - {name: admin, port: 81, targetPort: 9090}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  addresses: [10.96.0.20]
  selector: {app: echo}
  ports: [{port: 9000}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-frontend, namespace: shop}
spec:
  selector: {app: web}
  rules: [{from: [{principals: [example.org/ns/shop/sa/frontend]}]}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: shop-audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: v2-only, namespace: shop}
spec: {selector: {version: v2}, action: DENY, rules: [{from: [{namespaces: [ops]}]}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mesh-deny-plaintext, namespace: nodemesh-system}
spec: {action: DENY, rules: [{from: [{notPrincipals: ["*"]}]}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-everywhere, namespace: nodemesh-system}
spec: {selector: {app: echo}, action: AUDIT, rules: [{}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ops-wide, namespace: ops}
spec: {rules: [{}]}
"""


def resources(text: str = MESH):
    return parse_manifests(text, source="test.yaml")


@pytest.fixture
def snap() -> Snapshot:
    return Snapshot.build(resources(), version=7, node="node-1")


def refs(items) -> list[str]:
    return [f"{x.metadata.namespace}/{x.metadata.name}" for x in items]


# --- indices -------------------------------------------------------------------------------------

def test_header_and_mesh(snap):
    assert (snap.version, snap.node) == (7, "node-1")
    assert snap.mesh.spec.trust_domain == "example.org"
    assert refs(snap.workloads) == ["ops/web-x", "shop/echo-1", "shop/frontend-1", "shop/web-1",
                                    "shop/web-2"]


def test_service_at_every_vip_and_port(snap):
    web = snap.service_at("10.96.0.10", 80)
    assert web is not None and web[0].metadata.name == "web" and web[1].target_port == 8080
    assert snap.service_at("10.96.0.10", 81)[1].target_port == 9090
    assert snap.service_at("fd00::a", 80)[0] is web[0]        # v6 vip, canonicalised at build
    assert snap.service_at("10.96.0.20", 9000)[0].metadata.name == "echo"
    assert snap.service_at("10.96.0.20", 80) is None
    assert snap.service_at("10.10.1.2", 8080) is None          # a workload address is no vip


def test_workload_at_every_address(snap):
    assert snap.workload_at("10.10.1.2").metadata.name == "web-1"
    assert snap.workload_at("fd00::1:2").metadata.name == "web-1"
    assert snap.workload_at("10.10.2.9").metadata.namespace == "ops"
    assert snap.workload_at("10.96.0.10") is None
    assert snap.workload("shop", "echo-1").metadata.name == "echo-1"
    assert snap.workload("ops", "echo-1") is None


def test_endpoints_follow_selector_namespace_and_target_port(snap):
    web, http = snap.service_at("10.96.0.10", 80)
    eps = snap.endpoints(web, http)
    assert [(e.workload.metadata.name, e.address, e.port, e.node) for e in eps] == [
        ("web-1", "10.10.1.2", 8080, "node-1"), ("web-2", "10.10.2.2", 8080, "node-2")]
    assert eps[0].locality == Locality(region="eu-west", zone="eu-west-1a")
    assert eps[1].identity == SpiffeId("example.org", "shop", "web")
    assert eps[0].key == ("10.10.1.2", 8080)
    _, admin = snap.service_at("10.96.0.10", 81)
    assert [e.port for e in snap.endpoints(web, admin)] == [9090, 9090]
    echo, p = snap.service_at("10.96.0.20", 9000)
    assert [e.workload.metadata.name for e in snap.endpoints(echo, p)] == ["echo-1"]


def test_selector_needs_every_label():
    text = MESH.replace("selector: {app: echo}\n  ports: [{port: 9000}]",
                        "selector: {app: web, version: v2}\n  ports: [{port: 9000}]")
    snap = Snapshot.build(resources(text), version=1, node="n")
    svc, p = snap.service_at("10.96.0.20", 9000)
    assert [e.workload.metadata.name for e in snap.endpoints(svc, p)] == ["web-2"]


def test_identities(snap):
    assert snap.identity_of(snap.workload("ops", "web-x")).principal == "example.org/ns/ops/sa/tools"
    web, _ = snap.service_at("10.96.0.10", 80)
    assert snap.service_identities(web) == frozenset({SpiffeId("example.org", "shop", "web")})


def test_local_workloads_per_node(snap):
    assert refs(snap.local_workloads) == ["shop/frontend-1", "shop/web-1"]
    other = Snapshot.build(resources(), version=7, node="node-2")
    assert refs(other.local_workloads) == ["ops/web-x", "shop/echo-1", "shop/web-2"]


@pytest.mark.parametrize("workload, expected", [
    ("shop/web-1", ["nodemesh-system/mesh-deny-plaintext", "shop/shop-audit", "shop/web-from-frontend"]),
    ("shop/web-2", ["nodemesh-system/mesh-deny-plaintext", "shop/shop-audit", "shop/v2-only",
                    "shop/web-from-frontend"]),
    ("shop/echo-1", ["nodemesh-system/echo-everywhere", "nodemesh-system/mesh-deny-plaintext",
                     "shop/shop-audit"]),
    ("shop/frontend-1", ["nodemesh-system/mesh-deny-plaintext", "shop/shop-audit"]),
    ("ops/web-x", ["nodemesh-system/mesh-deny-plaintext", "ops/ops-wide"]),
])
def test_policies_for(snap, workload, expected):
    ns, name = workload.split("/")
    assert refs(snap.policies_for(snap.workload(ns, name))) == expected


def test_policy_set_splits_by_action(snap):
    ps = snap.policy_set(snap.workload("shop", "web-2"))
    assert [p.ref for p in ps.deny] == ["nodemesh-system/mesh-deny-plaintext", "shop/v2-only"]
    assert [p.ref for p in ps.allow] == ["shop/web-from-frontend"]
    assert [p.ref for p in ps.audit] == ["shop/shop-audit"]


def test_build_does_not_depend_on_input_order():
    a = Snapshot.build(resources(), version=1, node="node-1")
    b = Snapshot.build(list(reversed(resources())), version=1, node="node-1")
    assert a.workloads == b.workloads and a.policies == b.policies
    web, http = a.service_at("10.96.0.10", 80)
    assert a.endpoints(web, http) == b.endpoints(*b.service_at("10.96.0.10", 80))
    w = a.workload("shop", "web-2")
    assert a.policies_for(w) == b.policies_for(w)


def test_default_mesh_when_none_applied():
    without = [r for r in resources() if r.kind != "Mesh"]
    snap = Snapshot.build(without, version=3, node="node-1")
    assert snap.mesh.metadata.name == "default"
    assert snap.mesh.spec.default_action == "ALLOW"
    assert snap.identity_of(snap.workload("shop", "web-1")).trust_domain == "cluster.local"
    assert Snapshot.empty(node="x").workload_at("10.10.1.2") is None


def test_unknown_workload_has_no_policies(snap):
    ghost = resources("""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: ghost, namespace: shop, labels: {app: web}}
spec: {node: node-1, netns: /run/netns/p, addresses: [10.10.9.9]}
""")[0]
    assert snap.policies_for(ghost) == () and snap.policy_set(ghost) is None
    assert snap.identity_of(ghost).principal == "example.org/ns/shop/sa/default"


# --- contradictions ------------------------------------------------------------------------------

def extra(doc: str):
    return resources() + resources(doc)


@pytest.mark.parametrize("doc, message, objects", [
    ("""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-9, namespace: other}
spec: {node: node-1, netns: /run/netns/p, addresses: [10.10.1.2]}
""", "address 10.10.1.2 is claimed by both Workload other/web-9 and Workload shop/web-1",
     ("Workload other/web-9", "Workload shop/web-1")),
    ("""
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web-copy, namespace: shop}
spec: {addresses: ["10.96.0.20"], selector: {app: web}, ports: [{port: 9000}]}
""", "10.96.0.20:9000 is claimed by both Service shop/echo and Service shop/web-copy",
     ("Service shop/echo", "Service shop/web-copy")),
    ("""
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web-vip, namespace: shop}
spec: {addresses: [10.10.2.3], selector: {app: web}, ports: [{port: 80}]}
""", "address 10.10.2.3 is both a vip of Service shop/web-vip and an address of Workload shop/echo-1",
     ("Service shop/web-vip", "Workload shop/echo-1")),
])
def test_contradictions_name_the_objects(doc, message, objects):
    with pytest.raises(SnapshotError) as e:
        Snapshot.build(extra(doc), version=1, node="node-1")
    assert str(e.value) == message and e.value.objects == objects


def test_two_meshes():
    with pytest.raises(SnapshotError) as e:   # the controller only stores "default"; an agent still checks
        Snapshot.build(resources() + [Mesh(metadata=ObjectMeta(name="other"))], version=1, node="n")
    assert str(e.value) == "two Meshes: Mesh default and Mesh other; there must be one"
    assert e.value.objects == ("Mesh default", "Mesh other")


def test_one_service_listing_a_port_twice():
    svc = Service(metadata=ObjectMeta(name="dup", namespace="shop"),
                  spec=ServiceSpec(addresses=("10.96.0.99",), selector={"app": "web"},
                                   ports=(ServicePort(port=80), ServicePort(port=80, target_port=81))))
    with pytest.raises(SnapshotError, match="^Service shop/dup lists port 80 twice$"):
        Snapshot.build(resources() + [svc], version=1, node="n")


def test_same_vip_on_other_port_is_fine():
    doc = """
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: echo-tls, namespace: shop}
spec: {addresses: [10.96.0.20], selector: {app: echo}, ports: [{port: 9443}]}
"""
    snap = Snapshot.build(extra(doc), version=1, node="node-1")
    assert snap.service_at("10.96.0.20", 9443)[0].metadata.name == "echo-tls"
    assert snap.service_at("10.96.0.20", 9000)[0].metadata.name == "echo"


def test_same_object_twice():
    web1 = [r for r in resources() if r.metadata.name == "web-1"]
    with pytest.raises(SnapshotError, match="Workload shop/web-1 appears twice"):
        Snapshot.build(resources() + web1, version=1, node="node-1")


def policy_from(name: str, namespace: str, source: Source) -> AuthorizationPolicy:
    """Built directly: the manifest parser would refuse what these tests need."""
    return AuthorizationPolicy(metadata=ObjectMeta(name=name, namespace=namespace),
                               spec=AuthorizationPolicySpec(rules=(Rule(from_=(source,)),)))


def test_policy_that_does_not_compile():
    bad = policy_from("bad", "shop", Source(ip_blocks=("10.0.0.0/33",)))
    with pytest.raises(SnapshotError) as e:
        Snapshot.build(resources() + [bad], version=1, node="node-1")
    assert e.value.objects == ("AuthorizationPolicy shop/bad",)
    assert "does not compile" in str(e.value)
    worse = policy_from("worse", ROOT_NAMESPACE, Source(principals=("spiffe://a/ns/b/sa/c",)))
    with pytest.raises(SnapshotError, match="nodemesh-system/worse"):
        Snapshot.build([worse], version=1, node="node-1")


def test_unsupported_resource():
    with pytest.raises(SnapshotError, match="unsupported resource str"):
        Snapshot.build(["Workload"], version=1, node="n")  # type: ignore[list-item]


# --- holder --------------------------------------------------------------------------------------

async def test_holder_wakes_waiters_only_for_newer_versions():
    holder = StateHolder(Snapshot.empty(node="n", version=1))
    seen: list[int] = []

    async def waiter():
        snap = await holder.wait_newer(2)
        seen.append(snap.version)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        holder.publish(Snapshot.empty(node="n", version=2))   # not newer than 2: keeps waiting
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        holder.publish(Snapshot.empty(node="n", version=3))
    assert seen == [3]
    assert holder.current.version == 3
    assert (await holder.wait_newer(1)).version == 3            # already newer: no wait


def test_endpoint_is_a_plain_value():
    ep = Endpoint(workload=resources()[1], address="10.10.1.2", port=8080, node="node-1",
                  locality=Locality(), identity=SpiffeId("a", "b", "c"))
    assert ep.key == ("10.10.1.2", 8080)
