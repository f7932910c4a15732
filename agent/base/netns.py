"""netns.py: sockets inside a pod's network namespace, created from the agent's own process.

Owns creating sockets inside a pod's netns (the ztunnel "in-pod" model, DESIGN "Data flow"): a
socket keeps the namespace it was created in, so the listeners and upstream connections made
here live in the pod while the agent's process stays in its own. The only user of pyroute2's
netns module; no trio policy beyond thin async wrappers. Knows nothing of workloads, snapshots
or ports.

How a socket gets into another namespace (measured on the dev machines, kernel 6.18):
``pyroute2.netns.create_socket`` *forks* a child that ``setns()``es, creates the socket and
passes its fd back: 10–15 ms wall, ~3 ms of the agent's CPU (the fork), and it creates a
missing namespace unless told not to. ``socket_in`` instead ``setns()``es only the calling
thread (namespaces are per thread on Linux), creates the socket and switches back: ~80 µs
(a plain ``socket()`` is ~17 µs there), i.e. cheap enough for every upstream connection.
The fork path stays available (``fork=True``) for comparison and as a fallback.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

import trio

from agent.base.constants import PROXY_MARK

log = logging.getLogger("nodemesh.agent.netns")

NETNS_RUN_DIR = "/var/run/netns"    # where `ip netns add NAME` mounts namespaces
SO_NETNS_COOKIE = 71                # linux/asm-generic/socket.h (Linux 5.14+)
_THREAD_NETNS = "/proc/thread-self/ns/net"


class NetnsError(OSError):
    """A network namespace could not be used: it does not exist, is not a network namespace, or
    the agent may not enter it. ``netns`` is the path tried; ``reason`` (also ``str(e)``) says
    what to check. ``errno`` is the OS's, where there was one."""

    def __init__(self, netns: str, reason: str, err: int | None = None) -> None:
        super().__init__(err, reason)
        self.netns, self.reason = netns, reason

    def __str__(self) -> str:
        return self.reason


class ListenError(OSError):
    """``listen_in`` could not bind or listen on ``address`` (host, port) inside ``netns``."""

    def __init__(self, netns: str | None, address: tuple[str, int], reason: str,
                 err: int | None = None) -> None:
        super().__init__(err, reason)
        self.netns, self.address, self.reason = netns, address, reason

    def __str__(self) -> str:
        return f"cannot listen on {_hostport(self.address)}{_where(self.netns)}: {self.reason}"


