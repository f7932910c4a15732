"""fastpath.py: same-node plaintext connections served start to end on the splice engine's
thread — accept on 15001, original destination, plan, pick, authorize, dial inside the
destination's netns, splice — with no trio task per connection (BENCHMARKS.md, scenarios c, e).

Only the common case is taken here: the chosen endpoint is on this node, policy allows it and
it answers. Anything else — a remote endpoint (HBONE), passthrough, no route, a failed or slow
connect — is handed with its original destination to the trio handler (``Outbound.handle``),
which does it the general way (retries on other endpoints, HBONE, error reports). The decisions
are the outbound handler's own (its ``OutboundDecider``: plan, pick, authorize, memoised per
snapshot), on the snapshot read once at accept; telemetry runs on the trio thread, posted in
batches; the connection is in the live registry like any other.
"""
from __future__ import annotations

import logging
import socket
import struct
import time
from collections import deque
from typing import Callable

import trio

from agent.base.constants import PROXY_MARK
from agent.base.netns import open_home, sockets_in
from agent.decide.plan import NoRoute, Upstream
from agent.observe.record import ConnRecord
from agent.proxy.connections import Live
from agent.proxy.delivery import Denied
from agent.proxy.outbound import Outbound, Picked
from agent.proxy.relay import RelayCounters
from agent.proxy.splice import SpliceEngine
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.fastpath")

REPORT_DELAY = 0.05      # seconds a metric or access-log line may wait (Envoy flushes logs each 1 s)
# (workload, stream, original destination or None, the endpoint picked or None); trio thread
READY_BATCH = 8          # upstream sockets made per visit to a destination's netns
READY_TTL = 10.0         # seconds; then the ready ones are dropped (a pod may have gone)
HandOver = Callable[[Workload, trio.SocketStream, "tuple[str, int] | None", "Picked | None"], None]
_RESET = struct.pack("ii", 1, 0)


class _Conn:
    """One connection of the fast path from its connect to its end: the engine's callbacks are
    its bound methods (no closures per connection) and it is what the live registry cancels.
    Its references to the relay and the registry entry are dropped at the end, so what a
    connection made is freed at once, not by the cycle collector."""

    __slots__ = ("fast", "workload", "conn", "up", "dst", "rec", "ep", "address", "where", "now",
                 "snap", "src_id", "src_ip", "counters", "live", "pair")

    def __init__(self, fast: FastPath, workload: Workload, conn: socket.socket, dst, rec: ConnRecord,
                 ep, snap, src_id, src_ip: str) -> None:
        self.fast, self.workload, self.conn, self.dst, self.rec, self.ep = fast, workload, conn, dst, rec, ep
        self.snap, self.src_id, self.src_ip = snap, src_id, src_ip
        self.up: socket.socket | None = None
        self.counters: RelayCounters | None = None
        self.live: Live | None = None
        self.pair = None

    def cancel(self) -> None:
        """The registry's cut (any thread): the engine ends the relay as failed."""
        pair = self.pair
        if pair is not None:
            self.fast.engine.cancel(pair)

    def connected(self, error: OSError | None) -> None:
        try:
            self.fast._connected(self, error)
        except Exception:
            log.exception("fast path failed after connecting to %s:%d", *self.address)
            self.fast.outbound.stats.finished(self.ep)
            self.up.close()
            _reset(self.conn)

    def ended(self, pair) -> None:
        self.fast._ended(self, pair)


