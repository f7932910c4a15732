"""select.py: pick the redirect mode for ``agent run --redirect ebpf|iptables|auto|none``.

``auto`` takes ebpf where the kernel allows it (cgroup v2, BPF, a working compile) and iptables
otherwise. ``none`` leaves redirection to something else (a CNI plugin that installs the same
iptables rules): enrol does nothing and original destinations come from ``SO_ORIGINAL_DST``.
Imports the ebpf module (and so bcc) only when it is chosen.
"""
from __future__ import annotations

import logging

import trio

from agent.redirect.base import Finding, RedirectError, Redirector
from agent.redirect.origdst import NoOriginalDestination, so_original_dst
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.redirect")

MODES = ("ebpf", "iptables", "auto", "none")


class NoRedirect:
    mode = "none"

    async def start(self, local: list[Workload]) -> None: ...

    async def enrol(self, workload: Workload) -> None: ...

    async def unenrol(self, workload: Workload) -> None: ...

    async def stop(self) -> None: ...

    async def original_destination(self, workload: Workload, stream: trio.SocketStream) -> tuple[str, int]:
        return so_original_dst(stream.socket)

    def original_destination_sync(self, sock) -> tuple[str, int]:
        return so_original_dst(sock)

    def host_origin(self, sock) -> tuple[tuple[str, str], tuple[str, int]]:
        raise NoOriginalDestination(None, "redirect mode 'none' cannot tell host workloads apart")

    def check(self, workload: Workload) -> list[Finding]:
        return [Finding("WARN", f"{workload.metadata.namespace}/{workload.metadata.name}: redirect mode "
                                "'none': nodemesh installs no hooks; traffic reaches the proxy only if "
                                "something else redirects it")]


def make(mode: str, *, node: str = "default") -> Redirector:
    if mode not in MODES:
        raise RedirectError(f"unknown redirect mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return NoRedirect()
    if mode == "iptables":
        from agent.redirect.iptables import IptablesRedirector
        return IptablesRedirector()
    try:
        from agent.redirect import ebpf
    except ImportError as e:
        if mode == "ebpf":
            raise RedirectError(f"the ebpf mode is not available: {e}") from None
        log.warning("redirect auto: ebpf unavailable (%s); using iptables", e)
        return make("iptables")
    ok, why = ebpf.supported()
    if ok:
        # One instance per node name: agents of several lab nodes share this kernel.
        return ebpf.EbpfRedirector(instance=node)
    if mode == "ebpf":
        raise RedirectError(f"the ebpf mode is not supported here: {why}; try --redirect iptables")
    log.warning("redirect auto: ebpf not supported (%s); using iptables", why)
    return make("iptables")
