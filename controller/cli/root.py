"""root.py: the one ``nodemesh`` entry point.

Subcommands are loaded lazily by "module:attribute" name (click's lazy-group pattern), so the
controller never imports the agent, and ``nodemesh --help`` stays fast.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

# name -> (import path, one-line help shown by `nodemesh --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "apply": ("controller.cli.resources:apply", "Create or update resources from files, folders or stdin."),
    "get": ("controller.cli.resources:get", "List resources or show one."),
    "delete": ("controller.cli.resources:delete", "Delete resources by kind and name, or from files."),
    "controller": ("controller.cli.server:controller", "Initialise and run the controller."),
    "token": ("controller.cli.identity:token", "Create one-time join tokens for nodes."),
    "ca": ("controller.cli.identity:ca", "Manage the mesh CA (rotate the root)."),
    "status": ("controller.cli.identity:status", "Show the controller, its nodes and their certificates."),
    "check": ("controller.cli.check:check", "Check health and warn about certificates close to expiry."),
    "install": ("controller.cli.install:install", "Print what installs nodemesh on hosts (systemd units)."),
    "agent": ("agent.cli:agent", "Run the node agent (proxy, identities, redirection) on this host."),
    "lab": ("agent.lab.cli:lab", "The network-namespace lab on this machine (up, status, exec, down)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=lambda: os.environ.get("NODEMESH_LOG_LEVEL", "info"),
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              show_default="info", help="Log verbosity (env NODEMESH_LOG_LEVEL).")
@click.version_option(package_name="nodemesh")
def cli(log_level: str) -> None:
    """nodemesh: a service mesh with one agent per host.

    Talk to the controller with apply/get/delete; run it with `nodemesh controller`.
    Connection settings come from flags, NODEMESH_* variables, or the config file that
    `nodemesh controller init` writes (~/.config/nodemesh/config.yaml).
    """
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise


def main() -> None:
    cli()
