"""The reactor on its own, with real socketpairs and loopback TCP: handlers per descriptor,
stale events skipped, timers, connects with a deadline, requests posted from other threads,
listening sockets, and what stopping does (callbacks, aborted connects, pending timers)."""
from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest
import trio

from agent.proxy.reactor import IN, Reactor

NAME = "test-reactor"


@pytest.fixture
async def reactor(nursery):
    r = Reactor(NAME)
    await nursery.start(r.run)
    assert r.available
    yield r


class Inbox:
    """What the reactor's thread reports, received on the trio thread in order."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._send, self._receive = trio.open_memory_channel(1000)

    def put(self, *value) -> None:                    # any thread
        self.token.run_sync_soon(self._send.send_nowait, value)

    async def get(self, timeout: float = 5):
        with trio.fail_after(timeout):
            return await self._receive.receive()

    def empty(self) -> bool:
        return self._receive.statistics().current_buffer_used == 0


async def on_thread(r: Reactor, fn, *args):
    """Run ``fn(*args)`` on the reactor's thread; its result."""
    inbox = Inbox()

    def call():
        try:
            inbox.put(fn(*args))
        except Exception as e:
            inbox.put(e)
    r.post(call)
    (result,) = await inbox.get()
    if isinstance(result, Exception):
        raise result
    return result


def listener(backlog: int = 64) -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    return srv


