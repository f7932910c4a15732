"""Each validation rule reports the exact problem: file, document, object, field path, message."""
from __future__ import annotations

import pytest

from controller import api

HEAD = "apiVersion: nodemesh.io/v1alpha1\n"


def problems(text: str, source: str = "t.yaml") -> list[str]:
    with pytest.raises(api.ManifestError) as info:
        api.parse_manifests(text, source=source)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def service(spec: str, meta: str = "{name: web, namespace: shop}") -> str:
    return f"{HEAD}kind: Service\nmetadata: {meta}\nspec: {spec}\n"


def workload(spec: str, meta: str = "{name: web-1, namespace: shop}") -> str:
    return f"{HEAD}kind: Workload\nmetadata: {meta}\nspec: {spec}\n"


def policy(spec: str) -> str:
    return f"{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"


def mesh(spec: str, meta: str = "{name: default}") -> str:
    return f"{HEAD}kind: Mesh\nmetadata: {meta}\nspec: {spec}\n"


SVC_OK = "addresses: [10.96.0.10], selector: {app: web}"
WL_OK = "node: node-1, addresses: [10.10.1.2], netns: /var/run/netns/web-1"
WL = "{" + WL_OK + "}"


def test_protocol_example_from_the_brief():
    text = mesh("{}") + "---\n" + service("{" + SVC_OK + ", ports: [{port: 80, protocol: htp}]}")
    assert problems(text, source="web.yaml") == [
        "web.yaml: document 2: Service shop/web: spec.ports[0].protocol: "
        "must be one of tcp, http, http2, got 'htp'"]


def test_problem_fields():
    with pytest.raises(api.ManifestError) as info:
        api.parse_manifests(service("{" + SVC_OK + ", ports: [{port: 0}]}"), source="s.yaml")
    assert info.value.problems == [api.Problem("s.yaml", 1, "Service shop/web", "spec.ports[0].port",
                                               "must be between 1 and 65535, got 0")]
    assert isinstance(info.value, api.ApiError)


def test_from_dict_reports_every_problem_of_the_document():
    doc = {"apiVersion": "nodemesh.io/v1", "kind": "Service", "metadata": {"name": "Web"},
           "spec": {"addresses": [], "selector": {"app": True}, "ports": [{"port": 80, "targetPort": "http"}]}}
    with pytest.raises(api.ManifestError) as info:
        api.from_dict(doc, source="req", index=3, default_namespace="shop")
    assert [str(p) for p in info.value.problems] == [
        "req: document 3: Service shop/Web: apiVersion: must be 'nodemesh.io/v1alpha1', got 'nodemesh.io/v1'",
        "req: document 3: Service shop/Web: metadata.name: must be a DNS-1123 subdomain (lowercase letters, "
        "digits, '-' and '.', starting and ending with a letter or digit), got 'Web'",
        "req: document 3: Service shop/Web: spec.addresses: must not be empty",
        'req: document 3: Service shop/Web: spec.selector["app"]: must be a string, got bool true '
        "(quote it to make it a string)",
        "req: document 3: Service shop/Web: spec.ports[0].targetPort: must be an integer 1-65535, got str 'http'",
    ]


