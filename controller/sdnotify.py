"""sdnotify.py: the controller's side of systemd's notify protocol (sd_notify(3)), stdlib only.

``READY=1`` once the API and metrics listen, ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC`` while
the trio loop runs, ``STOPPING=1`` when shutdown begins. A no-op without ``$NOTIFY_SOCKET``.
The agent has its own (agent/observe/sdnotify.py): the two packages never import each other.
"""
from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("nodemesh.controller.sdnotify")


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to ``$NOTIFY_SOCKET`` ("@" = abstract namespace); False if unset
    or the send failed (logged)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), "\0" + path[1:] if path[0] == "@" else path)
        return True
    except OSError as e:
        log.warning("cannot notify the service manager at %s: %s", path, e)
        return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when systemd
    asked for none (or asked another process, ``$WATCHDOG_PID``)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not (usec.isdigit() and int(usec) > 0) or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def feed_watchdog(interval: float) -> None:
    """Ping until cancelled; a loop that stops running stops the pings, and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
