"""connections.py: the live-connection registry — the one place that reacts to policy changes.

Every connection the node authorizes (inbound HBONE, inbound plaintext, same-node fast path)
is tracked with the facts it was authorized on and the cancel scope of its relay. On each new
snapshot the registry authorizes them again; one that is now denied is cancelled, which makes
the relay reset both sides (DESIGN.md: "a connection that is now denied is closed").
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import trio

from agent.decide.authorize import Deny, Facts, authorize
from agent.state.snapshot import StateHolder
from controller.api import SpiffeId

log = logging.getLogger("nodemesh.agent.connections")


@dataclass(eq=False)
class Live:
    """One authorized connection in flight."""

    destination: tuple[str, str]          # (namespace, name) of the local workload served
    port: int                             # the workload's port
    source_identity: SpiffeId | None
    source_ip: str
    scope: trio.CancelScope               # or anything with .cancel() (the fast path's relays)
    started: float = field(default_factory=time.monotonic)
    denied: Deny | None = None            # set when a policy change closed it

    def facts(self, workload) -> Facts:
        return Facts(destination=workload, port=self.port, source_identity=self.source_identity,
                     source_ip=self.source_ip)


class Registry:
    def __init__(self) -> None:
        self._live: set[Live] = set()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, live: Live) -> None:
        """Track ``live`` until ``discard``; atomic, so the splice engine's thread may call it."""
        self._live.add(live)

    def discard(self, live: Live) -> None:
        self._live.discard(live)

    @contextmanager
    def track(self, live: Live) -> Iterator[Live]:
        self._live.add(live)
        try:
            yield live
        finally:
            self._live.discard(live)

    def reauthorize(self, snapshot) -> list[Live]:
        """Cancel every tracked connection ``snapshot`` now denies; return them."""
        return [live for live in list(self._live) if self.check(live, snapshot)]

    def check(self, live: Live, snapshot) -> bool:
        """Cancel ``live`` if ``snapshot`` denies it (True then). For a connection tracked only
        after it was decided and dialled: a policy change published meanwhile is caught here."""
        workload = snapshot.workload(*live.destination)
        if workload is None or live.denied is not None:
            return False  # a vanished workload's connections end with its pod
        decision = authorize(snapshot, live.facts(workload))
        if not isinstance(decision, Deny):
            return False
        live.denied = decision
        live.scope.cancel()
        log.info("closing connection from %s (%s) to %s/%s:%d: now denied by %s rule %s",
                 live.source_ip, live.source_identity.uri if live.source_identity else "plaintext",
                 *live.destination, live.port, decision.policy, decision.rule)
        return True

    async def run(self, holder: StateHolder, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Re-authorize on every published snapshot, forever."""
        version = holder.current.version
        task_status.started()
        while True:
            snap = await holder.wait_newer(version)
            version = snap.version
            self.reauthorize(snap)
