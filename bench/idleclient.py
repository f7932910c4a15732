"""idleclient.py: hold N proxied keep-alive connections open and idle (run inside the pod).

    python idleclient.py HOST PORT N

Opens N connections, sends one GET /1k on each and reads the answer (so every hop is
established and has carried data), prints "ready N" and then holds them until stdin closes.
"""
from __future__ import annotations

import resource
import socket
import sys

from latclient import REQ, read_response   # same folder: run as a script

def main() -> None:
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 100)), hard))
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        conns.append(s)
    for s in conns:
        buf = bytearray()
        s.sendall(REQ)
        read_response(s, buf)
    print(f"ready {len(conns)}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