class FastPath:
    """Serve 15001 listeners from the engine thread (``serve``, for ``Handlers.serve_outbound``).

    ``original_destination(sock)`` is the redirector's synchronous lookup; ``hand_over`` runs on
    the trio thread with a connection the fast path declined (``Listeners.hand_over`` with
    ``Outbound.handle``)."""

    def __init__(self, outbound: Outbound, engine: SpliceEngine,
                 original_destination: Callable[[socket.socket], tuple[str, int]],
                 hand_over: HandOver) -> None:
        self.outbound, self.engine = outbound, engine
        self._orig_dst, self._hand_over = original_destination, hand_over
        self._reports: deque = deque()
        self._token: trio.lowlevel.TrioToken | None = None
        self._home: int | None = None                   # the engine thread's own netns (fd)
        self._ready: dict[tuple[str | None, int], list[socket.socket]] = {}   # engine thread
        self._clock: trio.abc.Clock | None = None

    # --- trio thread --------------------------------------------------------------------------

    def serve(self, workload: Workload, listener: trio.SocketListener) -> Callable[[], None]:
        """Accept on ``listener`` from the engine thread; returns the stop (and close) function."""
        self._token = trio.lowlevel.current_trio_token()
        self._clock = trio.lowlevel.current_clock()     # the balancer's stats use trio's time
        raw = listener.socket
        if not self.engine.available:                    # the agent is shutting down
            raw.close()
            return lambda: None
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        self.engine.listen(sock, lambda conn: self._accept(workload, conn))
        return lambda: self.engine.unlisten(sock)

    # Both run as trio run_sync_soon callbacks, which must never raise.

    def _drain(self) -> None:
        reports, batch = self._reports, []
        while reports:                                   # the engine thread may append meanwhile
            batch.append(reports.popleft())
        self.outbound.delivery.telemetry.report(batch)   # Telemetry never raises

    def _hand_over_now(self, workload: Workload, conn: socket.socket, dst, picked) -> None:
        try:
            self._hand_over(workload, trio.SocketStream(trio.socket.from_stdlib_socket(conn)), dst,
                            picked)
        except Exception as e:                           # e.g. the agent is shutting down
            log.info("dropping a connection of %s/%s: %s", workload.metadata.namespace,
                     workload.metadata.name, e)
            _reset(conn)

    # --- engine thread ------------------------------------------------------------------------

    def _post(self, fn, *args) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            for a in args:
                if isinstance(a, socket.socket):
                    a.close()

    def _report(self, opened: bool, rec: ConnRecord) -> None:
        """Report ``rec`` as opened (or closed) on the trio thread, in order, in batches
        (``Telemetry.report``): one wake-up of the trio thread and one access-log flush per
        ``REPORT_DELAY`` rather than per connection."""
        self._reports.append((opened, rec))
        if len(self._reports) == 1:
            self.engine.later(REPORT_DELAY, lambda: self._post(self._drain))

    def _decline(self, workload: Workload, conn: socket.socket, dst, picked: Picked | None = None) -> None:
        self._post(self._hand_over_now, workload, conn, dst, picked)

    def _accept(self, workload: Workload, conn: socket.socket) -> None:
        try:
            self._start(workload, conn)
        except Exception:
            log.exception("fast path failed on a connection of %s/%s; the general path takes it",
                          workload.metadata.namespace, workload.metadata.name)
            self._decline(workload, conn, None)

    def _start(self, workload: Workload, conn: socket.socket) -> None:
        out = self.outbound
        delivery, decider = out.delivery, out.decider
        snap = delivery.holder.current
        try:
            dst = self._orig_dst(conn)
        except OSError:
            self._decline(workload, conn, None)         # the trio handler reports it
            return
        ip, port = dst
        try:
            planned = decider.plan(snap, workload, ip, port)
            plan = planned.plan
            if not isinstance(plan, Upstream):
                self._decline(workload, conn, dst)
                return
            now = self._clock.current_time()
            ep = decider.pick(planned, now=now)
        except NoRoute:
            self._decline(workload, conn, dst)          # the trio handler decides it again and reports
            return
        if ep.node != out.node:
            self._decline(workload, conn, dst, Picked(ep))
            return
        src, src_id = planned.source, planned.source_identity
        src_ip = src.spec.addresses[0]
        rec = ConnRecord("source", src_ip, src_workload=src, src_identity=src_id.uri,
                         dst_address=f"{ip}:{port}", dst_service=plan.service,
                         dst_workload=ep.workload, dst_identity=ep.identity.uri)
        try:
            delivery.decide(snap, ep.workload, ep.port, src_id, src_ip, rec,
                            decider.authorization(snap, planned, ep))
        except Denied:
            _reset(conn)
            rec.end = time.monotonic()
            self._report(False, rec)
            return
        c = _Conn(self, workload, conn, dst, rec, ep, snap, src_id, src_ip)
        c.address = address = (ep.workload.spec.addresses[0], ep.port)
        c.where = (ep.workload.spec.netns or None, socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            c.up = self._upstream_socket(c.where)
        except OSError as e:
            self._decline(workload, conn, dst, Picked(ep, failed=str(e)))
            return
        out.stats.started(ep)
        c.now = now
        self.engine.connect(c.up, address, delivery.connect_timeout, c.connected)

    def _connected(self, c: _Conn, error: OSError | None) -> None:
        out, ep, address = self.outbound, c.ep, c.address
        t = self._clock.current_time()
        if error is not None:
            out.stats.finished(ep)
            out.stats.connect_failed(ep, t)
            c.up.close()
            self._drop_ready(c.where)       # the namespace may be gone or made anew
            log.info("fast path: connect to %s:%d failed (%s); the general path takes it",
                     *address, error)
            self._decline(c.workload, c.conn, c.dst, Picked(ep, failed=f"{address[0]}:{address[1]}: {error}"))
            return
        out.stats.connect_latency(ep, t - c.now, t)
        c.rec.dst_address = f"{address[0]}:{address[1]}"
        self._relay(c)

    def _upstream_socket(self, where: tuple[str | None, int]) -> socket.socket:
        """A new marked, non-blocking TCP socket in ``where`` = (netns, family), from a few made
        in one visit to the namespace (two ``setns`` and an ``open`` per batch, not per
        connection). The ready ones of a namespace are dropped when a connect from one fails
        and every ``READY_TTL`` seconds, so none outlives its pod for long."""
        ready = self._ready.get(where)
        if not ready:
            if self._home is None:
                self._home = open_home()
            ready = sockets_in(where[0], READY_BATCH, where[1],
                               socket.SOCK_STREAM | socket.SOCK_NONBLOCK, home=self._home)
            for s in ready:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
                except PermissionError:
                    pass
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._ready:
                self.engine.later(READY_TTL, self._expire_ready)
            self._ready[where] = ready
        return ready.pop()

    def _drop_ready(self, where) -> None:
        for s in self._ready.pop(where, ()):
            s.close()

    def _expire_ready(self) -> None:
        for where in list(self._ready):
            self._drop_ready(where)

    def _relay(self, c: _Conn) -> None:
        delivery = self.outbound.delivery
        c.counters = RelayCounters()
        w = c.ep.workload
        c.live = live = Live((w.metadata.namespace, w.metadata.name), c.ep.port, c.src_id, c.src_ip, c)
        self._report(True, c.rec)
        c.pair = self.engine.adopt(c.conn, c.up, c.counters, c.ended, closing=True)
        delivery.registry.add(live)          # after adopt: a policy change can cancel it now
        if delivery.holder.current is not c.snap:   # one published while we were connecting
            delivery.registry.check(live, delivery.holder.current)

    def _ended(self, c: _Conn, pair) -> None:
        live, rec, counters = c.live, c.rec, c.counters
        c.pair = c.live = None                # no cycle left: c, the pair and live go now
        self.outbound.delivery.registry.discard(live)
        self.outbound.stats.finished(c.ep)
        rec.end = time.monotonic()           # the report waits for its batch
        rec.request_bytes, rec.response_bytes = counters.a_to_b, counters.b_to_a
        if live.denied is not None:
            d = live.denied
            rec.decision, rec.policy, rec.rule, rec.reason, rec.flags = \
                "deny", d.policy, d.rule, f"closed by a policy change: {d.reason}", "DENY"
        elif pair.error is not None:
            rec.error = f"{pair.error[1]!r} ({pair.error[0]})"
        if pair.error is not None:
            _reset(c.conn)
            _reset(c.up)
        else:
            c.conn.close()
            c.up.close()
        self._report(False, rec)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as relay.abort does for a trio stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass
    sock.close()