def full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full: a connect to it stays in progress."""
    srv = listener(0)
    fillers = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(srv.getsockname())
        fillers.append(s)
    time.sleep(0.1)
    return srv, fillers


async def test_a_handler_gets_its_descriptors_events_on_the_thread_until_removed(reactor):
    inbox = Inbox()
    x, y = socket.socketpair()
    x.setblocking(False)
    calls = []

    def handler(fd, events):
        calls.append(fd)
        if len(calls) == 1:
            raise RuntimeError("a bug in a handler")      # logged; the thread goes on
        inbox.put(fd, events & IN != 0, threading.current_thread().name, x.recv(100))
        reactor.remove(fd)
    reactor.add(x.fileno(), IN, handler)
    y.send(b"hi")
    assert await inbox.get() == (x.fileno(), True, NAME, b"hi")
    y.send(b"again")                                      # removed: nobody is told
    await trio.sleep(0.1)
    assert len(calls) == 2 and inbox.empty() and reactor.available
    x.close()
    y.close()


async def test_rearm_to_nothing_keeps_the_handler_out_of_the_set_until_rearmed(reactor):
    inbox = Inbox()
    x, y = socket.socketpair()
    x.setblocking(False)

    def handler(fd, events):
        inbox.put(x.recv(100))
        reactor.rearm(fd, IN, 0)
    reactor.add(x.fileno(), IN, handler)
    y.send(b"one")
    assert await inbox.get() == (b"one",)
    y.send(b"two")
    await trio.sleep(0.1)
    assert inbox.empty()                                  # out of the set
    await on_thread(reactor, reactor.rearm, x.fileno(), 0, IN)
    assert await inbox.get() == (b"two",)
    await on_thread(reactor, reactor.remove, x.fileno())
    x.close()
    y.close()


async def test_an_event_of_a_descriptor_removed_earlier_in_the_same_batch_is_skipped(reactor):
    """Two descriptors ready in one poll: whichever handler runs first ends the other (as a
    relay ending a pair does) and its number is reused at once by a new descriptor; the old
    one's event in that batch must not reach the new one's handler."""
    inbox = Inbox()
    (a, a_peer), (b, b_peer) = socket.socketpair(), socket.socketpair()
    a_peer.send(b"x")
    b_peer.send(b"x")
    socks = {a.fileno(): a, b.fileno(): b}
    other = {a.fileno(): b.fileno(), b.fileno(): a.fileno()}
    fresh, fresh_peer = socket.socketpair()                # nothing to read: no event of its own

    def handler(fd, events):
        inbox.put("old", fd)
        reactor.remove(fd)
        gone = other[fd]
        reactor.remove(gone)
        socks.pop(gone).close()
        os.dup2(fresh.fileno(), gone)                      # the number taken again at once
        reactor.add(gone, IN, lambda fd, events: inbox.put("new", fd))

    def add_both():                                       # both already readable: one batch
        reactor.add(a.fileno(), IN, handler)
        reactor.add(b.fileno(), IN, handler)
    await on_thread(reactor, add_both)
    (kind, first) = await inbox.get()
    await trio.sleep(0.1)
    assert kind == "old" and inbox.empty()
    await on_thread(reactor, reactor.remove, other[first])
    os.close(other[first])
    for s in (a_peer, b_peer, fresh, fresh_peer, *socks.values()):
        s.close()


async def test_an_event_of_nobodys_descriptor_takes_it_out_of_the_set(reactor):
    x, y = socket.socketpair()
    reactor.add(x.fileno(), IN, lambda fd, events: None)
    await on_thread(reactor, lambda: reactor.remove(x.fileno(), watched=False))  # left in the set
    y.send(b"data")                                       # never read: level-triggered
    await trio.sleep(0.1)
    # it is out of the set now: adding it again is no EEXIST
    await on_thread(reactor, reactor.rearm, x.fileno(), 0, IN)
    await on_thread(reactor, reactor.remove, x.fileno())
    assert reactor.available
    x.close()
    y.close()


async def test_timers_run_in_due_order_on_the_thread_and_a_failing_one_is_only_logged(reactor):
    inbox = Inbox()
    start = time.monotonic()

    def boom():
        raise RuntimeError("a bug in a timer")

    def schedule():
        reactor.later(0.2, lambda: inbox.put("b", time.monotonic() - start))
        reactor.later(0.1, boom)
        reactor.later(0.05, lambda: inbox.put("a", threading.current_thread().name))
    reactor.post(schedule)
    assert await inbox.get() == ("a", NAME)
    name, elapsed = await inbox.get()
    assert name == "b" and elapsed >= 0.2
    assert reactor.available


async def test_posted_requests_from_another_thread_run_in_order_and_a_failing_one_is_skipped(reactor):
    inbox = Inbox()

    def request(i):
        if i == 10:
            raise RuntimeError("a bug in a request")
        inbox.put(i, threading.current_thread().name)

    poster = threading.Thread(target=lambda: [reactor.post(request, i) for i in range(50)])
    poster.start()
    poster.join()
    got = [await inbox.get() for _ in range(49)]
    assert got == [(i, NAME) for i in range(50) if i != 10]


async def test_a_connect_completes_or_fails_or_times_out(reactor):
    inbox = Inbox()
    srv = listener()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                         # bound, not listening: refused
    full, fillers = full_listener()
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.setblocking(False)

    def connect(name, sock, address, timeout):
        reactor.connect(sock, address, timeout, lambda error: inbox.put(name, error))
    t0 = time.monotonic()
    reactor.post(connect, "ok", socks[0], srv.getsockname(), 5)
    reactor.post(connect, "refused", socks[1], closed.getsockname(), 5)
    reactor.post(connect, "slow", socks[2], full.getsockname(), 0.3)
    got = dict([await inbox.get(), await inbox.get(), await inbox.get()])
    assert got["ok"] is None and socks[0].getpeername() == srv.getsockname()
    assert got["refused"].errno == errno.ECONNREFUSED
    assert isinstance(got["slow"], TimeoutError) and time.monotonic() - t0 >= 0.3
    await trio.sleep(0.1)
    assert inbox.empty()                                  # each reported once
    for s in socks + fillers + [srv, closed, full]:
        s.close()


async def test_listen_accepts_non_blocking_connections_on_the_thread_until_unlisten(reactor):
    inbox = Inbox()
    srv = listener()
    address = srv.getsockname()
    kept = []

    def on_accept(conn):
        kept.append(conn)
        inbox.put(conn.getblocking(), threading.current_thread().name, conn.getsockname())
    reactor.listen(srv, on_accept)
    clients = [socket.create_connection(address) for _ in range(5)]
    for _ in clients:
        assert await inbox.get() == (False, NAME, address)
    reactor.unlisten(srv)
    await on_thread(reactor, lambda: None)                # the unlisten ran before it
    assert srv.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address)
    for s in clients + kept:
        s.close()


async def test_stopping_runs_the_stop_callbacks_aborts_connects_then_runs_pending_timers():
    r = Reactor(NAME)
    order = []
    inbox = Inbox()
    full, fillers = full_listener()
    sock = socket.socket()
    sock.setblocking(False)
    srv = listener()
    r.at_stop(lambda: order.append("stop callback"))

    def start():
        r.connect(sock, full.getsockname(), 60, lambda error: order.append(error))
        r.later(60, lambda: order.append("timer"))
        inbox.put("started")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            r.listen(srv, lambda conn: None)
            r.post(start)
            assert await inbox.get() == ("started",)
            nursery.cancel_scope.cancel()                 # the agent shutting down
    assert not r.available
    assert order[0] == "stop callback" and order[2] == "timer" and len(order) == 3
    assert isinstance(order[1], ConnectionAbortedError)
    assert srv.fileno() == -1                             # the listener was the reactor's
    r.post(lambda: order.append("too late"))              # dropped, not raised
    assert len(order) == 3
    for s in fillers + [sock, full]:
        s.close()
