"""h2fast against h2 itself: the same bytes in (or the same sends) must leave two connections
in the same state (events, windows, stream states, bytes to send), however reads are split."""
from __future__ import annotations

import random

import h2
import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import pytest

from agent.proxy import h2fast

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


def _conn(client: bool, window: int = 1 << 20) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
    c.local_settings = h2.settings.Settings(client=client, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 16})
    c.max_inbound_frame_size = 1 << 16
    return c


def _pair(window: int = 1 << 20):
    """A client and a server past the preface with SETTINGS exchanged and acked."""
    c, s = _conn(True, window), _conn(False, window)
    c.initiate_connection()
    s.initiate_connection()
    c.increment_flow_control_window(1 << 24)
    s.increment_flow_control_window(1 << 24)
    for _ in range(2):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    return c, s


def _state(conn: h2.connection.H2Connection) -> tuple:
    return (conn.state_machine.state, conn.outbound_flow_control_window,
            conn.inbound_flow_control_window, conn._inbound_flow_control_window_manager.__dict__.copy(),
            {sid: (st.state_machine.state, st.outbound_flow_control_window, st.inbound_flow_control_window,
                   st._inbound_window_manager.__dict__.copy()) for sid, st in conn.streams.items()},
            bytes(conn._data_to_send))


def _events(events) -> list[str]:
    return [repr(e) + repr(getattr(e, "stream_ended", None)) for e in events]


def _feed_fast(conn, data: bytes) -> tuple[list, int]:
    """As H2Conn reads: h2fast first, h2 for the rest; returns the events and h2fast's share."""
    events, taken = h2fast.receive_data(conn, data)
    if taken < len(data):
        events += conn.receive_data(memoryview(data)[taken:] if taken else data)
    return events, taken


def _client_bytes(rng: random.Random) -> tuple[bytes, bytes]:
    """What a client sends: the preface part the servers saw already, then a random mix of
    streams opened, plain, padded and ending DATA frames, pings and window updates."""
    c, s = _pair()
    head = c.data_to_send()
    sids = []
    for _ in range(200):
        op = rng.random()
        if op < 0.1 or not sids:
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, CONNECT)
            sids.append(sid)
        elif op < 0.7:
            sid = rng.choice(sids)
            c.send_data(sid, rng.randbytes(rng.randint(0, 3000)))
        elif op < 0.8:
            sid = rng.choice(sids)
            c.send_data(sid, rng.randbytes(rng.randint(0, 100)), pad_length=rng.randint(0, 20))
        elif op < 0.85:
            sid = sids.pop(rng.randrange(len(sids)))
            c.send_data(sid, rng.randbytes(rng.randint(0, 100)), end_stream=True)
        elif op < 0.9:
            c.ping(rng.randbytes(8))
        else:
            c.increment_flow_control_window(rng.randint(1, 1000))
    return head, c.data_to_send()


@pytest.mark.parametrize("seed", range(20))
def test_receiving_is_the_same_as_h2s_however_the_reads_are_split(seed):
    rng = random.Random(seed)
    head, body = _client_bytes(rng)
    (_, plain), (_, fast) = _pair(), _pair()
    plain.receive_data(head)
    fast.receive_data(head)
    plain_events, fast_events = [], []
    cuts = _frame_ends(body)
    off = taken = 0
    while off < len(body):
        # Mostly whole frames (as request/response traffic reads), sometimes a cut anywhere.
        whole = [c for c in cuts if c > off][:4]
        end = rng.choice(whole) if whole and rng.random() < 0.8 else off + rng.choice([1, 9, 10, 1033])
        chunk = body[off:end]
        off = end
        plain_events += plain.receive_data(chunk)
        events, n = _feed_fast(fast, chunk)
        fast_events += events
        taken += n
    assert _events(fast_events) == _events(plain_events)
    assert _state(fast) == _state(plain)
    assert taken > len(body) // 4      # the fast path did take part of it


def _frame_ends(data: bytes) -> list[int]:
    ends, off = [], 0
    while off + 9 <= len(data):
        off += 9 + int.from_bytes(data[off:off + 3], "big")
        ends.append(off)
    return ends


def test_a_frame_beyond_the_window_is_the_same_connection_error():
    results = []
    for feed in (lambda conn, d: conn.receive_data(d), _feed_fast):   # h2 alone, then h2fast
        c, s = _pair(window=1000)
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, CONNECT)
        s.receive_data(c.data_to_send())
        frame = (2000).to_bytes(3, "big") + b"\x00\x00" + sid.to_bytes(4, "big") + b"x" * 2000
        with pytest.raises(h2.exceptions.FlowControlError):
            feed(s, frame)
        results.append(_state(s))
    assert results[0] == results[1]
    assert results[0][-1]          # a GOAWAY queued


def test_sending_is_the_same_as_h2s_and_refusals_change_nothing():
    rng = random.Random(7)
    pairs = [_pair(window=20_000), _pair(window=20_000)]
    sids = []
    for c, s in pairs:
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, CONNECT)
        s.receive_data(c.data_to_send())
        sids.append(sid)
    (plain, _), (fast, _) = pairs
    sid = sids[0]
    for _ in range(40):
        data = rng.randbytes(rng.randint(1, 3000))
        before = _state(fast)
        if h2fast.send_data(fast, sid, data):
            plain.send_data(sid, data)
        else:
            assert _state(fast) == before
            with pytest.raises(h2.exceptions.FlowControlError):
                plain.send_data(sid, data)
        assert _state(fast) == _state(plain)
    assert plain.local_flow_control_window(sid) < 3000      # the window did run out
    for conn in (plain, fast):
        conn.end_stream(sid)
    assert not h2fast.send_data(fast, sid, b"late")         # half-closed: h2's to refuse
    assert _state(fast) == _state(plain)
    assert not h2fast.send_data(fast, 99, b"x")             # no such stream
    assert not h2fast.send_data(fast, sid, b"")             # empty: h2's case


def test_the_connection_uses_it():
    c, s = _pair()
    assert h2fast.usable(c) and h2fast.usable(s)


@pytest.mark.parametrize("version", ["4.1.0", "4.9.0", "5.0.0"])
def test_an_untested_h2_is_left_to_itself(monkeypatch, version):
    monkeypatch.setattr(h2, "__version__", version)
    c, s = _pair()
    assert not h2fast.usable(c) and not h2fast.usable(s)


async def test_the_connection_falls_back_to_plain_h2(monkeypatch, nursery):
    from tests.agent.proxy.test_h2conn import Pair
    monkeypatch.setattr(h2, "__version__", "4.0.0")
    calls = []
    for name in ("send_data", "receive_data"):
        real = getattr(h2fast, name)
        monkeypatch.setattr(h2fast, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1])
    received = []

    async def echo(stream) -> None:
        while data := await stream.receive_some():
            received.append(data)
            await stream.send_all(data)
        await stream.send_eof()

    pair = Pair(nursery, on_stream=echo)
    await pair.start()
    assert not pair.client._fast and not pair.server._fast
    stream = await pair.open()
    for i in range(3):
        await stream.send_all(bytes([i]) * 1000)
        assert await stream.receive_some() == bytes([i]) * 1000
        assert stream.send_nowait(b"n" * 10)
        assert await stream.receive_some() == b"n" * 10
    await stream.send_eof()
    assert await stream.receive_some() == b""
    assert b"".join(received) == b"".join(bytes([i]) * 1000 + b"n" * 10 for i in range(3))
    assert calls == []          # h2 did it all
