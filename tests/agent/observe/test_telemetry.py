"""Telemetry: the proxy's ConnRecord becomes metrics and one access-log line at close."""
from __future__ import annotations

import io
import json

from prometheus_client.parser import text_string_to_metric_families

from agent.observe.accesslog import AccessLog
from agent.observe.metrics import AgentMetrics
from agent.observe.record import ConnRecord
from agent.observe.telemetry import Telemetry
from controller.api import parse_manifests


def workload(name: str, ns: str, sa: str, ip: str):
    (w,) = parse_manifests(json.dumps({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload", "metadata": {"name": name, "namespace": ns},
        "spec": {"node": "node-1", "serviceAccount": sa, "addresses": [ip], "netns": f"/run/netns/{name}"}}))
    return w


WEB = workload("web-1", "shop", "web", "10.10.1.2")
DB = workload("db-1", "shop", "db", "10.10.1.5")


def series(m: AgentMetrics, name: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(m.render().decode())
            for s in f.samples if s.name == name]


def test_an_allowed_connection_is_counted_when_set_up_and_logged_at_close():
    m, out = AgentMetrics(), io.StringIO()
    tel = Telemetry(m, AccessLog(out))
    rec = ConnRecord("source", "10.10.1.2", src_workload=WEB, src_identity="spiffe://cluster.local/ns/shop/sa/web")
    rec.dst_address, rec.dst_service = "10.96.0.5:5432", "db.shop.svc"
    rec.dst_workload, rec.dst_identity = DB, "spiffe://cluster.local/ns/shop/sa/db"
    rec.protocol, rec.security = "hbone", "mutual_tls"
    tel.opened(rec)   # set up: counted while still open
    (labels, n), = series(m, "nodemesh_tcp_connections_opened_total")
    assert n == 1 and series(m, "nodemesh_tcp_connections_closed_total") == [(labels, 0)] and out.getvalue() == ""
    rec.request_bytes, rec.response_bytes = 300, 4000
    tel.closed(rec)
    (labels, n), = series(m, "nodemesh_tcp_connections_opened_total")
    assert n == 1 and labels == {
        "reporter": "source", "source_workload": "web-1", "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/web", "destination_workload": "db-1",
        "destination_workload_namespace": "shop", "destination_principal": "spiffe://cluster.local/ns/shop/sa/db",
        "destination_service": "db.shop.svc", "connection_security_policy": "mutual_tls", "response_flags": "-"}
    assert series(m, "nodemesh_tcp_connections_closed_total") == [(labels, 1)]
    assert series(m, "nodemesh_tcp_sent_bytes_total") == [(labels, 4000)]
    assert series(m, "nodemesh_tcp_received_bytes_total") == [(labels, 300)]
    assert series(m, "nodemesh_policy_denials_total") == []
    line = json.loads(out.getvalue())
    assert line["dst"] == {"address": "10.96.0.5:5432", "service": "db.shop.svc", "workload": "db-1",
                           "namespace": "shop", "identity": "spiffe://cluster.local/ns/shop/sa/db"}
    assert (line["bytes_sent"], line["bytes_received"]) == (4000, 300)
    assert line["decision"]["result"] == "allow"


def test_a_denied_connection_counts_a_denial_with_policy_and_rule():
    m, out = AgentMetrics(), io.StringIO()
    tel = Telemetry(m, AccessLog(out))
    rec = ConnRecord("destination", "10.10.2.7", dst_workload=DB, protocol="hbone", security="mutual_tls",
                     src_identity="spiffe://cluster.local/ns/apps/sa/api")
    rec.decision, rec.policy, rec.rule, rec.reason, rec.flags = "deny", "shop/deny-db", 1, "matched", "DENY"
    tel.opened(rec)
    tel.closed(rec)
    assert series(m, "nodemesh_policy_denials_total") == [(
        {"policy": "shop/deny-db", "rule": "1", "reporter": "destination",
         "destination_workload": "db-1", "destination_workload_namespace": "shop"}, 1)]
    (labels, _), = series(m, "nodemesh_tcp_connections_closed_total")
    assert labels["response_flags"] == "DENY" and labels["source_workload"] == "unknown"
    line = json.loads(out.getvalue())
    assert line["decision"] == {"result": "deny", "policy": "shop/deny-db", "rule": 1, "reason": "matched"}
    assert line["src"]["workload"] is None and line["response_flags"] == "DENY"


def test_a_failure_inside_telemetry_never_reaches_the_data_path():
    class Exploding(AgentMetrics):
        def connection_opened(self, labels):
            raise RuntimeError("boom")
    tel = Telemetry(Exploding())
    rec = ConnRecord("source", "10.10.1.2")
    tel.opened(rec)
    tel.closed(rec)        # must not raise
    tel.closed(object())   # not even for a record missing every field


def test_a_batch_is_reported_in_order_with_one_flush_of_the_access_log():
    class Flushes(io.StringIO):
        count = 0

        def flush(self):
            self.count += 1
            super().flush()

    m, out = AgentMetrics(), Flushes()
    tel = Telemetry(m, AccessLog(out))
    recs = [ConnRecord("source", "10.10.1.2", src_workload=WEB, dst_workload=DB, dst_address=f"10.10.1.5:{p}")
            for p in (1, 2, 3)]
    tel.report([(True, recs[0]), (True, recs[1]), (False, recs[1]), (False, recs[0]), (False, recs[2])])
    assert [json.loads(l)["dst"]["address"] for l in out.getvalue().splitlines()] == \
        ["10.10.1.5:2", "10.10.1.5:1", "10.10.1.5:3"]
    assert out.count == 1
    (_, opened), = series(m, "nodemesh_tcp_connections_opened_total")
    (_, closed), = series(m, "nodemesh_tcp_connections_closed_total")
    assert opened == closed == 3      # the one never reported opened is counted at its close
