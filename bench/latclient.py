"""latclient.py: an open-loop HTTP/1.1 keep-alive client with µs timestamps (run inside the pod).

    python latclient.py HOST PORT RATE SECONDS [CONNECTIONS]

Sends GET /1k at a fixed RATE (requests/s) for SECONDS over a pool of CONNECTIONS keep-alive
connections (default 8), and prints JSON: latency percentiles in µs, each measured from the
request's *scheduled* send time (so falling behind shows up as latency instead of being
hidden), and how many requests were late to start (or never sent: a run stops at twice its
planned length when the path cannot keep up).

Open loop: a request goes out at its scheduled time on any connection that is not waiting for
a response, so one slow response does not hold back the requests behind it (it would on a
single connection, where every request waits for the one before). Only when all CONNECTIONS
are waiting does a request start late. Standard library only; ``select`` for its µs timeout.
"""
from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from collections import deque

REQ = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n"
SPIN_NS = 50_000          # the last 50 µs before a due time are waited for by polling


def response_end(buf: bytearray) -> int:
    """The length of the first complete Content-Length response in ``buf``, or 0 if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = bytes(buf[:end]).lower()
    i = head.find(b"content-length:")
    length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
    total = end + 4 + length
    return total if len(buf) >= total else 0


def read_response(s: socket.socket, buf: bytearray) -> None:
    """Read one whole response from blocking ``s``; leftovers stay in ``buf`` (idleclient.py)."""
    while not (total := response_end(buf)):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed before a whole response")
        buf += chunk
    del buf[:total]


class Conn:
    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf, self.due = s, bytearray(), 0

    def read(self) -> bool:
        """Take what has arrived; True once the response in flight is complete."""
        chunk = self.s.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed before a whole response")
        self.buf += chunk
        total = response_end(self.buf)
        if total:
            del self.buf[:total]
        return bool(total)


def main() -> None:
    host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    nconn = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    clock = time.perf_counter_ns
    sel = selectors.SelectSelector()
    idle: deque[Conn] = deque()
    for _ in range(nconn):
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s)
        s.sendall(REQ)                      # warm each path once
        read_response(s, c.buf)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, c)
        idle.append(c)
    interval = 1e9 / rate
    n = int(rate * seconds)
    lat: list[float] = []
    late = sent = 0
    start = clock() + 1_000_000
    give_up = start + int(2 * seconds * 1e9)     # bound the run when the path cannot keep up
    while len(lat) < sent or sent < n:
        now = clock()
        if now > give_up:
            break
        while sent < n and idle and start + int(sent * interval) <= now:
            due = start + int(sent * interval)
            if now - due > interval:
                late += 1
            c = idle.popleft()
            c.due = due
            c.s.send(REQ)                    # 33 bytes into an empty socket buffer: never short
            sent += 1
        if sent < n and idle:
            wait = start + int(sent * interval) - clock()
            timeout = max(0.0, (wait - SPIN_NS) / 1e9)
        else:
            timeout = max(0.0, (give_up - clock()) / 1e9)
        for key, _ in sel.select(timeout):
            c = key.data
            if c.read():
                lat.append((clock() - c.due) / 1000)
                idle.append(c)
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1)

    print(json.dumps({"n": len(lat), "scheduled": n, "late": late + n - len(lat), "p50": pct(50),
                      "p90": pct(90), "p99": pct(99), "max": round(lat[-1], 1),
                      "connections": nconn}))


if __name__ == "__main__":
    main()
