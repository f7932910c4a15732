"""run.py: ``python -m bench [SCENARIO...]`` — build the world, run scenarios, print and save.

Scenarios: a (same-node L4 keep-alive), c (connection per request), d (bulk), e (memory),
f (config scale, in-process), b (cross-node: HBONE beside haproxy and Envoy pairs with mutual
TLS). Default: all.
Prints a Markdown table of medians (min–max) over the runs and writes JSON to
bench/results/latest.json. Every process started is killed at the end, even on error, and the
pod netns is deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contextlib import nullcontext

from bench import scenarios as sc
from bench import procs, twonode
from bench.procs import Supervisor
from bench.topo import (BUF, CLIENT_IP, HTTP_PORT, PY, ROOT, TARGETS, Mesh, PodNetns, http_get_in, restart_baseline,
                        start_app, start_baselines, target_address)

RESULTS = Path(__file__).resolve().parent / "results"
C_BASELINES = ("haproxy", "nginx", "envoy")
ALL = ("a", "b", "c", "d", "e", "f")
DEFAULT = ("a", "b", "c", "d", "e", "f")

# metric -> (label, unit, lower is better)
METRICS = {
    "a_rps": ("(a) keep-alive req/s, wrk -c8", "req/s", False),
    "a_cpu_us_per_req": ("(a) proxy CPU per request", "µs", True),
    "a_p50_us": ("(a) p50 at 1000 rps", "µs", True),
    "a_p99_us": ("(a) p99 at 1000 rps", "µs", True),
    "a_added_p50_us": ("(a) added p50 at 1000 rps", "µs", True),
    "a_added_p99_us": ("(a) added p99 at 1000 rps", "µs", True),
    "b_p50_us": ("(b) two-hop mTLS p50 at 1000 rps", "µs", True),
    "b_p99_us": ("(b) two-hop mTLS p99 at 1000 rps", "µs", True),
    "b_added_p50_us": ("(b) added p50 at 1000 rps", "µs", True),
    "b_added_p90_us": ("(b) added p90 at 1000 rps", "µs", True),
    "b_added_p99_us": ("(b) added p99 at 1000 rps", "µs", True),
    "b_late_pct": ("(b) requests the client started late (path fell behind)", "%", True),
    "b_cpu_us_per_req_client_side": ("(b) CPU per request, client-side proxy", "µs", True),
    "b_cpu_us_per_req_server_side": ("(b) CPU per request, server-side proxy", "µs", True),
    "b_cpu_us_per_req_both": ("(b) CPU per request, both proxies", "µs", True),
    "c_conn_per_s": ("(c) new conn per request, conn/s", "conn/s", False),
    "c_cpu_us_per_conn": ("(c) proxy CPU per connection", "µs", True),
    "d_MB_per_s": ("(d) bulk, iperf3 1 stream", "MB/s", False),
    "d_MB_per_cpu_s": ("(d) bulk per proxy CPU-second", "MB/cpu-s", False),
    "e_base_rss_MB": ("(e) base RSS", "MB", True),
    "e_KB_per_idle_conn": ("(e) RSS per idle proxied conn (1k)", "KB", True),
}


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    def ver(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg(),
            "tools": {"haproxy": ver(["haproxy", "-v"]), "nginx": ver(["nginx", "-v"]),
                      "envoy": ver([str(Path(PY).parent / "envoy"), "--version"])[-60:],
                      "wrk": ver(["wrk", "-v"]), "iperf3": ver(["iperf3", "-v"])}}


def summarize(samples: dict) -> dict:
    out = {}
    for metric, per in samples.items():
        out[metric] = {t: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                       for t, v in per.items() if v}
        lower = METRICS.get(metric, ("", "", True))[2]
        base = {t: s["median"] for t, s in out[metric].items() if t in C_BASELINES}
        ours = out[metric].get("nodemesh")
        if base and ours:
            best_t = min(base, key=base.get) if lower else max(base, key=base.get)
            if base[best_t] > 0:
                out[metric]["_ratio"] = {"best_c": best_t, "ours_over_best": ours["median"] / base[best_t]}
    return out


def _fmt(x: float) -> str:
    a = abs(x)
    return f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}"


def table(results: dict, targets: list[str]) -> str:
    head = ["metric", "unit", *targets, "ours ÷ best C"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, (label, unit, lower) in METRICS.items():
        per = results.get(metric)
        if not per:
            continue
        cells = []
        for t in targets:
            s = per.get(t)
            cells.append(f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})" if s else "–")
        r = per.get("_ratio")
        ratio = f"{r['ours_over_best']:.2f}× {r['best_c']} ({'lower' if lower else 'higher'} is better)" if r else "–"
        rows.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(rows)


def config_table(f: dict) -> str:
    med = statistics.median
    return "\n".join([
        "| (f) config, in-process | value |", "|---|---|",
        f"| services × endpoints | {f['services']} × {f['endpoints']} |",
        f"| Decoder.build cold (decode + Snapshot.build), median (min–max) of {len(f['build_s'])} | "
        f"{med(f['build_s']):.2f} s ({min(f['build_s']):.2f}–{max(f['build_s']):.2f}) |",
        f"| Snapshot.build alone | {med(f['snapshot_build_only_s']):.2f} s |",
        f"| RSS to hold it (raw objects + decoded + snapshot) | {f['rss_total_MB']:.1f} MB "
        f"(raw {f['rss_raw_objects_MB']:.1f}, decoded + snapshot {f['rss_decoded_and_snapshot_MB']:.1f}) |",
        f"| one-Workload delta apply, p50 / p99 of {len(f['delta_s'])} | "
        f"{f['delta_p50_s'] * 1e3:.0f} ms / {f['delta_p99_s'] * 1e3:.0f} ms |",
    ])


def run_config(runs: int) -> dict:
    p = subprocess.run([PY, "-m", "bench.config_scale", "--runs", str(runs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=400)
    if p.returncode != 0:
        raise RuntimeError(f"config_scale failed: {p.stderr[-1500:]}")
    return json.loads(p.stdout)


def _scenario_b(sup, ns, client, tmp, mesh, targets, runs, report, profile_dir) -> dict:
    """Second agent (node-2) for the client pod, the TLS baseline pairs, then the runs."""
    pids: dict = {}
    if "direct" in targets:
        pids["direct"] = None
    if mesh is not None:
        pids["nodemesh"] = (mesh.start_agent("node-2"), sup.procs["agent"].pid)
    twonode.exempt_baselines(client, ns)
    tls = twonode.start_tls_baselines(sup, client, ns, tmp)
    pids.update({t: p for t, p in tls.items() if t in targets})
    for t in pids:
        got = http_get_in(client.name, *twonode.b_address(t))
        if got != 1024:
            raise RuntimeError(f"(b) {t}: GET /1k returned {got} bytes, not 1024")
    out = twonode.scenario_b(sup, client, pids, runs)
    if profile_dir is not None and "nodemesh" in pids:
        report["profile_b_client_agent"] = twonode.profile_b(sup, client, pids["nodemesh"][0],
                                                             profile_dir / "profile-b-client.raw.txt")
    for name in [n for n in sup.procs if n.endswith("-b-client") or n.endswith("-b-server")]:
        sup.stop(name)    # the other scenarios measure the one-hop baselines only
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help=f"any of {' '.join(ALL)} (default: {' '.join(DEFAULT)})")
    ap.add_argument("--runs", type=int, default=5, help="runs per target and metric (default 5)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--no-profile", action="store_true", help="skip py-spy on the agent during (a) and (c)")
    ap.add_argument("--redirect", choices=("iptables", "ebpf"), default="iptables",
                    help="the agent's redirect mode (default iptables; (b) runs with iptables only)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)
    chosen = tuple(a.scenarios) or DEFAULT
    unknown = [s for s in chosen if s not in ALL]
    if unknown:
        ap.error(f"unknown scenario(s) {' '.join(unknown)}; choose from {' '.join(ALL)}")
    targets = [t for t in a.targets.split(",") if t]
    if a.redirect == "ebpf" and "b" in chosen:
        ap.error("(b) needs --redirect iptables (its direct path and baselines bypass the redirect "
                 "with iptables rules); run it separately")

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    t_start = time.monotonic()
    report: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "scenarios": list(chosen), "runs": a.runs, "targets": targets,
                    "settings": {"baseline_buffer_bytes": BUF, "workers": 1, "redirect": a.redirect,
                                 "a": {"wrk_seconds": sc.A_SECONDS, "wrk_connections": sc.A_CONNS,
                                       "latency_rate": sc.A_RATE, "latency_seconds": sc.A_LAT_SECONDS},
                                 "c": {"wrk_seconds": sc.C_SECONDS, "wrk_connections": sc.C_CONNS},
                                 "d": {"iperf3_seconds": sc.D_SECONDS}, "e": {"connections": sc.E_CONNS}}}
    samples: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="nmbench-"))
    try:
        if any(s in chosen for s in "abcde"):
            with PodNetns() as ns, (PodNetns(CLIENT_IP) if "b" in chosen else nullcontext()) as client, Supervisor(tmp) as sup:
                print(f"[bench] pod netns {ns.name}, temp dir {tmp}", file=sys.stderr)
                start_app(sup, ns, tmp)
                pids: dict[str, int | None] = {}
                if "direct" in targets:
                    pids["direct"] = None
                restart = {}
                if "nodemesh" in targets:
                    mesh = Mesh(sup, tmp, redirect=a.redirect)
                    if a.redirect == "ebpf":
                        procs.CLIENT_CGROUP = ns.cgroup
                    if client is not None:
                        twonode.link_pods(client, ns)
                    pids["nodemesh"] = mesh.start(ns, client)
                    restart["nodemesh"] = mesh.restart_agent
                pids.update(start_baselines(sup, ns, tmp, tuple(t for t in targets if t in C_BASELINES)))
                for t in pids:
                    if t in C_BASELINES:
                        restart[t] = lambda t=t: restart_baseline(sup, ns, t)
                for t in pids:
                    got = http_get_in(ns.name, *target_address(t, HTTP_PORT))
                    if got != 1024:
                        raise RuntimeError(f"{t}: GET /1k returned {got} bytes, not 1024")
                world = sc.World(sup, ns, tmp, pids, runs=a.runs, restart=restart)
                for name in "abcde":
                    if name not in chosen:
                        continue
                    t0 = time.monotonic()
                    print(f"[bench] scenario {name} ...", file=sys.stderr)
                    if name == "b":
                        samples.update(_scenario_b(sup, ns, client, tmp, mesh if "nodemesh" in targets else None,
                                                   targets, a.runs, report,
                                                   None if a.no_profile else a.out.parent))
                    else:
                        samples.update(getattr(sc, f"scenario_{name}")(world))
                    if name in "ac" and not a.no_profile and pids.get("nodemesh"):
                        report[f"profile_{name}"] = getattr(sc, f"profile_{name}")(
                            world, pids["nodemesh"], a.out.parent / f"profile-{name}")
                    print(f"[bench] scenario {name} done in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        if "f" in chosen:
            print("[bench] scenario f ...", file=sys.stderr)
            report["config"] = run_config(a.runs)
    finally:
        if not a.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    report["results"] = summarize(samples)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["duration_s"] = round(time.monotonic() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    shown = [t for t in TARGETS if t in targets]
    if samples:
        print(table(report["results"], shown))
    if "config" in report:
        print()
        print(config_table(report["config"]))
    for key, what in (("profile_a", "the agent during (a)"), ("profile_c", "the agent during (c)"),
                      ("profile_b_client_agent", "the client-side agent during (b)")):
        if key in report:
            print(f"\npy-spy on {what}, top frames by own time:")
            for f, pct in report[key]["self_pct"][:10]:
                print(f"  {pct:5.1f}%  {f}")
    print(f"\n[bench] wrote {a.out} in {report['duration_s']}s", file=sys.stderr)
    return 0
