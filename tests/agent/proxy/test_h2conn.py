"""H2Conn's write path and flow control, over an in-memory transport that counts writes."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from agent.proxy import h2conn
from agent.proxy.h2conn import _ACK_BATCH, CONNECTION_WINDOW, STREAM_WINDOW, H2Conn
from agent.proxy.h2errors import CANCEL, StreamReset

MiB = 1024 * 1024
CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


class PipeWire:
    """One end of an in-memory transport with H2Conn's write interface; can be held blocked
    (the kernel 'takes nothing') to see what queues up behind it."""

    def __init__(self) -> None:
        self.peer: PipeWire | None = None
        self.inbox = bytearray()
        self.eof = False
        self._arrived = trio.lowlevel.ParkingLot()
        self.blocked = False
        self._unblocked = trio.Event()
        self.pending = bytearray()
        self.writes: list[int] = []        # bytes per write handed to the "kernel"

    def _deliver(self, data: bytes) -> None:
        self.writes.append(len(data))
        self.peer.inbox += data
        self.peer._arrived.unpark_all()

    def block(self) -> None:
        self.blocked = True
        self._unblocked = trio.Event()

    def unblock(self) -> None:
        self.blocked = False
        self._unblocked.set()

    @property
    def unsent(self) -> int:
        return len(self.pending)

    def queue(self, data: bytes) -> None:
        self.pending += data

    def try_send(self, data: bytes) -> bool:
        self.pending += data
        if self.blocked:
            return not self.pending
        if self.pending:
            self._deliver(bytes(self.pending))
            self.pending.clear()
        return True

    async def finish_send(self) -> None:
        while self.blocked:
            await self._unblocked.wait()
        if self.pending:
            self._deliver(bytes(self.pending))
            self.pending.clear()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self.inbox and not self.eof:
            await self._arrived.park()
        n = max_bytes or len(self.inbox)
        data = bytes(self.inbox[:n])
        del self.inbox[:n]
        return data

    async def aclose(self) -> None:
        if self.peer is not None:
            self.peer.eof = True
            self.peer._arrived.unpark_all()
        await trio.lowlevel.checkpoint()


def pipe() -> tuple[PipeWire, PipeWire]:
    a, b = PipeWire(), PipeWire()
    a.peer, b.peer = b, a
    return a, b


class Pair:
    """A client and a server H2Conn over a pipe; the server accepts every request (200)."""

    def __init__(self, nursery: trio.Nursery, on_stream=None) -> None:
        self.client_wire, self.server_wire = pipe()
        self.server_streams: list = []
        self._nursery = nursery
        self._on_stream = on_stream

        def on_request(stream, headers) -> None:
            self.server_streams.append(stream)
            nursery.start_soon(self._answer, stream)

        self.client = H2Conn(self.client_wire, client_side=True)
        self.server = H2Conn(self.server_wire, client_side=False, on_request=on_request)

    async def _answer(self, stream) -> None:
        await stream.send_headers([(b":status", b"200")])
        if self._on_stream is not None:
            await self._on_stream(stream)

    async def start(self) -> None:
        await self._nursery.start(self.server.run)
        await self._nursery.start(self.client.run)

    async def open(self):
        stream = self.client.open_stream_nowait(CONNECT)
        await stream.wait_response()
        return stream


@pytest.fixture
async def pair(nursery):
    p = Pair(nursery)
    await p.start()
    return p


async def test_one_send_all_is_one_transport_write(pair):
    stream = await pair.open()
    await trio.testing.wait_all_tasks_blocked()
    before = len(pair.client_wire.writes)
    await stream.send_all(b"x" * 1024)
    assert len(pair.client_wire.writes) == before + 1       # one DATA frame, one write
    assert pair.client_wire.writes[-1] == 9 + 1024
    [server_stream] = pair.server_streams
    assert await server_stream.receive_some() == b"x" * 1024


async def test_frames_queued_behind_a_blocked_transport_leave_in_one_write(pair):
    streams = [await pair.open() for _ in range(3)]
    await trio.testing.wait_all_tasks_blocked()
    pair.client_wire.block()
    done: list[int] = []

    async def send(i, s):
        await s.send_all(bytes([i]) * 1000)
        done.append(i)

    async with trio.open_nursery() as nursery:
        for i, s in enumerate(streams):
            nursery.start_soon(send, i, s)
        await trio.testing.wait_all_tasks_blocked()
        # Backpressure: nobody's send_all returns while the transport holds their bytes,
        # so each stream has at most its one write queued.
        assert done == []
        assert len(pair.client_wire.pending) == 3 * (9 + 1000)
        before = len(pair.client_wire.writes)
        pair.client_wire.unblock()
    assert sorted(done) == [0, 1, 2]
    assert len(pair.client_wire.writes) == before + 1       # all three frames in one write
    for i, s in enumerate(pair.server_streams):
        assert await s.receive_some() == bytes([i]) * 1000


async def test_window_updates_are_batched_and_flow_control_still_holds(pair, monkeypatch):
    stream = await pair.open()
    [server_stream] = pair.server_streams
    acks = []
    h2 = pair.server._h2
    real_ack = h2.acknowledge_received_data
    monkeypatch.setattr(h2, "acknowledge_received_data", lambda n, sid: (acks.append(n), real_ack(n, sid)))
    total = 12 * MiB                     # three stream windows: the sender must be let on
    chunk = 16 * 1024

    async def sender():
        for _ in range(total // chunk):
            await stream.send_all(b"y" * chunk)
        await stream.send_eof()

    received = 0
    reads = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while data := await server_stream.receive_some(4096):       # a reader of small reads
            received += len(data)
            reads += 1
            assert server_stream._buffered <= STREAM_WINDOW
    assert received == total
    assert reads >= total // 4096
    assert len(acks) <= total // _ACK_BATCH + 1                      # not one per read
    assert sum(acks) <= total


async def test_a_reset_stream_gives_its_unread_bytes_back_to_the_connection(nursery):
    async def flood_then_reset(stream):
        await stream.send_all(b"z" * (3 * MiB))
        stream.abort(CANCEL)            # RST_STREAM with 3 MiB unread at the client

    p = Pair(nursery, on_stream=flood_then_reset)
    await p.start()
    # Six times 3 MiB is more than the connection window: without the bytes of reset
    # streams handed back, the last streams would stall for good.
    assert 6 * 3 * MiB > CONNECTION_WINDOW
    with trio.fail_after(10):
        for _ in range(6):
            stream = await p.open()
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(stream.broken, StreamReset)
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            await stream.aclose()
        assert p.client._h2.inbound_flow_control_window > CONNECTION_WINDOW // 2


async def test_data_read_after_the_stream_finished_is_still_acknowledged(nursery):
    async def send_then_end(stream):
        await stream.send_all(b"q" * (100 * 1024))
        await stream.send_eof()

    p = Pair(nursery, on_stream=send_then_end)
    await p.start()
    with trio.fail_after(5):
        stream = await p.open()
        await stream.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert p.client.active_streams == 0          # both ends done; 100 KiB still unread
        got = 0
        while data := await stream.receive_some(1000):
            got += len(data)
    assert got == 100 * 1024
    assert p.client._unacked.get(stream.stream_id, 0) == 0 and p.client._unacked_total == 0


async def test_a_peer_that_sends_but_never_reads_is_no_longer_read(pair, monkeypatch):
    """PINGs (each asks for an answer) from a peer that takes none of our answers: the answers
    queued behind it stay bounded, because we stop reading it until it reads."""
    monkeypatch.setattr(h2conn, "_MAX_UNSENT", 1000)
    await trio.testing.wait_all_tasks_blocked()
    pair.server_wire.block()
    for i in range(20_000):                               # 340 KB of PINGs: more than one read
        pair.client._h2.ping(i.to_bytes(8, "big"))
    pair.client.write_out()
    await trio.testing.wait_all_tasks_blocked()
    assert pair.server_wire.inbox                         # the rest is left unread...
    assert pair.server_wire.unsent <= 256 * 1024          # ...answers to one read at most
    pair.server_wire.unblock()
    with trio.fail_after(10):
        while pair.server_wire.inbox or pair.server_wire.pending:
            await trio.sleep(0.01)                        # reads again once its answers leave
