"""The DESIGN.md example documents decode into exactly these objects, and survive round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controller import api
from controller.api import (AuthorizationPolicy, AuthorizationPolicySpec, LoadBalancer, Locality,
                            Mesh, MeshSpec, ObjectMeta, Operation, Rule, Service, ServicePort,
                            ServiceSpec, Source, Workload, WorkloadSpec)

EXAMPLE = (Path(__file__).parent / "design_example.yaml").read_text()

EXPECTED = [
    Mesh(ObjectMeta("default"), MeshSpec(trust_domain="cluster.local", mtls="STRICT",
                                         default_action="ALLOW", certificate_ttl="24h")),
    Workload(ObjectMeta("web-1", "shop", labels={"app": "web", "version": "v1"}),
             WorkloadSpec(node="node-1", service_account="web", addresses=("10.10.1.2",),
                          locality=Locality(region="eu-west", zone="eu-west-1a"),
                          netns="/var/run/netns/web-1", ports=(8080,))),
    Service(ObjectMeta("web", "shop"),
            ServiceSpec(addresses=("10.96.0.10",), selector={"app": "web"},
                        ports=(ServicePort(name="http", port=80, target_port=8080, protocol="http"),),
                        load_balancer=LoadBalancer(algorithm="ewma", locality_failover=True))),
    AuthorizationPolicy(
        ObjectMeta("web-from-frontend", "shop"),
        AuthorizationPolicySpec(selector={"app": "web"}, action="ALLOW", rules=(
            Rule(from_=(Source(principals=("cluster.local/ns/shop/sa/frontend",)),
                        Source(namespaces=("ops",)),
                        Source(ip_blocks=("10.10.0.0/16",))),
                 to=(Operation(ports=(8080,), methods=("GET", "HEAD"), paths=("/api/*",)),)),))),
]


def test_design_example_parses_exactly():
    assert api.parse_manifests(EXAMPLE, source="design.yaml") == EXPECTED


def test_keys_and_refs():
    assert [r.key for r in EXPECTED] == [
        ("Mesh", "", "default"), ("Workload", "shop", "web-1"), ("Service", "shop", "web"),
        ("AuthorizationPolicy", "shop", "web-from-frontend")]
    assert [r.ref for r in EXPECTED] == [
        "Mesh default", "Workload shop/web-1", "Service shop/web",
        "AuthorizationPolicy shop/web-from-frontend"]


def test_resources_are_hashable_and_immutable():
    assert len(set(EXPECTED + EXPECTED)) == 4
    with pytest.raises(TypeError):
        EXPECTED[1].metadata.labels["app"] = "other"  # type: ignore[index]
    with pytest.raises(AttributeError):
        EXPECTED[1].spec.node = "node-2"  # type: ignore[misc]


def test_defaults_are_filled_in():
    text = """
