"""install.py: ``nodemesh install systemd`` — print the systemd units, as ``linkerd install`` does.

The unit text lives once, in the packaged templates ``controller/install/*.service.in``;
scripts/install-controller and scripts/install-node write what this prints. Rendering only:
nothing here touches the machine.
"""
from __future__ import annotations

import re
import socket
from importlib import resources
from pathlib import PurePosixPath

import click

UNITS = {"controller": "nodemesh-controller.service", "agent": "nodemesh-agent.service"}
STATE_ROOT = PurePosixPath("/var/lib")      # StateDirectory= is relative to it

# What may stand unquoted in an ExecStart= line: no spaces, quotes, "%" or "$" (which systemd
# would expand), nothing that needs escaping.
_SAFE = re.compile(r"[A-Za-z0-9_./:@+,=\[\]-]+")


def template(unit: str) -> str:
    return (resources.files("controller") / "install" / f"{UNITS[unit]}.in").read_text()


def render(unit: str, values: dict[str, str]) -> str:
    """The text of ``unit`` ("controller" or "agent") with every ``@NAME@`` replaced; a name
    with no value is a KeyError (a template and this module out of step)."""
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], template(unit))


def _state_setting(directory: PurePosixPath) -> str:
    """``StateDirectory=`` for a directory under /var/lib (systemd makes it), else the
    directory made writable under ``ProtectSystem=strict``."""
    if directory.is_relative_to(STATE_ROOT) and directory != STATE_ROOT:
        return f"StateDirectory={directory.relative_to(STATE_ROOT)}"
    return f"ReadWritePaths={directory}"


def _word(ctx, param, value):
    text = str(value)
    if not _SAFE.fullmatch(text):
        raise click.BadParameter(f"{text!r} cannot stand in a unit's ExecStart= line "
                                 "(no spaces, quotes, % or $)")
    return value


def _absolute(ctx, param, value):
    path = PurePosixPath(_word(ctx, param, value))
    if not path.is_absolute():
        raise click.BadParameter(f"{value} is not an absolute path")
    return path


@click.group()
def install() -> None:
    """Print what installs nodemesh: systemd units (kubernetes manifests to come)."""


@install.command()
@click.argument("unit", type=click.Choice(["all", *UNITS]), default="all")
@click.option("--prefix", default="/opt/nodemesh", show_default=True, callback=_absolute,
              help="Where the installers put nodemesh (ExecStart= runs PREFIX/venv/bin/nodemesh).")
@click.option("--node", default=socket.gethostname, show_default="this host's name", callback=_word,
              help="The agent's node name.")
@click.option("--controller", default="https://127.0.0.1:15012", show_default=True, metavar="URL",
              callback=_word, help="The controller the agent joins and follows.")
@click.option("--redirect", type=click.Choice(["ebpf", "iptables", "auto", "none"]), default="auto",
              show_default=True, help="The agent's redirect mode.")
@click.option("--config-dir", default="/etc/nodemesh", show_default=True, callback=_absolute,
              help="Where the agent's join token (agent/token) and controller CA (agent/ca.crt) are.")
@click.option("--state-dir", default="/var/lib/nodemesh/agent", show_default=True, callback=_absolute,
              help="The agent's state dir (certificates, last good snapshot).")
@click.option("--data-dir", default="/var/lib/nodemesh/controller", show_default=True, callback=_absolute,
              help="The controller's data dir (store, CA).")
def systemd(unit, prefix, node, controller, redirect, config_dir, state_dir, data_dir):
    """Print nodemesh-controller.service and nodemesh-agent.service (or the one UNIT named).

    Type=notify units with a watchdog, Restart=on-failure, journal logging and hardening; the
    agent keeps only the capabilities eBPF, netlink and setns need. Write them with, e.g.,
    `nodemesh install systemd agent --node n1 --controller https://10.0.0.1:15012
    > /etc/systemd/system/nodemesh-agent.service` (scripts/install-node does this).
    """
    values = {
        "PREFIX": str(prefix), "DATA_DIR": str(data_dir), "DATA_DIR_SETTING": _state_setting(data_dir),
        "NODE": node, "CONTROLLER": controller, "REDIRECT": redirect,
        "TOKEN": str(config_dir / "agent" / "token"), "CA": str(config_dir / "agent" / "ca.crt"),
        "STATE_DIR": str(state_dir), "STATE_DIR_SETTING": _state_setting(state_dir),
    }
    names = list(UNITS) if unit == "all" else [unit]
    click.echo("\n".join(render(name, values) for name in names), nl=False)
