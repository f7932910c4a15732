"""cli.py: ``nodemesh agent run|check`` — thin click shells over agent/app.py and the doctor."""
from __future__ import annotations

import os
from pathlib import Path

import click
import trio

from agent import app
from agent.base import limits
from agent.sync import join
from agent.sync.client import ControlPlaneError
from agent.redirect.base import RedirectError


def _one_malloc_arena() -> None:
    """Ask glibc for a single malloc arena (M_ARENA_MAX = 1), before any thread exists.

    By default each thread that mallocs gets its own arena (up to 8 per core), and the pages it
    touches stay resident; the agent's few worker threads (listen_in, redirect checks) are
    never on the data path, so sharing the main arena costs nothing and saves ~0.8 MB of the
    idle agent. ``MALLOC_ARENA_MAX`` in the environment still wins. No-op off glibc.
    """
    import ctypes   # loaded by trio anyway; here only to reach mallopt
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(-8, 1)   # M_ARENA_MAX, from glibc's <malloc.h>
    except (OSError, AttributeError):
        pass


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    try:
        return (host.strip("[]") or "0.0.0.0"), int(port)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}") from None


@click.group()
def agent() -> None:
    """The node agent: one per host."""


@agent.command()
@click.option("--node", required=True, envvar="NODEMESH_NODE", help="This node's name (env NODEMESH_NODE).")
@click.option("--controller", required=True, envvar="NODEMESH_CONTROLLER", metavar="URL",
              help="Controller API, e.g. https://10.0.0.1:15012 (env NODEMESH_CONTROLLER).")
@click.option("--token", "token_file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a one-time join token (nodemesh token create); needed on first start only.")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path), envvar="NODEMESH_CA",
              help="Trust bundle to verify the controller (its ca/bundle.crt); needed on first start only.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/var/lib/nodemesh/agent"), show_default=True,
              help="Node and workload certificates, the last good snapshot.")
@click.option("--admin", default="127.0.0.1:15000", show_default=True, help="Admin endpoint (/config_dump, /certs, /workloads, /logging).")
@click.option("--metrics", default="0.0.0.0:15020", show_default=True, help="Prometheus /metrics.")
@click.option("--ready", default="0.0.0.0:15021", show_default=True, help="/healthz/ready.")
@click.option("--passthrough/--no-passthrough", default=True, show_default=True,
              help="Let connections to destinations outside the mesh through unchanged.")
@click.option("--connect-timeout", default=5.0, show_default=True, help="Seconds to reach an endpoint, retries included.")
@click.option("--redirect", type=click.Choice(["ebpf", "iptables", "auto", "none"]), default="auto", show_default=True,
              help="How workloads' traffic reaches the proxy: eBPF cgroup hooks, iptables rules in each pod "
                   "netns, the best the kernel allows, or none (something else redirects).")
@click.option("--access-log", default=None, metavar="PATH|off", help="JSON access log destination [default: stdout].")
def run(node, controller, token_file, ca_file, state_dir, admin, metrics, ready, passthrough, connect_timeout, redirect, access_log):
    """Join the mesh and serve this node's workloads until SIGTERM."""
    cfg = app.AgentConfig(node=node, controller=controller, ca_file=ca_file, token_file=token_file,
                          state_dir=state_dir, admin=_addr(admin), metrics=_addr(metrics), ready=_addr(ready),
                          passthrough=passthrough, connect_timeout=connect_timeout, access_log=access_log,
                          redirect=redirect)
    _one_malloc_arena()
    limits.raise_nofile()
    try:
        trio.run(app.run, cfg)
    except join.JoinError as e:
        raise click.ClickException(str(e)) from None
    except (ControlPlaneError, RedirectError) as e:
        raise click.ClickException(f"cannot start: {e}") from None


@agent.command()
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
def check(strict):
    """Preflight this machine for the agent: cgroup v2, bpffs, kernel headers for bcc, iptables.
    Works without a running agent; `nodemesh check --node` adds what a running agent serves.
    Exit 1 on failure."""
    from agent.observe.doctor import kernel_findings
    found = kernel_findings()
    for level, message in found:
        click.echo(f"{level:<4}  {message}")
    levels = {lvl for lvl, _ in found}
    if "FAIL" in levels or (strict and "WARN" in levels):
        raise SystemExit(1)
