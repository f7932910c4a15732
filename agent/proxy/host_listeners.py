"""host_listeners.py: the host namespace's listeners for host-process workloads (``spec.cgroup``
and no netns: a systemd service) — one 127.0.0.1:15001 that all of them share, and 15006 / 15008
on each one's own IPv4 addresses — reconciled against the snapshot.

The host namespace is the agent's own (in the lab: the node's netns, where the lab starts the
agent). Which workload a connection belongs to comes from where it arrived: the local address
for 15006 and 15008 (a workload's addresses are its own in a snapshot), and for 15001, where
every host workload's connections land, the redirector's ``origin`` (the cgroup id connect4
recorded, or the SYN's mark). Then the same handlers as pods' serve it. Decides nothing about a
connection and does not own open ones: closing a listener leaves its connections running.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

import trio

from agent.base.constants import IN_POD_PORTS
from agent.base.netns import listen_in
from agent.proxy.listeners import Handlers, OpenListener, WorkloadListeners, accept
from agent.state.snapshot import Snapshot
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.listeners")

WorkloadKey = tuple[str, str]                                          # (namespace, name)
Origin = Callable[[object], tuple[WorkloadKey, tuple[str, int]]]       # accepted socket -> (who, where to)
HostOutbound = Callable[[Workload, trio.SocketStream, tuple[str, int]], Awaitable[None]]
OUTBOUND_HOST = "127.0.0.1"
RETRY_INTERVAL = 2.0


def is_host_workload(w: Workload) -> bool:
    """Served from the host namespace: known by cgroup, with no netns of its own."""
    return bool(w.spec.cgroup) and not w.spec.netns


def _ipv4(w: Workload) -> list[str]:
    return [a for a in w.spec.addresses if ":" not in a]


def _name(key: WorkloadKey) -> str:
    return f"{key[0]}/{key[1]}"


class HostListeners:
    """The host listeners of every local host workload.

    ``handlers``: as for pods (listeners.py), except that ``outbound`` is called with the
    original destination too, as ``outbound(workload, stream, dst)`` (``Outbound.handle``);
    ``origin(sock)``: the redirector's ``host_origin``. Start ``run`` with ``nursery.start``,
    then call ``reconcile`` with each snapshot; listeners that failed to open (an address that is
    not on this host yet, a port in use) are retried every ``retry_interval`` seconds.
    """

    def __init__(self, handlers: Handlers, origin: Origin, *, open_listener: OpenListener = listen_in,
                 ports: tuple[int, int, int] = IN_POD_PORTS, retry_interval: float = RETRY_INTERVAL) -> None:
        self._outbound: HostOutbound = handlers.outbound      # type: ignore[assignment]
        self._inbound = {ports[1]: handlers.inbound_plain, ports[2]: handlers.inbound_hbone}
        self._origin, self._open_listener = origin, open_listener
        self._out_port, self._plain_port, self._hbone_port = ports
        self._retry_interval = retry_interval
        self._workloads: dict[WorkloadKey, Workload] = {}
        # (address, port) -> (owner: a workload key, or None for the shared 15001), and what is open
        self._wanted: dict[tuple[str, int], WorkloadKey | None] = {}
        self._open: dict[tuple[str, int], tuple[trio.SocketListener, trio.CancelScope, WorkloadKey | None]] = {}
        self._errors: dict[tuple[str, int], str] = {}
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (accept loops and connections live in a nursery owned here);
        every listener is closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._retry)
                task_status.started()
        finally:
            self._nursery = None
            for address in list(self._open):
                self._close(address)

    async def _retry(self) -> None:
        while True:
            await trio.sleep(self._retry_interval)
            if len(self._open) < len(self._wanted):
                async with self._lock:
                    await self._open_missing()

    async def reconcile(self, snapshot: Snapshot) -> None:
        """Make the host listeners match ``snapshot``'s local host workloads; idempotent. Returns
        once every attempt has finished; failures are in ``status()`` and retried."""
        if self._nursery is None:
            raise RuntimeError("HostListeners.run() must be started before reconcile()")
        workloads = {(w.metadata.namespace, w.metadata.name): w for w in snapshot.local_workloads
                     if is_host_workload(w)}
        wanted: dict[tuple[str, int], WorkloadKey | None] = {}
        if workloads:
            wanted[(OUTBOUND_HOST, self._out_port)] = None
        for key, w in workloads.items():
            for a in _ipv4(w):
                wanted[(a, self._plain_port)] = wanted[(a, self._hbone_port)] = key
        async with self._lock:
            self._workloads, self._wanted = workloads, wanted
            for address in [a for a, (_, _, owner) in self._open.items() if wanted.get(a, ()) != owner]:
                log.info("closing host listener %s:%d", *address)
                self._close(address)
            for address in [a for a in self._errors if a not in wanted]:
                del self._errors[address]
            await self._open_missing()

    # --- readiness ------------------------------------------------------------------------------

    def status(self) -> dict[str, WorkloadListeners]:
        """Per local host workload ("namespace/name"): the ports open on all its addresses (15001:
        the shared one) and the errors opening the others; netns "" (the host's)."""
        out = {}
        for key, w in self._workloads.items():
            mine = self._addresses(w)
            ports = tuple(p for p in (self._out_port, self._plain_port, self._hbone_port)
                          if all(x in self._open for x in mine if x[1] == p))
            error = "; ".join(self._errors[x] for x in mine if x in self._errors)
            out[_name(key)] = WorkloadListeners(ports=ports, error=error, netns="")
        return out

    def ready(self, snapshot: Snapshot) -> bool:
        """True when every local host workload of ``snapshot`` has all its listeners open."""
        for w in snapshot.local_workloads:
            if is_host_workload(w):
                if self._workloads.get((w.metadata.namespace, w.metadata.name)) != w:
                    return False
                if any(x not in self._open for x in self._addresses(w)):
                    return False
        return True

    def _addresses(self, w: Workload) -> list[tuple[str, int]]:
        """What a host workload listens on: the shared 15001, its addresses' 15006 and 15008."""
        return [(OUTBOUND_HOST, self._out_port)] + [(a, p) for a in _ipv4(w)
                                                    for p in (self._plain_port, self._hbone_port)]

    def inbound_sockets(self, workload: Workload) -> dict[str, trio.socket.SocketType]:
        """A host workload's open 15006 listening sockets by address (the ebpf redirect steers
        its declared ports to them)."""
        key = (workload.metadata.namespace, workload.metadata.name)
        return {a: self._open[(a, p)][0].socket for (a, p), owner in self._wanted.items()
                if owner == key and p == self._plain_port and (a, p) in self._open}

    # --- internals ------------------------------------------------------------------------------

    async def _open_missing(self) -> None:
        assert self._nursery is not None
        for address, owner in self._wanted.items():
            if address in self._open:
                continue
            try:
                listener = await self._open_listener(None, *address)
            except OSError as e:
                if self._errors.get(address) != str(e):
                    log.warning("host listener %s:%d not open, retrying every %gs: %s", *address,
                                self._retry_interval, e)
                self._errors[address] = str(e)
                continue
            self._errors.pop(address, None)
            scope = trio.CancelScope()
            self._open[address] = (listener, scope, owner)
            self._nursery.start_soon(self._accept_loop, address, owner, listener, scope)
            log.info("listening in the host netns on %s:%d for %s", *address,
                     "every host workload" if owner is None else _name(owner))

    def _close(self, address: tuple[str, int]) -> None:
        listener, scope, _ = self._open.pop(address)
        scope.cancel()
        listener.socket.close()

    async def _accept_loop(self, address, owner: WorkloadKey | None, listener: trio.SocketListener,
                           scope: trio.CancelScope) -> None:
        assert self._nursery is not None
        connections = self._nursery          # closing a listener keeps its connections
        with scope:
            while True:
                try:
                    stream = await accept(listener, f"host {address[0]}:{address[1]}")
                except OSError as e:
                    log.error("host listener %s:%d failed, reopening it: %s", *address, e)
                    if self._open.get(address, (None,))[0] is listener:
                        del self._open[address]
                        self._errors[address] = f"accept failed: {e}"
                    listener.socket.close()
                    return
                if stream is None:
                    return
                connections.start_soon(self._connection, address, owner, stream)

    async def _connection(self, address, owner: WorkloadKey | None, stream: trio.SocketStream) -> None:
        try:
            if owner is None:
                try:
                    owner, dst = self._origin(stream.socket)
                except OSError as e:
                    log.info("host 15001: dropping a connection: %s", e)
                    return
            w = self._workloads.get(owner)
            if w is None:
                log.info("host %s:%d: %s is not a local host workload any more; dropping a connection",
                         *address, _name(owner))
            elif address[1] == self._out_port:
                await self._outbound(w, stream, dst)
            else:
                await self._inbound[address[1]](w, stream)
        except Exception:
            log.exception("handler failed for a connection on host %s:%d", *address)
        finally:
            await trio.aclose_forcefully(stream)
