"""A real NOTIFY_SOCKET for tests: the datagram socket systemd would give a Type=notify service.

Binds an AF_UNIX datagram socket (a path, or an abstract name when it starts with "@", as
systemd's own may be), records every message with its arrival time (time.monotonic), and
answers what a service manager would see: when READY=1 came, how many WATCHDOG=1 pings.
"""
from __future__ import annotations

import socket
import threading
import time


class NotifySocket:
    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[tuple[float, list[str]]] = []     # (arrival, lines)
        self._lock = threading.Lock()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def arrivals(self, line: str) -> list[float]:
        """Arrival times of the messages that carry ``line`` (e.g. "READY=1")."""
        with self._lock:
            return [t for t, lines in self.messages if line in lines]

    def lines(self, prefix: str) -> list[str]:
        with self._lock:
            return [ln for _, lines in self.messages for ln in lines if ln.startswith(prefix)]

    def wait_for(self, line: str, timeout: float = 30.0, count: int = 1) -> float:
        """The arrival of the ``count``-th message carrying ``line``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.arrivals(line)
            if len(got) >= count:
                return got[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no {line} (x{count}) within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
