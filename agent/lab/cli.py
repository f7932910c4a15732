"""cli.py: ``nodemesh lab up|down|status`` — the mesh lab on one machine.

Runs the controller as a real process with its logs under the lab's run dir, applies the demo
mesh, and prints how to use it. Talks to the controller only through the ``nodemesh`` command
(real processes), so the lab exercises exactly what users run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import click

from agent.lab import procs

DEFAULT_RUN = Path(os.environ.get("NODEMESH_LAB_DIR", "/run/nodemesh-lab"))
NODEMESH = [sys.executable, "-m", "controller.cli"]


def _nodemesh(*args: str, run: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "NODEMESH_CONFIG": str(run / "config.yaml")}
    p = subprocess.run([*NODEMESH, *args], env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise click.ClickException(f"'nodemesh {' '.join(args)}' failed:\n{p.stderr.strip() or p.stdout.strip()}")
    return p


run_option = click.option("--dir", "run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
                          show_default=True, help="The lab's run dir: state, logs, pid files (env NODEMESH_LAB_DIR).")


@click.group()
def lab() -> None:
    """The network-namespace lab: a whole mesh on this machine."""


@lab.command()
@run_option
@click.option("--api-port", default=15012, show_default=True, help="Controller API port (on 127.0.0.1).")
@click.option("--metrics-port", default=15014, show_default=True, help="Controller metrics port (on 127.0.0.1).")
def up(run: Path, api_port: int, metrics_port: int) -> None:
    """Start the lab: controller, demo resources. Idempotent: a running lab is kept."""
    run.mkdir(parents=True, exist_ok=True)
    data = run / "controller"
    step = _Progress()
    step("initialising the controller")
    _nodemesh("controller", "init", "--data-dir", str(data), "--write-config", str(run / "config.yaml"),
              "--controller-url", f"https://127.0.0.1:{api_port}", run=run)
    if procs.pid_of(run, "controller") is None:
        step("starting the controller")
        procs.start(run, "controller", [*NODEMESH, "controller", "run", "--data-dir", str(data),
                                        "--listen", f"127.0.0.1:{api_port}",
                                        "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    step("waiting for the controller")
    _wait_ready(run)
    step("applying the demo mesh")
    demo = resources.files("agent.lab") / "demo"
    with resources.as_file(demo) as path:
        out = _nodemesh("apply", "-f", str(path), run=run).stdout
    step.done()
    click.echo(out, nl=False)
    nm = shutil.which("nodemesh") or f"{Path(sys.executable).parent}/nodemesh"
    click.echo(f"""
The lab is up (run dir {run}).
  controller  https://127.0.0.1:{api_port}   metrics http://127.0.0.1:{metrics_port}/metrics
  logs        {run}/logs/

Try:
  export NODEMESH_CONFIG={run}/config.yaml
  {nm} get workloads -A -o wide
  {nm} get services -n shop
  {nm} get ap -n shop -o yaml
  sudo scripts/lab down        # remove everything the lab made
""")


@lab.command()
@run_option
def down(run: Path) -> None:
    """Stop every lab process and remove the run dir. Safe to run twice, or after a crash."""
    stopped = [name for name in procs.names(run) if procs.stop(run, name)]
    if run.exists():
        shutil.rmtree(run)
    click.echo(f"lab down: stopped {', '.join(stopped) or 'nothing'}; removed {run}")


@lab.command()
@run_option
def status(run: Path) -> None:
    """Show the lab's processes and what the controller holds."""
    if not run.exists():
        click.echo(f"no lab at {run} (start one with: sudo scripts/lab up)")
        raise SystemExit(1)
    for name in procs.names(run):
        pid = procs.pid_of(run, name)
        click.echo(f"{name:<12} {'running, pid ' + str(pid) if pid else 'NOT RUNNING'}   log {run}/logs/{name}.log")
    p = _nodemesh("get", "workloads", "-A", "-o", "wide", run=run, check=False)
    click.echo(p.stdout or p.stderr, nl=False)
    if p.returncode:
        raise SystemExit(1)


def _wait_ready(run: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        p = _nodemesh("get", "mesh", run=run, check=False)
        if p.returncode == 0:
            return
        if procs.pid_of(run, "controller") is None:
            log = (run / "logs" / "controller.log").read_text()[-2000:]
            raise click.ClickException(f"the controller exited; last lines of {run}/logs/controller.log:\n{log}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"the controller did not answer within {timeout:.0f}s: {p.stderr.strip()}")
        time.sleep(0.2)


class _Progress:
    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, what: str) -> None:
        click.echo(f"[lab {time.monotonic() - self.t0:5.1f}s] {what}", err=True)

    def done(self) -> None:
        self(f"ready")
