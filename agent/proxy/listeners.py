"""listeners.py: the in-pod listeners — 15001 outbound, 15006 inbound plaintext, 15008 HBONE —
opened inside each local pod's network namespace and reconciled against the snapshot.

Owns which listening sockets exist and their accept loops, and hands each accepted connection,
in its own task, to a handler. Decides nothing about a connection (the handlers do) and does
not own open connections: closing a workload's listeners leaves its connections running (the
live-connection registry closes those). Host-process workloads (cgroup, no netns) are served
elsewhere.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from agent.base.constants import IN_POD_PORTS
from agent.base.netns import NetnsError, listen_in
from agent.state.snapshot import Snapshot
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.listeners")

PORTS = IN_POD_PORTS
RETRY_INTERVAL = 2.0

Handler = Callable[[Workload, trio.SocketStream], Awaitable[None]]
OpenListener = Callable[[str, str, int], Awaitable[trio.SocketListener]]   # (netns, host, port)
WorkloadKey = tuple[str, str]                                              # (namespace, name)

# accept() failing for lack of resources: wait and try again, as trio.serve_listeners does
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def accept(listener: trio.SocketListener, what: str) -> trio.SocketStream | None:
    """The next connection on ``listener``; None once it is closed. Waits out accept() failing
    for lack of resources (logged, 100 ms pauses, as trio.serve_listeners does); any other
    OSError is raised: the listener is broken and the caller reopens it."""
    while True:
        try:
            return await listener.accept()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return None
        except OSError as e:
            if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("accept on %s: %s; pausing 100 ms", what, e)
            await trio.sleep(0.1)


@dataclass(frozen=True)
class Handlers:
    """What serves an accepted connection, per listener. Each is called in its own task with the
    local Workload the listener was opened for and the accepted ``trio.SocketStream`` (for
    HBONE the plain TCP stream: the handler does TLS itself). The stream is closed when the
    handler returns; an exception is logged and ends only that connection.

    The Workload is the one of the snapshot that *opened* the listener (a later snapshot that
    only changes labels or policy keeps the listener): handlers take the current snapshot
    themselves and look the workload up there for every decision.
    """

    outbound: Handler          # 15001
    inbound_plain: Handler     # 15006
    inbound_hbone: Handler     # 15008
    # 15001 served elsewhere (the fast path, on the splice engine's thread): takes the workload
    # and the open listener, returns the function that stops serving and closes it
    serve_outbound: Callable[[Workload, trio.SocketListener], Callable[[], None]] | None = None


@dataclass(frozen=True)
class WorkloadListeners:
    """One workload's listeners, for readiness and the admin page: the ports listening now
    (in the order given to ``Listeners``), the last error opening the others ("" if none), and
    the namespace they live in."""

    ports: tuple[int, ...] = ()
    error: str = ""
    netns: str = ""


class _Entry:
    """A workload's listeners while it is local: opened (maybe partly), served, closed once."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload                 # the snapshot's object that opened it
        self.netns = workload.spec.netns
        self.listeners: dict[int, trio.SocketListener] = {}
        self.stops: dict[int, Callable[[], None]] = {}    # listeners served elsewhere
        self.error = ""
        self.scope = trio.CancelScope()          # the accept loops'
        self.accepts: trio.Nursery | None = None

    @property
    def name(self) -> str:
        return f"{self.workload.metadata.namespace}/{self.workload.metadata.name}"


def _key(w: Workload) -> WorkloadKey:
    return (w.metadata.namespace, w.metadata.name)


