"""scenarios.py: what each scenario measures, on the world topo.py builds.

Every scenario returns ``{metric: {target: [value per run]}}``; runs interleave the targets
(rotating the order each run) so that noise from other work on the machine spreads evenly.
After every single measurement all supervised processes are checked to be alive.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

from bench import load
from bench.procs import CpuMeter, Supervisor, descendants, rss_kb
from bench.topo import BULK_PORT, HTTP_PORT, PY, PodNetns, target_address

PY_SPY = str(Path(PY).parent / "py-spy")

Samples = dict[str, dict[str, list[float]]]


@dataclass
class World:
    sup: Supervisor
    ns: PodNetns
    tmp: Path
    pids: dict[str, int | None]            # target -> proxy pid (None for direct)
    runs: int = 5
    restart: dict[str, Callable[[], int]] = field(default_factory=dict)   # target -> new pid

    @property
    def targets(self) -> list[str]:
        return list(self.pids)

    def order(self, run: int, targets: list[str] | None = None) -> list[str]:
        ts = targets or self.targets
        k = run % len(ts)
        return ts[k:] + ts[:k]


def _add(out: Samples, metric: str, target: str, value: float | None) -> None:
    if value is not None:
        out.setdefault(metric, {}).setdefault(target, []).append(value)


# --- (a) same-node L4 plaintext, 1 KB keep-alive ------------------------------------------------

A_SECONDS, A_CONNS, A_RATE, A_LAT_SECONDS = 2, 8, 1000.0, 2.5


def scenario_a(w: World) -> Samples:
    out: Samples = {}
    for run in range(w.runs):
        p50 = {}
        for t in w.order(run):
            host, port = target_address(t, HTTP_PORT)
            cpu = CpuMeter(w.pids[t])
            cpu.start()
            r = load.wrk(w.ns.name, host, port, seconds=A_SECONDS, connections=A_CONNS)
            used = cpu.stop()
            w.sup.check_alive()
            if r.errors:
                raise RuntimeError(f"(a) {t}: wrk reported errors: {r.errors}")
            _add(out, "a_rps", t, r.rps)
            _add(out, "a_cpu_us_per_req", t, used / r.requests * 1e6 if w.pids[t] else None)
            lat = load.latency(w.ns.name, host, port, rate=A_RATE, seconds=A_LAT_SECONDS)
            w.sup.check_alive()
            p50[t] = lat
            _add(out, "a_p50_us", t, lat["p50"])
            _add(out, "a_p99_us", t, lat["p99"])
        for t, lat in p50.items():
            if t != "direct":
                _add(out, "a_added_p50_us", t, lat["p50"] - p50["direct"]["p50"])
                _add(out, "a_added_p99_us", t, lat["p99"] - p50["direct"]["p99"])
    return out


def profile_a(w: World, pid: int, dest: Path, seconds: float = 5.0) -> dict:
    """py-spy on the agent during one extra (a) wrk run (not counted in the results)."""
    return _profile_wrk(w, pid, dest, seconds, close=False)


def profile_c(w: World, pid: int, dest: Path, seconds: float = 5.0) -> dict:
    """py-spy on the agent during one extra (c) wrk run, a new connection per request."""
    return _profile_wrk(w, pid, dest, seconds, close=True)


def _profile_wrk(w: World, pid: int, dest: Path, seconds: float, *, close: bool) -> dict:
    from bench.profile import summarize
    host, port = target_address("nodemesh", HTTP_PORT)
    raw = dest.with_suffix(".raw.txt")
    # --threads: the splice engine's thread apart from the trio thread. Not --nonblocking:
    # that tears about half the stacks (BENCHMARKS.md); pausing the agent 200 times a second
    # costs it a little speed, not the shape of the profile.
    spy = subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-d", f"{seconds + 1:g}", "-r", "200",
                            "--threads", "-f", "raw", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    load.wrk(w.ns.name, host, port, seconds=seconds, connections=C_CONNS if close else A_CONNS,
             close=close)
    err = spy.communicate(timeout=60)[1]
    w.sup.check_alive()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err[-500:]}")
    return summarize(raw)


# --- (c) new connection per request ------------------------------------------------------------

C_SECONDS, C_CONNS = 3.0, 8


def scenario_c(w: World) -> Samples:
    out: Samples = {}
    for run in range(w.runs):
        for t in w.order(run):
            host, port = target_address(t, HTTP_PORT)
            cpu = CpuMeter(w.pids[t])
            cpu.start()
            r = load.wrk(w.ns.name, host, port, seconds=C_SECONDS, connections=C_CONNS, close=True)
            used = cpu.stop()
            w.sup.check_alive()
            _add(out, "c_conn_per_s", t, r.rps)
            _add(out, "c_cpu_us_per_conn", t, used / r.requests * 1e6 if w.pids[t] else None)
            if r.errors:
                _add(out, "c_errors", t, 1)
            time.sleep(0.3)   # let the short TIME_WAIT/conntrack entries of this run drain
    return out


# --- (d) bulk transfer -------------------------------------------------------------------------

D_SECONDS = 3.0


def scenario_d(w: World) -> Samples:
    out: Samples = {}
    for run in range(w.runs):
        for t in w.order(run):
            host, port = target_address(t, BULK_PORT)
            cpu = CpuMeter(w.pids[t])
            cpu.start()
            r = load.iperf(w.ns.name, host, port, seconds=D_SECONDS)
            used = cpu.stop()
            w.sup.check_alive()
            _add(out, "d_MB_per_s", t, r["MBps"])
            _add(out, "d_MB_per_cpu_s", t, r["bytes"] / 1e6 / used if w.pids[t] and used > 0 else None)
    return out


# --- (e) memory ----------------------------------------------------------------------------------

E_CONNS = 1000


def scenario_e(w: World) -> Samples:
    """Each run starts every proxy afresh (a process keeps the memory it once used, so a second
    round of connections in the same process would look free), waits for it to settle, reads
    its base RSS, then holds E_CONNS idle connections through it."""
    out: Samples = {}
    proxies = [t for t in w.targets if w.pids[t]]
    for run in range(w.runs):
        for t in w.order(run, proxies):
            w.pids[t] = w.restart[t]()
            host, port = target_address(t, HTTP_PORT)
            tree = lambda: descendants(w.pids[t])   # noqa: E731
            time.sleep(0.5)
            before = rss_kb(tree())
            _add(out, "e_base_rss_MB", t, before / 1024)
            with load.IdleConnections(w.ns.name, host, port, E_CONNS):
                time.sleep(0.5)
                after = rss_kb(tree())
                w.sup.check_alive()
            _add(out, "e_KB_per_idle_conn", t, (after - before) / E_CONNS)
            time.sleep(0.5)
            w.sup.check_alive()
    return out
