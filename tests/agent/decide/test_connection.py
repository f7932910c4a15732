"""decide/connection.py: the one outbound sequence (plan, pick, authorize) and its per-snapshot memo."""
from __future__ import annotations

import random

import pytest

from agent.decide.authorize import Allow, Deny
from agent.decide.balancer import Stats
from agent.decide.connection import OutboundDecider
from agent.decide.plan import NoRoute, Passthrough, Upstream
from agent.state.snapshot import Snapshot
from controller.api import parse_manifests

BASE = """
apiVersion: nodemesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: cluster.local, mtls: STRICT, defaultAction: ALLOW}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: client-1, namespace: shop, labels: {app: client}}
spec: {node: node-1, netns: /run/netns/c, serviceAccount: client, addresses: [10.10.1.9]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: node-1, netns: /run/netns/w1, serviceAccount: web, addresses: [10.10.1.2], ports: [8080]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {node: node-2, netns: /run/netns/w2, serviceAccount: web, addresses: [10.10.2.2], ports: [8080]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  addresses: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  addresses: [10.96.0.30]
  selector: {app: nobody}
  ports: [{name: tcp, port: 9000}]
"""

DENY_CLIENT = """
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: shop}
spec:
  selector: {app: web}
  action: DENY
  rules: [{from: [{principals: [cluster.local/ns/shop/sa/client]}]}]
"""


def snapshot(text: str, version: int = 1) -> Snapshot:
    return Snapshot.build(parse_manifests(text), version=version, node="node-1")


def decider(passthrough: bool = True) -> OutboundDecider:
    return OutboundDecider(passthrough=passthrough, stats=Stats(), rng=random.Random(7))


def test_a_service_vip_plans_its_endpoints_as_the_source_workload():
    snap, d = snapshot(BASE), decider()
    planned = d.plan(snap, snap.workload("shop", "client-1"), "10.96.0.10", 80)
    assert isinstance(planned.plan, Upstream) and planned.plan.name == "shop/web"
    assert planned.source_identity.uri == "spiffe://cluster.local/ns/shop/sa/client"
    assert {ep.workload.metadata.name for ep in planned.plan.endpoints} == {"web-1", "web-2"}


def test_outside_the_mesh_passes_through_unless_passthrough_is_off():
    snap = snapshot(BASE)
    client = snap.workload("shop", "client-1")
    assert isinstance(decider().plan(snap, client, "192.0.2.1", 443).plan, Passthrough)
    with pytest.raises(NoRoute, match="outside the mesh"):
        decider(passthrough=False).plan(snap, client, "192.0.2.1", 443)
    with pytest.raises(NoRoute) as e:
        decider().plan(snap, client, "10.96.0.30", 9000)
    assert e.value.flags == "UH"


def test_pick_skips_what_was_tried_and_says_UF_when_nothing_is_left():
    snap, d = snapshot(BASE), decider()
    planned = d.plan(snap, snap.workload("shop", "client-1"), "10.96.0.10", 80)
    first = d.pick(planned, now=0.0)
    second = d.pick(planned, now=0.0, exclude=frozenset({first.key}))
    assert second.key != first.key
    with pytest.raises(NoRoute) as e:
        d.pick(planned, now=0.0, exclude=frozenset({first.key, second.key}))
    assert e.value.flags == "UF"


def test_authorization_is_the_destinations_policy_and_never_outlives_its_snapshot():
    d = decider()
    allowing = snapshot(BASE, 1)
    client = allowing.workload("shop", "client-1")
    planned = d.plan(allowing, client, "10.96.0.10", 80)
    web1 = next(ep for ep in planned.plan.endpoints if ep.workload.metadata.name == "web-1")
    assert isinstance(d.authorization(allowing, planned, web1), Allow)
    assert d.plan(allowing, client, "10.96.0.10", 80) is planned        # memoised for the snapshot

    denying = allowing.update({r.key: r for r in parse_manifests(DENY_CLIENT)}, version=2)
    planned2 = d.plan(denying, denying.workload("shop", "client-1"), "10.96.0.10", 80)
    web1 = next(ep for ep in planned2.plan.endpoints if ep.workload.metadata.name == "web-1")
    decision = d.authorization(denying, planned2, web1)
    assert isinstance(decision, Deny) and decision.policy == "shop/no-client" and decision.rule == 0
