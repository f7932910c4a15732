"""sockaccept: the accept shortcut gives what socket.accept() gives, and is used only where tested."""
from __future__ import annotations

import socket

import pytest

from agent.proxy.sockaccept import acceptor, usable


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    return s


@pytest.mark.parametrize("fast", [True, False])
def test_the_accepted_socket_is_what_accept_gives(fast):
    with listener() as lst:
        accept = acceptor(lst, fast=fast)
        with pytest.raises(BlockingIOError):
            accept()                                   # nothing waiting: as accept() says
        client = socket.create_connection(lst.getsockname())
        with client:
            conn = accept()
            with conn:
                reference = (lst.family, lst.type, lst.proto)
                assert (conn.family, conn.type, conn.proto) == reference
                assert conn.getpeername() == client.getsockname()
                assert conn.getsockname() == lst.getsockname()
                assert conn.getblocking() is False and conn.gettimeout() == 0.0
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def test_the_shortcut_is_used_only_on_tested_interpreters():
    assert usable((3, 11)) and not usable((3, 99)) and not usable((2, 7))
