"""ebpf.py: redirect mode "ebpf" — bcc-compiled programs of bpf/ on each workload's cgroup and netns.

Compiles bpf/*.c once at ``start`` (off the trio thread, in a child process: ebpf_build.py is
the only module that imports bcc), parameters as cflags, and attaches per workload:

- Outbound, on the workload's cgroup v2 (``spec.cgroup``): ``cgroup/connect4`` rewrites a TCP
  connect() to 127.0.0.1:15001 (in the client's own netns: the in-pod listener), skipping
  loopback, the pod's own addresses and sockets carrying SO_MARK PROXY_MARK, and records the
  original destination by socket cookie; ``sockops`` re-keys it by (netns cookie, client ip,
  client port) when the SYN leaves; ``original_destination`` reads and deletes that entry.
  ``cgroup/connect6`` does the same for IPv4-mapped destinations (::ffff:a.b.c.d) of dual-stack
  sockets; native IPv6 is left alone (the in-pod listeners are IPv4 only), so IPv6 works but is
  not meshed.
- Inbound, on the pod's netns: ``sk_lookup`` (chosen over nft TPROXY: no fwmark rule, no local
  route, no netfilter in the pod, the original destination is simply the accepted socket's
  getsockname(), and the link vanishes with the agent instead of outliving it). A TCP SYN from
  outside the pod for one of the pod's own IPv4 addresses (``spec.addresses``), on any port but
  15008, is handed to the 15006 listener the agent registers with ``register_inbound_socket``;
  HBONE peers reach pod_ip:15008 by the normal lookup. The proxy's own deliveries to the app
  (dialled from inside the pod) are never steered: sk_lookup cannot see their socket's mark, and
  ``ingress_ifindex`` of local delivery is the veth, not lo, so "from inside" means a source
  address that is loopback or the destination itself (what connect() to a local address picks;
  a pod socket explicitly bound to a *second* own address would be steered).

Host workloads (``spec.cgroup``, no netns: a systemd service) get the same cgroup hooks on their
cgroup; connect4 rewrites to 127.0.0.1:15001 of the *host* netns (the agent's own), where all
host workloads share one listener, so connect4 also records ``bpf_get_current_cgroup_id()`` and
``host_origin`` maps that id (the cgroup directory's inode number) back to the workload. Inbound,
``sk_lookup`` is linked once to the host netns and steers only the (address, declared port) pairs
of host workloads (``register_host_inbound``) to the host 15006 listener of that address: the
host's other traffic, the agent's own ports included, takes the normal lookup.

Attachments: cgroup programs with flags 0 (attaching again replaces — a restarted agent takes
over a cgroup it enrols); sk_lookup as bpf_links held by this process (closed on exit, even a
crash). Nothing is pinned: all map state is per-connection and short-lived, and the listeners
die with the agent anyway, so a restarted agent has nothing to adopt. Instead the cgroups it
attached to are recorded in ``<state_dir>/<instance>.json``, and ``start(local)`` detaches our
programs (by name) from recorded cgroups whose workloads are not in ``local``.

Cgroup paths: ``spec.cgroup`` is a cgroup v2 path. Under a hybrid layout (cgroup2 at
/sys/fs/cgroup/unified), ``/sys/fs/cgroup/X`` is taken to mean ``<cgroup2 mount>/X``; a relative
path is relative to the cgroup2 mount.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.base.constants import OUTBOUND_PORT
from agent.base.netns import netns_cookie, netns_path, socket_in
from agent.redirect import bpfmaps, ebpf_build
from agent.redirect.ebpf_build import cflags  # noqa: F401 (the programs' parameters, tested here)
from agent.redirect.base import Finding, RedirectError
from agent.redirect.cgroup import cgroup2_mounts, cgroup_dir  # noqa: F401 (also the names tests use)
from agent.redirect.origdst import NoOriginalDestination
from controller.api import Workload

log = logging.getLogger("nodemesh.agent.redirect")

STATE_DIR = "/run/nodemesh/ebpf"
HOST_NETNS = "/proc/self/ns/net"        # the host namespace: the agent's own

# the cgroup hooks, in attach order (sockops first, so every redirected connect is re-keyed)
CGROUP_HOOKS = (("nm_sockops", bpfmaps.ATTACH_CGROUP_SOCK_OPS),
                ("nm_connect4", bpfmaps.ATTACH_INET4_CONNECT),
                ("nm_connect6", bpfmaps.ATTACH_INET6_CONNECT))
OUR_PROGRAMS = frozenset({"nm_sockops", "nm_connect4", "nm_connect6", "nm_sk_lookup"})


def _name(w: Workload) -> str:
    return f"{w.metadata.namespace}/{w.metadata.name}"


def _ipv4(addresses) -> list[str]:
    return [a for a in addresses if ":" not in a]


# --- compile -----------------------------------------------------------------------------------

def _compile() -> ebpf_build.Built:
    """Compile and load all programs, in a child process (agent/redirect/ebpf_build.py: the
    agent never holds bcc or LLVM). Blocking (0.5–3 s). Raises RedirectError."""
    return ebpf_build.build()


def supported() -> tuple[bool, str]:
    """Can this kernel run the ebpf mode? (cgroup2 mounted, bpf() works, the programs compile
    and load.) Returns (True, "") or (False, why). Blocking: compiles once (~1–3 s); the
    result is kept for the next ``EbpfRedirector.start`` so the agent compiles only once."""
    if os.geteuid() != 0:
        return False, "needs root (CAP_BPF, CAP_NET_ADMIN)"
    if not cgroup2_mounts():
        return False, "no cgroup2 file system mounted"
    try:
        bpfmaps.libbpf()
    except OSError as e:
        return False, f"libbpf not found: {e}"
    try:
        compiled = _compile()
    except (RedirectError, OSError, ImportError) as e:
        return False, str(e)
    with _spare_lock:                  # the next start() uses it instead of compiling again
        while _spare:
            _spare.pop().cleanup()
        _spare.append(compiled)
    return True, ""


_spare: list = []                      # at most one Built compiled by supported()
_spare_lock = threading.Lock()


def _compiled():
    with _spare_lock:
        if _spare:
            return _spare.pop()
    return _compile()


# --- the redirector ----------------------------------------------------------------------------

@dataclass
class _Enrolment:
    cgroup: str
    netns: str                       # "" for a host-process workload
    cookie: int                      # netns cookie of the workload's netns (or the agent's)
    own: list[str]                   # IPv4 addresses entered in own_addrs
    link_fd: int = -1                # sk_lookup link on the netns
    inbound: list[str] = field(default_factory=list)   # IPv4 keys in inbound_listeners
    cgroup_id: int = 0               # a host workload's cgroup id (its directory's inode number)
    host_keys: list[tuple[str, int]] = field(default_factory=list)   # keys in host_inbound


class EbpfRedirector:
    """Redirector (agent/redirect/base.py) for mode "ebpf".

    ``instance`` names this agent's record of attached cgroups (``<state_dir>/<instance>.json``):
    agents sharing one kernel (the lab) must use different instances, or one's ``start`` would
    detach the other's cgroups. Extra over the interface: ``register_inbound_socket`` /
    ``unregister_inbound_socket`` for the 15006 listener the agent owns, and
    ``register_host_inbound`` / ``host_origin`` for host workloads.
    """

    mode = "ebpf"

    def __init__(self, *, instance: str = "default", state_dir: str = STATE_DIR) -> None:
        self._state_file = Path(state_dir) / f"{instance}.json"
        self._bpf = None
        self._progs: dict[str, int] = {}
        self._maps: dict[str, int] = {}
        self._prog_ids: list[int] = []           # kernel ids of _progs, for the record
        self._enrolled: dict[tuple[str, str], _Enrolment] = {}
        self._by_cgroup: dict[int, tuple[str, str]] = {}   # cgroup id -> host workload
        self._host_link = -1                     # sk_lookup link on the host netns (host workloads)
        self._lock = threading.Lock()            # enrol/unenrol run in worker threads

    # -- lifecycle --

    async def start(self, local: list[Workload]) -> None:
        """Compile and load the programs (once), then detach our programs from cgroups recorded
        by an earlier run whose workloads are not in ``local``. Raises RedirectError."""
        if self._bpf is None:
            built = await trio.to_thread.run_sync(_compiled)
            self._bpf, self._progs, self._maps = built, built.progs, built.maps
            self._prog_ids = sorted(bpfmaps.prog_info(fd)[0] for fd in self._progs.values())
        await trio.to_thread.run_sync(self._sweep, local)

    def _sweep(self, local: list[Workload]) -> None:
        mounts = cgroup2_mounts()
        keep = set()
        for w in local:
            try:
                keep.add(cgroup_dir(w.spec.cgroup, mounts))
            except RedirectError:
                pass
        with self._lock:
            recorded, old_ids = self._read_state(), self._read_program_ids()
            for cg in recorded - keep:
                # Only the programs an earlier run of *this* agent loaded: another agent on the
                # machine (the lab's other nodes) may have attached its own to that cgroup since.
                n = _detach_ours(cg, old_ids)
                log.info("ebpf: removed %d leftover attachment(s) from %s", n, cg)
            self._write_state((recorded & keep) | {e.cgroup for e in self._enrolled.values()})

    async def stop(self) -> None:
        """Unenrol everything, close the programs and forget the record. Nothing is pinned."""
        with trio.CancelScope(shield=True):       # undo kernel changes even when cancelled
            for key in list(self._enrolled):
                await trio.to_thread.run_sync(self._unenrol_key, key)
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf, self._progs, self._maps, self._prog_ids = None, {}, {}, []
        try:
            self._state_file.unlink()
        except FileNotFoundError:
            pass

    # -- enrol --

    async def enrol(self, workload: Workload) -> None:
        """Attach connect4/connect6/sockops to the workload's cgroup and (for a pod) sk_lookup to
        its netns. Idempotent. Raises RedirectError naming the workload and the step."""
        if self._bpf is None:
            raise RedirectError(f"{_name(workload)}: enrol before start")
        await trio.to_thread.run_sync(self._enrol_sync, workload)

    def _enrol_sync(self, w: Workload) -> None:
        key = (w.metadata.namespace, w.metadata.name)
        try:
            cg = cgroup_dir(w.spec.cgroup, cgroup2_mounts())
        except RedirectError as e:
            raise RedirectError(f"{_name(w)}: {e}") from None
        if not os.path.isdir(cg):
            raise RedirectError(f"{_name(w)}: cgroup {cg} does not exist")
        with self._lock:
            old = self._enrolled.get(key)
            if old is not None and (old.cgroup, old.netns) != (cg, w.spec.netns):
                self._unenrol_locked(key)
                old = None
            if old is None:
                try:
                    cookie = self._cookie(w.spec.netns)
                except OSError as e:
                    raise RedirectError(f"{_name(w)}: cannot reach netns {w.spec.netns}: {e}") from e
                old = self._enrolled[key] = _Enrolment(cg, w.spec.netns, cookie, [])
                self._write_state(self._read_state() | {cg})
            e = old
            try:
                self._set_own(e, _ipv4(w.spec.addresses))
                self._attach_cgroup(cg)
                if e.netns and e.link_fd < 0:
                    e.link_fd = self._link_sk_lookup(netns_path(e.netns))
                if not e.netns:             # a host workload: told apart by its cgroup id
                    e.cgroup_id = os.stat(cg).st_ino
                    self._by_cgroup[e.cgroup_id] = key
                    if self._host_link < 0:
                        self._host_link = self._link_sk_lookup(HOST_NETNS)
            except OSError as err:
                self._unenrol_locked(key)
                raise RedirectError(f"{_name(w)}: attaching to {cg} / {e.netns or 'host netns'} failed: {err}") from err

    def _link_sk_lookup(self, path: str) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return bpfmaps.link_create(self._progs["nm_sk_lookup"], fd, bpfmaps.ATTACH_SK_LOOKUP)
        finally:
            os.close(fd)

    @staticmethod
    def _cookie(netns: str) -> int:
        s = socket_in(netns or None, socket.AF_INET, socket.SOCK_STREAM)
        try:
            return netns_cookie(s)
        finally:
            s.close()

    def _set_own(self, e: _Enrolment, addrs: list[str]) -> None:
        fd = self._maps["own_addrs"]
        for a in set(e.own) - set(addrs):
            bpfmaps.map_delete(fd, bpfmaps.OwnAddrKey(e.cookie, bpfmaps.ip4_u32(a), 0))
        for a in addrs:
            bpfmaps.map_update(fd, bpfmaps.OwnAddrKey(e.cookie, bpfmaps.ip4_u32(a), 0), ctypes.c_uint8(1))
        e.own = list(addrs)

    def _attach_cgroup(self, cg: str) -> None:
        fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name, atype in CGROUP_HOOKS:
                bpfmaps.prog_attach(self._progs[name], fd, atype, 0)
        finally:
            os.close(fd)

    # -- unenrol --

    async def unenrol(self, workload: Workload) -> None:
        """Undo ``enrol``; a workload not enrolled is a no-op; a vanished cgroup/netns is fine."""
        await trio.to_thread.run_sync(self._unenrol_key, (workload.metadata.namespace, workload.metadata.name))

    def _unenrol_key(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._unenrol_locked(key)

    def _unenrol_locked(self, key: tuple[str, str]) -> None:
        e = self._enrolled.pop(key, None)
        if e is None:
            return
        if e.link_fd >= 0:
            os.close(e.link_fd)
            e.link_fd = -1
        for a in e.inbound:
            bpfmaps.map_delete(self._maps["inbound_listeners"], ctypes.c_uint32(bpfmaps.ip4_u32(a)))
        self._set_host_inbound(e, {})
        for cgid in [i for i, k in self._by_cgroup.items() if k == key]:
            del self._by_cgroup[cgid]
        if self._host_link >= 0 and not any(not o.netns for o in self._enrolled.values()):
            os.close(self._host_link)          # the last host workload: unlink the host netns
            self._host_link = -1
        self._set_own(e, [])
        if not any(o.cgroup == e.cgroup for o in self._enrolled.values()):
            try:
                fd = os.open(e.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    for name, atype in reversed(CGROUP_HOOKS):
                        bpfmaps.prog_detach(self._progs[name], fd, atype)
                finally:
                    os.close(fd)
            self._write_state(self._read_state() - {e.cgroup})

    # -- inbound listener --

    def register_inbound_socket(self, workload: Workload, sock) -> None:
        """Steer the workload's outside inbound TCP (all ports but 15008) to ``sock``, its listening
        15006 socket (stdlib/trio socket or SocketListener; the kernel keeps its own reference,
        and drops it when the socket closes). Call after ``enrol``. Raises RedirectError."""
        e = self._enrolled.get((workload.metadata.namespace, workload.metadata.name))
        if e is None or not e.netns:
            raise RedirectError(f"{_name(workload)}: register_inbound_socket needs an enrolled pod (netns)")
        raw = getattr(sock, "socket", sock)
        fd = ctypes.c_uint32(raw.fileno())
        addrs = _ipv4(workload.spec.addresses)
        try:
            for a in addrs:
                bpfmaps.map_update(self._maps["inbound_listeners"], ctypes.c_uint32(bpfmaps.ip4_u32(a)), fd)
        except OSError as err:
            raise RedirectError(f"{_name(workload)}: cannot register the 15006 listener: {err}") from err
        e.inbound = sorted(set(e.inbound) | set(addrs))

    def register_host_inbound(self, workload: Workload, sockets: dict) -> None:
        """Steer outside TCP for a host workload's (IPv4 address, declared port) pairs to its host
        15006 listener of that address (``sockets``: address -> listening socket), and nothing
        else of the host's. Call after ``enrol``; again to update. Raises RedirectError."""
        e = self._enrolled.get((workload.metadata.namespace, workload.metadata.name))
        if e is None or e.netns:
            raise RedirectError(f"{_name(workload)}: register_host_inbound needs an enrolled host workload")
        wanted = {(a, p): sockets[a] for a in _ipv4(workload.spec.addresses) if a in sockets
                  for p in workload.spec.ports}
        try:
            with self._lock:
                self._set_host_inbound(e, wanted)
        except OSError as err:
            raise RedirectError(f"{_name(workload)}: cannot register the host 15006 listener: {err}") from err

    def _set_host_inbound(self, e: _Enrolment, wanted: dict) -> None:
        fd = self._maps["host_inbound"]
        for a, p in set(e.host_keys) - set(wanted):
            bpfmaps.map_delete(fd, bpfmaps.HostPortKey(bpfmaps.ip4_u32(a), p, 0))
        for (a, p), sock in wanted.items():
            raw = getattr(sock, "socket", sock)
            bpfmaps.map_update(fd, bpfmaps.HostPortKey(bpfmaps.ip4_u32(a), p, 0), ctypes.c_uint32(raw.fileno()))
        e.host_keys = sorted(wanted)

    def unregister_inbound_socket(self, workload: Workload) -> None:
        e = self._enrolled.get((workload.metadata.namespace, workload.metadata.name))
        if e is not None:
            for a in e.inbound:
                bpfmaps.map_delete(self._maps["inbound_listeners"], ctypes.c_uint32(bpfmaps.ip4_u32(a)))
            e.inbound = []

    # -- original destination --

    async def original_destination(self, workload: Workload, stream: trio.SocketStream) -> tuple[str, int]:
        """Where a connection accepted on 15001 (or steered to 15006) was going. Outbound: the
        entry of (netns cookie, peer ip, peer port), read and deleted. Inbound (sk_lookup keeps
        the address the client dialled): the accepted socket's own address. Raises
        NoOriginalDestination. A map syscall of microseconds: runs on the trio thread."""
        await trio.lowlevel.checkpoint()
        return self.original_destination_sync(stream.socket)

    def original_destination_sync(self, sock) -> tuple[str, int]:
        local = sock.getsockname()
        if sock.family == socket.AF_INET and local[1] != OUTBOUND_PORT:
            return local[0], local[1]
        return self._redirected(sock).address()

    def _redirected(self, sock) -> bpfmaps.Origdst:
        """The origdst entry of a connection accepted on a 15001, read and deleted."""
        peer = sock.getpeername()
        if sock.family != socket.AF_INET or "origdst_by_peer" not in self._maps:
            raise NoOriginalDestination(None, f"no original destination for {peer[0]}:{peer[1]}: "
                                              "the ebpf redirect covers IPv4 only")
        key = bpfmaps.OrigdstKey(netns_cookie(sock), bpfmaps.ip4_u32(peer[0]), peer[1], 0)
        value = bpfmaps.Origdst()
        if not bpfmaps.map_lookup(self._maps["origdst_by_peer"], key, value, delete=True):
            raise NoOriginalDestination(None, f"no original destination for {peer[0]}:{peer[1]}: was the "
                                              "connection redirected by this agent's connect4 program?")
        return value

    def host_origin(self, sock) -> tuple[tuple[str, str], tuple[str, int]]:
        """For a connection accepted on the host netns's 15001: which enrolled host workload made
        it, as (namespace, name), and its original destination; from the entry connect4 wrote
        (read and deleted), whose cgroup id is the connecting process's cgroup — the workload's
        own or one below it (a service's sub-cgroups). Raises NoOriginalDestination."""
        value = self._redirected(sock)
        key = self._by_cgroup.get(value.cgroup_id)
        if key is None:
            key = self._below_host_cgroup(value.cgroup_id)
        if key is None:
            raise NoOriginalDestination(None, f"connection to {value.address()} from cgroup id "
                                              f"{value.cgroup_id}, which is no enrolled host workload's")
        return key, value.address()

    def _below_host_cgroup(self, cgroup_id: int) -> tuple[str, str] | None:
        """The host workload whose cgroup has ``cgroup_id`` as a descendant (then remembered)."""
        with self._lock:
            for key, e in self._enrolled.items():
                if e.netns:
                    continue
                for dirpath, _, _ in os.walk(e.cgroup):
                    try:
                        if os.stat(dirpath).st_ino == cgroup_id:
                            self._by_cgroup[cgroup_id] = key
                            return key
                    except OSError:
                        continue
        return None

    # -- doctor --

    def check(self, workload: Workload) -> list[Finding]:
        """Programs attached to the workload's cgroup (ours, or a stale copy), maps present,
        sk_lookup link and 15006 listener for a pod; for a host workload its cgroup id mapped, the
        host netns's sk_lookup link and its (address, port) pairs steered to 15006."""
        name = _name(workload)
        if self._bpf is None:
            return [Finding("FAIL", f"{name}: ebpf redirector not started (programs not loaded)")]
        out = [Finding("ok", f"{name}: maps origdst_by_peer, own_addrs, inbound_listeners present")]
        try:
            cg = cgroup_dir(workload.spec.cgroup, cgroup2_mounts())
            fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (RedirectError, OSError) as e:
            return out + [Finding("FAIL", f"{name}: cgroup: {e}")]
        try:
            for prog, atype in CGROUP_HOOKS:
                mine = bpfmaps.prog_info(self._progs[prog])[0]
                ids = {i: n for i, n in bpfmaps.attached(fd, atype)}
                if mine in ids:
                    out.append(Finding("ok", f"{name}: {prog} attached to {cg}"))
                elif prog in ids.values():
                    out.append(Finding("WARN", f"{name}: {prog} on {cg} is another agent's (stale?); re-enrol"))
                else:
                    out.append(Finding("FAIL", f"{name}: {prog} not attached to {cg}"))
        finally:
            os.close(fd)
        e = self._enrolled.get((workload.metadata.namespace, workload.metadata.name))
        if not workload.spec.netns:
            return out + self._check_host(workload, e)
        if e is not None and e.link_fd >= 0:
            out.append(Finding("ok", f"{name}: sk_lookup linked to {workload.spec.netns}"))
        else:
            out.append(Finding("FAIL", f"{name}: no sk_lookup link on {workload.spec.netns}"))
        if e is None or not e.inbound:
            out.append(Finding("WARN", f"{name}: no 15006 listener registered: inbound plaintext "
                                       "reaches the app directly"))
        return out

    def _check_host(self, workload: Workload, e: _Enrolment | None) -> list[Finding]:
        name = _name(workload)
        out = []
        if e is None or e.cgroup_id not in self._by_cgroup:
            out.append(Finding("FAIL", f"{name}: host workload not enrolled (its cgroup id is not mapped)"))
        if self._host_link >= 0:
            out.append(Finding("ok", f"{name}: sk_lookup linked to the host netns"))
        else:
            out.append(Finding("FAIL", f"{name}: no sk_lookup link on the host netns"))
        wanted = {(a, p) for a in _ipv4(workload.spec.addresses) for p in workload.spec.ports}
        if e is not None and wanted and set(e.host_keys) != wanted:
            out.append(Finding("WARN", f"{name}: host 15006 not registered for "
                                       f"{', '.join(f'{a}:{p}' for a, p in sorted(wanted - set(e.host_keys)))}: "
                                       "inbound plaintext reaches the service directly"))
        return out

    # -- the record of attached cgroups --

    def _read_state(self) -> set[str]:
        try:
            return set(json.loads(self._state_file.read_text()).get("cgroups", []))
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as e:
            log.warning("ebpf: ignoring unreadable %s: %s", self._state_file, e)
            return set()

    def _read_program_ids(self) -> frozenset[int] | None:
        """The kernel ids of the programs the recorded run loaded (None: a record without them)."""
        try:
            ids = json.loads(self._state_file.read_text()).get("programs")
        except (OSError, ValueError):
            return frozenset()
        return None if ids is None else frozenset(int(i) for i in ids)

    def _write_state(self, cgroups: set[str]) -> None:
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cgroups": sorted(cgroups), "programs": self._prog_ids}))
        os.replace(tmp, self._state_file)


def _detach_ours(cg: str, ids: frozenset[int] | None = None) -> int:
    """Detach nodemesh programs from cgroup ``cg``: those with a kernel id in ``ids``, or (None)
    every one by name; returns how many. A missing cgroup has nothing attached."""
    try:
        fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    n = 0
    try:
        for _, atype in reversed(CGROUP_HOOKS):
            for prog_id, prog_name in bpfmaps.attached(fd, atype):
                if (prog_name in OUR_PROGRAMS and (ids is None or prog_id in ids)
                        and bpfmaps.detach_id(fd, atype, prog_id)):
                    n += 1
    finally:
        os.close(fd)
    return n
