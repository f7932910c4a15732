"""AgentMetrics: names and label sets as DESIGN.md lists them, read back from the exposition text."""
from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.observe.metrics import AgentMetrics, ConnectionLabels

# Written out, not imported: these are the contract (Istio's label names).
TCP_LABELS = {"reporter", "source_workload", "source_workload_namespace", "source_principal",
              "destination_workload", "destination_workload_namespace", "destination_principal",
              "destination_service", "connection_security_policy", "response_flags"}
TCP_METRICS = ["nodemesh_tcp_connections_opened_total", "nodemesh_tcp_connections_closed_total",
               "nodemesh_tcp_sent_bytes_total", "nodemesh_tcp_received_bytes_total"]

WEB_TO_DB = ConnectionLabels(
    reporter="source", source_workload="web-1", source_workload_namespace="shop",
    source_principal="spiffe://cluster.local/ns/shop/sa/web", destination_workload="db-1",
    destination_workload_namespace="shop", destination_principal="spiffe://cluster.local/ns/shop/sa/db",
    destination_service="db.shop.svc", connection_security_policy="mutual_tls", response_flags="-")


def samples(m: AgentMetrics) -> dict[str, list[tuple[dict, float]]]:
    """Sample name -> [(labels, value)], parsed from what /metrics would serve."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(m: AgentMetrics, name: str, **labels) -> float | None:
    for got, v in samples(m).get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            return v
    return None


def test_tcp_metric_names_and_label_sets():
    m = AgentMetrics()
    m.connection_opened(WEB_TO_DB)
    m.connection_closed(WEB_TO_DB, sent=10, received=20)
    got = samples(m)
    for name in TCP_METRICS:
        assert [set(labels) for labels, _ in got[name]] == [TCP_LABELS], name
    (labels, _), = got["nodemesh_tcp_connections_opened_total"]
    assert labels == {"reporter": "source", "source_workload": "web-1", "source_workload_namespace": "shop",
                      "source_principal": "spiffe://cluster.local/ns/shop/sa/web",
                      "destination_workload": "db-1", "destination_workload_namespace": "shop",
                      "destination_principal": "spiffe://cluster.local/ns/shop/sa/db",
                      "destination_service": "db.shop.svc", "connection_security_policy": "mutual_tls",
                      "response_flags": "-"}
    assert not [n for n in got if n.endswith("_created")]   # no prometheus_client _created series


def test_counters_move_with_opened_closed_and_bytes():
    m = AgentMetrics()
    m.connection_opened(WEB_TO_DB)
    m.connection_opened(WEB_TO_DB)
    assert value(m, "nodemesh_tcp_connections_opened_total") == 2
    assert value(m, "nodemesh_tcp_connections_closed_total") == 0
    m.connection_closed(WEB_TO_DB, sent=100, received=7)
    m.add_bytes(WEB_TO_DB, sent=1000, received=1)      # the other one, still open, reports early
    m.connection_closed(WEB_TO_DB, sent=5, received=2)
    assert value(m, "nodemesh_tcp_connections_closed_total") == 2
    assert value(m, "nodemesh_tcp_sent_bytes_total") == 1105
    assert value(m, "nodemesh_tcp_received_bytes_total") == 10


def test_equal_labels_share_a_series_and_different_ones_do_not():
    m = AgentMetrics()
    same = ConnectionLabels(**{k: getattr(WEB_TO_DB, k) for k in TCP_LABELS})
    failed = ConnectionLabels(reporter="source", source_workload="web-1", response_flags="UF")
    assert same == WEB_TO_DB and hash(same) == hash(WEB_TO_DB) and same is not WEB_TO_DB
    m.connection_opened(WEB_TO_DB)
    m.connection_opened(same)
    m.connection_opened(failed)
    opened = samples(m)["nodemesh_tcp_connections_opened_total"]
    assert len(opened) == 2
    assert value(m, "nodemesh_tcp_connections_opened_total", response_flags="-") == 2
    uf = [labels for labels, v in opened if labels["response_flags"] == "UF"]
    assert uf and uf[0]["destination_workload"] == "unknown" and uf[0]["connection_security_policy"] == "none"


def test_policy_denial_labels():
    m = AgentMetrics()
    m.policy_denied(policy="shop/deny-db", rule=0, reporter="destination",
                    destination_workload="db-1", destination_workload_namespace="shop")
    m.policy_denied(policy="shop/deny-db", rule=0, reporter="destination",
                    destination_workload="db-1", destination_workload_namespace="shop")
    m.policy_denied(policy=None, rule=None, reporter="source",
                    destination_workload="", destination_workload_namespace="")
    got = samples(m)["nodemesh_policy_denials_total"]
    assert sorted((sorted(labels.items()), v) for labels, v in got) == sorted([
        (sorted({"policy": "shop/deny-db", "rule": "0", "reporter": "destination",
                 "destination_workload": "db-1", "destination_workload_namespace": "shop"}.items()), 2.0),
        (sorted({"policy": "unknown", "rule": "", "reporter": "source",
                 "destination_workload": "unknown", "destination_workload_namespace": "unknown"}.items()), 1.0),
    ])


def test_certificate_expiry_and_config_gauges_are_read_at_scrape_time():
    expiry = {"spiffe://cluster.local/ns/shop/sa/web": 1_700_000_000.0}
    status = {"version": 7, "rejected": 0}
    m = AgentMetrics(cert_expiry=lambda: expiry, config_version=lambda: status["version"],
                     config_rejected=lambda: status["rejected"], listeners=lambda: {"up": 3, "failed": 1})
    assert value(m, "nodemesh_certificate_expiry_timestamp_seconds",
                 identity="spiffe://cluster.local/ns/shop/sa/web") == 1_700_000_000
    expiry["spiffe://cluster.local/ns/shop/sa/db"] = 1_700_086_400.0
    status.update(version=9, rejected=2)
    got = samples(m)
    assert {labels["identity"]: v for labels, v in got["nodemesh_certificate_expiry_timestamp_seconds"]} == {
        "spiffe://cluster.local/ns/shop/sa/web": 1_700_000_000, "spiffe://cluster.local/ns/shop/sa/db": 1_700_086_400}
    assert got["nodemesh_config_version"] == [({}, 9)]
    assert got["nodemesh_config_rejected_total"] == [({}, 2)]
    assert sorted((labels["state"], v) for labels, v in got["nodemesh_listeners"]) == [("failed", 1), ("up", 3)]


def test_a_broken_source_leaves_only_its_metric_out():
    def broken():
        raise RuntimeError("identity manager gone")
    m = AgentMetrics(cert_expiry=broken, config_version=lambda: 4)
    m.connection_opened(WEB_TO_DB)
    got = samples(m)
    assert "nodemesh_certificate_expiry_timestamp_seconds" not in got
    assert got["nodemesh_config_version"] == [({}, 4)]
    assert value(m, "nodemesh_tcp_connections_opened_total") == 1


def test_request_metrics_labels_and_histogram():
    m = AgentMetrics()
    m.request_finished(WEB_TO_DB, response_code=200, protocol="http", duration=0.003)
    m.request_finished(WEB_TO_DB, response_code=200, protocol="http", duration=2.0)
    m.request_finished(ConnectionLabels(**{**{k: getattr(WEB_TO_DB, k) for k in TCP_LABELS},
                                          "response_flags": "UF"}),
                       response_code=200, protocol="http", duration=0.001)
    got = samples(m)
    for labels, _ in got["nodemesh_requests_total"]:
        assert set(labels) == TCP_LABELS | {"response_code", "request_protocol"}
    assert len(got["nodemesh_requests_total"]) == 2
    duration_labels = TCP_LABELS - {"response_flags"} | {"response_code", "request_protocol"}
    # without response_flags the three requests are one series
    assert [set(labels) for labels, _ in got["nodemesh_request_duration_seconds_count"]] == [duration_labels]
    assert got["nodemesh_request_duration_seconds_count"][0][1] == 3
    assert abs(got["nodemesh_request_duration_seconds_sum"][0][1] - 2.004) < 1e-9
    buckets = {labels["le"]: v for labels, v in got["nodemesh_request_duration_seconds_bucket"]}
    assert buckets["0.001"] == 1 and buckets["0.005"] == 2 and buckets["1.0"] == 2
    assert buckets["2.5"] == 3 and buckets["+Inf"] == 3


def test_each_agent_has_its_own_registry():
    a, b = AgentMetrics(), AgentMetrics()
    a.connection_opened(WEB_TO_DB)
    assert value(a, "nodemesh_tcp_connections_opened_total") == 1
    assert "nodemesh_tcp_connections_opened_total" not in samples(b)
    assert b"nodemesh_tcp_" not in generate_latest(REGISTRY)
