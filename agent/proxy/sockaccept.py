"""sockaccept.py: accept(2) without ``socket.accept()``'s wrapper — the data path's one reach
into CPython's socket internals.

``socket.socket.accept()`` is ``self._accept()`` (the C accept, giving a descriptor and the peer
address) plus Python around it: it builds the new socket from ``self.family/type/proto`` (three
property calls), and checks and applies the default timeout. The engine thread accepts in
batches on a non-blocking listener whose kind it knows, so ``acceptor`` does the C call and
builds the socket from the kind read once. ``_accept`` is private, so this is used only on the
CPython versions it was tested with (``TESTED``; tests/agent/proxy/test_sockaccept.py compares
it with ``accept()``), and elsewhere falls back to ``accept()``. BENCHMARKS.md ("sockaccept")
has the figure that pays for it.
"""
from __future__ import annotations

import socket
import sys
from typing import Callable

TESTED = frozenset({(3, 11), (3, 12), (3, 13)})


def usable(version: tuple[int, ...] = tuple(sys.version_info[:2])) -> bool:
    """Whether the shortcut is used on this interpreter (CPython of a tested version)."""
    return sys.implementation.name == "cpython" and tuple(version[:2]) in TESTED


def acceptor(sock: socket.socket, *, fast: bool | None = None) -> Callable[[], socket.socket]:
    """A function that accepts one connection on ``sock`` and returns it as a non-blocking
    ``socket.socket``; raises what ``accept()`` raises (BlockingIOError when none waits)."""
    if not (usable() if fast is None else fast):
        def slow() -> socket.socket:
            conn, _ = sock.accept()
            conn.setblocking(False)
            return conn
        return slow
    accept, make = sock._accept, socket.socket
    family, kind, proto = int(sock.family), int(sock.type), sock.proto

    def quick() -> socket.socket:
        conn = make(family, kind, proto, accept()[0])
        conn.setblocking(False)
        return conn
    return quick
