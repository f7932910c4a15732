"""inbound.py: connections into a local workload — HBONE on 15008, plaintext on 15006 — and
the delivery step the same-node fast path shares with them.

Decide, then do: ``authorize`` (agent/policy.py) decides on the snapshot read once at accept;
only then is the workload dialled, from inside its own netns. Every delivered connection is
tracked in the registry, so a later policy change can close it. A denied HBONE stream gets
403 and a denied plaintext connection a TCP reset; both are logged with policy and rule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from agent.identity import IdentityError, IdentityManager
from agent.policy import Allow, Deny, Facts, authorize
from agent.proxy import ProxyError
from agent.proxy.connections import Live, Registry
from agent.proxy.hbone import ConnectRequest, HboneError, serve_hbone
from agent.proxy.plan import ConnRecord
from agent.proxy.relay import RelayCounters, RelayError, abort, relay
from agent.proxy.splice import SpliceEngine
from agent.state import Snapshot, StateHolder
from controller.api import InvalidSpiffeId, SpiffeId, Workload, parse_spiffe_id

log = logging.getLogger("nodemesh.agent.inbound")

ConnectIn = Callable[..., Awaitable[trio.SocketStream]]      # (netns, host, port, *, timeout)
OrigDst = Callable[[Workload, trio.SocketStream], Awaitable[tuple[str, int]]]


class Denied(ProxyError):
    def __init__(self, decision: Deny) -> None:
        super().__init__(f"denied by {decision.policy or 'policy'} rule {decision.rule}: {decision.reason}")
        self.decision = decision


@dataclass
class Delivery:
    """Authorize a connection for a local workload, dial it inside its netns, relay, track."""

    holder: StateHolder
    registry: Registry
    telemetry: object                  # .opened(rec) / .closed(rec) / .report(batch); agent/observe
    connect_in: ConnectIn
    connect_timeout: float = 5.0
    engine: SpliceEngine | None = None   # socket-to-socket relays; None: all through relay.relay

    async def relay(self, a: trio.abc.Stream, b: trio.abc.Stream, counters: RelayCounters) -> None:
        """Relay ``a`` <-> ``b``: two TCP sockets through the splice engine (the kernel copies,
        no trio turn per message), anything else (an HBONE stream) through ``relay.relay``."""
        if (self.engine is not None and isinstance(a, trio.SocketStream)
                and isinstance(b, trio.SocketStream)):
            await self.engine.relay(a, b, counters=counters)
        else:
            await relay(a, b, counters=counters)

    @staticmethod
    def authorization(snap: Snapshot, workload: Workload, port: int, source: SpiffeId | None,
                      source_ip: str) -> Allow | Deny:
        """``authorize`` on these facts: pure, so a caller may keep it for ``snap`` (the fast path
        does) and hand it to ``decide``."""
        return authorize(snap, Facts(destination=workload, port=port, source_identity=source,
                                     source_ip=source_ip))

    def decide(self, snap: Snapshot, workload: Workload, port: int, source: SpiffeId | None,
               source_ip: str, rec: ConnRecord, decision: Allow | Deny | None = None) -> Allow:
        """Authorize, recording the decision in ``rec``; raise Denied. ``decision``: what
        ``authorization`` said on these same arguments, if the caller has it already."""
        if decision is None:
            decision = self.authorization(snap, workload, port, source, source_ip)
        if isinstance(decision, Deny):
            rec.decision, rec.policy, rec.rule, rec.reason, rec.flags = \
                "deny", decision.policy, decision.rule, decision.reason, "DENY"
            log.info("denied %s (%s) -> %s/%s:%d by %s rule %s: %s", source_ip,
                     source.uri if source else "plaintext", workload.metadata.namespace,
                     workload.metadata.name, port, decision.policy, decision.rule, decision.reason)
            raise Denied(decision)
        if decision.matched is not None:
            rec.policy, rec.rule = decision.matched.policy, decision.matched.rule
        rec.reason = decision.reason
        return decision

    async def dial(self, workload: Workload, port: int, rec: ConnRecord) -> trio.SocketStream:
        """Dial a local workload's port from inside its own netns (its first address)."""
        return await self.dial_address(workload, workload.spec.addresses[0], port, rec)

    async def dial_address(self, where: Workload, ip: str, port: int, rec: ConnRecord) -> trio.SocketStream:
        """Dial ``ip:port`` from ``where``'s netns (the destination's for delivery, the source's for
        passthrough); a failure is recorded in ``rec`` (flag UF) and re-raised."""
        rec.dst_address = f"{ip}:{port}"
        try:
            with trio.fail_after(self.connect_timeout):
                return await self.connect_in(where.spec.netns or None, ip, port, timeout=self.connect_timeout)
        except (OSError, trio.TooSlowError, ProxyError) as e:
            rec.flags, rec.error = "UF", f"connect to {ip}:{port} failed: {e or type(e).__name__}"
            raise

    async def pipe(self, client: trio.abc.Stream, upstream: trio.abc.Stream, workload: Workload, port: int,
                   source: SpiffeId | None, source_ip: str, rec: ConnRecord,
                   snapshot: Snapshot | None = None) -> None:
        """Relay until both sides finish; a policy change that now denies it cancels the relay,
        including one published since ``snapshot`` (what the connection was decided on)."""
        counters = RelayCounters()
        scope = trio.CancelScope()
        live = Live((workload.metadata.namespace, workload.metadata.name), port, source, source_ip, scope)
        try:
            with self.registry.track(live), scope:
                if snapshot is not None and self.holder.current is not snapshot:
                    self.registry.check(live, self.holder.current)   # changed since the decision
                await self.relay(client, upstream, counters)
        except RelayError as e:
            rec.error = f"{e.reason} ({e.direction})"
        finally:
            rec.request_bytes, rec.response_bytes = counters.a_to_b, counters.b_to_a
            if live.denied is not None:
                d = live.denied
                rec.decision, rec.policy, rec.rule, rec.reason, rec.flags = \
                    "deny", d.policy, d.rule, f"closed by a policy change: {d.reason}", "DENY"


