"""app.py: the agent's composition root — the one place that wires its parts.

Joins (or reuses its node certificate), follows the controller (sync.py), keeps certificates
for every local workload (identity/), opens their in-pod listeners (proxy/listeners.py) or, for
host workloads (cgroup, no netns), the host namespace's (proxy/host_listeners.py) and serves
their traffic (proxy/), re-authorizes live connections on every update, and serves
admin (15000, 127.0.0.1), metrics (15020) and readiness (15021). Ready only when the snapshot,
the certificates and the listeners are all in place. Stops cleanly on SIGTERM/SIGINT.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import random
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from agent.base.constants import INBOUND_PLAIN_PORT
from agent.base.netns import connect_in
from agent.decide.balancer import Stats
from agent.decide.connection import OutboundDecider
from agent.identity import IdentityError, IdentityManager, SignResult
from agent.identity.store import StateDir
from agent.observe import doctor
from agent.observe.accesslog import AccessLog
from agent.observe.admin import admin_routes, metrics_routes, ready_routes
from agent.observe.httpd import serve_http
from agent.observe.metrics import AgentMetrics
from agent.observe.sdnotify import Notifier
from agent.observe.telemetry import Telemetry
from agent.proxy.connections import Registry
from agent.proxy.delivery import Delivery
from agent.proxy.fastpath import FastPath
from agent.proxy.host_listeners import HostListeners, is_host_workload
from agent.proxy.inbound import Inbound
from agent.proxy.listeners import Handlers, Listeners
from agent.proxy.outbound import Outbound, Pools
from agent.proxy.splice import SpliceEngine
from agent.redirect import select
from agent.redirect.base import RedirectError, Redirector
from agent.state.snapshot import Snapshot, StateHolder
from agent.sync import join
from agent.sync.client import ControlPlane, ControlPlaneError
from agent.sync.follow import SyncStatus, run_sync
from controller.api import to_dict

log = logging.getLogger("nodemesh.agent")

BUNDLE_REFRESH = 30.0


@dataclass
class AgentConfig:
    node: str
    controller: str
    ca_file: Path | None
    token_file: Path | None
    state_dir: Path = Path("/var/lib/nodemesh/agent")
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)
    ready: tuple[str, int] = ("0.0.0.0", 15021)
    passthrough: bool = True
    connect_timeout: float = 5.0
    access_log: str | None = None        # None: stdout; a path; or "off"
    redirect: str = "auto"               # ebpf | iptables | auto | none
    seed: int | None = None


@dataclass
class Workloads:
    """What is in place for the local workloads (certificates, redirects); readiness reads it."""

    errors: dict[str, str] = field(default_factory=dict)
    enrolled: dict[tuple[str, str], object] = field(default_factory=dict)   # key -> Workload


async def run(cfg: AgentConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    notifier = Notifier.from_env()   # systemd's Type=notify: READY=1 once ready() first passes
    rng = random.Random(cfg.seed)
    identities = StateDir(cfg.state_dir / "identities")
    bundle = _initial_bundle(cfg, identities)
    cp = ControlPlane(cfg.controller, bundle_pem=bundle)
    now = dt.datetime.now(dt.timezone.utc)
    node_uri, creds, bundle = await join.join(cp, identities, node=cfg.node, token_file=cfg.token_file, now=now)
    await cp.update(bundle_pem=bundle, credentials=creds)

    async def signer(uri: str, csr: bytes) -> SignResult:
        signed = await cp.sign(csr)
        return SignResult(signed.chain_pem, signed.bundle_pem)

    identity = IdentityManager(signer, rng=rng, state_dir=cfg.state_dir / "identities")
    holder = StateHolder(Snapshot.empty(node=cfg.node))
    status = SyncStatus()
    certs = Workloads()
    registry = Registry()
    redirector = select.make(cfg.redirect, node=cfg.node)
    access = None if cfg.access_log == "off" else AccessLog(cfg.access_log)
    metrics = AgentMetrics(cert_expiry=identity.expiries, config_version=lambda: status.version,
                           config_rejected=lambda: status.rejected_total)
    telemetry = Telemetry(metrics, access)
    engine = SpliceEngine()
    delivery = Delivery(holder, registry, telemetry, connect_in, cfg.connect_timeout, engine)
    inbound = Inbound(delivery, identity, redirector.original_destination)

    async with trio.open_nursery() as nursery:
        pools = Pools(delivery, nursery)
        decider = OutboundDecider(passthrough=cfg.passthrough, stats=Stats(), rng=rng)
        outbound = Outbound(delivery, identity, pools, redirector.original_destination, cfg.node, decider)
        fast = FastPath(outbound, engine, redirector.original_destination_sync,
                        lambda w, stream, dst, picked: listeners.hand_over(
                            w, partial(outbound.handle, dst=dst, picked=picked), stream))
        listeners = Listeners(Handlers(outbound.handle, inbound.plaintext, inbound.hbone,
                                       serve_outbound=fast.serve))
        # host workloads' 15001 goes through the trio handler: the fast path serves pods' listeners
        host_listeners = HostListeners(Handlers(outbound.handle, inbound.plaintext, inbound.hbone),
                             redirector.host_origin)

        def ready() -> tuple[bool, str]:
            if not status.synced:
                return False, "no configuration yet (waiting for the controller)"
            if certs.errors:
                return False, "not in place: " + "; ".join(f"{what}: {e}" for what, e in certs.errors.items())
            if not (listeners.ready(holder.current) and host_listeners.ready(holder.current)):
                failed = {k: v.error for k, v in {**listeners.status(), **host_listeners.status()}.items() if v.error}
                return False, f"listeners not open: {failed or 'opening'}"
            missing = [f"{w.metadata.namespace}/{w.metadata.name}" for w in holder.current.local_workloads
                       if (w.spec.netns or w.spec.cgroup)
                       and (w.metadata.namespace, w.metadata.name) not in certs.enrolled]
            if missing:
                return False, f"redirect not in place yet for {', '.join(missing)}"
            return True, f"serving version {status.version}"

        await nursery.start(engine.run)
        await nursery.start(identity.run)
        await nursery.start(registry.run, holder)
        await nursery.start(listeners.run)
        await nursery.start(host_listeners.run)
        await nursery.start(partial(run_sync, cp, holder, node=cfg.node, path=cfg.state_dir / "snapshot.json",
                                    status=status))
        await redirector.start(list(holder.current.local_workloads))
        nursery.start_soon(_follow_snapshots, holder, (listeners, host_listeners), pools, identity, certs, redirector)
        nursery.start_soon(_refresh_bundle, cp, identity, node_uri, creds)
        nursery.start_soon(_report, cp, status, ready)
        for (host, port), routes in (
                (cfg.admin, {**admin_routes(config_dump=lambda: _config_dump(holder, status),
                                            certs=lambda: _certs(identity),
                                            workloads=lambda: _workloads(holder, listeners, host_listeners)),
                             "/redirect": partial(_redirect_report, redirector, holder),
                             "/check": partial(_check_report, redirector, holder, listeners, host_listeners)}),
                (cfg.metrics, metrics_routes(metrics)),
                (cfg.ready, ready_routes(ready))):
            await nursery.start(partial(serve_http, routes, host, port))
        log.info("agent for node %s up: controller %s, admin %s:%d, metrics :%d, ready :%d",
                 cfg.node, cfg.controller, *cfg.admin, cfg.metrics[1], cfg.ready[1])
        await nursery.start(notifier.run, ready)
        task_status.started()
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope, redirector, notifier)
    await cp.aclose()


async def _report(cp: ControlPlane, status: SyncStatus, ready) -> None:
    """Tell the controller what this node serves whenever that changes (and every 30 s)."""
    sent, last = None, 0.0
    while True:
        now = (status.version, ready()[0], status.error)
        if now != sent or trio.current_time() - last > 30:
            try:
                await cp.report(version=now[0], ready=now[1], error=now[2])
                sent, last = now, trio.current_time()
            except ControlPlaneError as e:
                log.debug("could not report to the controller: %s", e)
        await trio.sleep(0.5)


def _initial_bundle(cfg: AgentConfig, identities: StateDir) -> bytes:
    if cfg.ca_file is not None:
        try:
            return cfg.ca_file.read_bytes()
        except OSError as e:
            raise join.JoinError(f"cannot read --ca {cfg.ca_file}: {e}") from None
    saved = identities.load_bundle()
    if saved is None:
        raise join.JoinError(f"no trust bundle: pass --ca FILE (the controller's ca/bundle.crt) "
                                  f"for the first start; later starts use {identities.path}")
    return saved


async def _follow_snapshots(holder: StateHolder, both: tuple[Listeners, HostListeners], pools: Pools,
                            identity: IdentityManager, certs: Workloads, redirector: Redirector) -> None:
    """On every snapshot: certificates for local workloads, listeners (in-pod, and the host
    namespace's for host workloads), then the redirect (so no connection is redirected to a port
    that is not open yet); undo all of it for what left."""
    listeners, host = both
    version, held, enrolled = -1, set(), certs.enrolled
    while True:
        with trio.move_on_after(2.0):   # also retry what failed (certificates, listeners, redirect)
            await holder.wait_newer(version)
        snap = holder.current
        version = snap.version
        wanted = {snap.identity_of(w).uri for w in snap.local_workloads}
        for uri in sorted(wanted):
            try:
                await identity.certified(uri)
                certs.errors.pop(f"certificate {uri}", None)
            except IdentityError as e:
                certs.errors[f"certificate {uri}"] = str(e)
                log.warning("no certificate for %s yet: %s", uri, e)
        for uri in held - wanted:
            identity.forget(uri)
            certs.errors.pop(f"certificate {uri}", None)
        held = wanted
        local = {(w.metadata.namespace, w.metadata.name): w for w in snap.local_workloads}
        for key, w in list(enrolled.items()):   # unenrol before the listeners close
            if local.get(key) != w:
                await _redirect_step(redirector.unenrol, w, certs)
                del enrolled[key]
        await listeners.reconcile(snap)
        await host.reconcile(snap)
        pools.retain(snap)
        ready = {**listeners.status(), **host.status()}
        for key, w in local.items():
            st = ready.get(f"{key[0]}/{key[1]}")
            if key not in enrolled and st is not None and not st.error and (w.spec.netns or w.spec.cgroup):
                if await _redirect_step(redirector.enrol, w, certs):
                    enrolled[key] = w
                    if is_host_workload(w):
                        register = getattr(redirector, "register_host_inbound", None)
                        inbound = host.inbound_sockets(w)
                    else:
                        register = getattr(redirector, "register_inbound_socket", None)
                        inbound = listeners.listener(w, INBOUND_PLAIN_PORT)
                    if register is not None and inbound is not None:
                        try:
                            register(w, inbound)
                        except (RedirectError, OSError) as e:
                            certs.errors[f"redirect {key[0]}/{key[1]}"] = str(e)
                            log.error("inbound redirect for %s/%s failed: %s", *key, e)


async def _redirect_step(step, workload, certs: Workloads) -> bool:
    name = f"{workload.metadata.namespace}/{workload.metadata.name}"
    try:
        await step(workload)
        certs.errors.pop(f"redirect {name}", None)
        return True
    except (RedirectError, OSError) as e:
        certs.errors[f"redirect {name}"] = str(e)
        log.error("redirect %s for %s failed: %s", step.__name__, name, e)
        return False


async def _refresh_bundle(cp: ControlPlane, identity: IdentityManager, node_uri: str, creds) -> None:
    """Pick up root rotations and the renewed node certificate."""
    last_expiry, managed = None, False
    while True:
        try:
            if not managed:   # manage (renew) the node identity like any other, from its saved files
                await identity.certified(node_uri)
                managed, last_expiry = True, identity.expiries().get(node_uri)
            bundle = await cp.trust_bundle()
            if bundle != identity.bundle_pem:
                await identity.update_bundle(bundle)
            expiry = identity.expiries().get(node_uri)
            if bundle != cp.bundle_pem or expiry != last_expiry:
                await cp.update(bundle_pem=bundle, credentials=creds)
                last_expiry = expiry
        except (ControlPlaneError, IdentityError) as e:
            log.warning("could not refresh the trust bundle: %s", e)
        await trio.sleep(BUNDLE_REFRESH)


def _config_dump(holder: StateHolder, status: SyncStatus) -> dict:
    snap = holder.current
    return {"version": snap.version, "node": snap.node, "error": status.error, "connected": status.connected,
            "mesh": to_dict(snap.mesh),
            "workloads": [to_dict(w) for w in snap.workloads], "services": [to_dict(s) for s in snap.services],
            "policies": [to_dict(p) for p in snap.policies]}


def _certs(identity: IdentityManager) -> list[dict]:
    return [{"identity": uri, "expires": dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            for uri, t in sorted(identity.expiries().items())]


def _workloads(holder: StateHolder, listeners: Listeners, host: HostListeners) -> list[dict]:
    status = {**listeners.status(), **host.status()}
    out = []
    for w in holder.current.local_workloads:
        key = f"{w.metadata.namespace}/{w.metadata.name}"
        st = status.get(key)
        out.append({"workload": key, "identity": holder.current.identity_of(w).uri, "netns": w.spec.netns,
                    "listeners": list(st.ports) if st else [], "error": st.error if st else ""})
    return out


async def _stop_on_signal(scope: trio.CancelScope, redirector: Redirector, notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            notifier.stopping()
            log.info("received %s: removing redirects, shutting down", signal.Signals(sig).name)
            with trio.move_on_after(15):
                try:
                    await redirector.stop()
                except (RedirectError, OSError) as e:
                    log.error("removing redirects failed: %s", e)
            scope.cancel()
            return


async def _redirect_findings(redirector: Redirector, holder: StateHolder) -> list[tuple[str, str]]:
    findings = []
    for w in holder.current.local_workloads:
        found = await trio.to_thread.run_sync(redirector.check, w)
        findings += [(f.level, f.message) for f in found]
    return findings


async def _redirect_report(redirector: Redirector, holder: StateHolder):
    """/redirect on the admin port: the mode and each local workload's hooks."""
    findings = [{"level": lvl, "message": m} for lvl, m in await _redirect_findings(redirector, holder)]
    return 200, "application/json", json.dumps({"mode": redirector.mode, "findings": findings}).encode()


async def _check_report(redirector: Redirector, holder: StateHolder, listeners: Listeners,
                        host: HostListeners):
    """/check on the admin port: the node half of ``nodemesh check`` (kernel, redirect mode,
    listeners and hooks of each workload), as ``{"findings": [{"level", "message"}, ...]}``."""
    found = doctor.node_findings(redirector.mode, _workloads(holder, listeners, host),
                                 await _redirect_findings(redirector, holder))
    body = {"findings": [{"level": lvl, "message": m} for lvl, m in found]}
    return 200, "application/json", json.dumps(body).encode()
