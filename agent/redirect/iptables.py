"""iptables.py: redirect mode "iptables" — nat rules inside each pod's netns, as istio-cni writes them.

``plan_rules`` (pure) says what a workload's netns needs; ``IptablesRedirector`` applies it with
``iptables-restore`` run inside the pod netns (``nsenter --net``), which goes through whichever
backend the host uses (iptables-nft on Debian 12). Two chains of our own, hooked from OUTPUT and
PREROUTING of the nat table:

- NODEMESH_OUTPUT: the proxy's own sockets (SO_MARK 0x539), loopback and the pod's own addresses
  pass; every other TCP connect is REDIRECTed to 127.0.0.1:15001, and ``SO_ORIGINAL_DST`` tells
  the proxy where it was going.
- NODEMESH_PREROUTING: HBONE (15008) and anything arriving on lo pass; other inbound TCP is
  REDIRECTed to 15006 (plaintext inbound: refused under STRICT, authorized under PERMISSIVE).

Enrol is idempotent (the chains are rewritten whole, the jumps added once); unenrol removes the
jumps and the chains and tolerates a netns that is already gone. Rules live in the pod's netns,
so they vanish with the pod: a restarted agent simply enrols again.
"""
from __future__ import annotations

import logging
import subprocess

import trio

from agent.base.constants import INBOUND_HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT, PROXY_MARK
from agent.redirect.base import Finding, RedirectError
from agent.redirect.origdst import so_original_dst
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.redirect")

OUT_CHAIN, IN_CHAIN = "NODEMESH_OUTPUT", "NODEMESH_PREROUTING"
JUMPS = (("OUTPUT", OUT_CHAIN), ("PREROUTING", IN_CHAIN))


def plan_rules(workload: Workload) -> str:
    """The ``iptables-restore --noflush`` input for one workload's netns (our chains only)."""
    own = [a for a in workload.spec.addresses if ":" not in a]
    lines = ["*nat", f":{OUT_CHAIN} - [0:0]", f":{IN_CHAIN} - [0:0]",
             f"-A {OUT_CHAIN} -m mark --mark {PROXY_MARK:#x} -j RETURN",
             f"-A {OUT_CHAIN} -d 127.0.0.0/8 -j RETURN"]
    lines += [f"-A {OUT_CHAIN} -d {a}/32 -j RETURN" for a in own]
    lines += [f"-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
              f"-A {IN_CHAIN} -i lo -j RETURN",
              f"-A {IN_CHAIN} -p tcp -m tcp --dport {INBOUND_HBONE_PORT} -j RETURN",
              f"-A {IN_CHAIN} -p tcp -j REDIRECT --to-ports {INBOUND_PLAIN_PORT}",
              "COMMIT", ""]
    return "\n".join(lines)


def _run(netns: str, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net={netns}", *argv], input=stdin, capture_output=True,
                          text=True, timeout=20)


def _apply(workload: Workload) -> None:
    ns = workload.spec.netns
    p = _run(ns, ["iptables-restore", "--noflush"], plan_rules(workload))
    if p.returncode != 0:
        raise RedirectError(f"{_name(workload)}: iptables-restore in {ns} failed: {p.stderr.strip()}")
    for hook, chain in JUMPS:
        if _run(ns, ["iptables", "-t", "nat", "-C", hook, "-p", "tcp", "-j", chain]).returncode != 0:
            p = _run(ns, ["iptables", "-t", "nat", "-I", hook, "1", "-p", "tcp", "-j", chain])
            if p.returncode != 0:
                raise RedirectError(f"{_name(workload)}: cannot hook {chain} into {hook}: {p.stderr.strip()}")


def _remove(netns: str) -> None:
    for hook, chain in JUMPS:
        for _ in range(16):   # remove every copy of the jump, then the chain
            if _run(netns, ["iptables", "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain]).returncode != 0:
                break
        _run(netns, ["iptables", "-t", "nat", "-F", chain])
        _run(netns, ["iptables", "-t", "nat", "-X", chain])


def _name(w: Workload) -> str:
    return f"{w.metadata.namespace}/{w.metadata.name}"


class IptablesRedirector:
    mode = "iptables"

    def __init__(self) -> None:
        self._enrolled: dict[tuple[str, str], str] = {}   # workload -> netns path

    async def start(self, local: list[Workload]) -> None:
        """Nothing to load; rules of a crashed agent are rewritten by the next enrol."""

    async def enrol(self, workload: Workload) -> None:
        if not workload.spec.netns:
            raise RedirectError(f"{_name(workload)} has no netns: the iptables mode redirects pods only")
        key = (workload.metadata.namespace, workload.metadata.name)
        old = self._enrolled.get(key)
        if old and old != workload.spec.netns:
            await trio.to_thread.run_sync(_remove, old)
        await trio.to_thread.run_sync(_apply, workload)
        self._enrolled[key] = workload.spec.netns
        log.info("enrolled %s (iptables in %s)", _name(workload), workload.spec.netns)

    async def unenrol(self, workload: Workload) -> None:
        netns = self._enrolled.pop((workload.metadata.namespace, workload.metadata.name), None) or workload.spec.netns
        if netns:
            await trio.to_thread.run_sync(_remove, netns)
            log.info("unenrolled %s (iptables in %s)", _name(workload), netns)

    async def stop(self) -> None:
        for netns in list(self._enrolled.values()):
            await trio.to_thread.run_sync(_remove, netns)
        self._enrolled.clear()

    async def original_destination(self, workload: Workload, stream: trio.SocketStream) -> tuple[str, int]:
        return so_original_dst(stream.socket)

    def original_destination_sync(self, sock) -> tuple[str, int]:
        return so_original_dst(sock)

    def check(self, workload: Workload) -> list[Finding]:
        ns = workload.spec.netns
        p = _run(ns, ["iptables-save", "-t", "nat"])
        if p.returncode != 0:
            return [Finding("FAIL", f"{_name(workload)}: cannot read rules in {ns}: {p.stderr.strip()}")]
        have = p.stdout
        out = []
        for hook, chain in JUMPS:
            jump = f"-A {hook} -p tcp -j {chain}"
            if jump not in have:
                out.append(Finding("FAIL", f"{_name(workload)}: {hook} does not jump to {chain}"))
            elif have.split(f"-A {hook} ", 1)[1].split("\n", 1)[0] != jump[len(f'-A {hook} '):]:
                out.append(Finding("WARN", f"{_name(workload)}: another rule precedes {chain} in {hook}"))
        wanted = [l for l in plan_rules(workload).splitlines() if l.startswith("-A ")]
        rules = [l for l in have.splitlines() if l.startswith(f"-A {OUT_CHAIN} ") or l.startswith(f"-A {IN_CHAIN} ")]
        if rules != wanted:
            out.append(Finding("FAIL", f"{_name(workload)}: chains differ from the plan ({len(rules)} rules, "
                                       f"{len(wanted)} expected)"))
        return out or [Finding("ok", f"{_name(workload)}: iptables redirect in place in {ns}")]
