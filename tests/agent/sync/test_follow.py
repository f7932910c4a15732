"""Config sync against a real controller: deltas, rejection of bad updates, outage, restart from disk."""
from __future__ import annotations

import random

import trio

from agent.state.snapshot import Snapshot, StateHolder
from agent.sync.client import ControlPlane
from agent.sync.follow import SyncStatus, run_sync
from controller import pki
from controller.api.spiffe import node_uri
from tests.controller.test_api_server import MESH, service
from tests.controller.test_identity_api import workload


async def joined_controlplane(controller, tmp_path, node="node-1") -> ControlPlane:
    admin = controller.client()
    token = (await controller.call(admin.create_token, node, 600))["token"]
    bundle = controller.d.bundle.read_bytes()
    cp = ControlPlane(controller.url, bundle_pem=bundle)
    key = pki.generate_key()
    signed = await cp.join(token, pki.csr_pem(node_uri("cluster.local", node), key))
    cert, keyf = tmp_path / "node.crt", tmp_path / "node.key"
    pki.write_file(cert, signed.chain_pem, secret=False)
    pki.write_file(keyf, pki.key_pem(key), secret=True)
    await cp.update(bundle_pem=signed.bundle_pem, credentials=(cert, keyf))
    return cp


async def test_sync_follows_deltas_rejects_contradictions_and_reports(controller, tmp_path, nursery):
    admin = controller.client()
    await controller.call(admin.apply, [MESH, workload("web-1", "node-1"), service("web", "10.96.0.10")])
    cp = await joined_controlplane(controller, tmp_path)
    holder = StateHolder(Snapshot.empty(node="node-1"))
    status = SyncStatus()
    reports = []

    async def report(s):
        reports.append((s.version, s.error))
        await cp.report(version=s.version, ready=True, error=s.error)

    await nursery.start(lambda task_status: run_sync(cp, holder, node="node-1", path=tmp_path / "snap.json",
                                                     status=status, report=report, rng=random.Random(1),
                                                     task_status=task_status))
    with trio.fail_after(10):
        snap = await holder.wait_newer(0)
        assert [w.metadata.name for w in snap.local_workloads] == ["web-1"]
        assert snap.service_at("10.96.0.10", 80) is not None

        v = int((await controller.call(admin.apply, [service("db", "10.96.0.11")]))["resourceVersion"])
        snap = await holder.wait_newer(snap.version)
        assert snap.version == v and snap.service_at("10.96.0.11", 80) is not None

        # Two workloads claiming one address: the controller accepts each object, the agent
        # cannot serve the pair. It keeps the old snapshot and says why.
        clash = workload("web-2", "node-2")
        bad = int((await controller.call(admin.apply, [clash]))["resourceVersion"])
        while not status.error:
            await trio.sleep(0.01)
        assert holder.current.version == v
        assert f"version {bad} rejected" in status.error and "10.10.1.2" in status.error
        st = await controller.call(admin.status)
        assert st["nodes"][0]["version"] == v and "rejected" in st["nodes"][0]["error"]

        # Fixing it is just another update.
        await controller.call(admin.delete, [{"kind": "Workload", "namespace": "shop", "name": "web-2"}])
        snap = await holder.wait_newer(v)
        assert status.error == "" and snap.version > bad
    assert (tmp_path / "snap.json").exists()


async def test_agent_restart_serves_from_disk_with_the_controller_down(controller, tmp_path):
    admin = controller.client()
    await controller.call(admin.apply, [MESH, workload("web-1", "node-1"), service("web", "10.96.0.10")])
    cp = await joined_controlplane(controller, tmp_path)
    path = tmp_path / "snap.json"
    async with trio.open_nursery() as n:
        holder = StateHolder(Snapshot.empty(node="node-1"))
        await n.start(lambda task_status: run_sync(cp, holder, node="node-1", path=path, status=SyncStatus(),
                                                   task_status=task_status))
        with trio.fail_after(10):
            first = await holder.wait_newer(0)
        n.cancel_scope.cancel()

    # A new agent process whose controller is unreachable: it serves the snapshot from disk.
    dead = ControlPlane("https://127.0.0.1:9", bundle_pem=controller.d.bundle.read_bytes())
    status = SyncStatus()
    async with trio.open_nursery() as n:
        holder = StateHolder(Snapshot.empty(node="node-1"))
        await n.start(lambda task_status: run_sync(dead, holder, node="node-1", path=path, status=status,
                                                   rng=random.Random(1), task_status=task_status))
        assert holder.current.version == first.version and status.synced and not status.connected
        assert holder.current.service_at("10.96.0.10", 80) is not None
        n.cancel_scope.cancel()
