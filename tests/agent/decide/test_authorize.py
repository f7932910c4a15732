"""authorize(): the decision order of DESIGN.md and every matcher, table-driven.

Policies go through the real manifest parser, so they have the shape the controller stores.
"""
from __future__ import annotations

import json

import pytest

from agent.state import policies as policy_module   # where the rules are compiled
from agent.decide.authorize import Allow, Deny, Facts, Match, authorize
from agent.state.snapshot import Snapshot
from controller.api import parse_manifests, parse_principal

FRONT = parse_principal("cluster.local/ns/shop/sa/frontend")
OPS = parse_principal("cluster.local/ns/ops/sa/tools")
FOREIGN = parse_principal("other.org/ns/shop/sa/frontend")
PLAIN = None

BASE = [
    {"kind": "Workload", "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
     "spec": {"node": "node-1", "serviceAccount": "web", "addresses": ["10.10.1.2"],
              "netns": "/run/netns/web-1", "ports": [8080]}},
    {"kind": "Workload", "metadata": {"name": "db-1", "namespace": "shop", "labels": {"app": "db"}},
     "spec": {"node": "node-1", "serviceAccount": "db", "addresses": ["10.10.1.5"],
              "netns": "/run/netns/db-1"}},
    {"kind": "Workload", "metadata": {"name": "api-1", "namespace": "apps"},   # sorts before the root ns
     "spec": {"node": "node-2", "serviceAccount": "api", "addresses": ["10.10.2.7"],
              "netns": "/run/netns/api-1"}},
]


def P(name: str, action: str = "ALLOW", rules: list | None = None, *, ns: str = "shop",
      selector: dict | None = None) -> dict:
    spec: dict = {"action": action, "rules": rules if rules is not None else []}
    if selector is not None:
        spec["selector"] = selector
    return {"kind": "AuthorizationPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def snapshot(policies: list[dict], default: str = "ALLOW") -> Snapshot:
    mesh = {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"defaultAction": default}}
    docs = [mesh, *BASE, *policies]
    text = "\n---\n".join(json.dumps({"apiVersion": "nodemesh.io/v1alpha1", **d}) for d in docs)
    return Snapshot.build(parse_manifests(text, source="case"), version=1, node="node-1")


def facts(snap: Snapshot, *, dest: str = "shop/web-1", port: int = 8080, src=FRONT,
          ip: str = "10.10.1.3", method: str | None = None, path: str | None = None) -> Facts:
    return Facts(destination=snap.workload(*dest.split("/")), port=port, source_identity=src,
                 source_ip=ip, method=method, path=path)


def A(policy: str | None = None, rule: int | None = None, audits: tuple = ()) -> tuple:
    """Expect Allow, by that ALLOW rule (None: by the mesh default), with those AUDIT matches."""
    return ("allow", Match(policy, rule) if policy else None, tuple(Match(p, r) for p, r in audits))


def D(policy: str, rule: int | None = None) -> tuple:
    return ("deny", policy, rule)


def shape(decision: Allow | Deny) -> tuple:
    if isinstance(decision, Allow):
        return ("allow", decision.matched, decision.audits)
    return ("deny", decision.policy, decision.rule)


def fp(**source) -> list:
    """One rule with one ``from`` entry."""
    return [{"from": [source]}]


def to(**operation) -> list:
    """One rule with one ``to`` entry."""
    return [{"to": [operation]}]


L7 = {"method": "GET", "path": "/api/x"}