class Listeners:
    """The in-pod listeners of every local netns workload.

    Start ``run`` with ``nursery.start``; then call ``reconcile`` with each new snapshot.
    ``open_listener(netns, host, port)`` opens one listener (default: ``listen_in``, inside
    the pod's netns); ``ports`` are the outbound, inbound-plaintext and HBONE ports, in that
    order; listeners that failed to open are retried every ``retry_interval`` seconds and on
    every ``reconcile``.
    """

    def __init__(self, handlers: Handlers, *, open_listener: OpenListener = listen_in,
                 ports: tuple[int, int, int] = PORTS, host: str = "0.0.0.0",
                 retry_interval: float = RETRY_INTERVAL) -> None:
        if len(ports) != 3 or len(set(ports)) != 3:
            raise ValueError(f"ports must be three different ports (outbound, inbound plaintext, "
                             f"HBONE), got {ports!r}")
        self._open_listener = open_listener
        self._host = host
        self._retry_interval = retry_interval
        self._served = tuple(zip(("outbound", "inbound_plain", "inbound_hbone"), ports,
                                 (handlers.outbound, handlers.inbound_plain, handlers.inbound_hbone)))
        self._serve_outbound = handlers.serve_outbound
        self._ports = tuple(ports)
        self._entries: dict[WorkloadKey, _Entry] = {}
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()                  # one reconcile or retry pass at a time
        self._changed = trio.Event()

    # --- service --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: accept loops, connection tasks and the periodic retry live in
        a nursery owned here. Started once ``reconcile`` may be called. On the way out every
        listener is closed (connections end with the nursery, as everything it owns does)."""
        if self._nursery is not None:
            raise RuntimeError("Listeners.run() is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    await trio.sleep(self._retry_interval)
                    if any(self._incomplete(e) for e in self._entries.values()):
                        async with self._lock:
                            await self._open_missing()
        finally:
            self._nursery = None
            for entry in self._entries.values():
                self._close(entry)
            self._entries.clear()
            self._notify()

    async def reconcile(self, snapshot: Snapshot) -> None:
        """Make the listeners match ``snapshot``; idempotent.

        Every local workload with ``spec.netns`` gets its three listeners inside that netns
        (those not open yet are opened; earlier failures are retried). A workload that is gone,
        or whose netns path changed, has its listeners closed and accept loops cancelled; its
        open connections are left alone. A workload whose listeners cannot be opened (say its
        netns does not exist yet) is recorded in ``status()`` and retried; it never holds up
        the others. Returns once every attempt has finished.
        """
        if self._nursery is None:
            raise RuntimeError("Listeners.run() must be started before reconcile()")
        wanted = {_key(w): w for w in snapshot.local_workloads if w.spec.netns}
        async with self._lock:
            for key, entry in list(self._entries.items()):
                w = wanted.get(key)
                if w is None or w.spec.netns != entry.netns:
                    log.info("closing listeners of %s in %s (%s)", entry.name, entry.netns,
                             "workload gone" if w is None else f"netns now {w.spec.netns}")
                    self._close(self._entries.pop(key))
            for key, w in wanted.items():
                if key not in self._entries:
                    entry = _Entry(w)
                    entry.accepts = await self._nursery.start(self._serve_entry, entry)
                    self._entries[key] = entry
            await self._open_missing()
        self._notify()

    # --- readiness ------------------------------------------------------------------------------

    def status(self) -> dict[str, WorkloadListeners]:
        """Per local netns workload ("namespace/name"): its listening ports and last error."""
        return {e.name: WorkloadListeners(ports=tuple(p for p in self._ports if p in e.listeners),
                                          error=e.error, netns=e.netns)
                for e in self._entries.values()}

    def ready(self, snapshot: Snapshot) -> bool:
        """True when every local workload of ``snapshot`` that has a netns has all its listeners
        open in that netns (vacuously true when there is none)."""
        for w in snapshot.local_workloads:
            if not w.spec.netns:
                continue
            entry = self._entries.get(_key(w))
            if entry is None or entry.netns != w.spec.netns or self._incomplete(entry):
                return False
        return True

    async def wait_ready(self, snapshot: Snapshot) -> None:
        """Return as soon as ``ready(snapshot)``; bound it with a timeout (a workload whose
        netns never appears never becomes ready)."""
        while not self.ready(snapshot):
            await self._changed.wait()

    # --- internals ------------------------------------------------------------------------------

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    def _incomplete(self, entry: _Entry) -> bool:
        return len(entry.listeners) < len(self._ports)

    async def _serve_entry(self, entry: _Entry, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery of ``entry``'s accept loops until ``_close`` cancels it."""
        with entry.scope:
            async with trio.open_nursery() as accepts:
                task_status.started(accepts)
                await trio.sleep_forever()

    def listener(self, workload: Workload, port: int) -> trio.SocketListener | None:
        """The open listener of ``workload`` on ``port`` (the eBPF redirect steers inbound to 15006's)."""
        entry = self._entries.get(_key(workload))
        return entry.listeners.get(port) if entry is not None else None

    async def _open_missing(self) -> None:
        async with trio.open_nursery() as nursery:
            for entry in self._entries.values():
                if self._incomplete(entry):
                    nursery.start_soon(self._open_entry, entry)

    async def _open_entry(self, entry: _Entry) -> None:
        errors: list[str] = []
        opened: list[int] = []
        for kind, port, handler in self._served:
            if port in entry.listeners:
                continue
            try:
                listener = await self._open_listener(entry.netns, self._host, port)
            except OSError as e:
                errors.append(str(e))
                if isinstance(e, NetnsError):
                    break                  # the namespace itself: the other ports would fail alike
                continue
            if entry.scope.cancel_called:  # closed meanwhile (cannot happen under the lock; cheap)
                listener.socket.close()
                return
            entry.listeners[port] = listener
            opened.append(port)
            if kind == "outbound" and self._serve_outbound is not None:
                entry.stops[port] = self._serve_outbound(entry.workload, listener)
                continue
            assert entry.accepts is not None
            entry.accepts.start_soon(self._accept_loop, entry, kind, port, handler, listener)
        error = "; ".join(errors)
        if error and error != entry.error:
            log.warning("listeners of %s not (all) open, retrying every %gs: %s", entry.name,
                        self._retry_interval, error)
        if opened:
            log.info("listening for %s in %s on %s", entry.name, entry.netns,
                     ", ".join(map(str, opened)))
        entry.error = error
        if opened or error:
            self._notify()

    async def _accept_loop(self, entry: _Entry, kind: str, port: int, handler: Handler,
                           listener: trio.SocketListener) -> None:
        assert self._nursery is not None
        connections = self._nursery          # not the entry's: closing listeners keeps connections
        while True:
            try:
                stream = await accept(listener, f"{port} for {entry.name}")
            except OSError as e:
                log.error("listener %d of %s failed, reopening it: %s", port, entry.name, e)
                if entry.listeners.get(port) is listener:
                    del entry.listeners[port]
                    entry.error = f"accept on {port} failed: {e}"
                listener.socket.close()
                self._notify()
                return
            if stream is None:
                return
            connections.start_soon(self._connection, entry.workload, entry.name, kind, port,
                                   handler, stream)

    @staticmethod
    async def _connection(workload: Workload, name: str, kind: str, port: int, handler: Handler,
                          stream: trio.SocketStream) -> None:
        try:
            await handler(workload, stream)
        except Exception:
            log.exception("%s handler failed for a connection to %s on %d", kind, name, port)
        finally:
            await trio.aclose_forcefully(stream)

    def hand_over(self, workload: Workload, handler: Handler, stream: trio.SocketStream) -> None:
        """Serve a connection accepted elsewhere (the fast path declined it) like one accepted
        here: ``handler`` in its own task, the stream closed when it returns."""
        if self._nursery is None:
            stream.socket.close()
            return
        name = f"{workload.metadata.namespace}/{workload.metadata.name}"
        self._nursery.start_soon(self._connection, workload, name, "outbound", self._ports[0],
                                 handler, stream)

    @staticmethod
    def _close(entry: _Entry) -> None:
        entry.scope.cancel()
        for port, listener in entry.listeners.items():
            stop = entry.stops.pop(port, None)
            if stop is not None:
                stop()
            else:
                listener.socket.close()
        entry.listeners.clear()
