"""config_scale.py: (f) what it costs the agent to take a large mesh config, measured in-process.

    python -m bench.config_scale [--services 1000] [--endpoints 10000] [--runs 5] [--deltas 50]

Builds controller-shaped dicts (what the watch stream carries) for S Services selecting E
Workloads in total (E/S each, spread over 100 nodes and 10 namespaces), then measures the
agent's own code: ``agent.sync.Decoder.build`` (decode from dicts + ``Snapshot.build``) cold,
the RSS the process grows by to hold the raw objects, the decoded resources and the snapshot,
and the latency of applying a one-object delta (a Workload's labels change) the way the agent
does: ``Resources.apply`` of the watch event, then ``Decoder.build`` with the decoder that follows
those Resources (decode what changed + ``Snapshot.update``). Also the snapshot file: a first
write (``save_cold_s``) and the write after each delta (``save_delta_s``; the agent does these
in a worker thread, coalesced). Prints one JSON object. Run in a fresh process so RSS means
something.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from agent.state.snapshot import Snapshot
from agent.sync.follow import Decoder
from agent.sync.snapshot_file import Resources, SnapshotFile


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def objects(services: int, endpoints: int, version: int = 1) -> list[dict]:
    per = max(1, endpoints // services)
    out = [{"apiVersion": "nodemesh.io/v1alpha1", "kind": "Mesh",
            "metadata": {"name": "default", "resourceVersion": str(version)},
            "spec": {"trustDomain": "cluster.local", "mtls": "STRICT"}}]
    for s in range(services):
        ns = f"ns-{s % 10}"
        out.append({"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service",
                    "metadata": {"name": f"svc-{s}", "namespace": ns, "resourceVersion": str(version)},
                    "spec": {"addresses": [f"10.96.{s // 250}.{s % 250 + 1}"], "selector": {"app": f"svc-{s}"},
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}]}})
        for i in range(per):
            n = s * per + i
            out.append({"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
                        "metadata": {"name": f"svc-{s}-{i}", "namespace": ns, "resourceVersion": str(version),
                                     "labels": {"app": f"svc-{s}", "version": "v1"}},
                        "spec": {"node": f"node-{n % 100}", "serviceAccount": f"svc-{s}",
                                 "addresses": [f"10.{100 + n // 65000}.{(n // 250) % 260 % 256}.{n % 250 + 1}"],
                                 "ports": [8080], "netns": f"/var/run/netns/pod-{n}"}})
    return out


def resources(objs: list[dict], version: int) -> Resources:
    res = Resources()
    for o in objs:
        res.apply({"type": "ADDED", "object": o})
    res.version = version
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--deltas", type=int, default=50)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds; deltas stop repeating after this (the cold runs always all run)")
    a = ap.parse_args()
    t_end = time.monotonic() + a.budget

    gc.collect()
    rss0 = rss_kb()
    objs = objects(a.services, a.endpoints)
    res = resources(objs, 1)
    del objs
    gc.collect()
    rss_raw = rss_kb()

    cold, cold_cpu, snap_only = [], [], []
    rss_built = None
    for run in range(a.runs):
        d = Decoder()
        gc.collect()
        t0, c0 = time.perf_counter(), time.thread_time()
        snap = d.build(res, node="node-1")
        cold.append(time.perf_counter() - t0)
        cold_cpu.append(time.thread_time() - c0)
        if rss_built is None:
            gc.collect()
            rss_built = rss_kb()
            decoded = [hit[1] for hit in d._cache.values()]   # the decoded resources, for Snapshot.build alone
            gc.collect()
            t0 = time.perf_counter()
            Snapshot.build(decoded, version=1, node="node-1")
            snap_only.append(time.perf_counter() - t0)
            del decoded
        del d, snap

    # the agent's one decoder, following the Resources it builds from (cold once, then deltas)
    gc.collect()
    decoder = Decoder()
    decoder.build(res, node="node-1")
    out = Path(tempfile.mkdtemp(prefix="config-scale-")) / "snapshot.json"
    file = SnapshotFile(out)
    t0 = time.perf_counter()
    file.write(res.version, list(res.objects.values()))
    save_cold = time.perf_counter() - t0

    # deltas: one Workload's labels change (new resourceVersion), as a watch event
    deltas, deltas_cpu, saves = [], [], []
    keys = [k for k in res.objects if k[0] == "Workload"]
    for i in range(a.deltas):
        if time.monotonic() > t_end and len(deltas) >= 2:
            break
        key = keys[(i * 7919) % len(keys)]
        obj = json.loads(json.dumps(res.objects[key]))
        obj["metadata"]["resourceVersion"] = str(res.version + 1)
        obj["metadata"]["labels"]["version"] = f"v{i + 2}"
        t0, c0 = time.perf_counter(), time.thread_time()
        res.apply({"type": "MODIFIED", "object": obj})
        decoder.build(res, node="node-1")
        deltas.append(time.perf_counter() - t0)
        deltas_cpu.append(time.thread_time() - c0)
        t0 = time.perf_counter()
        file.write(res.version, list(res.objects.values()))
        saves.append(time.perf_counter() - t0)
    out.unlink()
    out.parent.rmdir()

    deltas.sort()
    deltas_cpu.sort()
    print(json.dumps({
        "services": a.services, "endpoints": a.endpoints,
        "build_s": cold, "snapshot_build_only_s": snap_only,
        "rss_base_MB": rss0 / 1024, "rss_raw_objects_MB": (rss_raw - rss0) / 1024,
        "rss_total_MB": (rss_built - rss0) / 1024, "rss_decoded_and_snapshot_MB": (rss_built - rss_raw) / 1024,
        "delta_s": deltas,
        "delta_p50_s": deltas[len(deltas) // 2],
        "delta_p99_s": deltas[min(len(deltas) - 1, int(0.99 * len(deltas)))],
        "deltas": len(deltas),
        # CPU time of this thread: what the work costs when other processes share the cores
        "build_cpu_s": cold_cpu,
        "delta_cpu_p50_s": deltas_cpu[len(deltas_cpu) // 2],
        "delta_cpu_p99_s": deltas_cpu[min(len(deltas_cpu) - 1, int(0.99 * len(deltas_cpu)))],
        "save_cold_s": save_cold,
        "save_delta_s": saves, "save_delta_p50_s": statistics.median(saves),
    }))


if __name__ == "__main__":
    main()