@dataclass
class Inbound:
    delivery: Delivery
    identity: IdentityManager
    orig_dst: OrigDst

    @property
    def holder(self) -> StateHolder:
        return self.delivery.holder

    async def hbone(self, workload: Workload, stream: trio.SocketStream) -> None:
        """15008: terminate mTLS as the workload's identity and serve its CONNECT streams."""
        snap = self.holder.current
        uri = snap.identity_of(workload).uri
        try:
            ctx = self.identity.server_context(uri)
        except IdentityError as e:
            log.warning("refusing HBONE for %s: no certificate yet (%s)", uri, e)
            await stream.aclose()
            return
        tls = trio.SSLStream(stream, ctx, server_side=True)
        key = (workload.metadata.namespace, workload.metadata.name)
        await serve_hbone(tls, lambda req: self._connect(key, req, _peer_address(stream)))

    async def _connect(self, key: tuple[str, str], req: ConnectRequest, peer_ip: str) -> None:
        snap = self.holder.current
        workload = snap.workload(*key)
        source_ip = req.forwarded_for or peer_ip
        rec = ConnRecord("destination", source_ip, protocol="hbone", security="mutual_tls",
                         src_identity=req.peer_identity, dst_workload=workload,
                         src_workload=snap.workload_at(source_ip))
        tel = self.delivery.telemetry
        upstream = None
        piped = False
        try:
            ip, port = req.destination
            if workload is None or ip not in workload.spec.addresses:
                rec.flags, rec.error = "NR", f"{req.authority} is not served here"
                await req.reject(404)
                return
            rec.dst_identity = snap.identity_of(workload).uri
            try:
                source = parse_spiffe_id(req.peer_identity)
            except InvalidSpiffeId as e:
                rec.decision, rec.flags, rec.error = "deny", "DENY", f"peer is not a workload: {e}"
                await req.reject(403)
                return
            try:
                self.delivery.decide(snap, workload, port, source, source_ip, rec)
            except Denied:
                await req.reject(403)
                return
            try:
                upstream = await self.delivery.dial(workload, port, rec)
            except (OSError, trio.TooSlowError, ProxyError):
                await req.reject(503)
                return
            tunnel = await req.accept()
            tel.opened(rec)
            piped = True
            await self.delivery.pipe(tunnel, upstream, workload, port, source, source_ip, rec, snap)
        except (HboneError, RelayError, OSError) as e:
            rec.error = rec.error or str(e)
            if upstream is not None:
                await abort(upstream)
        except trio.Cancelled:
            if upstream is not None and not piped:   # the client reset the stream meanwhile
                rec.error = rec.error or "the client reset the stream before it was answered"
                with trio.CancelScope(shield=True):
                    await abort(upstream)
            raise
        finally:
            tel.closed(rec)

    async def plaintext(self, workload: Workload, stream: trio.SocketStream) -> None:
        """15006: plaintext from outside the mesh; refused under STRICT, authorized under PERMISSIVE."""
        snap = self.holder.current
        source_ip = _peer_address(stream)
        rec = ConnRecord("destination", source_ip, dst_workload=snap.workload(workload.metadata.namespace,
                                                                              workload.metadata.name))
        tel = self.delivery.telemetry
        try:
            if snap.mesh.spec.mtls == "STRICT":
                rec.decision, rec.flags, rec.reason = "deny", "DENY", "plaintext refused: mesh mtls is STRICT"
                log.info("refused plaintext %s -> %s/%s: mtls STRICT", source_ip,
                         workload.metadata.namespace, workload.metadata.name)
                await abort(stream)
                return
            _, port = await self.orig_dst(workload, stream)
            current = rec.dst_workload or workload
            try:
                self.delivery.decide(snap, current, port, None, source_ip, rec)
            except Denied:
                await abort(stream)
                return
            try:
                upstream = await self.delivery.dial(current, port, rec)
            except (OSError, trio.TooSlowError, ProxyError):
                await abort(stream)
                return
            tel.opened(rec)
            await self.delivery.pipe(stream, upstream, current, port, None, source_ip, rec, snap)
        except (ProxyError, OSError) as e:
            rec.error = rec.error or str(e)
            await abort(stream)
        finally:
            tel.closed(rec)


def _peer_address(stream) -> str:
    try:
        return stream.socket.getpeername()[0]
    except (OSError, AttributeError):
        return "0.0.0.0"
