"""outbound.py: a local workload's outgoing connection, from original destination to upstream.

Decide (``OutboundDecider``: the plan once, then a pick per attempt), then do: a remote endpoint is
reached through HBONE (mTLS as the source workload, expecting the endpoint's identity), a
same-node one through the fast path (the same authorization as inbound, then a direct dial in
the destination's netns: no TLS hop to ourselves). A failed connect is retried on another
endpoint within the connect timeout. Destinations outside the mesh pass through unless that
is turned off. HBONE pools are per source workload, dialling from its netns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from agent.base.constants import INBOUND_HBONE_PORT
from agent.decide.authorize import Deny
from agent.decide.connection import OutboundDecider, Planned
from agent.decide.plan import NoRoute, Passthrough
from agent.identity import IdentityError, IdentityManager
from agent.observe.record import ConnRecord
from agent.proxy import ProxyError
from agent.proxy.delivery import Delivery, Denied, OrigDst
from agent.proxy.hbone import ConnectRefused, HboneError
from agent.proxy.hbone_pool import HbonePool, open_hbone_pool
from agent.proxy.relay import RelayCounters, RelayError, abort
from agent.state.snapshot import Endpoint, Snapshot
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.outbound")


@dataclass(frozen=True)
class Picked:
    """The endpoint the fast path chose for a connection it hands over: to try first, or
    (``failed``: why) already tried."""

    endpoint: Endpoint
    failed: str = ""


class Pools:
    """One HBONE pool per local source workload, dialling from that workload's netns."""

    def __init__(self, delivery: Delivery, nursery: trio.Nursery) -> None:
        self._delivery, self._nursery = delivery, nursery
        self._pools: dict[tuple, tuple[HbonePool, trio.CancelScope]] = {}
        self._lock = trio.Lock()

    async def get(self, workload: Workload) -> HbonePool:
        key = (workload.metadata.namespace, workload.metadata.name, workload.spec.netns)
        async with self._lock:
            if key not in self._pools:
                self._pools[key] = await self._nursery.start(self._run, workload.spec.netns or None)
        return self._pools[key][0]

    async def _run(self, netns: str | None, *, task_status) -> None:
        timeout = self._delivery.connect_timeout

        async def connect(host: str, port: int) -> trio.SocketStream:
            return await self._delivery.connect_in(netns, host, port, timeout=timeout)

        with trio.CancelScope() as scope:
            async with open_hbone_pool(connect=connect) as pool:
                task_status.started((pool, scope))
                await trio.sleep_forever()

    def retain(self, snapshot: Snapshot) -> None:
        """Close the pools of workloads that are no longer local."""
        live = {(w.metadata.namespace, w.metadata.name, w.spec.netns) for w in snapshot.local_workloads}
        for key in [k for k in self._pools if k not in live]:
            self._pools.pop(key)[1].cancel()

    def stats(self) -> dict:
        """PoolStats (TLS connections, open streams) per source workload "ns/name"."""
        return {f"{k[0]}/{k[1]}": p.stats() for k, (p, _) in self._pools.items()}


