"""Kind names, SPIFFE IDs and durations."""
from __future__ import annotations

import pytest

from controller import api
from controller.api import SpiffeId


@pytest.mark.parametrize("name, kind", [
    ("mesh", "Mesh"), ("Meshes", "Mesh"), ("MESH", "Mesh"),
    ("workload", "Workload"), ("workloads", "Workload"), ("wl", "Workload"), ("WL", "Workload"),
    ("service", "Service"), ("services", "Service"), ("svc", "Service"), ("Service", "Service"),
    ("authorizationpolicy", "AuthorizationPolicy"), ("authorizationpolicies", "AuthorizationPolicy"),
    ("ap", "AuthorizationPolicy"), ("AuthorizationPolicy", "AuthorizationPolicy"),
])
def test_resolve_kind(name, kind):
    info = api.resolve_kind(name)
    assert info is api.KINDS[kind]
    assert info.cls.kind == kind


def test_kind_registry():
    assert list(api.KINDS) == ["Mesh", "Workload", "Service", "AuthorizationPolicy"]
    assert api.KINDS["Mesh"] == api.KindInfo("Mesh", "meshes", "mesh", (), False, api.Mesh)
    assert api.KINDS["Service"] == api.KindInfo("Service", "services", "service", ("svc",), True, api.Service)
    assert [i.namespaced for i in api.KINDS.values()] == [False, True, True, True]


@pytest.mark.parametrize("name", ["pods", "svcs", "", "policy"])
def test_unknown_kind_lists_valid_kinds(name):
    with pytest.raises(api.UnknownKind) as info:
        api.resolve_kind(name)
    assert str(info.value) == (
        f"unknown kind {name!r}: expected one of Mesh (meshes), Workload (workloads, wl), "
        "Service (services, svc), AuthorizationPolicy (authorizationpolicies, ap)")
    assert isinstance(info.value, api.ApiError)


def test_spiffe_id_forms():
    sid = api.parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/web")
    assert sid == SpiffeId("cluster.local", "shop", "web")
    assert sid.uri == "spiffe://cluster.local/ns/shop/sa/web"
    assert sid.principal == "cluster.local/ns/shop/sa/web"
    assert api.parse_principal(sid.principal) == sid
    assert api.parse_spiffe_id("spiffe://prod_1.example-x/ns/A.b_c-9/sa/Svc.Acct") == SpiffeId(
        "prod_1.example-x", "A.b_c-9", "Svc.Acct")


@pytest.mark.parametrize("uri, reason", [
    ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://' (lowercase scheme)"),
    ("https://cluster.local/ns/a/sa/b", "must start with 'spiffe://' (lowercase scheme)"),
    ("cluster.local/ns/a/sa/b", "must start with 'spiffe://' (lowercase scheme)"),
    ("spiffe://Cluster.local/ns/a/sa/b",
     "trust domain may only contain a-z, 0-9, '.', '-' and '_' (trust domains are lowercase), got 'Cluster.local'"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "trust domain must not contain a port (':'), got 'cluster.local:8443'"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "trust domain must not contain userinfo ('@'), got 'user@cluster.local'"),
    ("spiffe:///ns/a/sa/b", "trust domain must not be empty"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "must not contain a query ('?')"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "must not contain a fragment ('#')"),
    ("spiffe://cluster.local", "must have the path /ns/<namespace>/sa/<serviceAccount>"),
    ("spiffe://cluster.local/", "path segment must not be empty"),
    ("spiffe://cluster.local/ns//sa/b", "path segment must not be empty"),
    ("spiffe://cluster.local/ns/a/sa/b/", "path segment must not be empty"),
    ("spiffe://cluster.local/ns/./sa/b", "path segment must not be '.' or '..'"),
    ("spiffe://cluster.local/ns/../sa/b", "path segment must not be '.' or '..'"),
    ("spiffe://cluster.local/ns/a%20b/sa/b", "path segment may only contain letters, digits, '.', '-' and '_', "
                                             "got 'a%20b'"),
    ("spiffe://cluster.local/ns/a/sa/b/extra",
     "path must be /ns/<namespace>/sa/<serviceAccount>, got /ns/a/sa/b/extra"),
    ("spiffe://cluster.local/sa/b/ns/a", "path must be /ns/<namespace>/sa/<serviceAccount>, got /sa/b/ns/a"),
    ("spiffe://cluster.local/workload", "path must be /ns/<namespace>/sa/<serviceAccount>, got /workload"),
])
def test_spiffe_id_rejects(uri, reason):
    with pytest.raises(api.InvalidSpiffeId) as info:
        api.parse_spiffe_id(uri)
    assert info.value.reason == reason
    assert str(info.value) == f"invalid SPIFFE ID {uri!r}: {reason}"


def test_spiffe_id_constructor_validates():
    with pytest.raises(api.InvalidSpiffeId):
        SpiffeId("cluster.local", "..", "web")
    with pytest.raises(api.InvalidSpiffeId, match="write principals without the 'spiffe://' scheme"):
        api.parse_principal("spiffe://cluster.local/ns/a/sa/b")


def test_workload_spiffe_id():
    (wl,) = api.parse_manifests(
        "apiVersion: nodemesh.io/v1alpha1\nkind: Workload\nmetadata: {name: web-1, namespace: shop}\n"
        "spec: {node: n1, serviceAccount: web, addresses: [10.0.0.1], netns: /run/netns/web-1}\n")
    assert api.workload_spiffe_id("example.org", wl).uri == "spiffe://example.org/ns/shop/sa/web"
    with pytest.raises(api.InvalidSpiffeId):
        api.workload_spiffe_id("Example.org", wl)


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("30m", 1800.0), ("24h", 86400.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
    ("500ms", 0.5), ("0", 0.0), ("2h45m30.5s", 9930.5), ("100us", 1e-4), ("100µs", 1e-4), ("3ns", 3e-9),
    (".5m", 30.0), ("-1m", -60.0), ("+10s", 10.0),
])
def test_parse_duration(text, seconds):
    assert api.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value, reason", [
    ("", "is empty; expected a duration like '90s', '30m', '1h30m', '1.5h' or '500ms'"),
    ("10", "missing unit after '10'; expected one of ns, us, ms, s, m, h"),
    ("1d", "unknown unit 'd'; expected one of ns, us, ms, s, m, h"),
    ("1h 30m", "unexpected ' 30m'; expected a number and a unit, like '90s', '30m', '1h30m', '1.5h' or '500ms'"),
    ("h", "unexpected 'h'; expected a number and a unit, like '90s', '30m', '1h30m', '1.5h' or '500ms'"),
    ("1H", "unknown unit 'H'; expected one of ns, us, ms, s, m, h"),
    (30, "must be a string like '90s', '30m', '1h30m', '1.5h' or '500ms', got int"),
])
def test_parse_duration_rejects(value, reason):
    with pytest.raises(api.InvalidDuration) as info:
        api.parse_duration(value)
    assert info.value.reason == reason
    assert str(info.value) == f"invalid duration {value!r}: {reason}"
