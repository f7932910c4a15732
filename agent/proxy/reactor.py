"""reactor.py: one thread's event loop off the trio loop — its epoll set, a handler per file
descriptor, timers, non-blocking connects with deadlines, listening sockets, requests posted from
other threads, start and stop. Knows nothing of what the handlers do with their descriptors
(splicing, pipes, bytes, policy). Every callback runs on its thread; none can stop it.
"""
from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Callable

import trio

from agent.proxy.sockaccept import acceptor

log = logging.getLogger("nodemesh.agent.reactor")

IN, OUT = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT   # RDHUP: a FIN comes with its data
ERR, BAD = select.EPOLLERR, select.EPOLLERR | select.EPOLLHUP
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}   # as listeners.py
_STOP = object()                          # the control request that ends the thread

Handler = Callable[[int, int], None]      # handler(fd, events), on the reactor's thread


class _Connecting:
    """A non-blocking connect in flight: its descriptor's handler until it is done."""

    __slots__ = ("reactor", "fd", "sock", "on_done")

    def __init__(self, reactor: Reactor, sock: socket.socket, on_done) -> None:
        self.reactor, self.fd, self.sock, self.on_done = reactor, sock.fileno(), sock, on_done

    def event(self, fd: int, events: int) -> None:
        if events & (OUT | BAD):          # done (or failed) only then, not on any other event
            self.done(None)

    def expire(self) -> None:
        if self.reactor._connecting.get(self.fd) is self:
            self.done(TimeoutError(errno.ETIMEDOUT, "connect timed out"))

    def done(self, error: OSError | None) -> None:
        sock, on_done = self.sock, self.on_done
        self.sock = self.on_done = None   # the deadline's timer holds self until it is due
        del self.reactor._connecting[self.fd]
        self.reactor.remove(self.fd)
        if error is None:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            error = OSError(code, os.strerror(code)) if code else None
        on_done(error)


class _Listener:
    """A listening socket: its descriptor's handler accepts in batches."""

    __slots__ = ("reactor", "sock", "on_accept", "accept")

    def __init__(self, reactor: Reactor, sock: socket.socket, on_accept) -> None:
        self.reactor, self.sock, self.on_accept = reactor, sock, on_accept
        self.accept = acceptor(sock)      # accept(2) without socket.accept()'s wrapper

    def event(self, fd: int, events: int) -> None:
        sock, on_accept, accept = self.sock, self.on_accept, self.accept
        for _ in range(64):
            try:
                conn = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _ACCEPT_CAPACITY:
                    log.debug("accept on %s: %s", sock.getsockname(), e)   # that connection's
                    continue
                # out of descriptors or memory: pause this listener 100 ms, as
                # trio.serve_listeners does, instead of spinning on a level-triggered epoll
                log.error("accept on %s failed: %s; pausing it 100 ms", sock.getsockname(), e)
                self.reactor.rearm(fd, IN, 0)
                self.reactor.later(0.1, self.resume)
                return
            on_accept(conn)

    def resume(self) -> None:
        fd = self.sock.fileno()
        if self.reactor._listening.get(fd) is self:     # not unlistened meanwhile
            self.reactor.rearm(fd, 0, IN)


