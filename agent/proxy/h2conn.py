"""h2conn.py: one HTTP/2 connection over a transport; its streams are h2stream.HboneStream.

With h2stream.py, h2errors.py and h2fast.py (plain DATA frames) the only modules that import h2. Owns framing, connection
flow control and the connection's two tasks (a reader that dispatches frames to streams, a
writer that finishes sends the kernel could not take at once: everything else is written
synchronously by whoever queued it). Knows nothing of CONNECT semantics, identities, TLS or
pooling: hbone.py builds those on top, tlsio.py is the usual transport.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

from agent.proxy import h2fast
from agent.proxy.h2errors import (
    CANCEL, NO_ERROR, ConnectionLost, HboneError, Headers, LocalProtocolError, ProtocolError,
    RemoteProtocolError, StreamReset, _code_name,
)
from agent.proxy.h2stream import HboneStream

__all__ = [
    "CANCEL", "CONNECTION_WINDOW", "MAX_FRAME_SIZE", "NO_ERROR", "STREAM_WINDOW", "ConnectionLost",
    "H2Conn", "HboneError", "HboneStream", "Headers", "LocalProtocolError", "ProtocolError",
    "RemoteProtocolError", "StreamReset",
]

log = logging.getLogger(__name__)

# Windows as ztunnel sets them, so bulk transfers are not window-bound on fast links.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
_DEFAULT_WINDOW = 65535
_READ_SIZE = 256 * 1024
_MAX_UNSENT = 1 << 20      # answers queued behind a peer that does not read; then stop reading
# Data read by the application is acknowledged to h2 in batches: h2 only emits WINDOW_UPDATE
# once half a window is consumed anyway, so acking each read only costs CPU. The batches are
# far below half of either window, so a reader that waits for data never holds back a window
# its peer needs (per stream < 256 KiB of 4 MiB; per connection < 1 MiB of 16 MiB).
_ACK_BATCH = 256 * 1024
_ACK_BATCH_CONNECTION = 1024 * 1024
_GOAWAY_FLUSH_TIMEOUT = 1.0


def _raw_data_repr(data: bytes | None) -> str:
    """hyperframe's DATA-frame repr, same output, but hexlifying 10 bytes instead of all.

    h2 formats ``repr(frame)`` for a trace log on every received frame, even with logging
    off (h2 4.x ``_receive_frame``); the original hexlifies the whole payload and then keeps
    20 hex digits, which cost ~20% of tunnel throughput.
    """
    if not data:
        return "None"
    r = data[:11].hex()
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


if hasattr(hyperframe.frame, "_raw_data_repr"):
    hyperframe.frame._raw_data_repr = _raw_data_repr


class _Wire(Protocol):
    """What H2Conn needs of its transport (tlsio.TlsTransport has it; any trio stream is
    adapted by _StreamWire)."""

    def try_send(self, data: bytes) -> bool: ...      # sync; False: finish_send must run
    def queue(self, data: bytes) -> None: ...         # sync; sent by the next finish_send
    async def finish_send(self) -> None: ...
    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...
    @property
    def unsent(self) -> int: ...                      # bytes queued, not yet taken by the kernel


class _StreamWire:
    """A trio stream as a _Wire: every write goes through the writer task."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._pending = bytearray()

    @property
    def unsent(self) -> int:
        return len(self._pending)

    def queue(self, data: bytes) -> None:
        self._pending += data

    def try_send(self, data: bytes) -> bool:
        self._pending += data
        return not self._pending

    async def finish_send(self) -> None:
        while self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            await self._stream.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._stream.receive_some(max_bytes)


