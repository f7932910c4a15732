"""The controller's HTTPS API, end to end over real TLS sockets with the real client."""
from __future__ import annotations

import copy
import json
import ssl
import threading

import httpx
import pytest
import trio

from controller import client
from tests.controller.conftest import NODE_URI, WORKLOAD_URI, issue_client_cert


def service(name: str, vip: str, ns: str = "shop", port: int = 80, protocol: str = "http") -> dict:
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"addresses": [vip], "selector": {"app": name},
                     "ports": [{"name": "p", "port": port, "protocol": protocol}]}}


MESH = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "default"},
        "spec": {"trustDomain": "cluster.local", "mtls": "STRICT"}}


async def test_apply_list_get_delete_round_trip(controller):
    c = controller.client()
    reply = await controller.call(c.apply, [MESH, service("web", "10.96.0.10")])
    assert [(r["kind"], r["name"], r["action"]) for r in reply["results"]] == [
        ("Mesh", "default", "created"), ("Service", "web", "created")]
    rv = int(reply["resourceVersion"])

    again = await controller.call(c.apply, [MESH, service("web", "10.96.0.10")])
    assert {r["action"] for r in again["results"]} == {"unchanged"}
    assert int(again["resourceVersion"]) == rv  # nothing changed, revision did not move

    listed = await controller.call(c.list, "services", "shop")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["web"]
    web = await controller.call(c.get, "services", "web", "shop")
    assert web["spec"]["ports"][0]["targetPort"] == 80  # defaults filled by the server
    assert web["metadata"]["resourceVersion"] == str(rv)
    mesh = await controller.call(c.get, "meshes", "default")
    assert mesh["spec"]["defaultAction"] == "ALLOW"

    await controller.call(c.delete, [{"kind": "Service", "namespace": "shop", "name": "web"}])
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.get, "services", "web", "shop")
    assert e.value.code == 404 and "Service shop/web not found" in str(e.value)


async def test_invalid_batch_changes_nothing(controller):
    c = controller.client()
    first = await controller.call(c.apply, [service("web", "10.96.0.10")])
    bad = service("db", "10.96.0.11", protocol="htp")
    changed_web = service("web", "10.96.0.99")
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.apply, [changed_web, bad])
    assert e.value.code == 422
    assert ("request: document 2: Service shop/db: spec.ports[0].protocol: must be one of tcp, http, http2, got 'htp'"
            in e.value.problems)
    web = await controller.call(c.get, "services", "web", "shop")
    assert web["spec"]["addresses"] == ["10.96.0.10"]
    listed = await controller.call(c.list, "services", None)
    assert listed["metadata"]["resourceVersion"] == first["resourceVersion"]


async def test_mesh_trust_domain_must_match_the_ca(controller):
    c = controller.client()
    other = copy.deepcopy(MESH)
    other["spec"]["trustDomain"] = "other.org"
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.apply, [other])
    assert e.value.code == 422 and "spec.trustDomain" in str(e.value) and "cluster.local" in str(e.value)


async def test_delete_of_a_missing_object_deletes_nothing(controller):
    c = controller.client()
    await controller.call(c.apply, [service("web", "10.96.0.10")])
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.delete, [{"kind": "Service", "namespace": "shop", "name": "web"},
                                         {"kind": "Service", "namespace": "shop", "name": "nope"}])
    assert e.value.code == 404 and "nope" in str(e.value)
    assert (await controller.call(c.get, "services", "web", "shop"))["metadata"]["name"] == "web"


async def test_stale_resource_version_is_a_conflict(controller):
    c = controller.client()
    await controller.call(c.apply, [service("web", "10.96.0.10")])
    web = await controller.call(c.get, "services", "web", "shop")
    await controller.call(c.apply, [service("web", "10.96.0.11")])
    web["spec"]["addresses"] = ["10.96.0.12"]
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(c.apply, [web])
    assert e.value.code == 409


async def test_without_a_certificate_nothing_is_served(controller):
    c = controller.client(admin=False)
    for call in (lambda: c.list("services", None), lambda: c.apply([service("web", "10.96.0.10")]),
                 lambda: c.get("meshes", "default")):
        with pytest.raises(client.ApiStatusError) as e:
            await trio.to_thread.run_sync(call)
        assert e.value.code == 401
    # The health check is the one thing open to anyone.
    verify = ssl.create_default_context(cafile=str(controller.d.bundle))
    r = await trio.to_thread.run_sync(lambda: httpx.get(f"{controller.url}/healthz", verify=verify))
    assert r.status_code == 200
    # Authentication comes before routing: an unknown path or a wrong method tells a stranger
    # nothing (401, not 404 or 405).
    for method, path in (("POST", "/apis/nodemesh.io/v1alpha1/no-such-thing"), ("GET", "/nowhere"),
                         ("PUT", "/apis/nodemesh.io/v1alpha1/apply")):
        r = await trio.to_thread.run_sync(lambda: httpx.request(method, controller.url + path, verify=verify))
        assert r.status_code == 401, (method, path, r.status_code, r.text)


