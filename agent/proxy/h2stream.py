"""h2stream.py: one HTTP/2 stream of an H2Conn as a trio half-closeable byte stream.

Owns the stream's receive buffer, its reads and writes, half-close and reset. Frames go out
through the connection (it owns h2's state and the transport); received frames come in from
the connection's reader, which may also hand them straight to a consumer's sink (``set_sink``)
while that consumer waits with nothing buffered: bytes a sink takes count as read, what it
does not take is buffered as usual. Knows nothing of CONNECT semantics or of the transport.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable

Sink = Callable[[memoryview | bytes], int]

import h2.exceptions
import trio

from agent.proxy import h2fast
from agent.proxy.h2errors import (
    CANCEL, NO_ERROR, ConnectionLost, HboneError, Headers, LocalProtocolError,
)

if TYPE_CHECKING:
    from agent.proxy.h2conn import H2Conn

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


class HboneStream(trio.abc.HalfCloseableStream):
    """One HTTP/2 stream as a trio half-closeable byte stream (a CONNECT tunnel's payload).

    ``receive_some`` returns b"" after the peer's END_STREAM; ``send_eof`` sends END_STREAM.
    A reset by the peer, or the loss of the connection, makes ``send_all``/``receive_some``
    raise ``trio.BrokenResourceError`` whose ``__cause__`` is a ``StreamReset`` or
    ``ConnectionLost``. ``aclose`` resets the stream (CANCEL) unless it finished both ways.
    Received data is acknowledged to the peer (window reopened) only as it is read.
    """

    def __init__(self, conn: H2Conn, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.response_headers: Headers | None = None
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._unacked = 0               # read by the application, not yet acked to h2
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
            h2conn = conn._h2
            waited = False
            self._check_send()
            if type(data) is bytes and data and self._send_one_frame(data):
                waited = await self._flush()
            else:
                view = memoryview(data).cast("B")
                while view:
                    window = conn._send_window(self.stream_id)
                    if window <= 0:
                        await self._send_lot.park()
                        waited = True
                        self._check_send()
                        continue
                    n = min(window, len(view), _MAX_SEND_CHUNK)
                    frame = h2conn.max_outbound_frame_size
                    for off in range(0, n, frame):
                        h2conn.send_data(self.stream_id, bytes(view[off:min(off + frame, n)]))
                    view = view[n:]
                    waited = await self._flush() or waited
                    self._check_send()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def _send_one_frame(self, data: bytes) -> bool:
        """Queue ``data`` as one DATA frame if window and frame size allow (the common case).

        h2 checks both before it changes any state, so a refusal leaves nothing behind.
        """
        conn = self._conn
        try:
            if not (conn._fast and h2fast.send_data(conn._h2, self.stream_id, data)):
                conn._h2.send_data(self.stream_id, data)
        except h2.exceptions.ProtocolError:
            return False
        return True

    def send_nowait(self, data: bytes) -> bool:
        """Send ``data`` without waiting, if it can leave at once: one DATA frame within the
        windows, a transport that is not backed up, no other send running.

        Returns False, having sent nothing, when it cannot (then ``send_all`` it). Not a
        checkpoint: for a caller that checkpoints anyway (a relay, in its next receive).
        Raises ``trio.BrokenResourceError``/``ClosedResourceError`` as ``send_all`` does.
        """
        conn = self._conn
        if self._sending or conn._blocked or type(data) is not bytes or not data:
            return False
        self._check_send()
        if not self._send_one_frame(data):
            return False
        conn._flush_now()
        if conn._failure is not None:
            raise trio.BrokenResourceError(str(conn._failure)) from conn._failure
        return True

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
               and self._conn._send_window(self.stream_id) <= 0):
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
            self._conn._h2.end_stream(self.stream_id)
        except h2.exceptions.ProtocolError as e:
            raise trio.BrokenResourceError("cannot end the stream") from LocalProtocolError(str(e))
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
                self._conn._consumed(self, len(data))
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            finished = self._sent_eof and self._recv_eof
            self._abort(NO_ERROR if finished else CANCEL, reset=not finished)
        await trio.lowlevel.checkpoint()

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
        conn = self._conn
        conn._flush_now()
        if not conn._blocked and conn._failure is None:
            return False
        try:
            await conn._wait_drained()
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

    def _on_data(self, data: bytes, flow_controlled_length: int) -> None:
        padding = flow_controlled_length - len(data)
        if padding:
            self._conn._ack(self.stream_id, padding)
        if data:
            self._chunks.append(memoryview(data))
            self._buffered += len(data)
            if self._buffered > self.peak_buffered:
                self.peak_buffered = self._buffered
            if self._sink is not None and self._recv_waiter.task is not None:
                if not self._push_due:      # pushed once the reader has dispatched the read
                    self._push_due = True
                    self._conn._to_push.append(self)
            else:
                self._recv_waiter.wake()

    def _push(self) -> None:
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
            self._conn._consumed(self, n)
        if self._buffered:
            self._recv_waiter.wake()

    def _on_response(self, headers: Headers) -> None:
        self.response_headers = headers
        self._wake_receivers()

    def _on_end(self) -> None:
        self._recv_eof = True
        self._wake_receivers()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._sent_eof and self._recv_eof:
            self._conn._release(self)

    def _break(self, error: HboneError) -> None:
        if self._broken is None and not (self._sent_eof and self._recv_eof):
            self._broken = error
            # Data dropped unread (a reset stream) still holds connection window.
            self._unacked += self._buffered
            self._conn._unacked_total += self._buffered
            self._chunks.clear()
            self._buffered = 0
        self._release_and_wake()
        callback, self.on_broken = self.on_broken, None
        if callback is not None:
            callback()

    def _abort(self, error_code: int, *, reset: bool = True) -> None:
        """Close without waiting: RST_STREAM(error_code) unless finished, drop the buffer."""
        if reset and self._broken is None and self._conn.alive:
            try:
                self._conn._h2.reset_stream(self.stream_id, error_code)
            except h2.exceptions.StreamClosedError:
                pass
            self._conn._flush_now()
        self._closed = True
        # Unread data still holds connection window: hand it back.
        if self._buffered:
            self._conn._ack(self.stream_id, self._buffered)
        self._chunks.clear()
        self._buffered = 0
        self._release_and_wake()

    def _release_and_wake(self) -> None:
        """Leave the connection's stream table and wake every waiter (readers and senders)."""
        self._conn._release(self)
        self._wake_receivers()
        if self._send_lot:
            self._send_lot.unpark_all()

    def send_headers_nowait(self, headers: Headers, *, end_stream: bool = False) -> None:
        """Queue HEADERS on this stream (server: the response); the writer sends it soon."""
        self._check_send()
        try:
            self._conn._h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(str(e) or type(e).__name__) from e
        if end_stream:
            self._sent_eof = True
            self._maybe_finished()
        self._conn._flush_now()

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
