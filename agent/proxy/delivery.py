"""delivery.py: the last step of every path into a local workload — enforce the decision, dial
the workload inside its own netns, relay, and track the connection in the live registry.

Inbound (HBONE on 15008, plaintext on 15006), the outbound handler's same-node endpoints and the
fast path all deliver through here, so a connection is authorized, dialled, counted and cut on
a policy change the same way whichever way it came. The decision itself is
``agent.decide.connection.authorize_connection``'s; this module only enforces and records it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from agent.decide.authorize import Allow, Deny
from agent.decide.connection import authorize_connection
from agent.observe.record import ConnRecord
from agent.proxy import ProxyError
from agent.proxy.connections import Live, Registry
from agent.proxy.relay import RelayCounters, RelayError, relay
from agent.proxy.splice import SpliceEngine
from agent.state.snapshot import Snapshot, StateHolder
from controller.api import SpiffeId, Workload

log = logging.getLogger("nodemesh.agent.inbound")   # the name it logged under before delivery.py

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

    def decide(self, snap: Snapshot, workload: Workload, port: int, source: SpiffeId | None,
               source_ip: str, rec: ConnRecord, decision: Allow | Deny | None = None) -> Allow:
        """Authorize, recording the decision in ``rec``; raise Denied. ``decision``: what
        ``authorize_connection`` said on these same arguments, if the caller has it already
        (the outbound decider memoises it)."""
        if decision is None:
            decision = authorize_connection(snap, workload, port, source, source_ip)
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
