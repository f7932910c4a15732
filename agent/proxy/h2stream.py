"""h2stream.py: one HTTP/2 stream of a connection as a trio half-closeable byte stream.

Owns the stream's receive buffer, its reads and writes, half-close and reset. Frames go out
through the connection (``Connection`` below: all a stream asks of it; h2conn.H2Conn is one),
which owns h2's state, flow control and the transport; received frames come in from the
connection's reader through the stream's ``deliver_*`` methods, and may go straight on to a
consumer's sink (``set_sink``) while that consumer waits with nothing buffered: bytes a sink
takes count as read, what it does not take is buffered as usual. Knows nothing of h2 itself,
CONNECT semantics or the transport; imports no other module of the connection.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

import trio

from agent.proxy.h2errors import CANCEL, NO_ERROR, ConnectionLost, HboneError, Headers, LocalProtocolError

Sink = Callable[[memoryview | bytes], int]

_READ_SIZE = 256 * 1024           # receive_some's default size
_MAX_SEND_CHUNK = 512 * 1024      # bytes queued into h2 per step of one send_all


class _Waiter:
    """A parking spot for one task (a stream has one receiver): cheaper than a ParkingLot."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        self.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)


class Connection(Protocol):
    """What a stream asks of its connection, and all it asks (h2conn.H2Conn has it).

    ``queue_*`` put frames into the connection's send buffer without writing them;
    ``write_out`` hands the buffer to the transport. Window sizes and byte counts are the
    HTTP/2 flow-controlled ones (RFC 9113 §5.2).
    """

    @property
    def alive(self) -> bool: ...

    def send_window(self, stream_id: int) -> int:
        """Bytes the stream may send now (within both windows, at most a few frames)."""

    def queue_frame(self, stream_id: int, data: bytes) -> bool:
        """Queue ``data`` as one DATA frame; False, having queued nothing, if the windows,
        the frame size or the stream's state do not allow it."""

    def queue_data(self, stream_id: int, data: memoryview) -> None:
        """Queue ``data`` (within ``send_window``) as DATA frames; raises LocalProtocolError."""

    def send_frame_nowait(self, stream_id: int, data: bytes) -> bool:
        """``queue_frame`` and ``write_out`` unless the transport is backed up (then False,
        nothing queued); raises ConnectionLost if the connection has failed."""

    def queue_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        """Queue HEADERS; raises LocalProtocolError if h2 refuses them."""

    def queue_end_stream(self, stream_id: int) -> None:
        """Queue END_STREAM; raises LocalProtocolError if h2 refuses it."""

    def queue_reset(self, stream_id: int, error_code: int) -> None:
        """Queue RST_STREAM (nothing if the stream is closed already)."""

    def write_out(self) -> bool:
        """Hand everything queued to the transport without blocking; True when it is backed
        up or the connection failed (then ``await drained()``)."""

    async def drained(self) -> None:
        """Wait until the transport holds nothing unsent; raises ConnectionLost."""

    def consumed(self, stream: HboneStream, n: int) -> None:
        """The application read ``n`` bytes of ``stream``: reopen the windows (in batches)."""

    def ack(self, stream_id: int, n: int) -> None:
        """Reopen the windows by ``n`` bytes nobody will read (padding) at once."""

    def push_later(self, stream: HboneStream) -> None:
        """Call ``stream.push_to_sink()`` once the frames of the current read are delivered."""

    def release(self, stream: HboneStream, dropped: int = 0) -> None:
        """``stream`` is done: forget it, reopening the windows by what it read or dropped."""


