"""accept_micro.py: what ``agent.proxy.sockaccept``'s shortcut saves per accepted connection.

``python -m bench.accept_micro [--conns N] [--runs R]``: a loopback listener, N connections
made first (so the accept queue is full), then accepted in one batch by the shortcut and by
``socket.accept()`` (+ setblocking, as the reactor needs), in interleaved runs; prints the
median CPU µs per accept of each and their difference. Loopback only.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time

from agent.proxy.sockaccept import acceptor


def one_run(n: int, fast: bool) -> float:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(n)
    lst.setblocking(False)
    clients = [socket.create_connection(lst.getsockname()) for _ in range(n)]
    accept = acceptor(lst, fast=fast)
    conns = []
    t0 = time.thread_time_ns()
    for _ in range(n):
        conns.append(accept())
    spent = time.thread_time_ns() - t0
    for s in conns + clients + [lst]:
        s.close()
    return spent / n / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    fast, slow = [], []
    for _ in range(a.runs):
        fast.append(one_run(a.conns, True))
        slow.append(one_run(a.conns, False))
    f, s = statistics.median(fast), statistics.median(slow)
    print(f"accept, µs CPU per connection (median of {a.runs} runs of {a.conns}): "
          f"shortcut {f:.2f}, socket.accept() {s:.2f}, saved {s - f:.2f} ({(s - f) / s:.0%})")


if __name__ == "__main__":
    main()
