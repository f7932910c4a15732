"""balancer.py: pure endpoint choice, ``(endpoints, stats, rng, now) -> Endpoint``. No I/O, no trio,
no clock: callers pass ``rng`` and ``now`` (monotonic seconds).

Owns the algorithms (random, round_robin, least_request and ewma, the last two as power of two
choices like linkerd's ``pool/p2c``), locality preference and the per-endpoint ``Stats`` they read.

Retrying a failed connect is the caller's loop, because only it owns the clock and the deadline::

    tried: set = set()
    while True:                                   # inside the connect timeout's cancel scope
        ep = pick(eps, ..., exclude=frozenset(tried), now=now())   # NoEndpoint ends the loop
        stats.started(ep)
        try:
            <connect>; stats.connect_latency(ep, elapsed, now()); break
        except OSError:
            stats.connect_failed(ep, now()); stats.finished(ep); tried.add(ep.key)
"""
from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from controller.api import Locality

if TYPE_CHECKING:
    from agent.state.snapshot import Endpoint

EndpointKey = tuple[str, int]   # (address, port), ``Endpoint.key``

DEFAULT_TAU = 10.0          # s, peak-EWMA time constant (linkerd's EWMA decay)
# An endpoint without a sample costs as much as a fast in-cluster connect, so new endpoints are
# tried soon (linkerd uses a more conservative 30 ms); one slow sample then raises it to the peak.
DEFAULT_RTT = 0.001         # s
EJECT_AFTER = 5             # consecutive connect failures
EJECT_FOR = 30.0            # s, the first ejection; each further one doubles ...
EJECT_MAX = 300.0           # s, ... up to this; a successful connect resets the count


class NoEndpoint(Exception):
    """Nothing is left to pick for ``service`` (as the caller named it in ``pick``)."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"no endpoint for {service or 'service'}: {reason}")
        self.service = service
        self.reason = reason


@dataclass
class _EndpointStats:
    active: int = 0
    rtt: float | None = None       # peak-EWMA connect latency, seconds
    stamp: float = 0.0             # when ``rtt`` was last sampled
    failures: int = 0              # consecutive connect failures since the last success/ejection
    ejections: int = 0             # since the last successful connect
    ejected_until: float = -math.inf


class Stats:
    """Mutable per-endpoint load, latency and ejection state, keyed by ``Endpoint.key``, plus a
    round-robin cursor per service. One per proxy. Its events take a lock, since the splice
    engine's thread (agent/proxy/fastpath.py) records connections too; reads in ``pick`` don't.

    Ejection: ``eject_after`` consecutive connect failures eject an endpoint for ``eject_for``
    seconds, doubling with each further ejection up to ``eject_max``; a successful connect resets
    both counts. Call ``retain`` with the live endpoint keys after each snapshot so departed
    endpoints do not accumulate.
    """

    def __init__(self, *, tau: float = DEFAULT_TAU, default_rtt: float = DEFAULT_RTT,
                 eject_after: int = EJECT_AFTER, eject_for: float = EJECT_FOR,
                 eject_max: float = EJECT_MAX) -> None:
        self.tau, self.default_rtt = tau, default_rtt
        self.eject_after, self.eject_for, self.eject_max = eject_after, eject_for, eject_max
        self._eps: dict[EndpointKey, _EndpointStats] = {}
        self._cursors: dict[str, int] = {}
        self._lock = threading.Lock()

    def _get(self, ep: Endpoint) -> _EndpointStats:
        s = self._eps.get(ep.key)
        if s is None:
            s = self._eps[ep.key] = _EndpointStats()
        return s

    # --- events ---------------------------------------------------------------------------------

    def started(self, ep: Endpoint) -> None:
        """A connection (or connect attempt) to ``ep`` began."""
        with self._lock:
            self._get(ep).active += 1

    def finished(self, ep: Endpoint) -> None:
        """A connection to ``ep`` ended (never goes below zero)."""
        with self._lock:
            s = self._get(ep)
            s.active = max(0, s.active - 1)

    def connect_latency(self, ep: Endpoint, seconds: float, now: float) -> None:
        """A connect to ``ep`` succeeded after ``seconds``: update the peak EWMA (a sample above
        the estimate replaces it; otherwise the estimate moves towards the sample by
        ``1 - exp(-elapsed/tau)``) and clear the failure and ejection counts."""
        with self._lock:
            s = self._get(ep)
            if s.rtt is None or seconds > s.rtt:
                s.rtt = seconds
            else:
                decay = math.exp(-max(0.0, now - s.stamp) / self.tau)
                s.rtt = s.rtt * decay + seconds * (1.0 - decay)
            s.stamp = now
            s.failures = s.ejections = 0

    def connect_failed(self, ep: Endpoint, now: float) -> None:
        """A connect to ``ep`` failed; the ``eject_after``-th in a row ejects it."""
        with self._lock:
            s = self._get(ep)
            s.failures += 1
            if s.failures >= self.eject_after:
                s.ejections += 1
                s.ejected_until = now + min(self.eject_max, self.eject_for * 2 ** (s.ejections - 1))
                s.failures = 0

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Forget every endpoint whose key is not in ``keys``."""
        keep = set(keys)
        for k in [k for k in self._eps if k not in keep]:
            del self._eps[k]

    # --- reads ----------------------------------------------------------------------------------

    def active(self, ep: Endpoint) -> int:
        s = self._eps.get(ep.key)
        return s.active if s else 0

    def ejected(self, ep: Endpoint, now: float) -> bool:
        s = self._eps.get(ep.key)
        return s is not None and now < s.ejected_until

    def rtt(self, ep: Endpoint, now: float) -> float:
        """The peak-EWMA connect latency; ``default_rtt`` without a sample. An estimate above the
        default relaxes towards it while no sample arrives (tower's PeakEwma relaxes towards
        zero), so an endpoint that was slow once is tried again after a few ``tau``."""
        s = self._eps.get(ep.key)
        if s is None or s.rtt is None:
            return self.default_rtt
        if s.rtt <= self.default_rtt:
            return s.rtt
        return self.default_rtt + (s.rtt - self.default_rtt) * math.exp(-max(0.0, now - s.stamp) / self.tau)

    def cost(self, ep: Endpoint, now: float) -> float:
        """Linkerd's ewma load: peak-EWMA latency x (active + 1)."""
        return self.rtt(ep, now) * (self.active(ep) + 1)

    def next_cursor(self, service: str) -> int:
        """The round-robin position for ``service``, then advance it."""
        i = self._cursors.get(service, 0)
        self._cursors[service] = i + 1
        return i


