"""`nodemesh agent run` under a real NOTIFY_SOCKET, as nodemesh-agent.service (Type=notify,
WatchdogSec) runs it: READY=1 only once the agent is really ready (the check behind
/healthz/ready), STATUS= naming what it waits for until then, WATCHDOG=1 while it runs,
STOPPING=1 on SIGTERM. Root: the workload's listeners live in a real network namespace.

The pod's namespace appears only after the agent has started, so for a while the agent is up
but not ready (its listeners cannot open): READY=1 must wait for it.
"""
from __future__ import annotations

import signal
import subprocess
import time
import uuid

import httpx
import pytest

from tests.agent.test_agent_process import Agent
from tests.controller.test_controller_process import Controller, nodemesh
from tests.notify_socket import NotifySocket

pytestmark = pytest.mark.root


def manifest(ns: str) -> str:
    return f"""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}
spec: {{node: node-1, serviceAccount: web, addresses: [10.250.0.2], ports: [8080], netns: /var/run/netns/{ns}}}
"""


def ready_answer(agent: Agent) -> tuple[float, bool, str]:
    t = time.monotonic()
    try:
        r = httpx.get(f"http://127.0.0.1:{agent.ready}/healthz/ready", timeout=2)
        return t, r.status_code == 200, r.text
    except httpx.TransportError as e:
        return t, False, str(e)


def test_ready_only_when_really_ready_then_watchdog_and_stopping(tmp_path, monkeypatch):
    ns = f"nmt-{uuid.uuid4().hex[:8]}"
    ctl = Controller(tmp_path)
    ctl.init()
    ctl.start()
    notify = NotifySocket(f"@nodemesh-test-{uuid.uuid4().hex}")     # the abstract namespace
    agent = Agent(ctl, tmp_path, "none")
    try:
        (tmp_path / "m.yaml").write_text(manifest(ns))
        nodemesh("apply", "-f", str(tmp_path / "m.yaml"), env=ctl.env)
        (tmp_path / "token").write_text(nodemesh("token", "create", "--node", "node-1", env=ctl.env).stdout)
        for name, value in notify.env(watchdog_usec=300_000).items():   # what systemd sets
            monkeypatch.setenv(name, value)
        agent.start(tmp_path / "token")

        # Up, serving /healthz/ready, but not ready: the pod's namespace does not exist yet.
        answers = []
        deadline = time.monotonic() + 30
        while not any("listeners not open" in s for s in notify.lines("STATUS=")):
            assert time.monotonic() < deadline, (notify.messages, agent.log.read_text())
            assert agent.proc.poll() is None, agent.log.read_text()
            answers.append(ready_answer(agent))
            time.sleep(0.05)
        for _ in range(20):                                  # a second of "not ready"
            answers.append(ready_answer(agent))
            time.sleep(0.05)
        assert not notify.arrivals("READY=1"), notify.messages
        assert not any(ok for _, ok, _ in answers), answers
        assert "listeners not open" in answers[-1][2]

        subprocess.run(["ip", "netns", "add", ns], check=True)
        while not notify.arrivals("READY=1"):
            assert time.monotonic() < deadline + 30, (notify.messages, agent.log.read_text())
            answers.append(ready_answer(agent))
            time.sleep(0.02)
        t_ready = notify.arrivals("READY=1")[0]
        # Every "not ready" answer was asked for before READY=1 was sent, and from then on the
        # agent answers ready: READY=1 follows the readiness check, it does not precede it.
        assert [t for t, ok, _ in answers if not ok and t >= t_ready] == []
        assert ready_answer(agent)[1]
        assert notify.lines("STATUS=ready: serving version"), notify.lines("STATUS=")
        assert len(notify.arrivals("READY=1")) == 1

        # WATCHDOG_USEC=0.3 s: a ping every 0.15 s while the event loop runs.
        count = len(notify.arrivals("WATCHDOG=1"))
        notify.wait_for("WATCHDOG=1", count=count + 5, timeout=5)

        assert agent.stop(signal.SIGTERM) == 0
        t_stopping = notify.wait_for("STOPPING=1", timeout=1)
        assert t_stopping > t_ready
    finally:
        for p in (agent.proc, ctl.proc):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        notify.close()
