"""bpfmaps.py: the ctypes mirrors of bpf/include/origdst.h and thin libbpf calls for the eBPF redirect.

Owns the byte layout the agent shares with the BPF programs (a unit test compares it with the C
layout through bcc) and the few bpf(2) commands bcc 0.26 does not wrap: program query, detach by
id, bpf_link for sk_lookup, map lookup-and-delete. Calls Debian's libbpf (``libbpf.so.1``, which
bcc links against) through ctypes; imports no bcc and knows no workloads. Every call is a plain
syscall of microseconds; errors are ``OSError`` with the kernel's errno.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

# --- mirrors of bpf/include/origdst.h (addresses network order, ports host order) -------------


class Origdst(ctypes.Structure):
    """``struct origdst``: where a redirected connection was going, and the cgroup id of the
    process that connected (which host workload, for connections on the host's 15001)."""

    _fields_ = [("ip4", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16),
                ("cgroup_id", ctypes.c_uint64)]

    def address(self) -> tuple[str, int]:
        return ip4_str(self.ip4), self.port


class OrigdstKey(ctypes.Structure):
    """``struct origdst_key``: a redirected client socket as the proxy sees it after accept()."""

    _fields_ = [("netns_cookie", ctypes.c_uint64), ("ip4", ctypes.c_uint32),
                ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class OwnAddrKey(ctypes.Structure):
    """``struct own_addr_key``: one of a pod's own addresses, left unredirected."""

    _fields_ = [("netns_cookie", ctypes.c_uint64), ("ip4", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class HostPortKey(ctypes.Structure):
    """``struct host_port_key``: a host workload's (address, declared port), steered to its 15006."""

    _fields_ = [("ip4", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


MIRRORS = {"origdst": Origdst, "origdst_key": OrigdstKey, "own_addr_key": OwnAddrKey,
           "host_port_key": HostPortKey}


def ip4_u32(ip: str) -> int:
    """An IPv4 literal as the u32 whose memory holds it in network byte order (as in the maps)."""
    return struct.unpack("=I", socket.inet_aton(ip))[0]


def ip4_str(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


# --- libbpf ------------------------------------------------------------------------------------

# enum bpf_attach_type (linux/bpf.h)
ATTACH_CGROUP_SOCK_OPS, ATTACH_INET4_CONNECT, ATTACH_INET6_CONNECT, ATTACH_SK_LOOKUP = 3, 10, 11, 36
_PROG_INFO_SIZE, _PROG_INFO_ID, _PROG_INFO_NAME = 256, 4, 64   # struct bpf_prog_info: id, name[16]

_lib: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    """Debian's libbpf (the one bcc uses), loaded on first use. Raises OSError if absent."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        lib = ctypes.CDLL(name, use_errno=True)
        u32p, vp = ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p
        for fn, args in (("bpf_prog_query", [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, u32p, u32p, u32p]),
                         ("bpf_prog_get_fd_by_id", [ctypes.c_uint32]),
                         ("bpf_obj_get_info_by_fd", [ctypes.c_int, vp, u32p]),
                         ("bpf_prog_attach", [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]),
                         ("bpf_prog_detach2", [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
                         ("bpf_link_create", [ctypes.c_int, ctypes.c_int, ctypes.c_int, vp]),
                         ("bpf_map_update_elem", [ctypes.c_int, vp, vp, ctypes.c_uint64]),
                         ("bpf_map_lookup_elem", [ctypes.c_int, vp, vp]),
                         ("bpf_map_lookup_and_delete_elem", [ctypes.c_int, vp, vp]),
                         ("bpf_map_delete_elem", [ctypes.c_int, vp])):
            f = getattr(lib, fn)
            f.argtypes, f.restype = args, ctypes.c_int
        _lib = lib
    return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    """BPF_PROG_ATTACH. flags=0 replaces a program attached the same way (a restarted agent
    takes over); it fails with EPERM where someone attached with BPF_F_ALLOW_MULTI."""
    _check(libbpf().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> bool:
    """BPF_PROG_DETACH of this program; False if it was not attached there (ENOENT)."""
    rc = libbpf().bpf_prog_detach2(prog_fd, target_fd, attach_type)
    if rc < 0 and (ctypes.get_errno() or -rc) == errno.ENOENT:
        return False
    _check(rc, "bpf_prog_detach")
    return True


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to ``target_fd`` (a cgroup) for ``attach_type``."""
    ids = (ctypes.c_uint32 * 64)()
    cnt, flags = ctypes.c_uint32(64), ctypes.c_uint32(0)
    _check(libbpf().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)),
           "bpf_prog_query")
    return list(ids[:cnt.value])


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for program ``prog_id`` (the caller closes it)."""
    return _check(libbpf().bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


def prog_info(prog_fd: int) -> tuple[int, str]:
    """(id, name) of a loaded program; the kernel keeps 15 characters of the name."""
    buf = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    size = ctypes.c_uint32(_PROG_INFO_SIZE)
    _check(libbpf().bpf_obj_get_info_by_fd(prog_fd, buf, ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    raw = buf.raw
    prog_id = struct.unpack_from("=I", raw, _PROG_INFO_ID)[0]
    name = raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    return prog_id, name


def attached(target_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of each program attached to a cgroup for ``attach_type``."""
    out = []
    for prog_id in prog_query(target_fd, attach_type):
        try:
            fd = prog_fd_by_id(prog_id)
        except OSError:          # unloaded meanwhile
            continue
        try:
            out.append(prog_info(fd))
        finally:
            os.close(fd)
    return out


def detach_id(target_fd: int, attach_type: int, prog_id: int) -> bool:
    """Detach program ``prog_id`` (loaded by anyone, e.g. a crashed agent) from a cgroup."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    try:
        return prog_detach(fd, target_fd, attach_type)
    finally:
        os.close(fd)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE; returns the link fd. The attachment lives as long as that fd (and any
    copy of it) is open: closing it detaches, so a crashed agent leaves no link behind."""
    return _check(libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create")


def map_update(map_fd: int, key: ctypes._SimpleCData | ctypes.Structure,
               value: ctypes._SimpleCData | ctypes.Structure) -> None:
    _check(libbpf().bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0), "bpf_map_update_elem")


def map_delete(map_fd: int, key: ctypes._SimpleCData | ctypes.Structure) -> bool:
    """Delete ``key``; False if it was not there."""
    rc = libbpf().bpf_map_delete_elem(map_fd, ctypes.byref(key))
    if rc < 0 and (ctypes.get_errno() or -rc) == errno.ENOENT:
        return False
    _check(rc, "bpf_map_delete_elem")
    return True


def map_lookup(map_fd: int, key, value, *, delete: bool = False) -> bool:
    """Read ``key`` into ``value`` (and delete it, atomically, with ``delete``); False if absent."""
    lib = libbpf()
    fn = lib.bpf_map_lookup_and_delete_elem if delete else lib.bpf_map_lookup_elem
    rc = fn(map_fd, ctypes.byref(key), ctypes.byref(value))
    if rc < 0 and (ctypes.get_errno() or -rc) == errno.ENOENT:
        return False
    _check(rc, "bpf_map_lookup_elem")
    return True