class Reactor:
    """An epoll loop on its own thread. Start ``run`` with ``nursery.start``.

    Descriptors are watched with ``add`` / ``rearm`` / ``remove``, each with a handler called
    as ``handler(fd, events)`` on the thread. From any thread: ``post``, ``add``, ``listen``,
    ``unlisten``; the other verbs are for the thread itself (its handlers, timers and posts).
    """

    def __init__(self, name: str = "nodemesh-reactor") -> None:
        self.name = name
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Handler] = {}
        self._gone: set[int] = set()          # fds removed during the current poll batch
        self._control: deque = deque()        # (fn, args) from other threads
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._listening: dict[int, _Listener] = {}
        self._connecting: dict[int, _Connecting] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []   # (due, seq, callback)
        self._seq = 0
        self._at_stop: list[Callable[[], None]] = []

    @property
    def available(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- service (trio thread) ------------------------------------------------------------------

    def at_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` when the thread has ended, before the pending timers run (so what
        it schedules with ``later`` still runs); e.g. the relay ends the pairs left."""
        self._at_stop.append(callback)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled. Then, on the trio thread: the ``at_stop`` callbacks,
        listening sockets closed, connects in flight failed (ConnectionAbortedError), and every
        pending timer run at once (e.g. the fast path's reports)."""
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, IN)
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.post(_STOP)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)
            self._thread = None
            for callback in self._at_stop:
                try:
                    callback()
                except Exception:
                    log.exception("reactor %s: a stop callback failed", self.name)
            for listener in self._listening.values():
                listener.sock.close()
            self._listening.clear()
            for c in list(self._connecting.values()):
                c.done(ConnectionAbortedError(errno.ECONNABORTED, "agent shutting down"))
            while self._timers:               # due now: e.g. the fast path's pending reports
                try:
                    heapq.heappop(self._timers)[2]()
                except Exception:
                    log.exception("reactor %s: a timer failed at shutdown", self.name)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
            self._control.clear()
            self._handlers.clear()
            self._epoll.close()

    # --- any thread -----------------------------------------------------------------------------

    def post(self, fn, *args) -> None:
        """Call ``fn(*args)`` on the thread soon, in the order posted; an exception it raises is
        logged. Dropped once the reactor has stopped (or before it started)."""
        if self._wake_w < 0:
            return                            # stopped: run() has ended and closed everything
        self._control.append((fn, args))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                              # a wake-up is already pending

    def add(self, fd: int, mask: int, handler: Handler) -> None:
        """Watch ``fd`` for ``mask`` (``IN``, ``OUT``), calling ``handler(fd, events)`` on the
        thread; from any thread (the thread sees events from here on)."""
        assert self._epoll is not None
        self._handlers[fd] = handler
        self._epoll.register(fd, mask)

    def unlisten(self, sock: socket.socket) -> None:
        """Stop accepting on ``sock`` and close it (on the thread); from any thread."""
        self.post(self._unlisten, sock)

    # --- the thread -----------------------------------------------------------------------------

    def rearm(self, fd: int, old: int, new: int) -> None:
        """Watch ``fd`` (added, watched for ``old``) for ``new`` instead; 0: out of the epoll set
        for now, its handler kept."""
        if new == 0:
            self._epoll.unregister(fd)
        elif old == 0:
            self._epoll.register(fd, new)
        else:
            self._epoll.modify(fd, new)

    def remove(self, fd: int, *, watched: bool = True) -> None:
        """Forget ``fd``: no event of it already polled reaches its handler (its number may be
        reused at once); ``watched``: it is in the epoll set (not if closing it removes it)."""
        self._handlers.pop(fd, None)
        self._gone.add(fd)
        if watched:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass                          # not in the set (paused) or closed already

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the thread in ``delay`` seconds."""
        self._seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, callback))

    def connect(self, sock: socket.socket, address: tuple[str, int], timeout: float,
                on_done: Callable[[OSError | None], None]) -> None:
        """Connect the non-blocking ``sock``; ``on_done(None)`` once connected, ``on_done(error)``
        on failure or after ``timeout`` seconds (TimeoutError)."""
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            try:                              # a local handshake is often done by now
                sock.getpeername()
                err = 0
            except OSError:
                pass
        if err == 0:
            on_done(None)
            return
        if err != errno.EINPROGRESS:
            on_done(OSError(err, os.strerror(err)))
            return
        fd = sock.fileno()
        c = self._connecting[fd] = _Connecting(self, sock, on_done)
        self.add(fd, OUT, c.event)
        self.later(timeout, c.expire)

    def listen(self, sock: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        """Accept on the listening ``sock`` (now the reactor's), calling ``on_accept(conn)`` on the
        thread with each new non-blocking connection; ``unlisten`` ends it. From any thread."""
        sock.setblocking(False)
        listener = self._listening[sock.fileno()] = _Listener(self, sock, on_accept)
        self.add(sock.fileno(), IN, listener.event)

    def _unlisten(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        listener = self._listening.get(fd)
        if listener is not None and listener.sock is sock:
            del self._listening[fd]
            self.remove(fd)                   # tolerates a listener paused by an accept error
            sock.close()

    def _loop(self) -> None:
        assert self._epoll is not None
        poll, handlers, gone, wake = self._epoll.poll, self._handlers, self._gone, self._wake_r
        timeout = -1
        while True:
            gone.clear()
            for fd, events in poll(timeout):
                # An fd ended earlier in this batch may already be closed and its number reused
                # by a connection accepted in this batch: its stale event is not the new one's.
                if fd in gone:
                    continue
                handler = handlers.get(fd)
                try:
                    if handler is not None:
                        handler(fd, events)
                    elif fd == wake:
                        if self._control_turn():
                            return
                    else:                     # nobody's: never let it spin the loop
                        self._epoll.unregister(fd)
                except Exception:             # never let one descriptor stop the thread
                    log.exception("reactor %s: unexpected error on fd %d", self.name, fd)
            timeout = self._expire() if self._timers else -1

    def _control_turn(self) -> bool:
        """Run the requests posted; True: stop."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        control = self._control
        while control:
            fn, args = control.popleft()
            if fn is _STOP:
                return True
            try:
                fn(*args)
            except Exception:
                log.exception("reactor %s: a control request failed", self.name)
        return False

    def _expire(self) -> float:
        """Run the timers that are due; the poll timeout until the next one (-1: none)."""
        now = time.monotonic()
        while self._timers:
            deadline = self._timers[0][0]
            if deadline > now:
                return deadline - now
            try:
                heapq.heappop(self._timers)[2]()
            except Exception:
                log.exception("reactor %s: a timer failed", self.name)
        return -1
