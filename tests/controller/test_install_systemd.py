"""`nodemesh install systemd`: the units it prints pass `systemd-analyze verify`, and the
controller speaks the notify protocol those units rely on (Type=notify, WatchdogSec) to a real
NOTIFY_SOCKET.

systemd-analyze exits 0 even when it finds errors and prints them on stderr (KERNEL-NOTES), so
a unit passes only when it prints nothing at all.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.controller.test_controller_process import Controller, nodemesh
from tests.notify_socket import NotifySocket

UNITS = {"controller": "nodemesh-controller.service", "agent": "nodemesh-agent.service"}


def verify(unit_dir: Path, *names: str) -> str:
    """Everything `systemd-analyze verify` says about the units (empty: they are fine)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (apt-get install systemd; scripts/setup.sh does)")
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=unit_dir,
                       capture_output=True, text=True, timeout=60)
    return (p.stdout + p.stderr).strip()


@pytest.fixture
def prefix(tmp_path) -> Path:
    """An install prefix whose ExecStart binary exists (systemd-analyze checks it)."""
    stub = tmp_path / "opt" / "venv" / "bin" / "nodemesh"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return tmp_path / "opt"


def render(unit: str, *args: str) -> str:
    return nodemesh("install", "systemd", unit, *args, env=os.environ).stdout


@pytest.mark.parametrize("dirs", [[], ["--state-dir", "/srv/nodemesh/agent", "--data-dir", "/srv/nodemesh/ctl"]],
                         ids=["default-dirs", "dirs-outside-var-lib"])
def test_printed_units_pass_systemd_analyze_verify(tmp_path, prefix, dirs):
    args = ["--prefix", str(prefix), "--node", "node-1", "--controller", "https://10.0.0.1:15012",
            "--redirect", "iptables", *dirs]
    for unit, name in UNITS.items():
        (tmp_path / name).write_text(render(unit, *args))
    assert verify(tmp_path, *UNITS.values()) == ""

    agent = (tmp_path / UNITS["agent"]).read_text()
    assert (f"ExecStart={prefix}/venv/bin/nodemesh agent run --node node-1 --controller https://10.0.0.1:15012 "
            "--token /etc/nodemesh/agent/token --ca /etc/nodemesh/agent/ca.crt") in agent
    for line in ("Type=notify", "WatchdogSec=30s", "Restart=on-failure", "ProtectSystem=strict", "ProtectHome=yes",
                 "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN CAP_BPF "
                 "CAP_PERFMON CAP_NET_BIND_SERVICE"):
        assert f"\n{line}\n" in agent, line
    controller = (tmp_path / UNITS["controller"]).read_text()
    assert "\nCapabilityBoundingSet=\n" in controller and "\nType=notify\n" in controller
    if dirs:
        assert "\nReadWritePaths=/srv/nodemesh/agent\n" in agent and "StateDirectory=" not in agent
        assert "\nReadWritePaths=/srv/nodemesh/ctl\n" in controller
    else:
        assert "\nStateDirectory=nodemesh/agent\n" in agent
        assert "\nStateDirectory=nodemesh/controller\n" in controller


def test_a_broken_unit_is_caught(tmp_path, prefix):
    """The check above would catch a mistake: systemd-analyze does speak up here."""
    text = render("agent", "--prefix", str(prefix)).replace("Type=notify", "Type=notfy")
    (tmp_path / "nodemesh-agent.service").write_text(text)
    assert "Failed to parse service type" in verify(tmp_path, "nodemesh-agent.service")


def test_all_prints_both_units_and_refuses_what_execstart_cannot_hold():
    both = nodemesh("install", "systemd", env=os.environ).stdout
    assert both.startswith("# nodemesh-controller.service:")
    assert "\n# nodemesh-agent.service:" in both
    assert f"--node {socket.gethostname()} " in both

    p = nodemesh("install", "systemd", "agent", "--node", "my node", env=os.environ, check=False)
    assert p.returncode == 2 and "cannot stand in a unit's ExecStart= line" in p.stderr
    p = nodemesh("install", "systemd", "--prefix", "opt/nodemesh", env=os.environ, check=False)
    assert p.returncode == 2 and "is not an absolute path" in p.stderr


def not_before(t_notified: float, attempts: list[tuple[float, bool]]) -> list[float]:
    """The attempts that failed although they started after the notification (should be none)."""
    return [t for t, ok in attempts if not ok and t >= t_notified]


def test_controller_notifies_ready_when_the_api_listens_and_stopping_on_sigterm(tmp_path):
    ctl = Controller(tmp_path)
    ctl.init()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="nm-") as short:   # sun_path is 108 bytes
        notify = NotifySocket(f"{short}/notify")
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "controller", "run", "--data-dir", str(ctl.data),
             "--listen", f"127.0.0.1:{ctl.port}", "--metrics-listen", f"127.0.0.1:{ctl.mport}"],
            env={**ctl.env, **notify.env(watchdog_usec=200_000)}, stdout=open(ctl.log, "ab"),
            stderr=subprocess.STDOUT)
        try:
            attempts = []                      # (when, could the API be reached)
            deadline = time.monotonic() + 20
            while not notify.arrivals("READY=1") and time.monotonic() < deadline:
                assert proc.poll() is None, ctl.log.read_text()
                t = time.monotonic()
                try:
                    socket.create_connection(("127.0.0.1", ctl.port), timeout=1).close()
                    attempts.append((t, True))
                except OSError:
                    attempts.append((t, False))
                time.sleep(0.01)
            t_ready = notify.wait_for("READY=1", timeout=1)
            # The API accepts connections from the moment READY=1 is sent, never only later.
            assert not_before(t_ready, attempts) == []
            socket.create_connection(("127.0.0.1", ctl.port), timeout=1).close()
            assert nodemesh("get", "svc", "-A", env=ctl.env).returncode == 0
            assert any(s.startswith("STATUS=serving resourceVersion") for s in notify.lines("STATUS="))

            # WATCHDOG_USEC=0.2 s: a ping every 0.1 s while the loop runs.
            first = notify.wait_for("WATCHDOG=1")
            notify.wait_for("WATCHDOG=1", count=len(notify.arrivals("WATCHDOG=1")) + 4, timeout=5)
            assert len(notify.arrivals("WATCHDOG=1")) >= 5 and notify.arrivals("WATCHDOG=1")[-1] - first < 5

            assert "STOPPING=1" not in notify.lines("STOPPING=")
            proc.send_signal(signal.SIGTERM)
            t_stopping = notify.wait_for("STOPPING=1", timeout=10)
            assert proc.wait(timeout=10) == 0
            assert t_stopping > t_ready
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()