class HboneStream(trio.abc.HalfCloseableStream):
    """One HTTP/2 stream as a trio half-closeable byte stream (a CONNECT tunnel's payload).

    ``receive_some`` returns b"" after the peer's END_STREAM; ``send_eof`` sends END_STREAM.
    A reset by the peer, or the loss of the connection, makes ``send_all``/``receive_some``
    raise ``trio.BrokenResourceError`` whose ``__cause__`` is a ``StreamReset`` or
    ``ConnectionLost``. ``aclose`` resets the stream (CANCEL) unless it finished both ways.
    Received data is acknowledged to the peer (window reopened) only as it is read.
    """

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.response_headers: Headers | None = None
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self.peak_buffered = 0          # for tests and metrics: receive-side high-water mark
        self._recv_eof = False
        self._sent_eof = False
        self._closed = False
        self._broken: HboneError | None = None
        self._recv_waiter = _Waiter()                  # receive_some
        self._recv_lot = trio.lowlevel.ParkingLot()    # wait_response
        self._send_lot = trio.lowlevel.ParkingLot()
        self._sending = False
        self._receiving = False
        self.on_broken: Callable[[], None] | None = None   # called once when reset or lost
        self._sink: Sink | None = None
        self._push_due = False          # in the connection's list of streams to push

    # --- trio stream API --------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            conn = self._conn
            waited = False
            self._check_send()
            if type(data) is bytes and data and conn.queue_frame(self.stream_id, data):
                waited = await self._flush()
            else:
                view = memoryview(data).cast("B")
                while view:
                    window = conn.send_window(self.stream_id)
                    if window <= 0:
                        await self._send_lot.park()
                        waited = True
                        self._check_send()
                        continue
                    n = min(window, len(view), _MAX_SEND_CHUNK)
                    try:
                        conn.queue_data(self.stream_id, view[:n])
                    except LocalProtocolError as e:
                        raise trio.BrokenResourceError("cannot send on the stream") from e
                    view = view[n:]
                    waited = await self._flush() or waited
                    self._check_send()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def send_nowait(self, data: bytes) -> bool:
        """Send ``data`` without waiting, if it can leave at once: one DATA frame within the
        windows, a transport that is not backed up, no other send running.

        Returns False, having sent nothing, when it cannot (then ``send_all`` it). Not a
        checkpoint: for a caller that checkpoints anyway (a relay, in its next receive).
        Raises ``trio.BrokenResourceError``/``ClosedResourceError`` as ``send_all`` does.
        """
        if self._sending or type(data) is not bytes or not data:
            return False
        self._check_send()
        try:
            return self._conn.send_frame_nowait(self.stream_id, data)
        except ConnectionLost as e:
            raise trio.BrokenResourceError(str(e)) from e

    def set_sink(self, sink: Sink | None) -> None:
        """Offer received data to ``sink`` before waking the receiver (None: stop).

        Only while a task waits in ``receive_some`` with nothing buffered, so what the sink
        takes is in order with what that task reads; ``sink(data)`` runs in the connection's
        reader, must not block or raise, and returns how many leading bytes it took (0: none,
        e.g. its socket is full; the rest is buffered and the receiver woken, so a consumer
        that is slow still holds the window back). The sink belongs to the receiving task:
        set it only from there, and clear it before that task stops receiving.
        """
        self._sink = sink

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while (not self._closed and self._broken is None and not self._sent_eof
               and self._conn.send_window(self.stream_id) <= 0):
            await self._send_lot.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._sent_eof and not self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._check_send()
        self._sent_eof = True
        try:
            self._conn.queue_end_stream(self.stream_id)
        except LocalProtocolError as e:
            raise trio.BrokenResourceError("cannot end the stream") from e
        self._maybe_finished()
        if not await self._flush():
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._broken is not None:
                    raise trio.BrokenResourceError(str(self._broken)) from self._broken
                if self._buffered or self._recv_eof:
                    break
                await self._recv_waiter.wait()
                parked = True
            data = self._take(max_bytes) if self._buffered else b""
            if data:
                self._conn.consumed(self, len(data))
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            finished = self._sent_eof and self._recv_eof
            self.abort(NO_ERROR if finished else CANCEL, reset=not finished)
        await trio.lowlevel.checkpoint()

    # --- beyond trio's stream API -----------------------------------------------------------

    @property
    def received_eof(self) -> bool:
        """The peer sent END_STREAM."""
        return self._recv_eof

    @property
    def broken(self) -> HboneError | None:
        """Why the stream broke (reset by the peer, connection lost), or None."""
        return self._broken

    def abort(self, error_code: int, *, reset: bool = True) -> None:
        """Close without waiting: RST_STREAM(error_code) unless finished, drop the buffer."""
        if reset and self._broken is None and self._conn.alive:
            self._conn.queue_reset(self.stream_id, error_code)
            self._conn.write_out()
        self._closed = True
        dropped, self._buffered = self._buffered, 0      # unread data still holds window
        self._chunks.clear()
        self._release_and_wake(dropped)

    def send_headers_nowait(self, headers: Headers, *, end_stream: bool = False) -> None:
        """Queue HEADERS on this stream (server: the response); the writer sends it soon."""
        self._check_send()
        self._conn.queue_headers(self.stream_id, headers, end_stream)
        if end_stream:
            self._sent_eof = True
            self._maybe_finished()
        self._conn.write_out()

    async def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        """Send HEADERS on this stream and wait until they are handed to the transport."""
        self.send_headers_nowait(headers, end_stream=end_stream)
        if not await self._flush():
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_response(self) -> Headers:
        """Client side: wait for the response headers (raises the stream's failure)."""
        while self.response_headers is None:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._recv_lot.park()
        return self.response_headers

    # --- called by the connection's reader --------------------------------------------------

    def deliver_data(self, data: bytes, flow_controlled_length: int) -> None:
        """A DATA frame's payload arrived (``flow_controlled_length`` counts its padding)."""
        if self._closed:
            self._conn.ack(self.stream_id, flow_controlled_length)
            return
        padding = flow_controlled_length - len(data)
        if padding:
            self._conn.ack(self.stream_id, padding)
        if data:
            self._chunks.append(memoryview(data))
            self._buffered += len(data)
            if self._buffered > self.peak_buffered:
                self.peak_buffered = self._buffered
            if self._sink is not None and self._recv_waiter.task is not None:
                if not self._push_due:      # pushed once the reader has dispatched the read
                    self._push_due = True
                    self._conn.push_later(self)
            else:
                self._recv_waiter.wake()

    def push_to_sink(self) -> None:
        """Offer what is buffered to the sink, in one piece; wake the receiver for any rest.

        Called by the connection's reader after a read's frames are dispatched; skipped if
        the receiver was woken meanwhile (END_STREAM, reset, close): then it reads it all.
        """
        self._push_due = False
        sink = self._sink
        if sink is None or self._recv_waiter.task is None or not self._buffered:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        n = sink(data)
        if n:
            chunks.clear()
            if n < len(data):
                chunks.append(memoryview(data)[n:])
            self._buffered -= n
            self._conn.consumed(self, n)
        if self._buffered:
            self._recv_waiter.wake()

    def deliver_response(self, headers: Headers) -> None:
        self.response_headers = headers
        self._wake_receivers()

    def deliver_end(self) -> None:
        """The peer sent END_STREAM."""
        self._recv_eof = True
        self._wake_receivers()
        self._maybe_finished()

    def break_with(self, error: HboneError) -> None:
        """The stream is reset, or its connection lost: fail every waiter and later call."""
        dropped = 0
        if self._broken is None and not (self._sent_eof and self._recv_eof):
            self._broken = error
            dropped, self._buffered = self._buffered, 0     # dropped unread: still holds window
            self._chunks.clear()
        self._release_and_wake(dropped)
        callback, self.on_broken = self.on_broken, None
        if callback is not None:
            callback()

    def window_opened(self) -> None:
        """The peer's window (the stream's or the connection's) grew: wake a waiting sender."""
        if self._send_lot:
            self._send_lot.unpark_all()

    # --- internals --------------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(str(self._broken)) from self._broken
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof was already called")

    async def _flush(self) -> bool:
        """Hand what h2 queued to the transport; if it is backed up, wait until it drains
        (that wait is the stream's backpressure). Returns whether it waited."""
        if not self._conn.write_out():
            return False
        try:
            await self._conn.drained()
        except ConnectionLost as e:
            raise trio.BrokenResourceError(str(e)) from e
        return True

    def _take(self, max_bytes: int | None) -> bytes:
        limit = max_bytes if max_bytes is not None else _READ_SIZE
        first = self._chunks[0]
        if len(first) >= limit or len(self._chunks) == 1:
            n = min(limit, len(first))
            out = bytes(first[:n])
            if n == len(first):
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
        else:
            parts, total = [], 0
            while self._chunks and total < limit:
                chunk = self._chunks.popleft()
                if total + len(chunk) > limit:
                    self._chunks.appendleft(chunk[limit - total:])
                    chunk = chunk[:limit - total]
                parts.append(chunk)
                total += len(chunk)
            out = b"".join(parts)
        self._buffered -= len(out)
        return out

    def _wake_receivers(self) -> None:
        self._recv_waiter.wake()
        if self._recv_lot:
            self._recv_lot.unpark_all()

    def _maybe_finished(self) -> None:
        if self._sent_eof and self._recv_eof:
            self._conn.release(self)

    def _release_and_wake(self, dropped: int = 0) -> None:
        """Leave the connection's stream table and wake every waiter (readers and senders)."""
        self._conn.release(self, dropped)
        self._wake_receivers()
        if self._send_lot:
            self._send_lot.unpark_all()
