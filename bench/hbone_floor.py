"""hbone_floor.py: the floor under our HBONE server — the least a Python HBONE hop can cost.

The server role of ``bench.hbone_micro --server floor``: one thread, a raw epoll loop, TLS as
an ``ssl.SSLObject`` over memory BIOs (one big ``recv`` and one ``send`` per turn, as
agent/proxy/tlsio.py does) and the stock ``h2`` library, relaying each CONNECT
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
    """One inbound HBONE connection: h2 over TLS over a socket, one echo socket per stream."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, poll: select.epoll, handlers: dict, echo_port: int) -> None:
        self.sock, self.tls, self.incoming, self.outgoing = sock, tls, incoming, outgoing
        self.poll, self.handlers, self.echo_port = poll, handlers, echo_port
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.upstreams: dict[int, socket.socket] = {}
        self.flush()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.tls.write(out)
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())     # blocking: a measuring stick only

    def readable(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            self.poll.unregister(self.sock.fileno())
            self.sock.close()
            return
        self.incoming.write(data)
        while True:
            try:
                plain = self.tls.read(256 * 1024)
            except ssl.SSLWantReadError:
                break
            if not plain:
                break
            for ev in self.h2.receive_data(plain):
                if isinstance(ev, h2.events.DataReceived):
                    self.upstreams[ev.stream_id].sendall(ev.data)
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.RequestReceived):
                    self._open(ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.upstreams[ev.stream_id].shutdown(socket.SHUT_WR)
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


def _handshake(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
               outgoing: ssl.MemoryBIO) -> None:
    """The TLS handshake on the still blocking socket."""
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if outgoing.pending:
            sock.sendall(outgoing.read())
        if done:
            return
        data = sock.recv(64 * 1024)
        if not data:
            raise ConnectionError("the client left during the handshake")
        incoming.write(data)


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
                incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
                _handshake(raw, tls, incoming, outgoing)
                conn = _Conn(raw, tls, incoming, outgoing, poll, handlers, echo_port)
                handlers[raw.fileno()] = conn.readable
                poll.register(raw.fileno(), select.EPOLLIN)
            else:
                handlers[fd]()


if __name__ == "__main__":
    main()
