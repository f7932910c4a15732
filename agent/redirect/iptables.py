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

Host workloads (``spec.cgroup``, no netns) are redirected in the *host* netns (the agent's own),
by cgroup, in three chains of their own shared by every host workload of the node and rewritten
whole on each change (``plan_host_rules``), removed with the last one:

- NODEMESH_HOST_OUTPUT (nat OUTPUT): the proxy's mark, loopback and each workload's own
  addresses pass; ``-m cgroup --path <its cgroup>`` TCP is REDIRECTed to 127.0.0.1:15001.
- NODEMESH_HOST_MARK (mangle OUTPUT): the SYN of each such connection gets the workload's own
  mark (``host_mark``: 0x4e4d0001, 0x4e4d0002, ...; never the proxy's). With
  ``net.ipv4.tcp_fwmark_accept=1`` (set while host workloads are enrolled, restored after) the
  accepted socket's SO_MARK is that SYN's mark, so ``host_origin`` tells which workload made a
  connection that all of them make to the one 127.0.0.1:15001 (checked on kernel 6.18: the mark
  survives the loopback hop). A mark is set on SYNs only, so routing by fwmark elsewhere on the
  host sees nothing else of ours.
- NODEMESH_HOST_PREROUTING (nat PREROUTING): only ``-d <workload address> --dport <declared
  port>`` is DNATed to <that address>:15006 (DNAT to the same address rather than REDIRECT, which
  would rewrite it to the incoming interface's primary address, where no 15006 listens); the
  host's other traffic is never touched.
"""
from __future__ import annotations

import logging
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.base.constants import INBOUND_HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT, PROXY_MARK
from agent.redirect.base import Finding, RedirectError
from agent.redirect.cgroup import cgroup2_mounts, cgroup_relative
from agent.redirect.origdst import NoOriginalDestination, so_original_dst
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.redirect")

OUT_CHAIN, IN_CHAIN = "NODEMESH_OUTPUT", "NODEMESH_PREROUTING"
JUMPS = (("OUTPUT", OUT_CHAIN), ("PREROUTING", IN_CHAIN))
HOST_OUT_CHAIN, HOST_MARK_CHAIN, HOST_IN_CHAIN = "NODEMESH_HOST_OUTPUT", "NODEMESH_HOST_MARK", "NODEMESH_HOST_PREROUTING"
HOST_JUMPS = (("nat", "OUTPUT", HOST_OUT_CHAIN), ("mangle", "OUTPUT", HOST_MARK_CHAIN),
              ("nat", "PREROUTING", HOST_IN_CHAIN))
HOST_MARK_BASE = 0x4E4D0000          # "NM": host workload i's SYNs carry HOST_MARK_BASE + i
FWMARK_ACCEPT = Path("/proc/sys/net/ipv4/tcp_fwmark_accept")   # of the reader's netns: the host's


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


@dataclass(frozen=True)
class HostEntry:
    """A host workload as its rules name it: its cgroup relative to the cgroup2 mount and its mark."""

    workload: Workload
    cgroup: str
    mark: int


def host_mark(index: int) -> int:
    """The mark of the ``index``-th (1-based) host workload's SYNs; never PROXY_MARK."""
    if not 1 <= index <= 0xFFFF:
        raise ValueError(f"host workload index {index} out of range")
    return HOST_MARK_BASE + index


def plan_host_rules(hosts: list[HostEntry]) -> str:
    """The ``iptables-restore --noflush`` input for the host netns's chains (ours only), for every
    enrolled host workload; the rules are written as ``iptables-save`` prints them."""
    out_rules = [f"-A {HOST_OUT_CHAIN} -m mark --mark {PROXY_MARK:#x} -j RETURN",
                 f"-A {HOST_OUT_CHAIN} -d 127.0.0.0/8 -j RETURN"]
    mark_rules = [f"-A {HOST_MARK_CHAIN} -m mark --mark {PROXY_MARK:#x} -j RETURN",
                  f"-A {HOST_MARK_CHAIN} -d 127.0.0.0/8 -j RETURN"]
    in_rules = [f"-A {HOST_IN_CHAIN} -i lo -j RETURN"]
    for h in hosts:
        own = [a for a in h.workload.spec.addresses if ":" not in a]
        cg = f"-m cgroup --path {h.cgroup}"
        for chain, rules in ((HOST_OUT_CHAIN, out_rules), (HOST_MARK_CHAIN, mark_rules)):
            rules += [f"-A {chain} -d {a}/32 {cg} -j RETURN" for a in own]
        out_rules.append(f"-A {HOST_OUT_CHAIN} -p tcp {cg} -j REDIRECT --to-ports {OUTBOUND_PORT}")
        mark_rules.append(f"-A {HOST_MARK_CHAIN} -p tcp {cg} -m tcp --tcp-flags FIN,SYN,RST,ACK SYN "
                          f"-j MARK --set-xmark {h.mark:#x}/0xffffffff")
        in_rules += [f"-A {HOST_IN_CHAIN} -d {a}/32 -p tcp -m tcp --dport {port} "
                     f"-j DNAT --to-destination {a}:{INBOUND_PLAIN_PORT}"
                     for a in own for port in h.workload.spec.ports]
    return "\n".join(["*nat", f":{HOST_OUT_CHAIN} - [0:0]", f":{HOST_IN_CHAIN} - [0:0]", *out_rules, *in_rules,
                      "COMMIT", "*mangle", f":{HOST_MARK_CHAIN} - [0:0]", *mark_rules, "COMMIT", ""])


def _run(netns: str | None, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """``argv`` inside ``netns`` (None: the host netns, the agent's own)."""
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    return subprocess.run([*prefix, *argv], input=stdin, capture_output=True, text=True, timeout=20)


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


def _apply_host(hosts: list[HostEntry]) -> None:
    p = _run(None, ["iptables-restore", "--noflush"], plan_host_rules(hosts))
    if p.returncode != 0:
        names = ", ".join(_name(h.workload) for h in hosts)
        raise RedirectError(f"{names}: iptables-restore in the host netns failed: {p.stderr.strip()}")
    for table, hook, chain in HOST_JUMPS:
        jump = ["-p", "tcp", "-j", chain]
        if _run(None, ["iptables", "-w", "-t", table, "-C", hook, *jump]).returncode != 0:
            p = _run(None, ["iptables", "-w", "-t", table, "-I", hook, "1", *jump])
            if p.returncode != 0:
                raise RedirectError(f"cannot hook {chain} into {table} {hook} of the host netns: {p.stderr.strip()}")


def _remove_host() -> None:
    for table, hook, chain in HOST_JUMPS:
        for _ in range(16):
            if _run(None, ["iptables", "-w", "-t", table, "-D", hook, "-p", "tcp", "-j", chain]).returncode != 0:
                break
        _run(None, ["iptables", "-w", "-t", table, "-F", chain])
        _run(None, ["iptables", "-w", "-t", table, "-X", chain])


def _name(w: Workload) -> str:
    return f"{w.metadata.namespace}/{w.metadata.name}"


class IptablesRedirector:
    mode = "iptables"

    def __init__(self) -> None:
        self._enrolled: dict[tuple[str, str], str] = {}   # workload -> netns path
        self._hosts: dict[tuple[str, str], HostEntry] = {}   # host workloads (host netns, by cgroup)
        self._fwmark_accept: str | None = None     # the sysctl's value before we set it

    async def start(self, local: list[Workload]) -> None:
        """Nothing to load; rules of a crashed agent are rewritten by the next enrol, and its host
        chains removed now when no host workload is local."""
        if not any(not w.spec.netns for w in local):
            await trio.to_thread.run_sync(_remove_host)

    async def enrol(self, workload: Workload) -> None:
        if not workload.spec.netns:
            await trio.to_thread.run_sync(self._enrol_host, workload)
            return
        key = (workload.metadata.namespace, workload.metadata.name)
        old = self._enrolled.get(key)
        if old and old != workload.spec.netns:
            await trio.to_thread.run_sync(_remove, old)
        await trio.to_thread.run_sync(_apply, workload)
        self._enrolled[key] = workload.spec.netns
        log.info("enrolled %s (iptables in %s)", _name(workload), workload.spec.netns)

    # -- host workloads --

    def _enrol_host(self, workload: Workload) -> None:
        key = (workload.metadata.namespace, workload.metadata.name)
        try:
            mounts = cgroup2_mounts()
            rel = cgroup_relative(workload.spec.cgroup, mounts)
        except RedirectError as e:
            raise RedirectError(f"{_name(workload)}: {e}") from None
        if not Path(mounts[0], rel).is_dir():
            raise RedirectError(f"{_name(workload)}: cgroup {workload.spec.cgroup} does not exist")
        old = self._hosts.get(key)
        used = {h.mark for k, h in self._hosts.items() if k != key}
        mark = old.mark if old is not None else next(host_mark(i) for i in range(1, len(used) + 2)
                                                     if host_mark(i) not in used)
        hosts = {**self._hosts, key: HostEntry(workload, rel, mark)}
        self._set_fwmark_accept()
        _apply_host(list(hosts.values()))
        self._hosts = hosts
        log.info("enrolled %s (iptables in the host netns, cgroup %s, mark %#x)", _name(workload), rel, mark)

    def _unenrol_host(self, key: tuple[str, str]) -> None:
        if self._hosts.pop(key, None) is None:
            return
        if self._hosts:
            _apply_host(list(self._hosts.values()))
        else:
            _remove_host()
            self._restore_fwmark_accept()
        log.info("unenrolled %s/%s (iptables in the host netns)", *key)

    def _set_fwmark_accept(self) -> None:
        if self._fwmark_accept is None:
            before = FWMARK_ACCEPT.read_text().strip()
            if before != "1":
                FWMARK_ACCEPT.write_text("1\n")
            self._fwmark_accept = before

    def _restore_fwmark_accept(self) -> None:
        if self._fwmark_accept is not None and self._fwmark_accept != "1":
            try:
                FWMARK_ACCEPT.write_text(self._fwmark_accept + "\n")
            except OSError as e:
                log.warning("could not restore net.ipv4.tcp_fwmark_accept: %s", e)
        self._fwmark_accept = None

    def host_origin(self, sock) -> tuple[tuple[str, str], tuple[str, int]]:
        """For a connection accepted on the host netns's 15001: which host workload made it (its
        SYN's mark, which the accepted socket carries) and its original destination
        (SO_ORIGINAL_DST). Raises NoOriginalDestination."""
        mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        for key, h in self._hosts.items():
            if h.mark == mark:
                return key, so_original_dst(sock)
        raise NoOriginalDestination(None, f"connection on the host 15001 with mark {mark:#x}, which is no "
                                          "enrolled host workload's")

    async def unenrol(self, workload: Workload) -> None:
        key = (workload.metadata.namespace, workload.metadata.name)
        if key in self._hosts:
            await trio.to_thread.run_sync(self._unenrol_host, key)
            return
        netns = self._enrolled.pop(key, None) or workload.spec.netns
        if netns:
            await trio.to_thread.run_sync(_remove, netns)
            log.info("unenrolled %s (iptables in %s)", _name(workload), netns)

    async def stop(self) -> None:
        for netns in list(self._enrolled.values()):
            await trio.to_thread.run_sync(_remove, netns)
        self._enrolled.clear()
        if self._hosts:
            self._hosts.clear()
            await trio.to_thread.run_sync(_remove_host)
            self._restore_fwmark_accept()

    async def original_destination(self, workload: Workload, stream: trio.SocketStream) -> tuple[str, int]:
        return so_original_dst(stream.socket)

    def original_destination_sync(self, sock) -> tuple[str, int]:
        return so_original_dst(sock)

    def check(self, workload: Workload) -> list[Finding]:
        if not workload.spec.netns:
            return self._check_host(workload)
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

    def _check_host(self, workload: Workload) -> list[Finding]:
        name = _name(workload)
        h = self._hosts.get((workload.metadata.namespace, workload.metadata.name))
        if h is None:
            return [Finding("FAIL", f"{name}: host workload not enrolled (no rules in the host netns)")]
        out = []
        have = ""
        for table in ("nat", "mangle"):
            p = _run(None, ["iptables-save", "-t", table])
            if p.returncode != 0:
                return [Finding("FAIL", f"{name}: cannot read {table} rules of the host netns: {p.stderr.strip()}")]
            have += p.stdout
        for table, hook, chain in HOST_JUMPS:
            if f"-A {hook} -p tcp -j {chain}" not in have:
                out.append(Finding("FAIL", f"{name}: {table} {hook} of the host netns does not jump to {chain}"))
        mine = [line for line in plan_host_rules([h]).splitlines()   # this workload's own rules
                if (line.startswith("-A ") and h.cgroup in line) or line.startswith(f"-A {HOST_IN_CHAIN} -d ")]
        saved = set(have.replace('"', "").splitlines())     # iptables-save quotes a path with a "/"
        missing = [line for line in mine if line not in saved]
        if missing:
            out.append(Finding("FAIL", f"{name}: {len(missing)} of its {len(mine)} host rules missing "
                                       f"(first: {missing[0]})"))
        try:
            if FWMARK_ACCEPT.read_text().strip() != "1":
                out.append(Finding("FAIL", f"{name}: net.ipv4.tcp_fwmark_accept is not 1 in the host netns: "
                                           "its connections cannot be told from other host workloads'"))
        except OSError as e:
            out.append(Finding("WARN", f"{name}: cannot read tcp_fwmark_accept: {e}"))
        return out or [Finding("ok", f"{name}: iptables redirect in place in the host netns "
                                     f"(cgroup {h.cgroup}, mark {h.mark:#x})")]
