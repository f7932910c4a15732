"""h2fast.py: plain HTTP/2 DATA frames in and out without h2's frame objects, h2's state exact.

For each DATA frame h2 builds a hyperframe object (flags as a set, a repr for a trace log,
serialize and join), most of its cost per small message. Here only the plain case is taken,
a DATA frame without padding on an open stream, and for it the same state changes are made as
h2 4.x's ``H2Connection.send_data`` and ``_receive_data_frame`` make: its state machines, its
flow-control windows and window managers, its events. Every other frame, and every case h2
would refuse, is left to h2 itself. Knows nothing of our streams' buffers or of the transport.
Tied to h2 internals, so pinned: ``usable`` is true only for the h2 versions in ``TESTED``
(those tests/agent/proxy/test_h2fast.py was run against) with the internals in place; with any
other h2, H2Conn leaves every frame to h2. BENCHMARKS.md ("HBONE data path") has its figure.
"""
from __future__ import annotations

import struct

import h2
import h2.exceptions
from h2.connection import ConnectionInputs, H2Connection
from h2.events import Event
from h2.stream import StreamInputs, StreamState

TESTED = frozenset({"4.4.1"})     # h2 versions the differential tests passed with

_HEADER = struct.Struct(">HBBBL")     # 24-bit length as 16 + 8 bits, type, flags, stream id
_DATA = 0x0
_END_STREAM = 0x1
_CAN_SEND = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_CAN_RECEIVE = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


def usable(conn: H2Connection) -> bool:
    """Whether ``conn`` is from a tested h2 and has the internals these functions use."""
    buf = getattr(conn, "incoming_buffer", None)
    return (h2.__version__ in TESTED and isinstance(getattr(conn, "_data_to_send", None), bytearray)
            and all(hasattr(buf, a) for a in ("_data", "_preamble_len", "_headers_buffer"))
            and all(hasattr(conn, a) for a in ("_inbound_flow_control_window_manager",
                                                "_terminate_connection", "state_machine")))


def send_data(conn: H2Connection, stream_id: int, data: bytes) -> bool:
    """Queue ``data`` as one DATA frame (no END_STREAM, no padding), as ``conn.send_data`` would.

    Returns False, having changed nothing, when it is not that plain case or h2 would refuse
    it (window, frame size, stream state): then ask h2. Raises h2's ProtocolError where h2
    would (the connection is closed).
    """
    n = len(data)
    stream = conn.streams.get(stream_id)
    if (stream is None or not n or n > conn.max_outbound_frame_size
            or n > conn.outbound_flow_control_window or n > stream.outbound_flow_control_window
            or stream.state_machine.state not in _CAN_SEND):
        return False
    conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    stream.outbound_flow_control_window -= n
    out = conn._data_to_send
    out += _HEADER.pack(n >> 8, n & 0xFF, _DATA, 0, stream_id)
    out += data
    conn.outbound_flow_control_window -= n
    return True


def receive_data(conn: H2Connection, data: bytes) -> tuple[list[Event], int]:
    """Take the plain DATA frames at the start of ``data`` (whole ones, on open streams), as
    ``conn.receive_data`` would; return their events and the number of bytes taken. The rest
    (from the first other frame on) is for ``conn.receive_data``.

    Raises h2's ProtocolError (a flow-control violation) with the GOAWAY queued, as h2 does.
    """
    buf = conn.incoming_buffer
    if buf._data or buf._preamble_len or buf._headers_buffer:
        return [], 0            # h2 holds part of a frame, its preface or a header block
    events: list[Event] = []
    off, end = 0, len(data)
    limit = conn.max_inbound_frame_size
    streams = conn.streams
    while end - off >= 9:
        length_hi, length_lo, ftype, flags, sid = _HEADER.unpack_from(data, off)
        length = (length_hi << 8) | length_lo
        sid &= 0x7FFFFFFF
        if ftype != _DATA or flags & ~_END_STREAM or length > limit or end - off - 9 < length:
            break
        stream = streams.get(sid)
        if stream is None or stream.state_machine.state not in _CAN_RECEIVE:
            break
        try:
            events += conn.state_machine.process_input(ConnectionInputs.RECV_DATA)
            conn._inbound_flow_control_window_manager.window_consumed(length)
            events += stream.receive_data(data[off + 9:off + 9 + length], bool(flags & _END_STREAM),
                                          length)[1]
        except h2.exceptions.ProtocolError as e:
            conn._terminate_connection(e.error_code)
            raise
        off += 9 + length
    return events, off
