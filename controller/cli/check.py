"""check.py: ``nodemesh check`` — is the controller healthy, and is anything about to expire?

Prints one line per check (ok / WARN / FAIL) and exits 1 on any FAIL (or any WARN with
--strict), so it works in scripts as well as for people. The node half (kernel, redirect mode,
listeners and hooks) is the local agent's: this asks its readiness port and its admin port's
/check over HTTP, and imports nothing of the agent (``nodemesh agent check`` is the preflight
for a node where no agent runs yet).
"""
from __future__ import annotations

import datetime as dt

import click
import httpx

from controller import api, client
from controller.cli.identity import parse_iso, until
from controller.cli.resources import connection_options


def expiry_findings(status: dict, *, now: dt.datetime, window: dt.timedelta,
                    ca_window: dt.timedelta) -> list[tuple[str, str]]:
    """(level, message) for every certificate in ``status`` expiring within its window. Pure."""
    out = []
    for c in status["certificates"]:
        t = parse_iso(c["expires"])
        level = "FAIL" if t <= now else "WARN" if t - now <= ca_window else "ok"
        out.append((level, f"{c['name']} certificate {c['serial']} expires {until(c['expires'], now)}"))
    for n in status["nodes"]:
        t = parse_iso(n["nearestExpiry"])
        if t is None:
            continue
        level = "FAIL" if t <= now else "WARN" if t - now <= window else "ok"
        what = n.get("nearestIdentity") or "node certificate"
        out.append((level, f"node {n['node']}: nearest expiry {what} {until(n['nearestExpiry'], now)}"))
    return out


def node_findings(admin_url: str, ready_url: str, timeout: float = 5.0) -> list[tuple[str, str]]:
    """What the local agent says of this node: its readiness, then its /check findings."""
    try:
        r = httpx.get(ready_url, timeout=timeout)
        out = [("ok" if r.status_code == 200 else "FAIL", f"agent readiness: {r.text.strip()}")]
        found = httpx.get(f"{admin_url.rstrip('/')}/check", timeout=timeout).json()["findings"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        return [("FAIL", f"no agent answers at {admin_url} ({e}); is 'nodemesh agent run' running on this "
                         "node? ('nodemesh agent check' checks the kernel without one)")]
    return out + [(f["level"], f["message"]) for f in found]


@click.command()
@click.option("--expiry-window", default="6h", show_default=True,
              help="Warn when a node or workload certificate expires within this long "
                   "(they are renewed at half life, so a healthy 24h certificate never gets this close).")
@click.option("--ca-expiry-window", default="720h", show_default=True,
              help="Warn when the CA, the controller's or the admin certificate expires within this long.")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
@click.option("--node/--no-node", "on_node", default=None,
              help="Also check this machine as a node: kernel features, the local agent, each workload's "
                   "redirect hooks [default: when an agent answers on --agent-admin].")
@click.option("--agent-admin", default="http://127.0.0.1:15000", show_default=True, help="The local agent's admin URL.")
@click.option("--agent-ready", default="http://127.0.0.1:15021/healthz/ready", show_default=True,
              help="The local agent's readiness URL.")
@click.option("--no-controller", is_flag=True, help="Skip the controller checks (on a node without admin credentials).")
@connection_options
def check(expiry_window, ca_expiry_window, strict, on_node, agent_admin, agent_ready, no_controller,
          controller, ca, cert, key, config):
    """Check the controller, certificate expiry and (on a node) the kernel, the agent and its
    redirect hooks — the doctor. Exit 1 on failure."""
    try:
        window, ca_window = (dt.timedelta(seconds=api.parse_duration(v)) for v in (expiry_window, ca_expiry_window))
    except api.InvalidDuration as e:
        raise click.BadParameter(str(e)) from None
    findings: list[tuple[str, str]] = []
    if not no_controller:
        try:
            c = client.Client(client.resolve_settings(controller, ca, cert, key, config))
            with c:
                s = c.status()
            findings.append(("ok", f"controller {c.settings.controller} answers (resourceVersion {s['resourceVersion']})"))
            findings += expiry_findings(s, now=dt.datetime.now(dt.timezone.utc), window=window, ca_window=ca_window)
        except client.ClientError as e:
            findings.append(("FAIL", str(e)))
    if on_node is not False:
        node = node_findings(agent_admin, agent_ready)
        if on_node or not (len(node) == 1 and node[0][0] == "FAIL"):
            findings += node
    for level, message in findings:
        click.echo(f"{level:<4}  {message}")
    levels = {lvl for lvl, _ in findings}
    if "FAIL" in levels or (strict and "WARN" in levels):
        raise SystemExit(1)
