"""latclient.py: an open-loop HTTP/1.1 keep-alive client with µs timestamps (run inside the pod).

    python latclient.py HOST PORT RATE SECONDS [CONNECTIONS]

Sends GET /1k at a fixed RATE (requests/s, spread over CONNECTIONS keep-alive connections,
round robin) for SECONDS and prints JSON: latency percentiles in µs, measured from the
*scheduled* send time (so falling behind shows up as latency instead of being hidden), and
how many requests were late to start (or never sent: a run stops at twice its planned length
when the path cannot keep up). Standard library only.
"""
from __future__ import annotations

import json
import socket
import sys
import time

REQ = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"


def read_response(s: socket.socket, buf: bytearray) -> None:
    """Read one response with a Content-Length body from ``s``; leftovers stay in ``buf``."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
            total = end + 4 + length
            while len(buf) < total:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed mid-response")
                buf += chunk
            del buf[:total]
            return
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk


def main() -> None:
    host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    nconn = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    conns = []
    for _ in range(nconn):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append((s, bytearray()))
    for s, buf in conns:             # warm each path once
        s.sendall(REQ)
        read_response(s, buf)
    interval = 1e9 / rate
    n = int(rate * seconds)
    lat = []
    late = 0
    clock = time.perf_counter_ns
    start = clock() + 1_000_000
    give_up = start + int(2 * seconds * 1e9)     # bound the run when the path cannot keep up
    for i in range(n):
        if clock() > give_up:
            break
        due = start + int(i * interval)
        now = clock()
        if due - now > 200_000:
            time.sleep((due - now - 100_000) / 1e9)
        while clock() < due:
            pass
        if clock() - due > interval:
            late += 1
        s, buf = conns[i % nconn]
        s.sendall(REQ)
        read_response(s, buf)
        lat.append((clock() - due) / 1000)
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1)

    print(json.dumps({"n": len(lat), "scheduled": n, "late": late + n - len(lat), "p50": pct(50), "p90": pct(90), "p99": pct(99),
                      "max": round(lat[-1], 1)}))


if __name__ == "__main__":
    main()