class ConnectError(OSError):
    """``connect_in`` failed. ``address`` is (host, port); ``netns`` where the connection was
    made from (None: the agent's namespace); ``reason`` is "refused", "timeout", "unreachable",
    or else the OS's words. ``errno`` is the OS's (ETIMEDOUT for a timeout)."""

    def __init__(self, address: tuple[str, int], reason: str, netns: str | None = None,
                 err: int | None = None) -> None:
        super().__init__(err, reason)
        self.address, self.reason, self.netns = address, reason, netns

    def __str__(self) -> str:
        return f"connect to {_hostport(self.address)}{_where(self.netns)} failed: {self.reason}"


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _where(netns: str | None) -> str:
    return f" in {netns}" if netns else ""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def netns_path(netns: str) -> str:
    """The file of ``netns``: a bare name means ``/var/run/netns/NAME`` (as ``ip netns`` and
    pyroute2 read it); anything with a ``/`` is a path already (a bind-mounted netns file, or
    ``/proc/PID/ns/net``) and is returned unchanged."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


# --- creating sockets ---------------------------------------------------------------------------

def socket_in(netns: str | None, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              *, fork: bool = False, home: int | None = None) -> socket.socket:
    """A new blocking socket created inside ``netns``.

    ``netns``: None (or "") for the agent's own namespace; a name (``web-1`` =
    ``/var/run/netns/web-1``) or a path to a netns file (``/var/run/netns/NAME``, a bind mount,
    ``/proc/PID/ns/net``). A missing namespace is never created.

    Takes ~80 µs of CPU and never waits on I/O, so ``connect_in`` calls it on the trio thread;
    ``fork=True`` (pyroute2's forked child, 10–15 ms) must run in a worker thread. Only the
    calling thread enters the namespace, and it always comes back before this returns.

    ``home``: an open fd of the calling thread's own netns (``open_home()``), for a thread that
    makes many sockets (the splice engine's); otherwise it is opened and closed each time.

    Raises ``NetnsError`` saying what to check (missing namespace, not a namespace, no
    CAP_SYS_ADMIN); other ``OSError``s from ``socket()`` itself (EMFILE, ...) pass through.
    """
    if not netns:
        return socket.socket(family, type)
    if not fork:
        return sockets_in(netns, 1, family, type, home=home)[0]
    path = netns_path(netns)
    fd = _open_netns(path)
    try:
        return _socket_by_fork(fd, path, family, type)
    finally:
        os.close(fd)


def sockets_in(netns: str | None, count: int, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM, *, home: int | None = None) -> list[socket.socket]:
    """``count`` new sockets inside ``netns``, made in one visit (one pair of ``setns``): for a
    caller that keeps a few ready. Otherwise as ``socket_in``."""
    if not netns:
        return [socket.socket(family, type) for _ in range(count)]
    path = netns_path(netns)
    fd = _open_netns(path)
    try:
        return _sockets_by_setns(fd, path, family, type, home, count)
    finally:
        os.close(fd)


def open_home() -> int:
    """An fd of the calling thread's network namespace, for ``socket_in(..., home=fd)``."""
    return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        hint = "has the process exited?" if path.startswith("/proc/") else "is the pod running?"
        raise NetnsError(path, f"no such network namespace {path}: {hint}", e.errno) from None
    except PermissionError as e:
        raise NetnsError(path, f"permission denied opening network namespace {path}: "
                               "the agent must run as root", e.errno) from None
    except OSError as e:
        raise NetnsError(path, f"cannot open network namespace {path}: {e.strerror}", e.errno) from None


def _enter_error(path: str, e: OSError) -> NetnsError:
    if e.errno == errno.EINVAL:
        return NetnsError(path, f"{path} is not a network namespace (expected /var/run/netns/NAME, "
                                "a bind-mounted netns file or /proc/PID/ns/net)", e.errno)
    if e.errno == errno.EPERM:
        return NetnsError(path, f"not permitted to enter network namespace {path}: "
                                "the agent needs CAP_SYS_ADMIN (run it as root)", e.errno)
    return NetnsError(path, f"cannot enter network namespace {path}: {e.strerror or e}", e.errno)


def _pyroute2_netns():
    """pyroute2's netns module, imported on first use (the package takes ~0.3 s to import)."""
    from pyroute2 import netns
    return netns


_CLONE_NEWNET = 0x40000000
_libc = None


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread. libc's own through ctypes rather than
    pyroute2's: the same call, without importing pyroute2's 224 modules (~11 MB of the agent's
    RSS) for it (``os.setns`` from Python 3.12 on)."""
    if hasattr(os, "setns"):
        os.setns(fd, _CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sockets_by_setns(fd: int, path: str, family: int, type: int, home_fd: int | None,
                      count: int) -> list[socket.socket]:
    home = home_fd if home_fd is not None else open_home()
    try:
        try:
            _setns(fd)
        except OSError as e:
            raise _enter_error(path, e) from None
        made: list[socket.socket] = []
        try:
            for _ in range(count):
                made.append(socket.socket(family, type))
            return made
        except BaseException:
            for s in made:
                s.close()
            raise
        finally:
            try:
                _setns(home)
            except OSError as e:   # cannot happen with the rights that let us leave; never hide it
                log.critical("thread %d stuck in network namespace %s: %s", threading.get_native_id(), path, e)
                raise NetnsError(path, f"could not return from network namespace {path} to the "
                                       f"agent's: {e}", e.errno) from e
    finally:
        if home_fd is None:
            os.close(home)


def _socket_by_fork(fd: int, path: str, family: int, type: int) -> socket.socket:
    try:
        # flags=0: never create the namespace (pyroute2's default O_CREAT would make an empty one)
        return _pyroute2_netns().create_socket(fd, family, type, flags=0)
    except TimeoutError:
        raise NetnsError(path, f"pyroute2's helper process did not create the socket in {path} "
                               "in time", errno.ETIMEDOUT) from None
    except OSError as e:
        raise _enter_error(path, e) from None


def netns_cookie(sock) -> int:
    """The kernel's 64-bit cookie of the network namespace ``sock`` lives in (``SO_NETNS_COOKIE``):
    stable for the namespace's lifetime, different for each namespace. The eBPF redirect keys
    original destinations by it (``bpf_get_netns_cookie``), since every pod's loopback is
    127.0.0.1. Takes a stdlib or trio socket, or a ``trio.SocketStream``/``SocketListener``.
    Raises ``OSError`` (ENOPROTOOPT before Linux 5.14)."""
    raw = getattr(sock, "socket", sock)
    try:
        data = raw.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as e:
        if e.errno == errno.ENOPROTOOPT:
            raise OSError(e.errno, "SO_NETNS_COOKIE is not supported: needs Linux 5.14 or newer") from e
        raise
    return struct.unpack("=Q", data)[0]


# --- async wrappers -----------------------------------------------------------------------------

async def listen_in(netns: str | None, host: str, port: int, backlog: int = 1024) -> trio.SocketListener:
    """A listening TCP socket on ``host:port`` (an IP literal) inside ``netns``, with
    SO_REUSEADDR. The namespace switch, bind and listen run in a worker thread.

    Raises ``NetnsError`` (see ``socket_in``) or ``ListenError`` (bind/listen failed, e.g.
    "Address already in use": something in the pod holds the port)."""
    sock = await trio.to_thread.run_sync(_listen_sync, netns, host, port, backlog)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _listen_sync(netns: str | None, host: str, port: int, backlog: int) -> socket.socket:
    sock = socket_in(netns, _family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        where = netns_path(netns) if netns else None
        raise ListenError(where, (host, port), e.strerror or str(e), e.errno) from e
    return sock


_UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)


async def connect_in(netns: str | None, host: str, port: int, *, mark: int | None = PROXY_MARK,
                     timeout: float) -> trio.SocketStream:
    """A TCP connection to ``host:port`` (an IP literal) from a socket created inside ``netns``,
    so its source address is the pod's (as ztunnel dials for a pod).

    The socket carries SO_MARK ``mark`` (every redirect rule skips it; None: no mark) when the
    agent may set it (CAP_NET_ADMIN; otherwise logged at debug and left unmarked) and
    TCP_NODELAY. ``timeout`` bounds the whole call. The socket is created on the calling
    (trio) thread: pyroute2's ``setns`` is a bare syscall (no netlink, no event loop), and only
    this thread leaves the agent's namespace, for the ~80 µs of the switch.

    Raises ``NetnsError`` (see ``socket_in``) or ``ConnectError`` with reason "refused",
    "timeout", "unreachable" or the OS's words. Both are ``OSError``s.
    """
    where = netns_path(netns) if netns else None
    with trio.move_on_after(timeout):
        # On the trio thread, not through to_thread: socket_in does no I/O wait (two setns
        # syscalls, ~80 µs of CPU) while a thread hop costs ~0.6 ms of latency per connection.
        await trio.lowlevel.checkpoint()
        sock = trio.socket.from_stdlib_socket(socket_in(where, _family(host), socket.SOCK_STREAM))
        try:
            if mark is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                except PermissionError as e:
                    log.debug("SO_MARK %#x not set on connection to %s: %s", mark,
                              _hostport((host, port)), e)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sock.connect((host, port))
        except OSError as e:
            sock.close()
            raise ConnectError((host, port), _connect_reason(e), where, e.errno) from e
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise ConnectError((host, port), "timeout", where, errno.ETIMEDOUT)


def _connect_reason(e: OSError) -> str:
    if e.errno == errno.ECONNREFUSED:
        return "refused"
    if e.errno == errno.ETIMEDOUT:
        return "timeout"
    if e.errno in _UNREACHABLE:
        return "unreachable"
    return e.strerror or str(e)
