"""base.py: the one interface both redirect modes (iptables, ebpf) implement.

A Redirector makes an enrolled workload's plain ``connect()`` land in its in-pod 15001, sends
traffic arriving for the workload to 15008 (HBONE) / 15006 (plaintext), exempts the proxy's
own marked sockets, and tells the proxy a redirected connection's original destination. A host
workload (``spec.cgroup``, no netns) is redirected by cgroup in the host namespace (the agent's
own) to the 127.0.0.1:15001 all host workloads share, so the redirector also says which of them
made a connection (``host_origin``); its inbound plaintext is captured only for its own
addresses and declared ports.
Kernel changes are idempotent and always undone: enrol twice changes nothing, unenrol of a
workload that is not enrolled is a no-op, ``stop`` removes everything, and ``start`` adopts or
replaces what a crashed agent left behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from controller.api import Workload


class RedirectError(Exception):
    """A redirect could not be set up or removed; the message names the workload and the step."""


@dataclass(frozen=True)
class Finding:
    """One line of `nodemesh check`: level is "ok", "WARN" or "FAIL"."""

    level: str
    message: str


class Redirector(Protocol):
    mode: str                                   # "iptables" or "ebpf"

    async def start(self, local: list[Workload]) -> None:
        """Prepare (compile/load programs); remove leftovers of workloads not in ``local``."""

    async def enrol(self, workload: Workload) -> None: ...

    async def unenrol(self, workload: Workload) -> None: ...

    async def stop(self) -> None:
        """Undo everything this redirector did to the kernel."""

    async def original_destination(self, workload: Workload, stream: trio.SocketStream) -> tuple[str, int]:
        """Where a connection accepted on 15001 (or 15006) was going before the redirect."""

    def original_destination_sync(self, sock) -> tuple[str, int]:
        """The same from any thread, for an accepted stdlib or trio socket (the fast path's)."""

    def host_origin(self, sock) -> tuple[tuple[str, str], tuple[str, int]]:
        """For a connection accepted on the host namespace's shared 15001 (host workloads, by
        cgroup): the (namespace, name) of the enrolled host workload that made it and its
        original destination. Raises NoOriginalDestination (agent/redirect/origdst.py)."""

    def check(self, workload: Workload) -> list[Finding]:
        """Are this workload's hooks present and in order? (the doctor in `nodemesh check`)"""
