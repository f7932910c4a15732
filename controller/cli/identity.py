"""identity.py: ``nodemesh token create``, ``nodemesh ca rotate`` and ``nodemesh status``."""
from __future__ import annotations

import datetime as dt

import click

from controller import api
from controller.cli.resources import _call, connection_options, open_client


def parse_iso(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def until(s: str | None, now: dt.datetime | None = None) -> str:
    """'2026-11-23T07:00:00Z (in 23h)' — a timestamp and how far away it is."""
    t = parse_iso(s)
    if t is None:
        return "-"
    secs = int((t - (now or dt.datetime.now(dt.timezone.utc))).total_seconds())
    if secs < 0:
        return f"{s} (EXPIRED)"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{s} (in {secs // size}{unit})"
    return f"{s} (in {secs}s)"


@click.group()
def token() -> None:
    """One-time join tokens: how a new node's agent proves it may join."""


@token.command("create")
@click.option("--node", required=True, help="The node the token is for; the agent gets this node's identity.")
@click.option("--ttl", default="1h", show_default=True, help="How long the token stays valid (e.g. 30m, 1h, 24h).")
@connection_options
def token_create(node, ttl, controller, ca, cert, key, config):
    """Print a one-time join token for NODE (give it to `nodemesh agent run --token FILE`)."""
    try:
        seconds = api.parse_duration(ttl)
    except api.InvalidDuration as e:
        raise click.BadParameter(str(e), param_hint="--ttl") from None
    with open_client(controller, ca, cert, key, config) as c:
        reply = _call(c.create_token, node, seconds)
    click.echo(reply["token"])
    click.echo(f"# one-time token for node {reply['node']}, expires {reply['expires']}", err=True)


@click.group()
def ca() -> None:
    """The mesh certificate authority."""


@ca.command("rotate")
@click.option("--propagation", default="60s", show_default=True,
              help="How long the new root is only trusted before it signs (agents fetch the bundle every 30s).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
def ca_rotate(propagation, yes, controller, ca, cert, key, config):
    """Rotate the mesh root CA without breaking traffic.

    The new root is trusted at once and signs after --propagation; the old root stays trusted
    until the last certificate it signed expires. The controller's server certificate and the
    admin credential are re-issued from the new root when it starts signing.
    """
    try:
        seconds = api.parse_duration(propagation)
    except api.InvalidDuration as e:
        raise click.BadParameter(str(e), param_hint="--propagation") from None
    if not yes:
        click.confirm("Rotate the mesh root CA now?", abort=True)
    with open_client(controller, ca, cert, key, config) as c:
        reply = _call(c.rotate_ca, seconds)
    when = "now" if reply["active"] else f"from {reply['signsFrom']}"
    click.echo(f"new root {reply['root']} is trusted now and signs {when}; old root {reply['retiredRoot']} "
               "stays trusted until the last certificate it signed expires (see nodemesh status)")


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@connection_options
def status(output, controller, ca, cert, key, config):
    """Show the controller, each node's certificates and the nearest expiry."""
    import json
    with open_client(controller, ca, cert, key, config) as c:
        s = _call(c.status)
    if output == "json":
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"controller: {c.settings.controller}  trust domain {s['trustDomain']}  "
               f"resourceVersion {s['resourceVersion']}")
    for cert_ in s["certificates"]:
        click.echo(f"  {cert_['name']:<13} {until(cert_['expires'])}")
    for r in s.get("retiredRoots") or []:
        click.echo(f"  retired root {r['serial']} trusted until {r['trustedUntil']}")
    if s.get("pendingRoot"):
        click.echo(f"  rotation under way: root {s['pendingRoot']['serial']} signs from {s['pendingRoot']['signsFrom']}")
    if not s["nodes"]:
        click.echo("nodes: none has joined yet (nodemesh token create --node NAME)")
        return
    rows = [("NODE", "VERSION", "READY", "NODE-CERT-EXPIRES", "IDENTITIES", "NEAREST-EXPIRY", "LAST-ERROR")]
    for n in s["nodes"]:
        version = "-" if n.get("version") is None else str(n["version"])
        if n.get("version") is not None and n["version"] < int(s["resourceVersion"]):
            version += f" (behind {s['resourceVersion']})"
        ready = {True: "yes", False: "NO", None: "-"}[n.get("ready")]
        rows.append((n["node"], version, ready, until(n["nodeCertificateExpires"]), str(n["identities"]),
                     until(n["nearestExpiry"]), n.get("error") or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    click.echo("\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