async def test_certificate_from_another_ca_is_refused_at_the_handshake(controller, tmp_path):
    from controller import datadir
    other = datadir.DataDir(tmp_path / "other")
    datadir.initialise(other, trust_domain="cluster.local", server_names=("localhost",))
    c = client.Client(client.Settings(controller.url, controller.d.bundle, other.admin_cert, other.admin_key))
    with pytest.raises(client.Unreachable):
        await controller.call(c.list, "services", None)


async def test_node_may_read_but_not_write_and_workload_may_do_neither(controller, tmp_path):
    node_cert, node_key = issue_client_cert(controller.d, tmp_path, NODE_URI, "node")
    node = controller.client(cert=node_cert, key=node_key)
    assert (await controller.call(node.list, "services", None))["items"] == []
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(node.apply, [service("web", "10.96.0.10")])
    assert e.value.code == 403 and "node/node-1" in str(e.value)

    wl_cert, wl_key = issue_client_cert(controller.d, tmp_path, WORKLOAD_URI, "wl")
    wl = controller.client(cert=wl_cert, key=wl_key)
    with pytest.raises(client.ApiStatusError) as e:
        await controller.call(wl.list, "services", None)
    assert e.value.code == 403


async def test_watch_sees_every_event_in_order_under_concurrent_applies(controller):
    c = controller.client()
    start = int((await controller.call(c.apply, [service("seed", "10.96.1.1")]))["resourceVersion"])
    writers, batches = 4, 6
    expected_writes = writers * batches
    seen: list[dict] = []
    ready = threading.Event()

    def collect():
        with controller.client() as w:
            for ev in w.watch(resource_version=start, kinds=("Service",)):
                if ev["type"] == "BOOKMARK":
                    continue
                seen.append(ev)
                if len(seen) == expected_writes * 2:
                    return

    def write(i):
        with controller.client() as w:
            for b in range(batches):
                w.apply([service(f"s{i}-{b}", f"10.96.{i + 2}.{b + 1}"),
                         service(f"t{i}-{b}", f"10.96.{i + 10}.{b + 1}")])

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(trio.to_thread.run_sync, collect)
            for i in range(writers):
                n.start_soon(trio.to_thread.run_sync, write, i)

    revisions = [int(ev["object"]["metadata"]["resourceVersion"]) for ev in seen]
    assert revisions == sorted(revisions)
    assert set(revisions) == set(range(start + 1, start + 1 + expected_writes))  # no gap, one per batch
    names = [ev["object"]["metadata"]["name"] for ev in seen]
    assert len(set(names)) == len(names) == expected_writes * 2
    assert all(ev["type"] == "ADDED" for ev in seen)


async def test_watch_without_resource_version_starts_with_a_snapshot(controller):
    c = controller.client()
    rv = (await controller.call(c.apply, [MESH, service("web", "10.96.0.10")]))["resourceVersion"]

    def first_five():
        with controller.client() as w:
            it = w.watch()
            events = [next(it), next(it), next(it)]
            w2 = controller.client()
            w2.apply([service("db", "10.96.0.11")])  # a later write arrives, then its sync mark
            return events + [next(it), next(it)]

    with trio.fail_after(10):
        events = await trio.to_thread.run_sync(first_five)
    assert [(e["type"], e["object"].get("kind")) for e in events] == [
        ("ADDED", "Mesh"), ("ADDED", "Service"), ("BOOKMARK", None), ("ADDED", "Service"), ("BOOKMARK", None)]
    assert events[2]["object"]["metadata"]["resourceVersion"] == rv  # end of the initial snapshot
    assert int(events[4]["object"]["metadata"]["resourceVersion"]) == int(rv) + 1


async def test_metrics_count_requests_and_expose_store_state(controller):
    c = controller.client()
    await controller.call(c.apply, [MESH, service("web", "10.96.0.10")])
    await controller.call(c.list, "services", None)
    text = (await trio.to_thread.run_sync(lambda: httpx.get(f"{controller.metrics_url}/metrics"))).text
    assert 'nodemesh_controller_api_requests_total{code="200",verb="apply"} 1.0' in text
    assert 'nodemesh_controller_store_objects{kind="Service"} 1.0' in text
    assert "nodemesh_controller_resource_version 1.0" in text
    assert "nodemesh_controller_watchers 0.0" in text


async def test_malformed_requests_get_clear_errors(controller):
    def raw(method, path, **kw):
        ctx = client.ssl_context(controller.settings())
        return httpx.request(method, controller.url + path, verify=ctx, **kw)

    r = await trio.to_thread.run_sync(lambda: raw("POST", "/apis/nodemesh.io/v1alpha1/apply", content=b"{nope"))
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    r = await trio.to_thread.run_sync(lambda: raw("GET", "/apis/nodemesh.io/v1alpha1/widgets"))
    assert r.status_code == 404 and "Service" in r.json()["message"]
    r = await trio.to_thread.run_sync(lambda: raw("GET", "/apis/nodemesh.io/v1alpha1/watch?resourceVersion=x"))
    assert r.status_code == 400
