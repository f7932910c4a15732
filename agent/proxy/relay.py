"""relay.py: copy bytes both ways between two trio streams, and open the proxy's own sockets.

Owns read sizing, half-close propagation, abort-on-error and byte counting. Knows nothing of
what the streams are (TCP, TLS, HBONE), of identities or of policy: it uses what they offer,
a socket's file descriptor, a stream's ``send_nowait`` and ``set_sink`` (a source that hands
data to the relay's TCP socket itself, from the task that received it: no wake-up of ours).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass

import trio

from agent.base.constants import PROXY_MARK
from agent.proxy import ProxyError

log = logging.getLogger(__name__)


# Reads grow 1 KiB -> 16 KiB -> 256 KiB when a read fills the buffer (ztunnel's copy.rs):
# small for request/response chatter, large for bulk.
READ_SIZES = (1024, 16 * 1024, 256 * 1024)

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class RelayCounters:
    """Bytes delivered so far in each direction; updated as they move (read by metrics)."""

    a_to_b: int = 0
    b_to_a: int = 0


@dataclass(frozen=True)
class RelayResult:
    a_to_b: int
    b_to_a: int


class RelayError(ProxyError):
    """One side failed; both were aborted. ``direction`` is where it happened ("a_to_b" or
    "b_to_a"); the counts are the bytes delivered before. ``__cause__`` is the stream error."""

    def __init__(self, direction: str, a_to_b: int, b_to_a: int, reason: str) -> None:
        super().__init__(direction, a_to_b, b_to_a, reason)
        self.direction, self.a_to_b, self.b_to_a, self.reason = direction, a_to_b, b_to_a, reason

    def __str__(self) -> str:
        return (f"relay failed in {self.direction} after {self.a_to_b} bytes a->b, "
                f"{self.b_to_a} bytes b->a: {self.reason}")


async def relay(a: trio.abc.Stream, b: trio.abc.Stream, *,
                counters: RelayCounters | None = None) -> RelayResult:
    """Copy a->b and b->a until both directions reach EOF; return the bytes delivered.

    EOF from one side becomes ``send_eof`` on the other when it is a HalfCloseableStream
    (a non-half-closeable side just stops receiving in that direction). Two tasks in all: the
    caller copies b->a, one child copies a->b. On an error on either side, or cancellation,
    both streams are aborted (a TCP socket is reset, an HBONE stream gets RST_STREAM) and
    ``RelayError`` is raised with the counts so far. The streams stay the caller's to close
    after a clean finish.
    """
    counters = counters if counters is not None else RelayCounters()
    failures: list[tuple[str, BaseException]] = []
    clean = False

    async def direction(src: trio.abc.Stream, dst: trio.abc.Stream, name: str,
                        scope: trio.CancelScope) -> None:
        try:
            await _copy(src, dst, counters, name)
        except _STREAM_ERRORS as e:
            failures.append((name, e))
            scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(direction, a, b, "a_to_b", nursery.cancel_scope)
            await direction(b, a, "b_to_a", nursery.cancel_scope)
        clean = not failures
    finally:
        if not clean:
            with trio.CancelScope(shield=True):
                await abort(a)
                await abort(b)
    if failures:
        name, error = failures[0]
        raise RelayError(name, counters.a_to_b, counters.b_to_a, repr(error)) from error
    return RelayResult(counters.a_to_b, counters.b_to_a)


async def _copy(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream,
                counters: RelayCounters, name: str) -> None:
    size_index = 0
    size = READ_SIZES[0]
    receive = _socket_receiver(src) or src.receive_some
    send = _socket_sender(dst) or _nowait_sender(dst) or dst.send_all
    sink = _socket_sink(src, dst, counters, name)
    if sink is not None:
        src.set_sink(sink)
    try:
        while True:
            data = await receive(size)
            if not data:
                break
            await send(data)
            setattr(counters, name, getattr(counters, name) + len(data))
            if len(data) == size and size_index + 1 < len(READ_SIZES):
                size_index += 1
                size = READ_SIZES[size_index]
    finally:
        if sink is not None:
            src.set_sink(None)
    if isinstance(dst, trio.abc.HalfCloseableStream):
        await dst.send_eof()


def _socket_sink(src, dst, counters: RelayCounters, name: str):
    """For a source with ``set_sink`` and a TCP destination: a sink that writes what the source
    receives straight to the socket without blocking, counted as delivered. It takes what the
    kernel takes; on a full socket or an error it takes nothing, and the relay's own send (woken
    with the rest) waits or raises. None for any other pair."""
    if type(dst) is not trio.SocketStream or not hasattr(src, "set_sink"):
        return None
    fd = dst.socket.fileno()
    write = os.write

    def sink(data) -> int:
        try:
            n = write(fd, data)
        except OSError:
            return 0
        setattr(counters, name, getattr(counters, name) + n)
        return n
    return sink


def _socket_receiver(stream):
    """For a TCP stream: wait until readable, then one ``recv`` (trio's ``receive_some`` tries
    first, so each message of request/response traffic costs it an EAGAIN, an exception and an
    extra scheduler turn). None for any other stream."""
    if type(stream) is not trio.SocketStream:
        return None
    sock = stream.socket
    fd = sock.fileno()
    wait = trio.lowlevel.wait_readable

    async def receive(size: int) -> bytes:
        while True:
            await wait(fd)
            try:
                return os.read(fd, size)
            except BlockingIOError:
                continue
            except OSError as e:
                raise trio.BrokenResourceError(f"receive failed: {e}") from e
    return receive


def _socket_sender(stream):
    """For a TCP stream: one ``send`` straight away (it nearly always takes a small message
    whole); what it does not take goes through trio's ``send_all``. None otherwise."""
    if type(stream) is not trio.SocketStream:
        return None
    fd = stream.socket.fileno()

    async def send(data: bytes) -> None:
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            raise trio.BrokenResourceError(f"send failed: {e}") from e
        if n < len(data):
            await stream.send_all(memoryview(data)[n:])
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
    return send


def _nowait_sender(stream):
    """For a stream with ``send_nowait`` (HBONE): send without waiting when it can leave at
    once, else ``send_all``. No checkpoint of its own: the next receive is one. None otherwise."""
    send_nowait = getattr(stream, "send_nowait", None)
    if send_nowait is None:
        return None
    send_all = stream.send_all

    async def send(data: bytes) -> None:
        if not send_nowait(data):
            await send_all(data)
    return send


async def abort(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` now, signalling an error where the transport can: a TCP socket is
    reset (SO_LINGER 0 → RST) rather than closed with FIN; an HBONE stream resets itself."""
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    await trio.aclose_forcefully(stream)


async def open_marked_tcp_stream(host: str, port: int, *, mark: int = PROXY_MARK) -> trio.SocketStream:
    """Connect to ``host:port`` (an IP literal) from a socket carrying SO_MARK ``mark`` and
    TCP_NODELAY. Setting the mark needs CAP_NET_ADMIN; without it the socket goes unmarked
    (logged at debug), which is fine wherever no redirect rule would catch it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except (PermissionError, AttributeError) as e:
            log.debug("SO_MARK %#x not set on connection to %s:%d: %s", mark, host, port, e)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
