"""The real `nodemesh` command: controller init/run as a process, apply/get/delete through the CLI."""
from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.controller.conftest import free_port

MANIFEST = """\
apiVersion: nodemesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: cluster.local, mtls: STRICT}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  addresses: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
"""


def nodemesh(*args, env, stdin=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "controller.cli", *args], env=env, input=stdin,
                       capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"nodemesh {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class Controller:
    def __init__(self, tmp: Path):
        self.data = tmp / "data"
        self.port, self.mport = free_port(), free_port()
        self.env = {**os.environ, "NODEMESH_CONFIG": str(tmp / "config.yaml")}
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "controller.log"

    def init(self):
        return nodemesh("controller", "init", "--data-dir", str(self.data),
                        "--controller-url", f"https://127.0.0.1:{self.port}", env=self.env)

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "controller", "run", "--data-dir", str(self.data),
             "--listen", f"127.0.0.1:{self.port}", "--metrics-listen", f"127.0.0.1:{self.mport}"],
            env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                httpx.get(f"https://127.0.0.1:{self.port}/healthz", verify=ssl.create_default_context(cafile=str(self.data / "ca" / "bundle.crt")))
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("controller did not come up:\n" + self.log.read_text())

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)


@pytest.fixture
def ctl(tmp_path):
    c = Controller(tmp_path)
    c.init()
    yield c
    if c.proc and c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait()


def test_state_survives_restart_and_kill_9(ctl, tmp_path):
    ctl.start()
    (tmp_path / "m.yaml").write_text(MANIFEST)
    out = nodemesh("apply", "-f", str(tmp_path / "m.yaml"), env=ctl.env).stdout
    assert out.splitlines() == ["mesh default created", "service shop/web created"]

    assert ctl.stop(signal.SIGTERM) == 0  # clean shutdown on SIGTERM
    ctl.start()
    table = nodemesh("get", "svc", "-n", "shop", env=ctl.env).stdout
    assert table.splitlines()[0].split() == ["NAME", "ADDRESSES", "PORTS", "AGE"]
    assert table.splitlines()[1].split()[:3] == ["web", "10.96.0.10", "80/http"]

    # A write acknowledged to the client is on disk even if the process dies right after.
    nodemesh("apply", "-f", "-", env=ctl.env, stdin=MANIFEST.replace("10.96.0.10", "10.96.0.77"))
    ctl.stop(signal.SIGKILL)
    ctl.start()
    yaml_out = nodemesh("get", "service", "web", "-n", "shop", "-o", "yaml", env=ctl.env).stdout
    assert "10.96.0.77" in yaml_out
    assert re.search(r"resourceVersion: ['\"]?2['\"]?$", yaml_out, re.M), yaml_out


def test_invalid_file_prints_where_and_changes_nothing(ctl, tmp_path):
    ctl.start()
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.replace("protocol: http}", "protocol: htp}"))
    p = nodemesh("apply", "-f", str(bad), env=ctl.env, check=False)
    assert p.returncode == 1
    assert f"{bad}: document 2: Service shop/web: spec.ports[0].protocol: must be one of tcp, http, http2, got 'htp'" in p.stderr
    p = nodemesh("get", "svc", "-A", env=ctl.env)
    assert "web" not in p.stdout


def test_delete_by_name_and_by_file(ctl, tmp_path):
    ctl.start()
    f = tmp_path / "m.yaml"
    f.write_text(MANIFEST)
    nodemesh("apply", "-f", str(f), env=ctl.env)
    assert nodemesh("delete", "svc", "web", "-n", "shop", env=ctl.env).stdout.strip() == "service shop/web deleted"
    p = nodemesh("delete", "svc", "web", "-n", "shop", env=ctl.env, check=False)
    assert p.returncode == 1 and "not found" in p.stderr
    nodemesh("apply", "-f", str(f), env=ctl.env)
    out = nodemesh("delete", "-f", str(f), env=ctl.env).stdout
    assert sorted(out.splitlines()) == ["mesh default deleted", "service shop/web deleted"]


def test_unreachable_controller_names_the_address(ctl):
    # Initialised but not running.
    p = nodemesh("get", "svc", env=ctl.env, check=False)
    assert p.returncode == 1
    assert f"cannot reach the controller at https://127.0.0.1:{ctl.port}" in p.stderr


def test_init_twice_changes_nothing(ctl):
    key_before = (ctl.data / "ca" / "ca.key").read_bytes()
    out = ctl.init().stdout
    assert "already initialised" in out
    assert (ctl.data / "ca" / "ca.key").read_bytes() == key_before
    assert oct((ctl.data / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_help_lists_every_command():
    out = nodemesh("--help", env=os.environ).stdout
    for cmd in ("apply", "get", "delete", "controller", "lab"):
        assert cmd in out