@dataclass
class Outbound:
    delivery: Delivery
    identity: IdentityManager
    pools: Pools
    orig_dst: OrigDst
    node: str
    decider: OutboundDecider               # shared with the fast path (plan, pick, authorize)
    hbone_port: int = INBOUND_HBONE_PORT   # where remote nodes' in-pod HBONE listeners are

    @property
    def stats(self):
        """The balancer's live stats (the decider's): connections started and finished here."""
        return self.decider.stats

    async def handle(self, workload: Workload, stream: trio.SocketStream,
                     dst: tuple[str, int] | None = None, picked: Picked | None = None) -> None:
        """15001: one connection a local workload made; its original destination (``dst`` when
        the fast path has read it already) says where to. ``picked``: the fast path's choice of
        endpoint, tried first (a remote one), or already tried and failed (a local one), so the
        balancer's choice is made once per connection."""
        snap = self.delivery.holder.current
        src = snap.workload(workload.metadata.namespace, workload.metadata.name) or workload
        src_ip = src.spec.addresses[0]
        rec = ConnRecord("source", src_ip, src_workload=src, src_identity=snap.identity_of(src).uri)
        tel = self.delivery.telemetry
        try:
            ip, port = dst or await self.orig_dst(workload, stream)
            rec.dst_address = f"{ip}:{port}"
            planned = self.decider.plan(snap, src, ip, port)
            if isinstance(planned.plan, Passthrough):
                rec.flags = "PT"
                upstream = await self.delivery.dial_address(src, ip, port, rec)
                tel.opened(rec)
                await self._relay(stream, upstream, rec)
                return
            rec.dst_service = planned.plan.service
            await self._to_upstream(snap, planned, stream, rec, picked)
        except (NoRoute, Denied) as e:
            if isinstance(e, NoRoute):
                rec.flags, rec.error = e.flags, e.reason
                log.info("no route for %s -> %s: %s", src_ip, rec.dst_address, e.reason)
            await abort(stream)
        except (ProxyError, OSError, trio.TooSlowError) as e:
            rec.error = rec.error or str(e) or type(e).__name__
            await abort(stream)
        finally:
            tel.closed(rec)

    async def _to_upstream(self, snap: Snapshot, planned: Planned, stream: trio.SocketStream,
                           rec: ConnRecord, picked: Picked | None = None) -> None:
        upstream, ep = await self._connect(snap, planned, rec, picked)
        self.delivery.telemetry.opened(rec)
        try:
            if isinstance(upstream, trio.SocketStream):   # same-node fast path: tracked like inbound
                await self.delivery.pipe(stream, upstream, ep.workload, ep.port, planned.source_identity,
                                         planned.source.spec.addresses[0], rec, snap)
            else:
                await self._relay(stream, upstream, rec)
        finally:
            self.stats.finished(ep)

    async def _connect(self, snap: Snapshot, planned: Planned, rec: ConnRecord, picked: Picked | None = None):
        """Pick and connect, trying other endpoints until one answers or the timeout passes."""
        plan = planned.plan
        tried: set = set()
        first = None
        if picked is not None:
            if picked.failed:
                tried.add(picked.endpoint.key)
                rec.error = picked.failed
            else:
                first = picked.endpoint
        with trio.move_on_after(self.delivery.connect_timeout):
            while True:
                now = trio.current_time()
                try:
                    if first is not None:
                        ep, first = first, None
                    else:
                        ep = self.decider.pick(planned, now=now, exclude=frozenset(tried))
                except NoRoute as e:
                    raise NoRoute(f"{e.reason}; last error: {rec.error or 'none'}", e.flags) from None
                self.stats.started(ep)
                try:
                    upstream = await self._open(snap, planned, ep, rec)
                except Denied:
                    self.stats.finished(ep)
                    raise
                except ConnectRefused as e:
                    self.stats.finished(ep)
                    if e.status == 403:   # the destination's policy said no: not the endpoint's fault
                        rec.decision, rec.flags, rec.reason = "deny", "DENY", "denied by the destination"
                        raise Denied(Deny(policy="", rule=None, reason=f"refused by the destination "
                                                      f"{ep.workload.metadata.namespace}/{ep.workload.metadata.name}")) from None
                    self.stats.connect_failed(ep, trio.current_time())
                    tried.add(ep.key)
                    rec.error = f"{ep.address}:{ep.port} refused the tunnel ({e.status})"
                    continue
                except (OSError, HboneError, ProxyError, IdentityError, trio.TooSlowError) as e:
                    self.stats.finished(ep)
                    self.stats.connect_failed(ep, trio.current_time())
                    tried.add(ep.key)
                    rec.error = f"{ep.address}:{ep.port}: {e or type(e).__name__}"
                    log.info("connect to %s (%s) failed, trying another endpoint: %s", ep.address,
                             plan.name, rec.error)
                    continue
                self.stats.connect_latency(ep, trio.current_time() - now, trio.current_time())
                return upstream, ep
        raise NoRoute(f"no endpoint of {plan.name} answered within {self.delivery.connect_timeout}s; "
                      f"last error: {rec.error or 'none'}", "UF")

    async def _open(self, snap: Snapshot, planned: Planned, ep: Endpoint, rec: ConnRecord):
        rec.dst_workload, rec.dst_identity = ep.workload, ep.identity.uri
        src, src_id = planned.source, planned.source_identity
        src_ip = src.spec.addresses[0]
        if ep.node == self.node:
            rec.protocol, rec.security = "tcp", "none"
            self.delivery.decide(snap, ep.workload, ep.port, src_id, src_ip, rec,
                                 self.decider.authorization(snap, planned, ep))
            return await self.delivery.dial(ep.workload, ep.port, rec)
        rec.protocol, rec.security = "hbone", "mutual_tls"
        await self.identity.certified(src_id.uri)
        pool = await self.pools.get(src)
        return await pool.open(f"{ep.address}:{ep.port}", node_address=(ep.address, self.hbone_port),
                               source_identity=src_id.uri, expected_peer=frozenset({ep.identity.uri}),
                               ssl_context=self.identity.client_context(src_id.uri), forwarded_for=src_ip)

    async def _relay(self, client, upstream, rec: ConnRecord) -> None:
        counters = RelayCounters()
        try:
            await self.delivery.relay(client, upstream, counters)
        except RelayError as e:
            rec.error = f"{e.reason} ({e.direction})"
        finally:
            rec.request_bytes, rec.response_bytes = counters.a_to_b, counters.b_to_a