class H2Conn:
    """One HTTP/2 connection. Start ``run`` in a task; it returns when the connection is done.

    Client side: ``open_stream(headers)`` sends a request and returns the stream and the
    response headers. Server side: ``on_request(stream, headers)`` is called (synchronously,
    from the reader) for each new request; it must not block.
    """

    def __init__(self, transport: trio.abc.Stream, *, client_side: bool,
                 max_concurrent_streams: int = 100,
                 on_request: Callable[[HboneStream, Headers], None] | None = None) -> None:
        # Outbound headers are built by hbone.py from parsed, normalised values: h2 need not
        # re-validate or re-normalise them on every request.
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=client_side,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self._h2 = h2.connection.H2Connection(config)
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._h2.DEFAULT_MAX_HEADER_LIST_SIZE,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # Replacing local_settings before the preface is h2's way to set them; the one value
        # it derived from the old object at construction must follow.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._fast = h2fast.usable(self._h2)       # plain DATA frames without h2's frame objects
        self._transport = transport
        self._wire: _Wire = transport if hasattr(transport, "try_send") else _StreamWire(transport)
        self._on_request = on_request
        self._streams: dict[int, HboneStream] = {}
        self._failure: HboneError | None = None   # set once the connection is unusable
        self._goaway = False                       # no new streams (either side said GOAWAY)
        self._unacked_total = 0                    # read by streams, not yet acked to h2
        self._to_push: list[HboneStream] = []     # streams with data for their sink (one read's)
        self._blocked = False                      # the transport holds unsent bytes
        self._writer_lot = trio.lowlevel.ParkingLot()   # the writer waits here for _blocked
        self._drained_lot = trio.lowlevel.ParkingLot()  # streams wait here while _blocked
        self._changed = trio.lowlevel.ParkingLot()  # stream count or liveness changed
        self._idle_lot = trio.lowlevel.ParkingLot()  # the last stream ended
        self._idle_since: float | None = None       # trio time the stream count fell to 0
        self._scope: trio.CancelScope | None = None
        self._started = False
        self._closed_locally = False
        self._closing = False          # aclose sent GOAWAY

    # --- the connection's life ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._failure is None

    @property
    def accepting_streams(self) -> bool:
        return self._failure is None and not self._goaway

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams

    async def wait_changed(self) -> None:
        """Wait until the stream count or the connection's liveness changes."""
        await self._changed.park()

    @property
    def idle_since(self) -> float | None:
        """trio time at which the last stream ended, or None while streams are open."""
        return self._idle_since if not self._streams else None

    async def wait_idle(self) -> None:
        """Wait until no stream is open (returns at once if none is), or the connection fails."""
        while self._streams and self._failure is None:
            await self._idle_lot.park()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the preface and drive the connection until it ends.

        Returns when the peer closes or ``aclose`` was called; raises ``ConnectionLost`` or
        ``RemoteProtocolError`` when the connection fails. Every stream still open then fails.
        """
        error: HboneError | None = None
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self._idle_since = trio.current_time()
        self._flush_now()
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                self._started = True
                task_status.started()
                try:
                    await self._reader()
                except HboneError as e:
                    error = e
                nursery.cancel_scope.cancel()
        finally:
            log.debug("HTTP/2 connection (%s side) ended: %r", "client" if self._h2.config.client_side else "server",
                      error or self._failure)
            self._fail(error or self._failure or ConnectionLost("connection closed"))
            if self._closed_locally:
                with trio.move_on_after(_GOAWAY_FLUSH_TIMEOUT) as cs:
                    cs.shield = True
                    try:
                        await self._transport.aclose()     # TLS close_notify
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await trio.aclose_forcefully(self._transport)
        if error is not None:
            raise error

    async def aclose(self) -> None:
        """Say GOAWAY, give it a moment to leave, then end ``run`` (open streams fail)."""
        if self._failure is None and self._started:
            self._goaway = True
            self._closing = True
            self._h2.close_connection()
            with trio.move_on_after(_GOAWAY_FLUSH_TIMEOUT):
                try:
                    await self._flush()
                except ConnectionLost:
                    pass
        self._closed_locally = True
        self._fail(ConnectionLost("connection closed locally"))
        await trio.lowlevel.checkpoint()

    def _fail(self, error: HboneError) -> None:
        if self._failure is None:
            self._failure = error
        for stream in list(self._streams.values()):
            stream._break(self._failure)
        if self._scope is not None:
            self._scope.cancel()
        self._drained_lot.unpark_all()
        self._changed.unpark_all()
        self._idle_lot.unpark_all()

    # --- writing ---------------------------------------------------------------------------
    # Whoever queued frames into h2 hands them to the transport at once, synchronously: one
    # TLS write and one send for everything h2 has pending, and nothing to cancel half-way.
    # Only when the kernel does not take it all does the writer task finish the send; until
    # then streams wait (so a slow peer cannot make our buffers grow) and frames queue behind.

    def _flush_now(self) -> None:
        """Hand everything h2 has queued to the transport without blocking."""
        data = self._h2.data_to_send()
        try:
            if self._blocked:
                if data:
                    self._wire.queue(data)
                return
            if self._wire.try_send(data):
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(ConnectionLost(f"write failed: {e!r}"))
            return
        self._blocked = True
        self._writer_lot.unpark_all()

    async def _writer(self) -> None:
        while True:
            while not self._blocked:
                await self._writer_lot.park()
            try:
                await self._wire.finish_send()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._fail(ConnectionLost(f"write failed: {e!r}"))
                return
            self._blocked = False
            self._flush_now()
            if not self._blocked:
                self._drained_lot.unpark_all()

    async def _wait_drained(self) -> None:
        """Wait until the transport holds nothing unsent (raises ConnectionLost if it fails)."""
        while self._blocked and self._failure is None:
            await self._drained_lot.park()
        if self._failure is not None:
            raise ConnectionLost(self._failure.args[0] if self._failure.args else "closed")

    async def _flush(self) -> None:
        """Wait until everything queued so far has been handed to the transport."""
        self._flush_now()
        await self._wait_drained()

    # --- reading ---------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                data = await self._wire.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                if self._goaway and not self._streams:
                    return      # the peer said GOAWAY and hung up (maybe without close_notify)
                cause = e.__cause__ or e
                raise ConnectionLost(f"read failed: {cause!r}") from e
            if not data:
                if self._streams:
                    raise ConnectionLost("peer closed the connection with streams open")
                return
            if self._failure is not None or self._closing:
                return      # we are closing (GOAWAY sent): h2 refuses frames from here on
            try:
                events, taken = h2fast.receive_data(self._h2, data) if self._fast else ([], 0)
                if taken < len(data):
                    events += self._h2.receive_data(memoryview(data)[taken:] if taken else data)
            except h2.exceptions.ProtocolError as e:
                self._flush_now()   # h2 queued a GOAWAY naming the error
                with trio.move_on_after(_GOAWAY_FLUSH_TIMEOUT):
                    await self._flush()
                raise RemoteProtocolError(str(e) or type(e).__name__,
                                          getattr(e, "error_code", None)
                                          or h2.errors.ErrorCodes.PROTOCOL_ERROR) from e
            for event in events:
                self._dispatch(event)
            if self._to_push:
                pushing, self._to_push = self._to_push, []
                for stream in pushing:
                    stream._push()
            self._flush_now()     # acks, window updates, and whatever the streams queued
            if self._blocked and self._wire.unsent > _MAX_UNSENT:
                # A peer that keeps sending (PINGs, SETTINGS, refused streams: each asks for
                # an answer) but does not read: read no more until it takes our answers.
                await self._wait_drained()

    def _dispatch(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self._streams.get(sid) if sid else None
        if isinstance(event, h2.events.DataReceived):
            if stream is None or stream._closed:
                self._ack(event.stream_id, event.flow_controlled_length)
            else:
                stream._on_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._new_inbound(event.stream_id, event.headers)
        elif isinstance(event, h2.events.ResponseReceived):
            if stream is not None:
                stream._on_response(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                stream._on_end()
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                stream._break(StreamReset(event.error_code, event.remote_reset))
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self._streams.values() if not event.stream_id else [stream] if stream else []
            for s in targets:
                s._send_lot.unpark_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for s in self._streams.values():
                s._send_lot.unpark_all()
            self._changed.unpark_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True
            last = event.last_stream_id or 0
            refused = ConnectionLost(f"peer sent GOAWAY ({_code_name(event.error_code)})")
            for s in list(self._streams.values()):
                if s.stream_id > last and s.stream_id % 2 == (1 if self._h2.config.client_side else 0):
                    s._break(refused)
            self._changed.unpark_all()
        # Trailers, pings, priority and unknown frames need nothing from us (h2 answers pings).

    def _new_inbound(self, sid: int, headers: Headers) -> None:
        stream = HboneStream(self, sid)
        self._add(stream)
        if self._on_request is None or self._goaway:
            stream._abort(h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._on_request(stream, headers)

    # --- used by streams -------------------------------------------------------------------

    def open_stream_nowait(self, headers: Headers) -> HboneStream:
        """Queue a request's HEADERS on a new stream; the caller flushes and awaits the response."""
        if self._failure is not None:
            raise ConnectionLost(str(self._failure))
        if self._goaway:
            raise ConnectionLost("connection is going away")
        sid = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(sid, headers)
        except h2.exceptions.ProtocolError as e:
            raise LocalProtocolError(str(e) or type(e).__name__) from e
        stream = HboneStream(self, sid)
        self._add(stream)
        self._flush_now()
        return stream

    def _send_window(self, sid: int) -> int:
        try:
            return min(self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size * 4)
        except h2.exceptions.StreamClosedError:
            return 0

    def _ack(self, sid: int, n: int) -> None:
        if n and self._failure is None:
            self._h2.acknowledge_received_data(n, sid)
            self._flush_now()

    def _consumed(self, stream: HboneStream, n: int) -> None:
        """The application read ``n`` bytes of ``stream``: acknowledge them, in batches."""
        if self._streams.get(stream.stream_id) is not stream:
            self._ack(stream.stream_id, n)     # finished (both ends sent END_STREAM): no batch
            return
        stream._unacked += n
        self._unacked_total += n
        if stream._unacked >= _ACK_BATCH:
            self._unacked_total -= stream._unacked
            n, stream._unacked = stream._unacked, 0
            self._ack(stream.stream_id, n)
        elif self._unacked_total >= _ACK_BATCH_CONNECTION:
            self._ack_all()

    def _ack_all(self) -> None:
        if self._failure is None:
            for s in self._streams.values():
                if s._unacked:
                    self._h2.acknowledge_received_data(s._unacked, s.stream_id)
                    s._unacked = 0
            self._flush_now()
        self._unacked_total = 0

    def _add(self, stream: HboneStream) -> None:
        self._streams[stream.stream_id] = stream
        self._idle_since = None
        if self._changed:
            self._changed.unpark_all()

    def _release(self, stream: HboneStream) -> None:
        if stream._unacked:      # the stream is done: hand its batch back to the connection
            self._unacked_total -= stream._unacked
            n, stream._unacked = stream._unacked, 0
            self._ack(stream.stream_id, n)
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            if not self._streams:
                self._idle_since = trio.current_time()
                if self._idle_lot:
                    self._idle_lot.unpark_all()
            if self._changed:
                self._changed.unpark_all()
