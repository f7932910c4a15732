"""h2conn.py: one HTTP/2 connection over a transport; its streams are h2stream.HboneStream.

With h2errors.py and h2fast.py (plain DATA frames) the only modules that import h2. Owns
framing, flow control and the connection's two tasks (a reader that dispatches frames to
streams, a writer that finishes sends the kernel could not take at once: everything else is
written synchronously by whoever queued it). Its streams call it only through
h2stream.Connection, and it calls them only through their public methods. Knows nothing of
CONNECT semantics, identities, TLS or pooling: hbone.py builds those on top, tlsio.py is the
usual transport.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from agent.proxy import h2fast, hyperframe_patch
from agent.proxy.h2errors import (
    ConnectionLost, HboneError, Headers, LocalProtocolError, RemoteProtocolError, StreamReset, _code_name,
)
from agent.proxy.h2stream import HboneStream
from agent.proxy.tlsio import StreamWire, Wire

__all__ = ["CONNECTION_WINDOW", "MAX_FRAME_SIZE", "STREAM_WINDOW", "H2Conn"]

log = logging.getLogger(__name__)
hyperframe_patch.apply()

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


@contextmanager
def _refused() -> Iterator[None]:         # h2 refusing what we asked, as LocalProtocolError
    try:
        yield
    except h2.exceptions.ProtocolError as e:
        raise LocalProtocolError(str(e) or type(e).__name__) from e


class H2Conn:
    """One HTTP/2 connection. Start ``run`` in a task; it returns when the connection is done.

    Client side: ``open_stream_nowait(headers)`` sends a request and returns the stream (whose
    ``wait_response`` gives the response headers). Server side: ``on_request(stream, headers)`` is called (synchronously,
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
        self._wire: Wire = transport if hasattr(transport, "try_send") else StreamWire(transport)
        self._on_request = on_request
        self._streams: dict[int, HboneStream] = {}
        self._failure: HboneError | None = None   # set once the connection is unusable
        self._goaway = False                       # no new streams (either side said GOAWAY)
        self._unacked: dict[int, int] = {}         # per stream: read, not yet acked to h2
        self._unacked_total = 0
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
        self.write_out()
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
            stream.break_with(self._failure)
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

    def write_out(self) -> bool:
        """Hand everything h2 has queued to the transport without blocking; True when the
        transport is backed up or the connection failed (streams then wait in ``drained``)."""
        data = self._h2.data_to_send()
        try:
            if self._blocked:
                if data:
                    self._wire.queue(data)
                return True
            if self._wire.try_send(data):
                return self._failure is not None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(ConnectionLost(f"write failed: {e!r}"))
            return True
        self._blocked = True
        self._writer_lot.unpark_all()
        return True

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
            self.write_out()
            if not self._blocked:
                self._drained_lot.unpark_all()

    async def drained(self) -> None:
        """Wait until the transport holds nothing unsent (raises ConnectionLost if it fails)."""
        while self._blocked and self._failure is None:
            await self._drained_lot.park()
        if self._failure is not None:
            raise ConnectionLost(self._failure.args[0] if self._failure.args else "closed")

    async def _flush(self) -> None:
        """Wait until everything queued so far has been handed to the transport."""
        self.write_out()
        await self.drained()

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
                self.write_out()   # h2 queued a GOAWAY naming the error
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
                    stream.push_to_sink()
            self.write_out()     # acks, window updates, and whatever the streams queued
            if self._blocked and self._wire.unsent > _MAX_UNSENT:
                # A peer that keeps sending (PINGs, SETTINGS, refused streams: each asks for
                # an answer) but does not read: read no more until it takes our answers.
                await self.drained()

    def _dispatch(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        stream = self._streams.get(sid) if sid else None
        if isinstance(event, h2.events.DataReceived):
            if stream is None:
                self.ack(event.stream_id, event.flow_controlled_length)
            else:
                stream.deliver_data(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            self._new_inbound(event.stream_id, event.headers)
        elif isinstance(event, h2.events.ResponseReceived):
            if stream is not None:
                stream.deliver_response(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                stream.deliver_end()
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                stream.break_with(StreamReset(event.error_code, event.remote_reset))
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self._streams.values() if not event.stream_id else [stream] if stream else []
            for s in targets:
                s.window_opened()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for s in self._streams.values():
                s.window_opened()
            self._changed.unpark_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True
            last = event.last_stream_id or 0
            refused = ConnectionLost(f"peer sent GOAWAY ({_code_name(event.error_code)})")
            for s in list(self._streams.values()):
                if s.stream_id > last and s.stream_id % 2 == (1 if self._h2.config.client_side else 0):
                    s.break_with(refused)
            self._changed.unpark_all()
        # Trailers, pings, priority and unknown frames need nothing from us (h2 answers pings).

    def _new_inbound(self, sid: int, headers: Headers) -> None:
        stream = HboneStream(self, sid)
        self._add(stream)
        if self._on_request is None or self._goaway:
            stream.abort(h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._on_request(stream, headers)

    # --- for streams: h2stream.Connection -------------------------------------------------

    def open_stream_nowait(self, headers: Headers) -> HboneStream:
        """Queue a request's HEADERS on a new stream; the caller flushes and awaits the response."""
        if self._failure is not None:
            raise ConnectionLost(str(self._failure))
        if self._goaway:
            raise ConnectionLost("connection is going away")
        sid = self._h2.get_next_available_stream_id()
        self.queue_headers(sid, headers, False)
        stream = HboneStream(self, sid)
        self._add(stream)
        self.write_out()
        return stream

    def send_window(self, stream_id: int) -> int:
        try:
            return min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size * 4)
        except h2.exceptions.StreamClosedError:
            return 0

    def queue_frame(self, stream_id: int, data: bytes) -> bool:
        # h2 checks window and frame size before it changes any state: a refusal leaves nothing.
        try:
            if not (self._fast and h2fast.send_data(self._h2, stream_id, data)):
                self._h2.send_data(stream_id, data)
        except h2.exceptions.ProtocolError:
            return False
        return True

    def send_frame_nowait(self, stream_id: int, data: bytes) -> bool:
        if self._blocked or not self.queue_frame(stream_id, data):
            return False
        self.write_out()
        if self._failure is not None:
            raise ConnectionLost(str(self._failure)) from self._failure
        return True

    def queue_data(self, stream_id: int, data: memoryview) -> None:
        frame = self._h2.max_outbound_frame_size
        with _refused():
            for off in range(0, len(data), frame):
                self._h2.send_data(stream_id, bytes(data[off:off + frame]))

    def queue_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        with _refused():
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)

    def queue_end_stream(self, stream_id: int) -> None:
        with _refused():
            self._h2.end_stream(stream_id)

    def queue_reset(self, stream_id: int, error_code: int) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def ack(self, stream_id: int, n: int) -> None:
        if n and self._failure is None:
            self._h2.acknowledge_received_data(n, stream_id)
            self.write_out()

    def consumed(self, stream: HboneStream, n: int) -> None:
        """Acknowledge ``n`` bytes the application read, in batches (see _ACK_BATCH)."""
        sid = stream.stream_id
        if self._streams.get(sid) is not stream:
            self.ack(sid, n)     # finished (both ends sent END_STREAM): no batch
            return
        unacked = self._unacked.get(sid, 0) + n
        self._unacked_total += n
        if unacked >= _ACK_BATCH:
            self._unacked[sid] = 0
            self._unacked_total -= unacked
            self.ack(sid, unacked)
        else:
            self._unacked[sid] = unacked
            if self._unacked_total >= _ACK_BATCH_CONNECTION:
                self._ack_all()

    def _ack_all(self) -> None:
        if self._failure is None:
            for sid, n in self._unacked.items():
                if n:
                    self._h2.acknowledge_received_data(n, sid)
            self.write_out()
        self._unacked.clear()
        self._unacked_total = 0

    def push_later(self, stream: HboneStream) -> None:
        self._to_push.append(stream)

    def _add(self, stream: HboneStream) -> None:
        self._streams[stream.stream_id] = stream
        self._idle_since = None
        if self._changed:
            self._changed.unpark_all()

    def release(self, stream: HboneStream, dropped: int = 0) -> None:
        sid = stream.stream_id
        unacked = self._unacked.pop(sid, 0)      # the stream is done: hand its batch back
        self._unacked_total -= unacked
        self.ack(sid, unacked + dropped)
        if self._streams.get(sid) is stream:
            del self._streams[sid]
            if not self._streams:
                self._idle_since = trio.current_time()
                if self._idle_lot:
                    self._idle_lot.unpark_all()
            if self._changed:
                self._changed.unpark_all()
