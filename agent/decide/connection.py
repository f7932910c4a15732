"""connection.py: the one decision sequence for an outgoing connection — plan, pick, authorize.

Both outbound paths run it: the trio handler (``agent.proxy.outbound``, once per attempt) and
the same-node fast path (``agent.proxy.fastpath``, on the splice engine's thread).
``OutboundDecider`` memoises what is pure for a snapshot (the plan of a source's destination,
the authorization of a source at an endpoint); the pick is made afresh each time, since it
reads the balancer's live stats. No I/O, no trio: ``now`` comes in, ``rng`` is the caller's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from agent.decide.authorize import Allow, Deny, Facts, authorize
from agent.decide.balancer import NoEndpoint, Stats, pick
from agent.decide.plan import NoRoute, Passthrough, Upstream, plan_outbound
from agent.state.snapshot import Endpoint, Snapshot
from controller.api import SpiffeId, Workload

MEMO_SIZE = 4096   # plans (and authorizations) kept per snapshot; past it they are made anew


def authorize_connection(snap: Snapshot, workload: Workload, port: int, source: SpiffeId | None,
                         source_ip: str) -> Allow | Deny:
    """The destination's decision on a connection to ``workload``'s ``port`` from ``source``
    (None: plaintext) at ``source_ip`` — the L4 facts every path authorizes on. Pure."""
    return authorize(snap, Facts(destination=workload, port=port, source_identity=source,
                                 source_ip=source_ip))


@dataclass(frozen=True, slots=True)
class Planned:
    """Where ``source``'s connection goes (``plan``) and the identity it goes as."""

    source: Workload
    source_identity: SpiffeId
    plan: Passthrough | Upstream


class OutboundDecider:
    """Plan, pick and authorize outgoing connections against one snapshot at a time.

    Safe to share between the trio thread and the engine thread: the memo is replaced whole
    when the snapshot changes and only ever filled for the snapshot it belongs to, so a
    decision made on one snapshot is never served for another.
    """

    def __init__(self, *, passthrough: bool, stats: Stats, rng: random.Random | None = None) -> None:
        self.passthrough, self.stats = passthrough, stats
        self.rng = rng if rng is not None else random.Random()
        self._memo: tuple[Snapshot | None, dict, dict] = (None, {}, {})

    def _tables(self, snap: Snapshot) -> tuple[dict, dict]:
        memo = self._memo
        if memo[0] is not snap:
            memo = self._memo = (snap, {}, {})
        return memo[1], memo[2]

    def plan(self, snap: Snapshot, source: Workload, ip: str, port: int) -> Planned:
        """Where ``source``'s connection to ``ip:port`` goes (``plan.plan_outbound``), as the
        snapshot's view of ``source``. Raises ``NoRoute``."""
        plans, _ = self._tables(snap)
        src = snap.workload(source.metadata.namespace, source.metadata.name) or source
        key = (id(src), ip, port, self.passthrough)
        found = plans.get(key)
        if found is None or found.source is not src:
            if len(plans) >= MEMO_SIZE:
                plans.clear()
            found = plans[key] = Planned(src, snap.identity_of(src),
                                         plan_outbound(snap, src, ip, port, passthrough=self.passthrough))
        return found

    def pick(self, planned: Planned, *, now: float, exclude: frozenset = frozenset()) -> Endpoint:
        """The endpoint for one attempt (the balancer, over the upstream's endpoints and the
        source's locality, skipping ``exclude``). Raises ``NoRoute`` (flag UF) when none is left."""
        plan = planned.plan
        try:
            return pick(plan.endpoints, algorithm=plan.algorithm, stats=self.stats, rng=self.rng,
                        locality=planned.source.spec.locality, locality_failover=plan.locality_failover,
                        exclude=exclude, now=now, service=plan.name)
        except NoEndpoint as e:
            raise NoRoute(str(e), "UF") from None

    def authorization(self, snap: Snapshot, planned: Planned, endpoint: Endpoint) -> Allow | Deny:
        """The destination's decision for ``planned.source`` at ``endpoint`` (an endpoint on this
        node: the source-side proxy delivers it and so enforces it). Pure, memoised."""
        _, decisions = self._tables(snap)
        src = planned.source
        key = (id(src), id(endpoint))
        found = decisions.get(key)
        if found is None or found[0] is not src or found[1] is not endpoint:
            if len(decisions) >= MEMO_SIZE:
                decisions.clear()
            found = decisions[key] = (src, endpoint, authorize_connection(
                snap, endpoint.workload, endpoint.port, planned.source_identity, src.spec.addresses[0]))
        return found[2]
