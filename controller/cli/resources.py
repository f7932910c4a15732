"""resources.py: ``nodemesh apply|get|delete`` — read manifests, call the API, print results.

Manifests are validated here first (so errors name the file), and again by the controller,
which is the authority. Printing is kubectl-like.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from controller import api, client

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def connection_options(f):
    """The flags every command that talks to the controller takes."""
    for option in reversed([
        click.option("--controller", metavar="URL", help="Controller API URL (env NODEMESH_CONTROLLER)."),
        click.option("--ca", metavar="FILE", help="CA certificate to verify the controller (env NODEMESH_CA)."),
        click.option("--cert", metavar="FILE", help="Client certificate (env NODEMESH_CERT)."),
        click.option("--key", metavar="FILE", help="Client key (env NODEMESH_KEY)."),
        click.option("--config", metavar="FILE",
                     help="Client config file (env NODEMESH_CONFIG; default ~/.config/nodemesh/config.yaml)."),
    ]):
        f = option(f)
    return f


def open_client(controller, ca, cert, key, config) -> client.Client:
    try:
        return client.Client(client.resolve_settings(controller, ca, cert, key, config))
    except client.ClientError as e:
        raise click.ClickException(str(e)) from None


def read_manifests(paths: tuple[str, ...], recursive: bool, default_namespace: str) -> list[api.Resource]:
    """Parse every file named (folders expanded, '-' is stdin); all problems reported at once."""
    resources: list[api.Resource] = []
    problems: list[str] = []
    for source, text in _sources(paths, recursive):
        try:
            resources += api.parse_manifests(text, source=source, default_namespace=default_namespace)
        except api.ManifestError as e:
            problems.append(str(e))
    if problems:
        raise click.ClickException("invalid manifests, nothing was applied:\n" + "\n".join(problems))
    if not resources:
        raise click.ClickException(f"no resources found in {', '.join(paths)}")
    return resources


def _sources(paths, recursive):
    for p in paths:
        if p == "-":
            yield "<stdin>", sys.stdin.read()
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in (path.rglob("*") if recursive else path.iterdir())
                           if f.is_file() and f.suffix in MANIFEST_SUFFIXES)
        elif path.exists():
            files = [path]
        else:
            raise click.ClickException(f"{p}: no such file or directory")
        for f in files:
            try:
                yield str(f), f.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise click.ClickException(f"{f}: cannot read: {e}") from None


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except client.ClientError as e:
        raise click.ClickException(str(e)) from None


def _label(result: dict) -> str:
    kind = result["kind"].lower()
    ns = result.get("namespace")
    return f"{kind} {ns}/{result['name']}" if ns else f"{kind} {result['name']}"


@click.command()
@click.option("-f", "--filename", "paths", multiple=True, required=True, metavar="PATH",
              help="A file, a folder of .yaml/.yml/.json files, or - for stdin (repeatable).")
@click.option("-R", "--recursive", is_flag=True, help="Descend into sub-folders of folders given with -f.")
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Namespace for documents that do not name one.")
@click.option("--dry-run", is_flag=True, help="Validate on the controller without changing anything.")
@connection_options
def apply(paths, recursive, namespace, dry_run, controller, ca, cert, key, config):
    """Create or update resources; the whole batch is applied in one transaction or not at all.

    \b
    nodemesh apply -f mesh.yaml -f services/
    cat policy.yaml | nodemesh apply -f -
    """
    resources = read_manifests(paths, recursive, namespace)
    with open_client(controller, ca, cert, key, config) as c:
        try:
            reply = c.apply([api.to_dict(r) for r in resources], dry_run=dry_run)
        except client.ApiStatusError as e:
            raise click.ClickException(f"the controller refused the batch, nothing was applied:\n{e}") from None
        except client.ClientError as e:
            raise click.ClickException(str(e)) from None
    for r in reply["results"]:
        click.echo(f"{_label(r)} {r['action']}{' (dry run)' if dry_run else ''}")


@click.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace to look in.")
@click.option("-A", "--all-namespaces", is_flag=True, help="List across every namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "yaml", "json"]), default="table",
              show_default=True, help="Output format.")
@connection_options
def get(kind, name, namespace, all_namespaces, output, controller, ca, cert, key, config):
    """List resources of KIND, or show the one called NAME.

    KIND is a kind, plural or short name: mesh, workloads (wl), services (svc),
    authorizationpolicies (ap).
    """
    try:
        info = api.resolve_kind(kind)
    except api.UnknownKind as e:
        raise click.ClickException(str(e)) from None
    ns = None if (all_namespaces or not info.namespaced) else namespace
    with open_client(controller, ca, cert, key, config) as c:
        if name:
            items = [_call(c.get, info.plural, name, ns if info.namespaced else None)]
        else:
            items = _call(c.list, info.plural, ns)["items"]
    if output == "json":
        click.echo(json.dumps(items[0] if name else {"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
    elif output == "yaml":
        click.echo(api.dump_yaml([api.from_dict(o) for o in items]), nl=False)
    elif not items:
        click.echo(f"No {info.plural} found" + (f" in namespace {ns}." if ns else "."), err=True)
    else:
        click.echo(render_table(info, items, wide=output == "wide", show_namespace=info.namespaced and ns is None))


@click.command()
@click.argument("kind", required=False)
@click.argument("names", nargs=-1)
@click.option("-f", "--filename", "paths", multiple=True, metavar="PATH",
              help="Delete what these files describe (repeatable; folders and - work as for apply).")
@click.option("-R", "--recursive", is_flag=True, help="Descend into sub-folders of folders given with -f.")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of the resources.")
@connection_options
def delete(kind, names, paths, recursive, namespace, controller, ca, cert, key, config):
    """Delete KIND NAME... or everything in -f files; all or nothing.

    \b
    nodemesh delete ap deny-all -n shop
    nodemesh delete -f demo/
    """
    if paths and (kind or names):
        raise click.UsageError("give either KIND NAME... or -f PATH, not both")
    if paths:
        keys = [dict(zip(("kind", "namespace", "name"), r.key)) for r in read_manifests(paths, recursive, namespace)]
    elif kind and names:
        try:
            info = api.resolve_kind(kind)
        except api.UnknownKind as e:
            raise click.ClickException(str(e)) from None
        keys = [{"kind": info.kind, "namespace": namespace if info.namespaced else "", "name": n} for n in names]
    else:
        raise click.UsageError("name what to delete: KIND NAME... or -f PATH")
    with open_client(controller, ca, cert, key, config) as c:
        reply = _call(c.delete, keys)
    for r in reply["results"]:
        click.echo(f"{_label(r)} deleted")


# --- tables -------------------------------------------------------------------------------

def _age(created: str, now: dt.datetime | None = None) -> str:
    try:
        t = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return "?"
    s = int(((now or dt.datetime.now(dt.timezone.utc)) - t).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{max(s, 0)}s"


def _columns(kind: str, wide: bool):
    """(header, getter(spec)) pairs per kind; wide adds detail columns."""
    j = ",".join
    base = {
        "Mesh": [("TRUST-DOMAIN", lambda s: s["trustDomain"]), ("MTLS", lambda s: s["mtls"]),
                 ("DEFAULT-ACTION", lambda s: s["defaultAction"])],
        "Workload": [("NODE", lambda s: s["node"]), ("ADDRESSES", lambda s: j(s["addresses"])),
                     ("SERVICE-ACCOUNT", lambda s: s["serviceAccount"])],
        "Service": [("ADDRESSES", lambda s: j(s["addresses"])),
                    ("PORTS", lambda s: j(f"{p['port']}/{p['protocol']}" for p in s["ports"]))],
        "AuthorizationPolicy": [("ACTION", lambda s: s["action"]), ("RULES", lambda s: str(len(s.get("rules") or [])))],
    }[kind]
    extra = {
        "Mesh": [("CERT-TTL", lambda s: s["certificateTTL"])],
        "Workload": [("ZONE", lambda s: (s.get("locality") or {}).get("zone", "")),
                     ("PORTS", lambda s: j(str(p) for p in s.get("ports", []))),
                     ("NETNS/CGROUP", lambda s: s.get("netns") or s.get("cgroup") or "")],
        "Service": [("SELECTOR", lambda s: j(f"{k}={v}" for k, v in s["selector"].items())),
                    ("LB", lambda s: (s.get("loadBalancer") or {}).get("algorithm", ""))],
        "AuthorizationPolicy": [("SELECTOR", lambda s: j(f"{k}={v}" for k, v in (s.get("selector") or {}).items()) or "<namespace>")],
    }[kind]
    return base + (extra if wide else [])


def render_table(info, items: list[dict], *, wide: bool, show_namespace: bool) -> str:
    cols = _columns(info.kind, wide)
    header = (["NAMESPACE"] if show_namespace else []) + ["NAME"] + [h for h, _ in cols] + ["AGE"]
    rows = [header]
    for o in items:
        meta, spec = o["metadata"], o.get("spec") or {}
        rows.append(([meta.get("namespace", "")] if show_namespace else []) + [meta["name"]]
                    + [g(spec) for _, g in cols] + [_age(meta.get("creationTimestamp", ""))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
