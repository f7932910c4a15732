"""pick(): locality tiers, each algorithm, peak EWMA, ejection; seeded rng and explicit now."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from agent.decide.balancer import DEFAULT_RTT, NoEndpoint, Stats, gen_pair, pick
from agent.state.snapshot import Endpoint
from controller.api import Locality, ObjectMeta, SpiffeId, Workload, WorkloadSpec

HERE = Locality(region="eu-west", zone="eu-west-1a")


def ep(name: str, region: str = "eu-west", zone: str = "eu-west-1a", port: int = 8080) -> Endpoint:
    """An endpoint whose address is its name: enough for the balancer, which only keys on it."""
    loc = Locality(region=region, zone=zone)
    w = Workload(metadata=ObjectMeta(name=name, namespace="shop"),
                 spec=WorkloadSpec(node="n", addresses=(name,), locality=loc, netns="/x"))
    return Endpoint(workload=w, address=name, port=port, node="n", locality=loc,
                    identity=SpiffeId("cluster.local", "shop", "web"))


A1, A2 = ep("a1"), ep("a2")                         # our zone
B1 = ep("b1", zone="eu-west-1b")                    # our region, another zone
C1 = ep("c1", region="us-east", zone="us-east-1a")  # another region
ALL = (A1, A2, B1, C1)


def name(e: Endpoint) -> str:
    return e.workload.metadata.name


def picks(endpoints, n: int = 200, *, algorithm: str = "random", stats: Stats | None = None,
          seed: int = 1, now: float = 0.0, **kw) -> Counter:
    stats = stats or Stats()
    rng = random.Random(seed)
    kw.setdefault("locality", HERE)
    kw.setdefault("locality_failover", True)
    return Counter(name(pick(endpoints, algorithm=algorithm, stats=stats, rng=rng, now=now, **kw))
                   for _ in range(n))


# --- locality --------------------------------------------------------------------------------------

def test_same_zone_first():
    assert set(picks(ALL)) == {"a1", "a2"}


def test_region_when_the_zone_is_excluded():
    assert set(picks(ALL, exclude=frozenset({A1.key, A2.key}))) == {"b1"}


def test_any_region_when_the_region_is_gone():
    assert set(picks(ALL, exclude=frozenset({A1.key, A2.key, B1.key}))) == {"c1"}


def test_failover_when_the_zone_is_ejected():
    stats = Stats()
    for e in (A1, A2):
        for _ in range(5):
            stats.connect_failed(e, now=0.0)
    assert set(picks(ALL, stats=stats, now=1.0)) == {"b1"}


def test_no_preference_without_failover_or_locality():
    assert set(picks(ALL, locality_failover=False)) == {"a1", "a2", "b1", "c1"}
    assert set(picks(ALL, locality=None)) == {"a1", "a2", "b1", "c1"}


def test_zone_without_region_match_is_not_our_zone():
    """Zone names are only compared within our region."""
    elsewhere = ep("x", region="ap-south", zone="eu-west-1a")
    assert set(picks((elsewhere, B1))) == {"b1"}


# --- algorithms --------------------------------------------------------------------------------

def test_round_robin_cycles_exactly_per_service():
    stats = Stats()
    eps = (A1, A2, ep("a3"))
    got = [name(pick(eps, algorithm="round_robin", stats=stats, rng=random.Random(0), locality=HERE,
                     locality_failover=True, now=0.0, service="shop/web:80")) for _ in range(7)]
    assert got == ["a1", "a2", "a3", "a1", "a2", "a3", "a1"]
    other = pick(eps, algorithm="round_robin", stats=stats, rng=random.Random(0), locality=HERE,
                 locality_failover=True, now=0.0, service="shop/echo:9000")
    assert name(other) == "a1"   # its own cursor


def test_random_uses_the_rng():
    assert picks(ALL, seed=5, locality=None) == picks(ALL, seed=5, locality=None)
    assert picks(ALL, seed=5, locality=None) != picks(ALL, seed=6, locality=None)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_gen_pair_is_two_distinct_uniform_indices(n):
    rng = random.Random(42)
    pairs = Counter(gen_pair(rng, n) for _ in range(4000 * n))
    assert all(a != b and 0 <= a < n and 0 <= b < n for a, b in pairs)
    assert len(pairs) == n * (n - 1)                        # every ordered pair occurs
    assert max(pairs.values()) < 1.25 * min(pairs.values())


def test_least_request_prefers_fewer_active():
    stats = Stats()
    stats.started(A1)
    # with two endpoints the pair is always both of them, so the busier one never wins
    assert picks((A1, A2), algorithm="least_request", stats=stats) == Counter({"a2": 200})
    stats.started(A2)
    stats.started(A2)
    assert picks((A1, A2), algorithm="least_request", stats=stats) == Counter({"a1": 200})


def test_least_request_never_picks_the_busiest_of_three():
    stats = Stats()
    a3 = ep("a3")
    for _ in range(3):
        stats.started(a3)
    got = picks((A1, A2, a3), 300, algorithm="least_request", stats=stats)
    assert got["a3"] == 0 and got["a1"] > 50 and got["a2"] > 50


def test_finished_balances_started_and_floors_at_zero():
    stats = Stats()
    stats.started(A1)
    stats.finished(A1)
    stats.finished(A1)
    assert stats.active(A1) == 0


# --- ewma --------------------------------------------------------------------------------------

def test_ewma_prefers_the_faster_endpoint():
    stats = Stats()
    slow, fast, mid = ep("slow"), ep("fast"), ep("mid")
    stats.connect_latency(slow, 0.050, now=0.0)
    stats.connect_latency(mid, 0.010, now=0.0)
    stats.connect_latency(fast, 0.002, now=0.0)
    got = picks((slow, fast, mid), 600, algorithm="ewma", stats=stats, now=0.0)
    assert got["slow"] == 0 and got["fast"] > got["mid"] > 0
    assert got["fast"] == pytest.approx(400, abs=40)          # it wins both pairs it is in


def test_ewma_cost_is_latency_times_active_plus_one():
    stats = Stats()
    slow, fast = ep("slow"), ep("fast")
    stats.connect_latency(slow, 0.050, now=0.0)
    stats.connect_latency(fast, 0.001, now=0.0)
    for _ in range(49):
        stats.started(fast)
    assert stats.cost(fast, 0.0) == pytest.approx(0.050)     # 1 ms x 50 ...
    for _ in range(2):
        stats.started(fast)
    assert stats.cost(fast, 0.0) == pytest.approx(0.052)     # ... and 52 > 50 ms x 1
    assert set(picks((slow, fast), 20, algorithm="ewma", stats=stats)) == {"slow"}


def test_ewma_reacts_to_a_slow_down_at_once():
    stats = Stats()
    a, b = ep("a"), ep("b")
    for t in range(10):
        stats.connect_latency(a, 0.001, now=float(t))
        stats.connect_latency(b, 0.003, now=float(t))
    assert set(picks((a, b), 50, algorithm="ewma", stats=stats, now=10.0)) == {"a"}
    stats.connect_latency(a, 0.100, now=10.0)                  # one slow connect: the peak
    assert stats.rtt(a, 10.0) == 0.100
    assert set(picks((a, b), 50, algorithm="ewma", stats=stats, now=10.0)) == {"b"}


def test_ewma_decays_towards_smaller_samples_with_tau():
    stats = Stats(tau=10.0)
    a = ep("a")
    stats.connect_latency(a, 0.100, now=0.0)
    stats.connect_latency(a, 0.004, now=10.0)                  # one tau later
    expected = 0.100 * math.exp(-1) + 0.004 * (1 - math.exp(-1))
    assert stats.rtt(a, 10.0) == pytest.approx(expected)
    stats.connect_latency(a, 0.004, now=10.0)                  # no time passed: no weight
    assert stats.rtt(a, 10.0) == pytest.approx(expected)


def test_unsampled_endpoints_cost_the_default_and_get_tried():
    stats = Stats()
    warm, new = ep("warm"), ep("new")
    stats.connect_latency(warm, 0.005, now=0.0)
    assert stats.rtt(new, 0.0) == DEFAULT_RTT == 0.001
    assert set(picks((warm, new), 20, algorithm="ewma", stats=stats)) == {"new"}


def test_an_idle_slow_estimate_relaxes_towards_the_default():
    stats = Stats(tau=10.0)
    a = ep("a")
    stats.connect_latency(a, 0.101, now=0.0)
    assert stats.rtt(a, 0.0) == pytest.approx(0.101)
    assert stats.rtt(a, 10.0) == pytest.approx(0.001 + 0.100 * math.exp(-1))
    assert stats.rtt(a, 1000.0) == pytest.approx(0.001)


# --- ejection ------------------------------------------------------------------------------------

def fail(stats: Stats, e: Endpoint, n: int, now: float) -> None:
    for _ in range(n):
        stats.connect_failed(e, now)


def test_five_consecutive_failures_eject_for_30s_then_60s():
    stats = Stats()
    fail(stats, A1, 4, now=0.0)
    assert not stats.ejected(A1, 0.0)
    fail(stats, A1, 1, now=0.0)
    assert stats.ejected(A1, 29.9) and not stats.ejected(A1, 30.0)
    fail(stats, A1, 5, now=30.0)
    assert stats.ejected(A1, 89.9) and not stats.ejected(A1, 90.0)


def test_a_success_resets_failures_and_doubling():
    stats = Stats()
    fail(stats, A1, 5, now=0.0)
    fail(stats, A1, 4, now=30.0)
    stats.connect_latency(A1, 0.001, now=30.0)
    fail(stats, A1, 4, now=31.0)
    assert not stats.ejected(A1, 31.0)                         # the count started again
    fail(stats, A1, 1, now=31.0)
    assert stats.ejected(A1, 60.9) and not stats.ejected(A1, 61.0)   # 30 s again, not 60


def test_ejection_is_capped():
    stats = Stats(eject_for=30.0, eject_max=100.0)
    now = 0.0
    for _ in range(4):                                         # 30, 60, 100 (not 120), 100
        fail(stats, A1, 5, now=now)
        now += 1000.0
    assert stats.ejected(A1, now - 1000.0 + 99.9) and not stats.ejected(A1, now - 1000.0 + 100.0)


def test_ejected_endpoint_is_skipped_until_it_expires():
    stats = Stats()
    fail(stats, A1, 5, now=0.0)
    assert set(picks((A1, A2), stats=stats, now=10.0)) == {"a2"}
    assert set(picks((A1, A2), stats=stats, now=30.0)) == {"a1", "a2"}


def test_all_ejected_falls_back_to_them():
    stats = Stats()
    fail(stats, A1, 5, now=0.0)
    fail(stats, A2, 5, now=0.0)
    assert set(picks((A1, A2), stats=stats, now=1.0)) == {"a1", "a2"}


def test_retain_forgets_departed_endpoints():
    stats = Stats()
    fail(stats, A1, 5, now=0.0)
    stats.started(A2)
    stats.retain([A2.key])
    assert not stats.ejected(A1, 1.0) and stats.active(A2) == 1


# --- nothing left ----------------------------------------------------------------------------------

def test_no_endpoints():
    with pytest.raises(NoEndpoint) as e:
        pick((), algorithm="ewma", stats=Stats(), rng=random.Random(0), locality=HERE,
             locality_failover=True, now=0.0, service="shop/web:80")
    assert (e.value.service, e.value.reason) == ("shop/web:80", "the service has no endpoints")


def test_every_endpoint_already_tried():
    rng, stats = random.Random(0), Stats()
    tried: set = set()
    order = []
    for _ in range(len(ALL)):                                  # the caller's retry loop
        e = pick(ALL, algorithm="round_robin", stats=stats, rng=rng, locality=HERE,
                 locality_failover=True, exclude=frozenset(tried), now=0.0, service="s")
        order.append(name(e))
        tried.add(e.key)
    assert order[:2] in (["a1", "a2"], ["a2", "a1"]) and order[2:] == ["b1", "c1"]
    with pytest.raises(NoEndpoint, match="all 4 endpoints were already tried"):
        pick(ALL, algorithm="round_robin", stats=stats, rng=rng, locality=HERE,
             locality_failover=True, exclude=frozenset(tried), now=0.0, service="s")


def test_unknown_algorithm():
    with pytest.raises(ValueError, match="unknown load-balancing algorithm 'fastest'"):
        pick(ALL, algorithm="fastest", stats=Stats(), rng=random.Random(0), locality=None,
             locality_failover=False, now=0.0)