# --- choosing -----------------------------------------------------------------------------------

def gen_pair(rng: random.Random, n: int) -> tuple[int, int]:
    """Two distinct indices below ``n`` (n >= 2), uniformly, as linkerd's ``gen_pair``."""
    a = rng.randrange(n)
    b = rng.randrange(n - 1)
    return a, (b + 1 if b >= a else b)


def _random(c: Sequence[Endpoint], stats: Stats, rng: random.Random, now: float, service: str) -> Endpoint:
    return rng.choice(c)


def _round_robin(c: Sequence[Endpoint], stats: Stats, rng: random.Random, now: float, service: str) -> Endpoint:
    return c[stats.next_cursor(service) % len(c)]


def _p2c(load: Callable[[Endpoint], float]) -> Callable[..., Endpoint]:
    def choose(c: Sequence[Endpoint], stats: Stats, rng: random.Random, now: float, service: str) -> Endpoint:
        if len(c) == 1:
            return c[0]
        a, b = gen_pair(rng, len(c))
        return c[a] if load(c[a], stats, now) <= load(c[b], stats, now) else c[b]
    return choose


ALGORITHMS: dict[str, Callable[..., Endpoint]] = {
    "random": _random,
    "round_robin": _round_robin,
    "least_request": _p2c(lambda ep, stats, now: stats.active(ep)),
    "ewma": _p2c(lambda ep, stats, now: stats.cost(ep, now)),
}


def _nearest(eps: list[Endpoint], here: Locality | None) -> list[Endpoint]:
    if here is None or not here.region:
        return eps
    region = [e for e in eps if e.locality.region == here.region]
    if here.zone:
        zone = [e for e in region if e.locality.zone == here.zone]
        if zone:
            return zone
    return region or eps


def pick(endpoints: Sequence[Endpoint], *, algorithm: str, stats: Stats, rng: random.Random,
         locality: Locality | None, locality_failover: bool,
         exclude: frozenset[EndpointKey] = frozenset(), now: float, service: str = "") -> Endpoint:
    """Choose one of ``endpoints``.

    Candidates: endpoints whose key is not in ``exclude`` and that are not ejected; if ejection
    would leave none, the ejected ones too (Envoy's panic mode: a guess from past failures should
    not turn into a certain outage). With ``locality_failover``, only those in ``locality``'s zone
    (same region and zone), else its region, else all. ``service`` names the round-robin cursor
    and the error. Raises ``NoEndpoint`` when there are no endpoints or all are excluded, and
    ``ValueError`` for an unknown algorithm.
    """
    choose = ALGORITHMS.get(algorithm)
    if choose is None:
        raise ValueError(f"unknown load-balancing algorithm {algorithm!r}")
    if not endpoints:
        raise NoEndpoint(service, "the service has no endpoints")
    available = [e for e in endpoints if e.key not in exclude]
    if not available:
        raise NoEndpoint(service, f"all {len(endpoints)} endpoints were already tried")
    candidates = [e for e in available if not stats.ejected(e, now)] or available
    if locality_failover:
        candidates = _nearest(candidates, locality)
    return choose(candidates, stats, rng, now, service)
