"""sdnotify.py: the agent's side of systemd's notify protocol (sd_notify(3)), standard library only.

Owns what the agent tells its service manager: ``STATUS=`` whenever the readiness answer
changes, ``READY=1`` the first time the readiness check passes (never at start), ``WATCHDOG=1``
at half of ``$WATCHDOG_USEC`` while the trio loop runs, ``STOPPING=1`` when shutdown begins.
Knows nothing of what "ready" means: app.py passes its check in. Without ``$NOTIFY_SOCKET``
(not run by systemd) every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Mapping

import trio

log = logging.getLogger("nodemesh.agent.sdnotify")


def _address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as a socket address: a leading "@" is the abstract namespace."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Datagrams to the service manager; ``address`` None disables it."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog      # seconds between WATCHDOG=1 pings, or None
        self.ready_sent = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (as systemd sets
        them); the variables are then removed from ``os.environ``, so the agent's child
        processes do not speak for it (sd_notify's ``unset_environment``)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 2e6
        if environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog)

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False (logged) if it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(lines).encode(), _address(self.address))
            return True
        except OSError as e:
            log.warning("cannot notify the service manager at %s: %s", self.address, e)
            return False

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    async def run(self, ready: Callable[[], tuple[bool, str]], *, interval: float = 0.5,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow ``ready()`` (``(ok, reason)``, the same check as /healthz/ready) every
        ``interval`` seconds, and feed the watchdog, until cancelled."""
        task_status.started()
        if self.address is None:
            return
        async with trio.open_nursery() as nursery:
            if self.watchdog is not None:
                nursery.start_soon(self._feed_watchdog)
            last = None
            while True:
                ok, reason = ready()
                reason = " ".join(reason.split())    # STATUS= is one line
                if ok and not self.ready_sent:
                    self.ready_sent = self.send("READY=1", f"STATUS=ready: {reason}")
                    last = (ok, reason)
                elif (ok, reason) != last:
                    last = (ok, reason) if self.send(f"STATUS={'ready' if ok else 'not ready'}: {reason}") else None
                await trio.sleep(interval)

    async def _feed_watchdog(self) -> None:
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog)
