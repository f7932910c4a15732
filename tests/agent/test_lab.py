"""`nodemesh lab up|status|down` as a user runs it: real processes, nothing left behind."""
from __future__ import annotations

import os
import subprocess
import sys

from agent.lab import procs
from tests.controller.conftest import free_port


def lab(*args, run, check=True):
    p = subprocess.run([sys.executable, "-m", "controller.cli", "lab", *args, "--dir", str(run)],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_lab_up_status_down(tmp_path):
    run = tmp_path / "lab"
    ports = ["--api-port", str(free_port()), "--metrics-port", str(free_port())]
    try:
        out = lab("up", *ports, run=run).stdout
        assert "service shop/web created" in out and "NODEMESH_CONFIG=" in out
        pid = procs.pid_of(run, "controller")
        assert pid is not None

        again = lab("up", *ports, run=run).stdout  # idempotent: same controller, nothing changed
        assert procs.pid_of(run, "controller") == pid
        assert "service shop/web unchanged" in again

        status = lab("status", run=run).stdout
        assert f"running, pid {pid}" in status and "web-1" in status and "node-1" in status
    finally:
        down = lab("down", run=run)
    assert "stopped controller" in down.stdout
    assert not run.exists()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert lab("down", run=run).returncode == 0  # twice is fine
    assert lab("status", run=run, check=False).returncode == 1
