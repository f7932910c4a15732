"""load.py: the load generators, run inside the pod netns, and their output parsed.

wrk (C) for closed-loop keep-alive and connection-per-request rates, latclient.py for
fixed-rate latency, iperf3 for bulk, idleclient.py to hold idle connections.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.topo import PY

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    errors: str       # "" or wrk's error lines


def wrk(netns: str, host: str, port: int, *, seconds: float, connections: int, close: bool = False) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{host}:{port}/1k")
    p = subprocess.run(procs.client_argv(netns, argv), capture_output=True, text=True, timeout=seconds + 30)
    out = p.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk via {host}:{port} failed ({p.returncode}): {out[-500:]} {p.stderr[-500:]}")
    secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "us": 1e-6, "m": 60}.get(m.group(3), 1)
    errors = " | ".join(l.strip() for l in out.splitlines() if "Socket errors" in l or "Non-2xx" in l)
    return WrkResult(int(m.group(1)), secs, float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), errors)


def latency(netns: str, host: str, port: int, *, rate: float, seconds: float) -> dict:
    argv = [PY, str(HERE / "latclient.py"), host, str(port), str(rate), str(seconds)]
    p = subprocess.run(procs.client_argv(netns, argv), capture_output=True, text=True, timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"latclient via {host}:{port} failed: {p.stderr[-800:]}")
    return json.loads(p.stdout)


def iperf(netns: str, host: str, port: int, *, seconds: float) -> dict:
    """Bytes received by the server and the rate, client -> server, one stream."""
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    p = subprocess.run(procs.client_argv(netns, argv), capture_output=True, text=True, timeout=seconds + 30)
    try:
        data = json.loads(p.stdout)
        s = data["end"]["sum_received"]
        return {"bytes": s["bytes"], "seconds": s["seconds"], "MBps": s["bytes"] / s["seconds"] / 1e6}
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 via {host}:{port} failed ({p.returncode}): {p.stdout[-600:]} {p.stderr[-300:]}") from e


class IdleConnections:
    """``with IdleConnections(...)`` holds N idle proxied connections until the block ends."""

    def __init__(self, netns: str, host: str, port: int, n: int) -> None:
        self.argv = procs.client_argv(netns, [PY, str(HERE / "idleclient.py"), host, str(port), str(n)])
        self.n = n

    def __enter__(self) -> IdleConnections:
        self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("ready"):
            self.p.kill()
            raise RuntimeError(f"idle client failed: {self.p.stderr.read()[-800:]}")
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.p.stdin.close()
            self.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
