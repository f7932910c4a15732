"""hbone_floor.py: the floor under our HBONE server — the least a Python HBONE hop can cost.

The server role of ``bench.hbone_micro --server floor``: one thread, a raw epoll loop, the
stdlib's ``ssl.SSLSocket`` (non-blocking) and the same ``h2`` library, relaying each CONNECT
stream to the TCP echo process — no trio, no tasks, no policy, no telemetry, no flow-control
care beyond acknowledging what arrives. Not a proxy to run: a measuring stick. What the agent
spends per request above this figure is what a rewrite of its HBONE data path onto one epoll
thread (as the splice engine does for plaintext) could save at most.

    python -m bench.hbone_floor CERT_DIR ECHO_PORT     (prints its port; ends when stdin closes)
"""
from __future__ import annotations

import select
import ssl
import socket
import sys
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from bench.hbone_micro import context


class _Conn:
    """One inbound HBONE connection: h2 over an SSLSocket, one echo socket per stream."""

    def __init__(self, tls: ssl.SSLSocket, poll: select.epoll, handlers: dict, echo_port: int) -> None:
        self.tls, self.poll, self.handlers, self.echo_port = tls, poll, handlers, echo_port
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.upstreams: dict[int, socket.socket] = {}
        self.flush()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.tls.sendall(out)

    def readable(self) -> None:
        while True:
            try:
                data = self.tls.recv(256 * 1024)
            except ssl.SSLWantReadError:
                break
            if not data:
                self.poll.unregister(self.tls.fileno())
                self.tls.close()
                return
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    self.upstreams[ev.stream_id].sendall(ev.data)
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.RequestReceived):
                    self._open(ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.upstreams[ev.stream_id].shutdown(socket.SHUT_WR)
            if not self.tls.pending():
                break
        self.flush()

    def _open(self, sid: int) -> None:
        up = socket.create_connection(("127.0.0.1", self.echo_port))
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.setblocking(False)
        self.upstreams[sid] = up
        self.handlers[up.fileno()] = lambda: self._upstream_readable(sid, up)
        self.poll.register(up.fileno(), select.EPOLLIN)
        self.h2.send_headers(sid, [(b":status", b"200")])

    def _upstream_readable(self, sid: int, up: socket.socket) -> None:
        data = up.recv(64 * 1024)
        if data:
            self.h2.send_data(sid, data)
        else:
            self.poll.unregister(up.fileno())
            del self.handlers[up.fileno()]
            up.close()
            self.h2.end_stream(sid)
        self.flush()


def main() -> None:
    directory, echo_port = Path(sys.argv[1]), int(sys.argv[2])
    ctx = context(directory, "server")
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    poll.register(sys.stdin.fileno(), select.EPOLLIN)
    handlers: dict = {}
    while True:
        for fd, _ in poll.poll():
            if fd == sys.stdin.fileno():
                return
            if fd == listener.fileno():
                raw, _ = listener.accept()
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = ctx.wrap_socket(raw, server_side=True)     # the handshake, blocking
                tls.setblocking(False)
                handlers[tls.fileno()] = _Conn(tls, poll, handlers, echo_port).readable
                poll.register(tls.fileno(), select.EPOLLIN)
            else:
                handlers[fd]()


if __name__ == "__main__":
    main()