CASES = [
    # id, policies, expected, facts overrides (+ "default" for the mesh's defaultAction)
    ("no policy: mesh ALLOW", [], A(), {}),
    ("no policy: mesh DENY", [], D("mesh/default"), {"default": "DENY"}),
    # principals
    ("principal exact", [P("a", rules=fp(principals=[FRONT.principal]))], A("shop/a", 0), {}),
    ("principal exact, other trust domain", [P("a", rules=fp(principals=[FRONT.principal]))], D(""),
     {"src": FOREIGN}),
    ("principal * matches any identity", [P("a", rules=fp(principals=["*"]))], A("shop/a", 0), {"src": OPS}),
    ("principal * never matches plaintext", [P("a", rules=fp(principals=["*"]))], D(""), {"src": PLAIN}),
    ("principal prefix", [P("a", rules=fp(principals=["cluster.local/ns/shop/*"]))], A("shop/a", 0), {}),
    ("principal prefix miss", [P("a", rules=fp(principals=["cluster.local/ns/shop/*"]))], D(""), {"src": OPS}),
    ("principal suffix", [P("a", rules=fp(principals=["*/sa/frontend"]))], A("shop/a", 0), {"src": FOREIGN}),
    ("principal suffix miss", [P("a", rules=fp(principals=["*/sa/frontend"]))], D(""), {"src": OPS}),
    # namespaces
    ("namespace match", [P("a", rules=fp(namespaces=["ops"]))], A("shop/a", 0), {"src": OPS}),
    ("namespace miss", [P("a", rules=fp(namespaces=["ops"]))], D(""), {"src": FRONT}),
    ("namespace * never matches plaintext", [P("a", rules=fp(namespaces=["*"]))], D(""), {"src": PLAIN}),
    # not-forms hold for a plaintext source
    ("notPrincipals excludes", [P("a", rules=fp(notPrincipals=[FRONT.principal]))], D(""), {}),
    ("notPrincipals other identity", [P("a", rules=fp(notPrincipals=[FRONT.principal]))], A("shop/a", 0),
     {"src": OPS}),
    ("notPrincipals matches plaintext", [P("a", rules=fp(notPrincipals=["*"]))], A("shop/a", 0), {"src": PLAIN}),
    ("notNamespaces excludes", [P("a", rules=fp(notNamespaces=["shop"]))], D(""), {}),
    ("notNamespaces matches plaintext", [P("a", rules=fp(notNamespaces=["shop"]))], A("shop/a", 0),
     {"src": PLAIN}),
    ("DENY notPrincipals * denies plaintext", [P("d", "DENY", fp(notPrincipals=["*"]))], D("shop/d", 0),
     {"src": PLAIN}),
    ("DENY notPrincipals * spares mTLS", [P("d", "DENY", fp(notPrincipals=["*"]))], A(), {}),
    # ipBlocks
    ("ipBlock v4 in", [P("a", rules=fp(ipBlocks=["10.10.0.0/16"]))], A("shop/a", 0), {}),
    ("ipBlock v4 out", [P("a", rules=fp(ipBlocks=["10.10.0.0/16"]))], D(""), {"ip": "10.11.0.1"}),
    ("ipBlock single address", [P("a", rules=fp(ipBlocks=["10.10.1.3"]))], A("shop/a", 0), {}),
    ("ipBlock v6 in", [P("a", rules=fp(ipBlocks=["fd00:10::/32"]))], A("shop/a", 0), {"ip": "fd00:10::7"}),
    ("ipBlock v6 out", [P("a", rules=fp(ipBlocks=["fd00:10::/32"]))], D(""), {"ip": "fd00:11::7"}),
    ("ipBlock v6 never holds a v4 source", [P("a", rules=fp(ipBlocks=["::/0"]))], D(""), {}),
    ("ipBlock v4 holds a v4-mapped v6 source", [P("a", rules=fp(ipBlocks=["10.10.0.0/16"]))], A("shop/a", 0),
     {"ip": "::ffff:10.10.1.3"}),
    ("notIpBlocks excludes", [P("a", rules=fp(notIpBlocks=["10.10.0.0/16"]))], D(""), {}),
    ("notIpBlocks other", [P("a", rules=fp(notIpBlocks=["10.10.0.0/16"]))], A("shop/a", 0), {"ip": "192.0.2.1"}),
    # AND inside an entry, OR across entries, from AND to
    ("fields of one entry are ANDed",
     [P("a", rules=fp(principals=[FRONT.principal], ipBlocks=["10.10.0.0/16"]))], D(""), {"ip": "192.0.2.1"}),
    ("fields of one entry all match",
     [P("a", rules=fp(principals=[FRONT.principal], ipBlocks=["10.10.0.0/16"]))], A("shop/a", 0), {}),
    ("from entries are ORed",
     [P("a", rules=[{"from": [{"principals": [FRONT.principal]}, {"ipBlocks": ["192.0.2.0/24"]}]}])],
     A("shop/a", 0), {"src": OPS, "ip": "192.0.2.1"}),
    ("to entries are ORed", [P("a", rules=[{"to": [{"ports": [1]}, {"ports": [8080]}]}])], A("shop/a", 0), {}),
    ("from and to must both match",
     [P("a", rules=[{"from": [{"principals": [FRONT.principal]}], "to": [{"ports": [9090]}]}])], D(""), {}),
    # ports
    ("port match", [P("a", rules=to(ports=[8080]))], A("shop/a", 0), {}),
    ("port miss", [P("a", rules=to(ports=[8080]))], D(""), {"port": 9090}),
    ("notPorts excludes", [P("a", rules=to(notPorts=[8080]))], D(""), {}),
    ("notPorts other", [P("a", rules=to(notPorts=[8080]))], A("shop/a", 0), {"port": 9090}),
    # methods and paths on L7 facts
    ("method and path prefix", [P("a", rules=to(methods=["GET"], paths=["/api/*"]))], A("shop/a", 0), L7),
    ("method miss", [P("a", rules=to(methods=["GET"], paths=["/api/*"]))], D(""),
     {"method": "POST", "path": "/api/x"}),
    ("path prefix miss", [P("a", rules=to(methods=["GET"], paths=["/api/*"]))], D(""),
     {"method": "GET", "path": "/apix"}),
    ("path suffix", [P("a", rules=to(paths=["*.js"]))], A("shop/a", 0), {"method": "GET", "path": "/s/app.js"}),
    ("path exact", [P("a", rules=to(paths=["/health"]))], A("shop/a", 0), {"method": "GET", "path": "/health"}),
    ("path exact miss", [P("a", rules=to(paths=["/health"]))], D(""), {"method": "GET", "path": "/health/x"}),
    ("path *", [P("a", rules=to(paths=["*"]))], A("shop/a", 0), {"method": "GET", "path": "/anything"}),
    ("notMethods excludes", [P("a", rules=to(notMethods=["DELETE"]))], D(""), {"method": "DELETE", "path": "/"}),
    ("notMethods other", [P("a", rules=to(notMethods=["DELETE"]))], A("shop/a", 0), L7),
    ("notPaths excludes", [P("a", rules=to(notPaths=["/admin/*"]))], D(""), {"method": "GET", "path": "/admin/x"}),
    # L7 conditions on L4 facts: ALLOW never matches, DENY matches on its L4 parts
    ("ALLOW with methods, L4 facts: fail closed", [P("a", rules=to(ports=[8080], methods=["GET"]))], D(""), {}),
    ("ALLOW with notPaths, L4 facts: fail closed", [P("a", rules=to(notPaths=["/admin"]))], D(""), {}),
    ("DENY with methods, L4 facts: L4 part matches", [P("d", "DENY", to(ports=[8080], methods=["POST"]))],
     D("shop/d", 0), {}),
    ("DENY with methods, L4 facts: L4 part misses", [P("d", "DENY", to(ports=[8080], methods=["POST"]))],
     A(), {"port": 9090}),
    ("DENY with methods, L7 facts: method misses", [P("d", "DENY", to(ports=[8080], methods=["POST"]))],
     A(), L7),
    ("DENY with methods, L7 facts: method matches", [P("d", "DENY", to(ports=[8080], methods=["POST"]))],
     D("shop/d", 0), {"method": "POST", "path": "/"}),
    ("DENY with only paths, L4 facts: denies the connection", [P("d", "DENY", to(paths=["/admin"]))],
     D("shop/d", 0), {}),
    # decision order
    ("DENY beats ALLOW", [P("a", rules=[{}]), P("d", "DENY", fp(principals=[FRONT.principal]))],
     D("shop/d", 0), {}),
    ("DENY names the matching rule", [P("d", "DENY", [{"from": [{"namespaces": ["ops"]}]},
                                                      {"from": [{"principals": [FRONT.principal]}]}])],
     D("shop/d", 1), {}),
    ("DENY rules [{}] denies all, plaintext too", [P("d", "DENY", [{}])], D("shop/d", 0), {"src": PLAIN}),
    ("DENY with no rules matches nothing", [P("d", "DENY", [])], A(), {}),
    ("ALLOW with no rules allows nothing", [P("a", "ALLOW", [])], D(""), {}),
    ("ALLOW rules [{}] allows plaintext", [P("a", rules=[{}])], A("shop/a", 0), {"src": PLAIN}),
    ("ALLOW names the matching rule", [P("a", rules=[{"from": [{"namespaces": ["ops"]}]},
                                                     {"from": [{"namespaces": ["shop"]}]}])],
     A("shop/a", 1), {}),
    ("second ALLOW policy matches", [P("a", rules=fp(namespaces=["ops"])), P("b", rules=fp(namespaces=["shop"]))],
     A("shop/b", 0), {}),
    ("ALLOW policies override a DENY default", [P("a", rules=[{}])], A("shop/a", 0), {"default": "DENY"}),
    # AUDIT never decides
    ("AUDIT listed, mesh default allows", [P("au", "AUDIT", [{}])], A(audits=[("shop/au", 0)]), {}),
    ("AUDIT is no ALLOW policy: mesh default denies", [P("au", "AUDIT", [{}])], D("mesh/default"),
     {"default": "DENY"}),
    ("AUDIT lists every matching rule",
     [P("au", "AUDIT", [{}, {"from": [{"namespaces": ["ops"]}]}, {"from": [{"namespaces": ["shop"]}]}])],
     A(audits=[("shop/au", 0), ("shop/au", 2)]), {}),
    ("AUDIT beside a matching ALLOW", [P("a", rules=[{}]), P("au", "AUDIT", [{}])],
     A("shop/a", 0, audits=[("shop/au", 0)]), {}),
    ("AUDIT does not rescue an unmatched ALLOW", [P("a", rules=fp(namespaces=["ops"])), P("au", "AUDIT", [{}])],
     D(""), {}),
    ("AUDIT with methods on L4 facts is not listed", [P("au", "AUDIT", to(methods=["GET"]))], A(), {}),
    # which policies select the workload
    ("selector elsewhere: policy ignored", [P("a", rules=fp(namespaces=["ops"]), selector={"app": "db"})],
     A(), {}),
    ("selector here: policy applies", [P("a", rules=fp(namespaces=["ops"]), selector={"app": "web"})],
     D(""), {}),
    ("policy of another namespace ignored", [P("a", rules=fp(namespaces=["ops"]), ns="ops")], A(), {}),
    ("root namespace DENY applies mesh-wide",
     [P("d", "DENY", fp(principals=[FRONT.principal]), ns="nodemesh-system")], D("nodemesh-system/d", 0), {}),
    ("root namespace policy honours its selector",
     [P("a", rules=fp(namespaces=["ops"]), ns="nodemesh-system", selector={"app": "db"})], A(), {}),
    ("root DENY is named before the namespace's",
     [P("a-first", "DENY", [{}]), P("z", "DENY", [{}], ns="nodemesh-system")], D("nodemesh-system/z", 0), {}),
    ("root DENY is named before one of a namespace sorting first",
     [P("a", "DENY", [{}], ns="apps"), P("z", "DENY", [{}], ns="nodemesh-system")], D("nodemesh-system/z", 0),
     {"dest": "apps/api-1"}),
    ("namespace-wide policy (no selector) applies", [P("a", "DENY", [{}], ns="apps")], D("apps/a", 0),
     {"dest": "apps/api-1"}),
]


