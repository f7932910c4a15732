"""The agent's HTTP endpoints over real sockets on 127.0.0.1: admin, metrics, readiness, and the
server's own behaviour (404, 405, limits, one bad connection)."""
from __future__ import annotations

import logging

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agent.observe.admin import admin_routes, metrics_routes, ready_routes
from agent.observe.httpd import Route, text_reply
from agent.observe.metrics import AgentMetrics, ConnectionLabels
from tests.agent.observe.conftest import http, raw

CONFIG = {"version": 12, "workloads": ["shop/web-1"]}
CERTS = [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "not_after": "2025-02-01T00:00:00Z"}]


async def workloads():       # async sources work too
    await trio.sleep(0)
    return [{"namespace": "shop", "name": "web-1", "addresses": ["10.10.1.2"]}]


def admin():
    return admin_routes(config_dump=lambda: CONFIG, certs=lambda: CERTS, workloads=workloads)


async def test_admin_endpoints_serve_json(serve):
    port = await serve(admin())
    assert port != 0
    for path, want in [("/config_dump", CONFIG), ("/certs", CERTS), ("/workloads", await workloads())]:
        r = await http("GET", port, path)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", path
        assert r.json() == want, path
    r = await http("GET", port, "/")
    assert r.json() == {"endpoints": ["/", "/certs", "/config_dump", "/logging", "/workloads"]}


async def test_unknown_path_is_404_listing_the_known_paths(serve):
    port = await serve(admin())
    r = await http("GET", port, "/stats?x=1")
    assert r.status_code == 404
    assert r.json() == {"error": "no such path: /stats",
                        "paths": ["/", "/certs", "/config_dump", "/logging", "/workloads"]}


async def test_other_methods_are_405_with_allow(serve):
    port = await serve(admin())
    for method, path in [("POST", "/config_dump"), ("DELETE", "/certs"), ("PUT", "/logging")]:
        r = await http(method, port, path)
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == ("GET, HEAD, POST" if path == "/logging" else "GET, HEAD")


async def test_head_sends_headers_without_body(serve):
    port = await serve(admin())
    r = await http("HEAD", port, "/certs")
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len((await http("GET", port, "/certs")).content)


async def test_logging_post_changes_a_logger_and_get_shows_it(serve, restore_log_levels):
    sync = logging.getLogger("nodemesh.agent.sync")
    other = logging.getLogger("nodemesh.agent.inbound")
    logging.getLogger("nodemesh").setLevel(logging.INFO)
    sync.setLevel(logging.NOTSET)
    other.setLevel(logging.NOTSET)
    port = await serve(admin())
    before = (await http("GET", port, "/logging")).json()["loggers"]
    assert before["nodemesh.agent.sync"] == "info" and before["nodemesh"] == "info"

    r = await http("POST", port, "/logging?nodemesh.agent.sync=debug")
    assert r.status_code == 200 and r.json()["loggers"]["nodemesh.agent.sync"] == "debug"
    assert sync.getEffectiveLevel() == logging.DEBUG
    assert other.getEffectiveLevel() == logging.INFO
    after = (await http("GET", port, "/logging")).json()["loggers"]
    assert after["nodemesh.agent.sync"] == "debug" and after["nodemesh.agent.inbound"] == "info"

    r = await http("POST", port, "/logging?level=WARNING")
    assert r.status_code == 200
    assert set(r.json()["loggers"].values()) == {"warning"}
    assert sync.getEffectiveLevel() == other.getEffectiveLevel() == logging.WARNING