apiVersion: nodemesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {name: db-1}
spec: {node: node-2, addresses: ["fd00::2"], cgroup: /sys/fs/cgroup/system.slice/db.service}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: db, namespace: data}
spec: {addresses: [10.96.0.11], selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: nothing}
"""
    mesh, wl, svc, ap = api.parse_manifests(text, default_namespace="team-a")
    assert mesh.spec == MeshSpec()
    assert (mesh.spec.trust_domain, mesh.spec.mtls, mesh.spec.default_action,
            mesh.spec.certificate_ttl) == ("cluster.local", "STRICT", "ALLOW", "24h")
    assert mesh.spec.certificate_ttl_seconds == 86400.0
    assert mesh.metadata.namespace == ""
    assert wl.metadata.namespace == "team-a"
    assert wl.spec == WorkloadSpec(node="node-2", service_account="default", addresses=("fd00::2",),
                                   cgroup="/sys/fs/cgroup/system.slice/db.service", ports=())
    assert svc.spec.ports == (ServicePort(port=5432, target_port=5432, protocol="tcp"),)
    assert svc.spec.load_balancer == LoadBalancer(algorithm="ewma", locality_failover=True)
    assert ap.metadata.namespace == "team-a"
    assert ap.spec == AuthorizationPolicySpec(selector={}, action="ALLOW", rules=())


def test_canonical_dict_form():
    assert [api.to_dict(r) for r in EXPECTED[1:3]] == [
        {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
         "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web", "version": "v1"}},
         "spec": {"node": "node-1", "serviceAccount": "web", "addresses": ["10.10.1.2"],
                  "locality": {"region": "eu-west", "zone": "eu-west-1a"},
                  "netns": "/var/run/netns/web-1", "ports": [8080]}},
        {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"addresses": ["10.96.0.10"], "selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}],
                  "loadBalancer": {"algorithm": "ewma", "localityFailover": True}}},
    ]
    assert list(api.to_dict(EXPECTED[0])) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(api.to_dict(EXPECTED[0])["spec"]) == ["trustDomain", "mtls", "defaultAction", "certificateTTL"]


def test_server_set_metadata_is_kept_and_emitted_only_when_present():
    doc = {"apiVersion": api.API_VERSION, "kind": "Mesh",
           "metadata": {"name": "default", "resourceVersion": "42", "uid": "u-1",
                        "creationTimestamp": "2024-05-01T10:00:00Z", "annotations": {"note": "any text: ok!"}}}
    mesh = api.from_dict(doc)
    assert mesh.metadata == ObjectMeta("default", annotations={"note": "any text: ok!"},
                                       resource_version="42", uid="u-1",
                                       creation_timestamp="2024-05-01T10:00:00Z")
    assert api.to_dict(mesh)["metadata"] == {
        "name": "default", "annotations": {"note": "any text: ok!"}, "uid": "u-1",
        "resourceVersion": "42", "creationTimestamp": "2024-05-01T10:00:00Z"}
    # an unquoted YAML timestamp stays a string (no datetime sneaks in)
    text = api.dump_yaml(mesh).replace("'2024-05-01T10:00:00Z'", "2024-05-01T10:00:00Z")
    assert "creationTimestamp: 2024-05-01T10:00:00Z" in text
    assert api.parse_manifests(text) == [mesh]


@pytest.mark.parametrize("resource", EXPECTED, ids=lambda r: r.kind)
def test_dict_round_trip_is_stable(resource):
    d = api.to_dict(resource)
    assert api.from_dict(d) == resource
    assert api.to_dict(api.from_dict(d)) == d


def test_yaml_round_trip_is_stable():
    text = api.dump_yaml(EXPECTED)
    assert text.count("\n---\n") == 3
    assert api.parse_manifests(text) == EXPECTED
    assert api.dump_yaml(api.parse_manifests(text)) == text
    first = list(yaml.safe_load_all(text))[1]
    assert list(first["spec"]) == ["node", "serviceAccount", "addresses", "locality", "netns", "ports"]


def test_json_round_trip_is_stable():
    text = api.dump_json(EXPECTED)
    obj = json.loads(text)
    assert (obj["apiVersion"], obj["kind"], len(obj["items"])) == ("v1", "List", 4)
    assert obj["items"] == [api.to_dict(r) for r in EXPECTED]
    assert api.parse_manifests(text) == EXPECTED
    assert api.dump_json(api.parse_manifests(text)) == text


def test_dump_json_of_one_resource_is_one_object():
    text = api.dump_json([EXPECTED[2]])
    assert text.startswith('{\n  "apiVersion": "nodemesh.io/v1alpha1",\n  "kind": "Service"')
    assert json.loads(text) == api.to_dict(EXPECTED[2])
    assert api.dump_json(EXPECTED[2]) == text


def test_construction_from_lists_and_dicts_normalises_to_tuples():
    wl = Workload(ObjectMeta("a", "b", labels={"x": "y"}),
                  WorkloadSpec(node="n", addresses=["10.0.0.1"], netns="/run/netns/a", ports=[80]))
    assert wl.spec.addresses == ("10.0.0.1",) and wl.spec.ports == (80,)
    assert wl == api.from_dict(api.to_dict(wl))
    assert ServicePort(port=80).target_port == 80