@pytest.mark.parametrize("policies, expected, overrides", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision(policies, expected, overrides):
    overrides = dict(overrides)
    snap = snapshot(policies, default=overrides.pop("default", "ALLOW"))
    assert shape(authorize(snap, facts(snap, **overrides))) == expected


# --- reasons and edges ----------------------------------------------------------------------------

def test_reasons_name_policies_and_rules():
    snap = snapshot([P("a", rules=fp(namespaces=["ops"])), P("b", rules=fp(namespaces=["x"]),
                                                             ns="nodemesh-system")])
    assert authorize(snap, facts(snap)) == Deny(
        "", None, "no ALLOW policy matched (considered: nodemesh-system/b, shop/a)")
    snap = snapshot([P("d", "DENY", [{"to": [{"ports": [1]}]}, {}])])
    assert authorize(snap, facts(snap)) == Deny("shop/d", 1, "denied by DENY policy shop/d rule 1")
    snap = snapshot([], default="DENY")
    assert authorize(snap, facts(snap)) == Deny(
        "mesh/default", None, "no ALLOW policy selects Workload shop/web-1; mesh defaultAction DENY")
    snap = snapshot([P("a", rules=[{"to": [{"ports": [1]}]}, {}])])
    assert authorize(snap, facts(snap)) == Allow("allowed by ALLOW policy shop/a rule 1", (),
                                                 Match("shop/a", 1))


def test_destination_not_in_snapshot_is_denied():
    snap = snapshot([])
    empty = Snapshot.build([], version=9, node="node-1")
    decision = authorize(empty, facts(snap))
    assert decision == Deny("", None, "destination Workload shop/web-1 is not in snapshot version 9")


def test_snapshot_view_of_destination_decides():
    """Facts may carry an older Workload object; its labels in the snapshot select policies."""
    snap = snapshot([P("a", rules=fp(namespaces=["ops"]), selector={"app": "db"})])
    stale = parse_manifests(json.dumps({"apiVersion": "nodemesh.io/v1alpha1", **BASE[0]})
                            .replace('"app": "web"', '"app": "db"'), source="x")[0]
    f = Facts(destination=stale, port=8080, source_identity=FRONT, source_ip="10.10.1.3")
    assert shape(authorize(snap, f)) == A()


def test_facts_validate():
    snap = snapshot([])
    with pytest.raises(ValueError, match="both method and path"):
        facts(snap, method="GET")
    with pytest.raises(ValueError):
        facts(snap, ip="10.10.1")
    assert facts(snap, ip="::ffff:10.0.0.1").ip.version == 4


def test_matching_parses_nothing_per_call(monkeypatch):
    snap = snapshot([P("a", rules=fp(principals=[FRONT.principal], ipBlocks=["10.10.0.0/16"])),
                     P("d", "DENY", fp(notIpBlocks=["10.0.0.0/8"], principals=["*/sa/evil"]))])

    def boom(*args, **kwargs):
        raise AssertionError("parsed during a decision")

    monkeypatch.setattr(policy_module, "parse_principal", boom)
    monkeypatch.setattr(policy_module.ipaddress, "ip_network", boom)
    assert shape(authorize(snap, facts(snap))) == A("shop/a", 0)
