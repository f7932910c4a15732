"""`nodemesh agent run` as a real process against a real controller process (root: it opens its
listeners inside a real pod network namespace).

A test client plays the peer node: it holds a workload certificate signed by the controller's
CA and opens HBONE streams to the pod's 15008 from inside the pod's netns. The agent must
authorize, deliver to the app inside the pod, cut the stream when a DENY policy arrives, and keep
serving from disk after a restart with the controller gone.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from functools import partial

import httpx
import pytest
import trio

from agent.base.netns import connect_in, listen_in
from agent.proxy.hbone import ConnectRefused
from agent.proxy.hbone_pool import open_hbone_pool
from controller import pki
from tests.controller.conftest import free_port
from tests.controller.test_controller_process import Controller, nodemesh

pytestmark = pytest.mark.root

POD_IP, APP_PORT = "10.250.0.2", 8080
CGROUP_ROOT = "/sys/fs/cgroup/unified"
CLIENT_URI = "spiffe://cluster.local/ns/shop/sa/frontend"
WEB_URI = "spiffe://cluster.local/ns/shop/sa/web"


def manifest(ns: str, extra: str = "") -> str:
    return f"""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}
spec: {{node: node-1, serviceAccount: web, addresses: [{POD_IP}], ports: [{APP_PORT}], netns: /var/run/netns/{ns},
        cgroup: {CGROUP_ROOT}/{ns}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {{name: frontend-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{node: node-2, serviceAccount: frontend, addresses: [10.250.1.2], cgroup: /sys/fs/cgroup/frontend}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{addresses: [10.96.0.10], selector: {{app: web}}, ports: [{{port: 80, targetPort: {APP_PORT}}}]}}
""" + extra


DENY = """---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: shop}
spec:
  selector: {app: web}
  action: DENY
  rules: [{from: [{principals: [cluster.local/ns/shop/sa/frontend]}]}]
"""


@pytest.fixture(params=["iptables", "ebpf"])
def redirect(request):
    return request.param


@pytest.fixture
def pod_netns():
    """A pod: a network namespace and a cgroup of the same name."""
    name = f"nmt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    cgroup = f"{CGROUP_ROOT}/{name}"
    os.mkdir(cgroup)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{POD_IP}/32", "dev", "lo"], check=True)
        # A route for the service range, as a pod's default route would give (the redirect
        # happens after routing in the iptables mode).
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        for dev in ("v0", "v1"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", name, "route", "add", "10.96.0.0/16", "dev", "v0"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        for _ in range(50):   # the cgroup empties once its test clients have exited
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)


class Agent:
    def __init__(self, ctl: Controller, tmp, redirect: str):
        self.ctl, self.tmp, self.redirect = ctl, tmp, redirect
        self.admin, self.metrics, self.ready = free_port(), free_port(), free_port()
        self.proc = None
        self.log = tmp / "agent.log"

    def start(self, token_file=None):
        args = [sys.executable, "-m", "controller.cli", "agent", "run", "--node", "node-1",
                "--controller", f"https://127.0.0.1:{self.ctl.port}", "--state-dir", str(self.tmp / "agent"),
                "--admin", f"127.0.0.1:{self.admin}", "--metrics", f"127.0.0.1:{self.metrics}",
                "--ready", f"127.0.0.1:{self.ready}", "--access-log", str(self.tmp / "access.log"),
                "--ca", str(self.ctl.data / "ca" / "bundle.crt"), "--redirect", self.redirect]
        if token_file:
            args += ["--token", str(token_file)]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=30.0) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{self.ready}/healthz/ready")
                last = r.text
                if r.status_code == 200:
                    return r.text
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not ready: {last}\n{self.log.read_text()}")

    def get(self, path, port=None):
        return httpx.get(f"http://127.0.0.1:{port or self.admin}{path}")

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


@pytest.fixture
def setup(tmp_path, pod_netns, redirect):
    ctl = Controller(tmp_path)
    ctl.init()
    ctl.start()
    (tmp_path / "m.yaml").write_text(manifest(pod_netns))
    nodemesh("apply", "-f", str(tmp_path / "m.yaml"), env=ctl.env)
    token = nodemesh("token", "create", "--node", "node-1", env=ctl.env).stdout.strip()
    (tmp_path / "token").write_text(token)
    agent = Agent(ctl, tmp_path, redirect)
    yield ctl, agent, pod_netns
    for p in (agent.proc, ctl.proc):
        if p and p.poll() is None:
            p.kill()
            p.wait()


def pod_client(netns: str, host: str, port: int, payload: bytes) -> str:
    """A plain client process inside the pod (its cgroup first, then its netns): connect, send, read the echo."""
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); "
            "s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())")
    wrapper = f'echo $$ > {CGROUP_ROOT}/{netns}/cgroup.procs && exec ip netns exec "$@"'
    p = subprocess.run(["sh", "-c", wrapper, "sh", netns, sys.executable, "-c", code, host, str(port),
                        payload.decode()], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def client_context(ctl: Controller, tmp) -> ssl.SSLContext:
    """The peer node's side: a frontend workload certificate from the mesh CA."""
    issuer = pki.load_issuer(ctl.data / "ca" / "ca.crt", ctl.data / "ca" / "ca.key")
    key = pki.generate_key()
    cert = pki.issue(issuer, key.public_key(), now=dt.datetime.now(dt.timezone.utc),
                     ttl=dt.timedelta(hours=1), uris=(CLIENT_URI,))
    pki.write_file(tmp / "fe.crt", pki.cert_pem(cert), secret=False)
    pki.write_file(tmp / "fe.key", pki.key_pem(key), secret=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_cert_chain(tmp / "fe.crt", tmp / "fe.key")
    ctx.load_verify_locations(cafile=str(ctl.data / "ca" / "bundle.crt"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def echo_app(netns, nursery):
    listener = await listen_in(f"/var/run/netns/{netns}", POD_IP, APP_PORT)

    async def handle(s):
        try:
            async for chunk in s:
                await s.send_all(chunk)
        except trio.BrokenResourceError:
            pass
    nursery.start_soon(partial(trio.serve_listeners, handle, [listener]))


async def hbone_round_trip(netns, ctx, data=b"ping"):
    async with open_hbone_pool(connect=lambda h, p: connect_in(f"/var/run/netns/{netns}", h, p, timeout=5)) as pool:
        s = await pool.open(f"{POD_IP}:{APP_PORT}", node_address=(POD_IP, 15008), source_identity=CLIENT_URI,
                            expected_peer={WEB_URI}, ssl_context=ctx, forwarded_for="10.250.1.2")
        await s.send_all(data)
        got = await s.receive_some()
        return s, got


async def test_agent_joins_serves_hbone_enforces_policy_and_restarts_from_disk(setup, tmp_path):
    ctl, agent, netns = setup
    agent.start(token_file=tmp_path / "token")
    assert "serving version 1" in await trio.to_thread.run_sync(agent.wait_ready)

    workloads = agent.get("/workloads").json()
    assert workloads == [{"workload": "shop/web-1", "identity": WEB_URI, "netns": f"/var/run/netns/{netns}",
                          "listeners": [15001, 15006, 15008], "error": ""}]
    status = json.loads(nodemesh("status", "-o", "json", env=ctl.env).stdout)
    (node,) = status["nodes"]
    assert (node["node"], node["version"], node["ready"], node["identities"]) == ("node-1", 1, True, 1)

    ctx = client_context(ctl, tmp_path)
    async with trio.open_nursery() as n:
        await echo_app(netns, n)
        with trio.fail_after(20):
            stream, got = await hbone_round_trip(netns, ctx)
            assert got == b"ping"
            # A DENY policy arrives: the open stream is cut, new ones are refused with 403.
            (tmp_path / "deny.yaml").write_text(DENY)
            await trio.to_thread.run_sync(lambda: nodemesh("apply", "-f", str(tmp_path / "deny.yaml"), env=ctl.env))
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await stream.send_all(b"x")
                    if not await stream.receive_some():
                        raise trio.BrokenResourceError("closed")
            with pytest.raises(ConnectRefused) as e:
                await hbone_round_trip(netns, ctx)
            assert e.value.status == 403
            # An unmodified client in the pod calls the Service VIP: the redirect sends it
            # to the pod's 15001, the proxy picks web-1 (same node: fast path) and delivers it.
            out = await trio.to_thread.run_sync(lambda: pod_client(netns, "10.96.0.10", 80, b"via-vip"))
            assert out == "via-vip"
        n.cancel_scope.cancel()
    report = agent.get("/redirect").json()
    assert report["mode"] == agent.redirect and {f["level"] for f in report["findings"]} == {"ok"}, report
    doctor = nodemesh("check", "--node", "--agent-admin", f"http://127.0.0.1:{agent.admin}",
                      "--agent-ready", f"http://127.0.0.1:{agent.ready}/healthz/ready", env=ctl.env).stdout
    assert f"redirect mode in force: {agent.redirect}" in doctor
    assert "shop/web-1: listeners [15001, 15006, 15008]" in doctor and "FAIL" not in doctor, doctor

    deadline = time.monotonic() + 10   # lines are written as each connection's handler finishes
    while True:
        lines = [json.loads(l) for l in (tmp_path / "access.log").read_text().splitlines()]
        allowed = any(l["decision"]["result"] == "allow" and l["src"]["identity"] == CLIENT_URI for l in lines)
        denied = any(l["decision"]["policy"] == "shop/deny-frontend" and l["decision"]["result"] == "deny"
                     for l in lines)
        if (allowed and denied) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert allowed and denied, lines
    metrics = agent.get("/metrics", agent.metrics).text
    assert re.search(r"nodemesh_policy_denials_total\{[^}]*policy=\"shop/deny-frontend\"", metrics), metrics
    assert "nodemesh_certificate_expiry_timestamp_seconds{identity=\"" + WEB_URI in metrics

    # Controller gone, agent restarted without a token: it serves the last snapshot from disk.
    assert ctl.stop(signal.SIGKILL) != 0
    assert agent.stop() == 0
    agent.start()
    assert "serving version 2" in await trio.to_thread.run_sync(agent.wait_ready)
    async with trio.open_nursery() as n:
        await echo_app(netns, n)
        with trio.fail_after(20), pytest.raises(ConnectRefused):
            await hbone_round_trip(netns, ctx)   # still enforcing the policy it had
        n.cancel_scope.cancel()
    assert agent.stop() == 0
    # Its listeners and its hooks are gone with it.
    rules = subprocess.run(["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"], capture_output=True,
                           text=True, check=True).stdout
    assert "NODEMESH" not in rules
    tree = subprocess.run(["bpftool", "cgroup", "tree", f"{CGROUP_ROOT}/{netns}"], capture_output=True,
                          text=True).stdout
    assert "nm_" not in tree and "connect4" not in tree, tree
    with pytest.raises(OSError):
        await connect_in(f"/var/run/netns/{netns}", POD_IP, 15008, timeout=2)
