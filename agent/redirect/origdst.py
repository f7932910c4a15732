"""origdst.py: where a redirected connection was going — ``SO_ORIGINAL_DST`` (iptables REDIRECT).

The eBPF redirect mode answers the same question from its map instead (ebpf.py); both are
reached through ``Redirector.original_destination``.
"""
from __future__ import annotations

import socket
import struct


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


class NoOriginalDestination(OSError):
    """The connection was not redirected (no conntrack entry): nothing to proxy it to."""


def so_original_dst(sock: socket.socket) -> tuple[str, int]:
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        raise NoOriginalDestination(e.errno, f"no original destination for this connection ({e.strerror}): "
                                             "is the redirect in place for this workload?") from None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port