async def test_logging_post_refuses_bad_input_and_changes_nothing(serve, restore_log_levels):
    sync = logging.getLogger("nodemesh.agent.sync")
    sync.setLevel(logging.INFO)
    port = await serve(admin())
    for query, status, words in [("?nodemesh.agent.sync=debug&level=loud", 400, "unknown level"),
                                 ("?nodemesh.nope=debug", 400, "unknown logger"),
                                 ("?httpx=debug", 400, "unknown logger"),
                                 ("", 400, "nothing to change")]:
        r = await http("POST", port, "/logging" + query)
        assert r.status_code == status and words in r.json()["error"], query
    r = await http("POST", port, "/logging?level=debug", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert sync.level == logging.INFO


async def test_metrics_endpoint(serve):
    m = AgentMetrics(config_version=lambda: 5)
    port = await serve(metrics_routes(m))
    m.connection_opened(ConnectionLabels(reporter="source", source_workload="web-1"))
    r = await http("GET", port, "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = {s.name: s for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert got["nodemesh_tcp_connections_opened_total"].labels["source_workload"] == "web-1"
    assert got["nodemesh_config_version"].value == 5
    assert (await http("GET", port, "/")).status_code == 404


async def test_ready_is_200_then_503_with_the_reason(serve):
    state = {"ready": (False, "no snapshot yet: controller unreachable")}
    port = await serve(ready_routes(lambda: state["ready"]))
    r = await http("GET", port, "/healthz/ready")
    assert (r.status_code, r.text) == (503, "no snapshot yet: controller unreachable\n")
    state["ready"] = (True, "")
    r = await http("GET", port, "/healthz/ready")
    assert (r.status_code, r.text) == (200, "ready\n")


async def test_a_raising_ready_check_is_503_not_500(serve):
    def ready():
        raise RuntimeError("status gone")
    port = await serve(ready_routes(ready))
    r = await http("GET", port, "/healthz/ready")
    assert r.status_code == 503 and "status gone" in r.text


async def test_a_raising_handler_is_500_and_the_server_keeps_serving(serve):
    def broken():
        raise KeyError("x")
    port = await serve({"/broken": broken, "/ok": lambda: text_reply("ok")})
    r = await http("GET", port, "/broken")
    assert r.status_code == 500 and "KeyError" in r.json()["error"]
    assert (await http("GET", port, "/ok")).text == "ok\n"


async def test_malformed_and_oversized_requests_do_not_kill_the_server(serve):
    port = await serve({"/ok": lambda: text_reply("ok")}, max_request_bytes=4096)
    assert (await raw(port, b"this is not http\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    big = b"GET /ok HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 8192 + b"\r\n\r\n"
    assert (await raw(port, big)).startswith(b"HTTP/1.1 431 ")
    body = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"b" * 5000
    assert (await raw(port, body)).startswith(b"HTTP/1.1 413 ")
    half = await raw(port, b"GET /ok HTTP/1.1\r\nhost: x\r\n")   # half a request, then EOF
    assert half.startswith(b"HTTP/1.1 400 ")
    assert (await http("GET", port, "/ok")).text == "ok\n"


async def test_keep_alive_serves_several_requests_on_one_connection(serve):
    port = await serve({"/ok": lambda: text_reply("ok")})
    out = await raw(port, b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n"
                          b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n"
                          b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 ") == 2 and out.count(b"HTTP/1.1 404 ") == 1


async def test_an_idle_connection_is_closed(serve):
    port = await serve({"/ok": lambda: text_reply("ok")}, idle_timeout=0.2)
    with trio.fail_after(3):     # raw() returns only because the server hangs up
        assert await raw(port, b"", timeout=3) == b""


async def test_route_with_request_and_post(serve):
    seen = []

    def post(req):
        seen.append((req.method, req.query, req.body))
        return text_reply("done")
    port = await serve({"/x": Route(get=lambda req: text_reply(req.query.get("a", ["?"])[0]), post=post)})
    assert (await http("GET", port, "/x?a=1")).text == "1\n"
    assert (await http("POST", port, "/x?b=2", content=b"hi")).text == "done\n"
    assert seen == [("POST", {"b": ["2"]}, b"hi")]


@pytest.fixture(autouse=True)
async def _bounded():
    """Every test here must finish well within 20 s, whatever the server does."""
    with trio.fail_after(20):
        yield