@pytest.mark.parametrize("text, expected", [
    # document shape
    ("- a\n", "document: [0]: must be a mapping with apiVersion, kind, metadata and spec, got str 'a'"),
    ("just text\n", "document: <root>: must be a mapping with apiVersion, kind, metadata and spec, "
                    "got str 'just text'"),
    ("kind: Mesh\nmetadata: {name: default}\n", "Mesh default: apiVersion: required field is missing"),
    (HEAD + "kind: Gateway\nmetadata: {name: g}\n",
     "document: kind: must be one of Mesh, Workload, Service, AuthorizationPolicy, got 'Gateway'"),
    (HEAD + "kind: service\nmetadata: {name: g}\n",
     "document: kind: must be one of Mesh, Workload, Service, AuthorizationPolicy, got 'service'; "
     "did you mean 'Service'?"),
    (HEAD + "kind: Mesh\n", "document: metadata: required field is missing"),
    (mesh("{}") + "status: {}\n", "Mesh default: status: unknown field 'status'; "
                                  "expected one of apiVersion, kind, metadata, spec"),
    (mesh("{}", "{name: default, Labels: {a: b}}"),
     "Mesh default: metadata.Labels: unknown field 'Labels'; did you mean 'labels'?"),
    (mesh("{}", "{name: default, generation: 2}"),
     "Mesh default: metadata.generation: unknown field 'generation'; expected one of name, namespace, "
     "labels, annotations, uid, resourceVersion, creationTimestamp"),
    # metadata
    (workload(WL, "{namespace: shop}"), "document: metadata.name: required field is missing"),
    (workload(WL, "{name: web-1, namespace: shop.eu}"),
     "Workload shop.eu/web-1: metadata.namespace: must be a DNS-1123 label (lowercase letters, digits and "
     "'-', starting and ending with a letter or digit), got 'shop.eu'"),
    (workload(WL, "{name: " + "a" * 254 + "}"),
     f"Workload default/{'a' * 254}: metadata.name: must be at most 253 characters, got 254"),
    (workload(WL, "{name: w, labels: {app: 'a b'}}"),
     "Workload default/w: metadata.labels[\"app\"]: value may only contain letters, digits, '-', '_' and '.', "
     "starting and ending with a letter or digit, got 'a b'"),
    (workload(WL, "{name: w, labels: {Example.com/app: x}}"),
     "Workload default/w: metadata.labels[\"Example.com/app\"]: invalid key: key prefix must be a DNS-1123 "
     "subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit), "
     "got 'Example.com'"),
    (workload(WL, "{name: w, annotations: {note: yes}}"),
     "Workload default/w: metadata.annotations[\"note\"]: must be a string, got bool true "
     "(quote it to make it a string)"),
    (workload(WL, "{name: w, labels: [app]}"),
     "Workload default/w: metadata.labels: must be a mapping of strings to strings, got list"),
    (workload(WL, "{name: w, resourceVersion: 7}"),
     "Workload default/w: metadata.resourceVersion: must be a string, got int 7 (quote it to make it a string)"),
    # Mesh
    (mesh("{}", "{name: prod}"), "Mesh prod: metadata.name: must be 'default' (a mesh has one Mesh), got 'prod'"),
    (mesh("{}", "{name: default, namespace: shop}"),
     "Mesh default: metadata.namespace: must be omitted: Mesh is cluster-scoped, got 'shop'"),
    (mesh("{trustDomain: Example.COM}"),
     "Mesh default: spec.trustDomain: trust domain may only contain a-z, 0-9, '.', '-' and '_' "
     "(trust domains are lowercase), got 'Example.COM'"),
    (mesh("{mtls: strict}"),
     "Mesh default: spec.mtls: must be one of STRICT, PERMISSIVE, got 'strict'; did you mean 'STRICT'?"),
    (mesh("{defaultAction: REJECT}"), "Mesh default: spec.defaultAction: must be one of ALLOW, DENY, got 'REJECT'"),
    (mesh("{certificateTTL: 5m}"), "Mesh default: spec.certificateTTL: must be between 10m and 8760h, got '5m'"),
    (mesh("{certificateTTL: 8761h}"),
     "Mesh default: spec.certificateTTL: must be between 10m and 8760h, got '8761h'"),
    (mesh("{certificateTTL: 1d}"), "Mesh default: spec.certificateTTL: must be a duration like '24h' or '90m': "
                                   "unknown unit 'd'; expected one of ns, us, ms, s, m, h"),
    (mesh("{certificateTTL: 3600}"),
     "Mesh default: spec.certificateTTL: must be a string, got int 3600 (quote it to make it a string)"),
    (mesh("[]"), "Mesh default: spec: must be a mapping, got list"),
    # Workload
    (workload("{addresses: [10.0.0.1], netns: /run/netns/a}"),
     "Workload shop/web-1: spec.node: required field is missing"),
    (workload("{node: node-1, netns: /run/netns/a}"),
     "Workload shop/web-1: spec.addresses: required field is missing"),
    (workload("{node: node-1, addresses: [10.0.0.1]}"),
     "Workload shop/web-1: spec: must set netns (a pod) or cgroup (a host process), or both; got neither"),
    (workload("{node: node-1, addresses: [10.0.0.1], netns: run/netns/a}"),
     "Workload shop/web-1: spec.netns: must be an absolute path, got 'run/netns/a'"),
    (workload("{node: node-1, addresses: [10.0.0.1], cgroup: /sys/fs/cgroupx/a}"),
     "Workload shop/web-1: spec.cgroup: must be a path under /sys/fs/cgroup, got '/sys/fs/cgroupx/a'"),
    (workload("{node: node-1, addresses: [10.0.0.1], cgroup: /sys/fs/cgroup/../../etc}"),
     "Workload shop/web-1: spec.cgroup: must be an absolute path without '..' or NUL, "
     "got '/sys/fs/cgroup/../../etc'"),
    (workload("{" + WL_OK.replace("[10.10.1.2]", "['fd00::1', 'FD00:0::1']") + "}"),
     "Workload shop/web-1: spec.addresses[1]: duplicate 'fd00::1', already at spec.addresses[0]"),
    (workload("{" + WL_OK.replace("[10.10.1.2]", "[10.10.1.256]") + "}"),
     "Workload shop/web-1: spec.addresses[0]: must be an IPv4 or IPv6 address, got '10.10.1.256'"),
    (workload("{" + WL_OK + ", ports: [8080, 8080]}"),
     "Workload shop/web-1: spec.ports[1]: duplicate 8080, already at spec.ports[0]"),
    (workload("{" + WL_OK + ", ports: [65536]}"),
     "Workload shop/web-1: spec.ports[0]: must be between 1 and 65535, got 65536"),
    (workload("{" + WL_OK + ", ports: [80.0]}"),
     "Workload shop/web-1: spec.ports[0]: must be an integer 1-65535, got float 80.0"),
    (workload("{" + WL_OK + ", locality: {region: eu, rack: r1}}"),
     "Workload shop/web-1: spec.locality.rack: unknown field 'rack'; expected one of region, zone, subzone"),
    (workload("{" + WL_OK + ", serviceAccount: Web}"),
     "Workload shop/web-1: spec.serviceAccount: must be a DNS-1123 subdomain (lowercase letters, digits, "
     "'-' and '.', starting and ending with a letter or digit), got 'Web'"),
    (workload("{addresses: [10.10.1.2], netns: /n, node: true}"),
     "Workload shop/web-1: spec.node: must be a string, got bool true (quote it to make it a string)"),
    # Service
    (service("{selector: {app: web}, ports: [{port: 80}]}"),
     "Service shop/web: spec.addresses: required field is missing"),
    (service("{addresses: [10.96.0.10], ports: [{port: 80}]}"),
     "Service shop/web: spec.selector: required field is missing"),
    (service("{addresses: [10.96.0.10], selector: {}, ports: [{port: 80}]}"),
     "Service shop/web: spec.selector: must not be empty: it picks the workloads behind the service"),
    (service("{" + SVC_OK + ", ports: []}"), "Service shop/web: spec.ports: must not be empty"),
    (service("{" + SVC_OK + ", ports: [{name: HTTP, port: 80}]}"),
     "Service shop/web: spec.ports[0].name: must be a DNS-1123 label (lowercase letters, digits and '-', "
     "starting and ending with a letter or digit), got 'HTTP'"),
    (service("{" + SVC_OK + ", ports: [{targetPort: 80}]}"),
     "Service shop/web: spec.ports[0].port: required field is missing"),
    (service("{" + SVC_OK + ", ports: [{port: 80, targetPort: 0}]}"),
     "Service shop/web: spec.ports[0].targetPort: must be between 1 and 65535, got 0"),
    (service("{" + SVC_OK + ", ports: [{port: 80, protocol: grpc}]}"),
     "Service shop/web: spec.ports[0].protocol: must be one of tcp, http, http2, got 'grpc'"),
    (service("{" + SVC_OK + ", ports: [{port: 80}], loadBalancer: {algorithm: p2c}}"),
     "Service shop/web: spec.loadBalancer.algorithm: must be one of random, round_robin, least_request, "
     "ewma, got 'p2c'"),
    (service("{" + SVC_OK + ", ports: [{port: 80}], loadBalancer: {localityFailover: 'yes'}}"),
     "Service shop/web: spec.loadBalancer.localityFailover: must be true or false, got str 'yes'"),
    (service("{" + SVC_OK + ", ports: [{port: 80}], loadbalancer: {}}"),
     "Service shop/web: spec.loadbalancer: unknown field 'loadbalancer'; did you mean 'loadBalancer'?"),
    (service("{" + SVC_OK + ", ports: [{port: 80}], port: [{port: 80}]}"),
     "Service shop/web: spec.port: unknown field 'port'; did you mean 'ports'?"),
    # AuthorizationPolicy
    (policy("{action: deny}"),
     "AuthorizationPolicy shop/p: spec.action: must be one of ALLOW, DENY, AUDIT, got 'deny'; did you mean 'DENY'?"),
    (policy("{rules: {}}"), "AuthorizationPolicy shop/p: spec.rules: must be a list, got mapping"),
    (policy("{rules: [{from: [{}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0]: must set at least one field of principals, "
     "notPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks; got none"),
    (policy("{rules: [{to: [{}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].to[0]: must set at least one field of ports, notPorts, "
     "methods, notMethods, paths, notPaths; got none"),
    (policy("{rules: [{from: [{principal: [x]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].principal: unknown field 'principal'; "
     "did you mean 'principals'?"),
    (policy("{rules: [{from: [{principals: [cluster.local/ns/shop/sa]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].principals[0]: must be a principal like "
     "'cluster.local/ns/shop/sa/web' or '*', got 'cluster.local/ns/shop/sa': path must be "
     "/ns/<namespace>/sa/<serviceAccount>, got /ns/shop/sa"),
    (policy("{rules: [{from: [{notPrincipals: ['cluster.local/*/sa/web']}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].notPrincipals[0]: a principal pattern may have one "
     "'*', only at its start or end, and otherwise letters, digits, '.', '-', '_' and '/', "
     "got 'cluster.local/*/sa/web'"),
    (policy("{rules: [{from: [{namespaces: [Ops]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].namespaces[0]: namespace must be a DNS-1123 label "
     "(lowercase letters, digits and '-', starting and ending with a letter or digit), got 'Ops' (or '*')"),
    (policy("{rules: [{from: [{ipBlocks: [10.10.1.0/16]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].ipBlocks[0]: has host bits set: got '10.10.1.0/16'; "
     "did you mean '10.10.0.0/16'?"),
    (policy("{rules: [{from: [{notIpBlocks: ['fd00::1/8']}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].notIpBlocks[0]: has host bits set: got 'fd00::1/8'; "
     "did you mean 'fd00::/8'?"),
    (policy("{rules: [{from: [{ipBlocks: [10.10.0.0/33]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].from[0].ipBlocks[0]: must be a CIDR block like "
     "'10.10.0.0/16' or an IP address, got '10.10.0.0/33'"),
    (policy("{rules: [{to: [{notPorts: [99999]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].to[0].notPorts[0]: must be between 1 and 65535, got 99999"),
    (policy("{rules: [{to: [{methods: [get]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].to[0].methods[0]: must be an uppercase HTTP method like GET "
     "or POST, got 'get'; did you mean 'GET'?"),
    (policy("{rules: [{to: [{paths: [api/*]}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].to[0].paths[0]: must be a path starting with '/' (no '?', "
     "'#' or spaces), optionally with one '*' at its start or end ('/api/*', '*.js', '*'), got 'api/*'"),
    (policy("{rules: [{to: [{notPaths: ['/a/*/b']}]}]}"),
     "AuthorizationPolicy shop/p: spec.rules[0].to[0].notPaths[0]: must be a path starting with '/' (no '?', "
     "'#' or spaces), optionally with one '*' at its start or end ('/api/*', '*.js', '*'), got '/a/*/b'"),
    (policy("{selector: {app: [web]}}"),
     "AuthorizationPolicy shop/p: spec.selector[\"app\"]: must be a string, got list"),
])
def test_rule_message(text, expected):
    assert problems(text) == [f"t.yaml: document 1: {expected}"]


@pytest.mark.parametrize("text", [
    policy("{rules: [{}]}"),
    policy("{rules: [{from: [{principals: ['*', 'cluster.local/ns/shop/*', '*/sa/web'], namespaces: ['*']}]}]}"),
    policy("{rules: [{from: [{ipBlocks: [10.0.0.1, 'fd00::/8', 0.0.0.0/0]}], to: [{ports: [80], "
           "methods: [GET, M-SEARCH], paths: ['*', '/api/*', '*.js', /]}]}]}"),
    workload("{node: node-1, addresses: [10.0.0.1], cgroup: /sys/fs/cgroup}"),
    workload("{node: node-1, addresses: [10.0.0.1], cgroup: /sys/fs/cgroup/kubepods.slice/p.scope, "
             "netns: /var/run/netns/p, locality: {region: r, zone: z, subzone: s}}"),
    mesh("{certificateTTL: 10m}"),
    mesh("{certificateTTL: 8760h, trustDomain: prod.example-1_a}"),
    service("{" + SVC_OK + ", ports: [{port: 80}, {port: 81}]}", "{name: web, namespace: shop, labels: "
            "{app.kubernetes.io/name: web, empty: ''}}"),
])
def test_valid_documents_are_accepted(text):
    assert len(api.parse_manifests(text)) == 1


def test_policy_values_are_kept():
    (p,) = api.parse_manifests(policy(
        "{action: DENY, rules: [{}, {from: [{notNamespaces: [ops], notIpBlocks: ['FD00::/8']}], "
        "to: [{notMethods: [DELETE], notPaths: [/admin/*], notPorts: [9090]}]}]}"))
    assert p.spec.action == "DENY"
    assert p.spec.selector == {}
    assert p.spec.rules == (
        api.Rule(),
        api.Rule(from_=(api.Source(not_namespaces=("ops",), not_ip_blocks=("fd00::/8",)),),
                 to=(api.Operation(not_methods=("DELETE",), not_paths=("/admin/*",), not_ports=(9090,)),)))
    assert api.to_dict(p)["spec"]["rules"] == [
        {}, {"from": [{"notNamespaces": ["ops"], "notIpBlocks": ["fd00::/8"]}],
             "to": [{"notPorts": [9090], "notMethods": ["DELETE"], "notPaths": ["/admin/*"]}]}]


def test_service_port_duplicates_are_reported_even_when_the_port_has_other_problems():
    assert problems(service("{" + SVC_OK + ", ports: [{name: http, port: 80}, "
                            "{name: http, port: 80, targetport: 8080}]}")) == [
        "t.yaml: document 1: Service shop/web: spec.ports[1].targetport: unknown field 'targetport'; "
        "did you mean 'targetPort'?",
        "t.yaml: document 1: Service shop/web: spec.ports[1].name: duplicate name 'http', "
        "already used by spec.ports[0]",
        "t.yaml: document 1: Service shop/web: spec.ports[1].port: duplicate port 80, already used by spec.ports[0]",
    ]


def test_several_errors_in_several_documents_are_all_reported():
    text = "\n---\n".join([
        mesh("{mtls: OFF}"),  # YAML 1.1 reads OFF as false: not silently the string 'OFF'
        workload(WL),
        service("{addresses: [10.96.0.10], selector: {app: web}, ports: [{port: 80, protocol: htp}]}"),
        workload("{node: Node_1, addresses: [], netns: /x}", "{name: w2, namespace: shop}"),
    ])
    assert problems(text, source="all.yaml") == [
        "all.yaml: document 1: Mesh default: spec.mtls: must be one of STRICT, PERMISSIVE, got bool false",
        "all.yaml: document 3: Service shop/web: spec.ports[0].protocol: must be one of tcp, http, http2, got 'htp'",
        "all.yaml: document 4: Workload shop/w2: spec.node: must be a DNS-1123 subdomain (lowercase letters, "
        "digits, '-' and '.', starting and ending with a letter or digit), got 'Node_1'",
        "all.yaml: document 4: Workload shop/w2: spec.addresses: must not be empty",
    ]
