"""Decoding manifests: YAML multi-document, JSON forms, Lists, syntax errors and numbering."""
from __future__ import annotations

import json

import pytest

from controller import api

MESH = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "default"}}
SVC = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
       "spec": {"addresses": ["10.96.0.10"], "selector": {"app": "web"}, "ports": [{"port": 80}]}}
MESH_YAML = "apiVersion: nodemesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n"


def problems(text: str, source: str = "m.yaml") -> list[str]:
    with pytest.raises(api.ManifestError) as info:
        api.parse_manifests(text, source=source)
    return [str(p) for p in info.value.problems]


def test_empty_documents_and_comments_are_skipped_but_counted():
    text = "# a header comment\n---\n" + MESH_YAML + "---\n---\n# nothing here\n---\n" + MESH_YAML.replace(
        "default}", "other}")
    assert problems(text) == [
        "m.yaml: document 4: Mesh other: metadata.name: must be 'default' (a mesh has one Mesh), got 'other'"]
    assert api.parse_manifests("") == []
    assert api.parse_manifests("---\n# only comments\n...\n") == []
    assert len(api.parse_manifests(MESH_YAML + "---\n")) == 1


def test_duplicate_yaml_key_is_rejected_with_key_and_line():
    text = MESH_YAML + "---\n" + MESH_YAML + "spec:\n  mtls: STRICT\n  mtls: PERMISSIVE\n"
    assert problems(text) == [
        "m.yaml: document 2: document: line 10, column 3: invalid YAML: duplicate key 'mtls' "
        "(first defined at line 9)"]


def test_yaml_merge_keys_are_not_duplicates():
    text = MESH_YAML + "spec:\n  <<: {mtls: STRICT, defaultAction: DENY}\n  mtls: PERMISSIVE\n"
    (mesh,) = api.parse_manifests(text)
    assert (mesh.spec.mtls, mesh.spec.default_action) == ("PERMISSIVE", "DENY")


def test_yaml_syntax_error_names_source_and_line_and_later_documents_are_still_checked():
    text = MESH_YAML + "---\nkind: [Service\nmetadata: {}\n---\n" + MESH_YAML + "spec: {mtls: NONE}\n"
    assert problems(text, source="x.yaml") == [
        "x.yaml: document 2: document: line 6, column 9: invalid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence at line 5)",
        "x.yaml: document 3: Mesh default: spec.mtls: must be one of STRICT, PERMISSIVE, got 'NONE'",
    ]


def test_yaml_list_form_reports_item_paths():
    text = ("apiVersion: v1\nkind: List\nitems:\n"
            f"- {json.dumps(MESH)}\n"
            f"- {json.dumps({**SVC, 'spec': {**SVC['spec'], 'ports': [{'port': 'http'}]}})}\n")
    assert problems(text) == [
        "m.yaml: document 1: Service shop/web: items[1].spec.ports[0].port: must be an integer 1-65535, "
        "got str 'http'"]


@pytest.mark.parametrize("text", [
    json.dumps([MESH, SVC], indent=2),
    json.dumps({"apiVersion": "v1", "kind": "List", "items": [MESH, SVC]}, indent="\t"),
    json.dumps(MESH) + "\n" + json.dumps(SVC),
    "  {apiVersion: nodemesh.io/v1alpha1, kind: Mesh, metadata: {name: default}}\n---\n" + json.dumps(SVC),
], ids=["array", "List-tabs", "concatenated", "flow-yaml"])
def test_json_forms(text):
    resources = api.parse_manifests(text)
    assert [r.key for r in resources] == [("Mesh", "", "default"), ("Service", "shop", "web")]
    assert [api.to_dict(r) for r in resources] == [
        {**MESH, "spec": {"trustDomain": "cluster.local", "mtls": "STRICT", "defaultAction": "ALLOW",
                          "certificateTTL": "24h"}},
        {**SVC, "spec": {**SVC["spec"], "ports": [{"port": 80, "targetPort": 80, "protocol": "tcp"}],
                         "loadBalancer": {"algorithm": "ewma", "localityFailover": True}}},
    ]


def test_json_array_item_errors_name_the_item():
    bad = {**SVC, "metadta": {}}
    assert problems(json.dumps([MESH, bad]), source="a.json") == [
        "a.json: document 1: Service shop/web: [1].metadta: unknown field 'metadta'; did you mean 'metadata'?"]


def test_json_syntax_error_names_line_and_column():
    assert problems('{\n  "apiVersion": "nodemesh.io/v1alpha1",\n  "kind": "Mesh"\n  "metadata": {}\n}',
                    source="b.json") == [
        "b.json: document 1: document: line 4, column 3: invalid JSON: Expecting ',' delimiter"]


def test_json_duplicate_key_is_rejected():
    assert problems('{"kind": "Mesh", "kind": "Service"}', source="c.json") == [
        "c.json: document 1: document: line 1: invalid JSON: duplicate key 'kind' in the document starting here"]


def test_default_namespace_applies_to_namespaced_kinds_only():
    svc = {**SVC, "metadata": {"name": "web"}}
    mesh, s = api.parse_manifests(json.dumps([MESH, svc]), default_namespace="team-b")
    assert (mesh.key, s.key) == (("Mesh", "", "default"), ("Service", "team-b", "web"))


def test_round_trip_keeps_unusual_strings():
    doc = {**SVC, "metadata": {"name": "web", "namespace": "shop",
                               "labels": {"version": "1.10", "on": "yes", "null": ""},
                               "annotations": {"note": "*: true\n---\nline", "n": "0123"}}}
    (svc,) = api.parse_manifests(json.dumps(doc))
    assert svc.metadata.labels == {"version": "1.10", "on": "yes", "null": ""}
    assert api.parse_manifests(api.dump_yaml([svc])) == [svc]
    assert api.parse_manifests(api.dump_json([svc])) == [svc]
