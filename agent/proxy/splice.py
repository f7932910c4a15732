"""splice.py: the plaintext relay engine — bytes between two TCP sockets moved by the kernel
(``splice(2)`` through a pipe per direction), driven by one thread with its own epoll, off the
trio loop.

Owns that thread, its epoll set, a pool of pipes, half-close, failure and byte counting for the
socket pairs handed to it, and for the fast path (fastpath.py) the listening sockets handed to
it, non-blocking connects with deadlines and timers. Knows nothing of what the bytes are, of
identities or of policy, and never closes a relayed pair's sockets: they stay the caller's, as
with ``relay.relay`` (whose contract ``SpliceEngine.relay`` keeps). Why: trio pays a try /
EAGAIN / wait / retry and a task switch per ``recv``/``send``; here a 1 KB message costs one
``epoll_wait`` turn and two ``splice`` calls, and bulk data never enters Python (BENCHMARKS.md,
scenarios a and d). Every callback it makes runs on its thread; trio is only told by
``TrioToken.run_sync_soon``.
"""
from __future__ import annotations

import errno
import fcntl
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

from agent.proxy.relay import RelayCounters, RelayError, RelayResult, abort, relay

log = logging.getLogger("nodemesh.agent.splice")

CHUNK = 1 << 20            # the most one splice() may move; a pipe holds 64 KiB by default
PIPE_SIZE = 256 * 1024     # F_SETPIPE_SZ: bulk moves in 256 KiB bites (ztunnel's largest read)
PIPE_POOL = 64             # empty pipes kept for reuse
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# RDHUP: the peer's FIN is seen with its last data, so EOF is read in the same turn
_IN, _OUT, _RDHUP = select.EPOLLIN | select.EPOLLRDHUP, select.EPOLLOUT, select.EPOLLRDHUP
_BAD = select.EPOLLERR | select.EPOLLHUP
_ERR = select.EPOLLERR
_F_SETPIPE_SZ = 1031
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}   # as listeners.py


class _Cancelled(Exception):
    """The trio side asked for the pair to be dropped (cancellation, shutdown)."""


class _DirectionError(Exception):
    def __init__(self, direction: str, error: OSError) -> None:
        super().__init__(direction, error)
        self.direction, self.error = direction, error


class _Direction:
    """One way of a pair: src -> pipe -> dst. ``pipe`` is held only while bytes are in it;
    ``mask`` is what the epoll set watches on src (0: src is not in it)."""

    __slots__ = ("src", "dst", "src_sock", "dst_sock", "name", "forward", "pipe", "pending", "eof",
                 "done", "mask")

    def __init__(self, src_sock, dst_sock, name: str) -> None:
        # stdlib or trio sockets (fileno, getsockopt, shutdown)
        self.src_sock, self.dst_sock = src_sock, dst_sock
        self.src, self.dst = src_sock.fileno(), dst_sock.fileno()
        self.name, self.forward = name, name == "a_to_b"
        self.pipe: tuple[int, int] | None = None
        self.pending = 0          # bytes in the pipe, not yet written to dst
        self.eof = False          # src said EOF
        self.done = False         # EOF passed on (dst shut for writing)
        self.mask = _IN


class _Pair:
    __slots__ = ("a", "b", "ab", "ba", "counters", "finish", "error", "closed", "closing")

    def __init__(self, a, b, counters: RelayCounters, finish) -> None:
        self.ab, self.ba = ab, ba = _Direction(a, b, "a_to_b"), _Direction(b, a, "b_to_a")
        self.a, self.b = ab.src, ba.src
        self.counters = counters
        self.finish = finish                  # finish(pair), on the engine thread, once at the end
        self.error: tuple[str, BaseException] | None = None
        self.closed = False
        self.closing = False                  # finish() closes both sockets at once


class SpliceEngine:
    """Relay TCP socket pairs in the kernel from one thread.

    Start ``run`` with ``nursery.start``; then ``await engine.relay(a, b, counters=...)`` with
    two connected ``trio.SocketStream``s. Until ``run`` has started (or after it ended),
    ``available`` is False and ``relay`` hands the pair to ``relay.relay`` instead.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._pairs: dict[int, _Pair] = {}    # fd -> pair, both fds of each pair
        self._control: deque = deque()        # (verb, pair) from the trio thread
        self._wake_r = self._wake_w = -1
        self._pipes: list[tuple[int, int]] = []
        self._thread: threading.Thread | None = None
        self._listening: dict[int, tuple[socket.socket, Callable, tuple[int, int, int]]] = {}
        self._connecting: dict[int, tuple[socket.socket, Callable]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []   # (due, seq, callback)
        self._gone: set[int] = set()          # fds ended during the current poll batch
        self._seq = 0

    @property
    def available(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._pairs) // 2

    # --- service (trio thread) ------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine thread until cancelled; pairs still relaying then are failed."""
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        self._thread = threading.Thread(target=self._loop, name="nodemesh-splice", daemon=True)
        self._thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._post("stop", None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._thread.join)
            self._thread = None
            for pair in {id(p): p for p in self._pairs.values()}.values():   # came in late
                self._end(pair, ("a_to_b", _Cancelled("agent shutting down")))
            for sock, *_ in self._listening.values():
                sock.close()
            self._listening.clear()
            for fd in list(self._connecting):
                self._connected(fd, ConnectionAbortedError(errno.ECONNABORTED, "agent shutting down"))
            while self._timers:               # due now: e.g. the fast path's pending reports
                try:
                    heapq.heappop(self._timers)[2]()
                except Exception:
                    log.exception("splice engine: a timer failed at shutdown")
            for fd in (self._wake_r, self._wake_w, *[fd for p in self._pipes for fd in p]):
                os.close(fd)
            self._wake_r = self._wake_w = -1
            self._pipes.clear()
            self._epoll.close()

    async def relay(self, a: trio.SocketStream, b: trio.SocketStream, *,
                    counters: RelayCounters | None = None) -> RelayResult:
        """Copy a->b and b->a until both directions reach EOF; return the bytes delivered.

        The same contract as ``relay.relay``: EOF on one side becomes a half-close of the other;
        on an error on either side, or cancellation, both sockets are reset and ``RelayError``
        (or the cancellation) is raised with the counts so far; after a clean finish the
        sockets stay the caller's to close.
        """
        if not self.available:
            return await relay(a, b, counters=counters)
        counters = counters if counters is not None else RelayCounters()
        token = trio.lowlevel.current_trio_token()
        ended = trio.Event()
        pair = self.adopt(a.socket, b.socket, counters, lambda _: token.run_sync_soon(ended.set))
        try:
            await ended.wait()
        except BaseException:
            self._post("cancel", pair)
            with trio.CancelScope(shield=True):
                await ended.wait()            # the engine (or run() on its way out) ends it
                await abort(a)
                await abort(b)
            raise
        if pair.error is not None:
            name, error = pair.error
            with trio.CancelScope(shield=True):
                await abort(a)
                await abort(b)
            raise RelayError(name, counters.a_to_b, counters.b_to_a, repr(error)) from error
        return RelayResult(counters.a_to_b, counters.b_to_a)

    # --- for the fast path: any thread, engine-thread callbacks -----------------------------------

    def adopt(self, a, b, counters: RelayCounters, on_end: Callable[[_Pair], None], *,
              closing: bool = False) -> _Pair:
        """Start relaying connected sockets ``a`` <-> ``b`` (non-blocking); ``on_end(pair)`` runs
        on the engine thread when both directions are done (``pair.error`` None) or one failed
        or it was cancelled (``pair.error`` = (direction, exception)). The sockets stay the
        caller's; ``closing``: ``on_end`` closes them at once (so the last EOF needs no
        ``shutdown``: the close sends it). Returns the pair, for ``cancel``."""
        assert self._epoll is not None
        pair = _Pair(a, b, counters, on_end)
        pair.closing = closing
        self._pairs[pair.a] = self._pairs[pair.b] = pair
        self._epoll.register(pair.a, _IN)     # the engine thread sees data from here on
        self._epoll.register(pair.b, _IN)
        return pair

    def cancel(self, pair: _Pair) -> None:
        """End ``pair`` as failed (its ``on_end`` runs on the engine thread); from any thread."""
        self._post("cancel", pair)

    def listen(self, sock: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        """Accept on the listening ``sock`` (now the engine's) from the engine thread, calling
        ``on_accept(conn)`` there with each new non-blocking connection. ``unlisten`` ends it."""
        sock.setblocking(False)
        # socket.accept() without its per-call wrapper: the kind of socket made, looked up once
        kind = (int(sock.family), int(sock.type), sock.proto)
        self._listening[sock.fileno()] = (sock, on_accept, kind)
        self._epoll.register(sock.fileno(), _IN)

    def unlisten(self, sock: socket.socket) -> None:
        """Stop accepting on ``sock`` and close it (on the engine thread); from any thread."""
        self._post("unlisten", sock)

    def connect(self, sock: socket.socket, address: tuple[str, int], timeout: float,
                on_done: Callable[[OSError | None], None]) -> None:
        """Engine thread only: connect the non-blocking ``sock``; ``on_done(None)`` once
        connected, ``on_done(error)`` on failure or after ``timeout`` seconds (TimeoutError)."""
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
        entry = (sock, on_done)
        self._connecting[fd] = entry
        self._epoll.register(fd, _OUT)

        def expired() -> None:
            if self._connecting.get(fd) is entry:
                self._connected(fd, TimeoutError(errno.ETIMEDOUT, "connect timed out"))
        self.later(timeout, expired)

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        """Engine thread only: run ``callback`` there in ``delay`` seconds."""
        self._seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, callback))

    def _connected(self, fd: int, error: OSError | None) -> None:
        sock, on_done = self._connecting.pop(fd)
        self._epoll.unregister(fd)
        self._gone.add(fd)
        if error is None:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            error = OSError(code, os.strerror(code)) if code else None
        on_done(error)

    def _expire(self) -> float | None:
        """Run the timers that are due; the poll timeout until the next one."""
        now = time.monotonic()
        while self._timers:
            deadline = self._timers[0][0]
            if deadline > now:
                return deadline - now
            try:
                heapq.heappop(self._timers)[2]()
            except Exception:
                log.exception("splice engine: a timer failed")
        return None

    def _accept(self, fd: int) -> None:
        sock, on_accept, (family, kind, proto) = self._listening[fd]
        accept, make = sock._accept, socket.socket
        for _ in range(64):
            try:
                conn = make(family, kind, proto, accept()[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _ACCEPT_CAPACITY:
                    log.debug("accept on %s: %s", sock.getsockname(), e)   # that connection's
                    continue
                # out of descriptors or memory: pause this listener 100 ms, as
                # trio.serve_listeners does, instead of spinning on a level-triggered epoll
                log.error("accept on %s failed: %s; pausing it 100 ms", sock.getsockname(), e)
                self._epoll.unregister(fd)

                def resume() -> None:
                    if self._listening.get(fd, (None,))[0] is sock:
                        self._epoll.register(fd, _IN)
                self.later(0.1, resume)
                return
            conn.setblocking(False)
            on_accept(conn)

    def _post(self, verb: str, pair) -> None:
        if self._wake_w < 0:
            return                            # stopped: run() has ended and closed everything
        self._control.append((verb, pair))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                              # a wake-up is already pending

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._epoll is not None
        poll, pairs, wake = self._epoll.poll, self._pairs, self._wake_r
        timeout = None
        gone = self._gone
        while True:
            gone.clear()
            for fd, events in poll(timeout if timeout is not None else -1):
                # An fd ended earlier in this batch may already be closed and its number reused
                # by a connection accepted in this batch: its stale event is not the new one's.
                if fd in gone:
                    continue
                if fd == wake:
                    try:
                        if self._control_turn():
                            return
                    except Exception:
                        log.exception("splice engine: a control request failed")
                    continue
                pair = pairs.get(fd)
                try:
                    if pair is not None:
                        if not pair.closed:
                            self._turn(pair, fd, events)
                    elif fd in self._connecting:
                        if events & (_OUT | _BAD):
                            self._connected(fd, None)
                    elif fd in self._listening:
                        self._accept(fd)
                    else:                    # nobody's: never let it spin the loop
                        self._epoll.unregister(fd)
                except Exception as e:       # never let one connection stop the engine
                    log.exception("splice engine: unexpected error on fd %d", fd)
                    if pair is not None:
                        self._end(pair, ("a_to_b" if fd == pair.a else "b_to_a", e))
            timeout = self._expire() if self._timers else None

    def _control_turn(self) -> bool:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._control:
            verb, pair = self._control.popleft()
            if verb == "stop":
                for p in {id(p): p for p in self._pairs.values()}.values():
                    self._end(p, ("a_to_b", _Cancelled("agent shutting down")))
                return True
            if verb == "cancel" and not pair.closed:
                self._end(pair, ("a_to_b", _Cancelled("cancelled")))
            elif verb == "unlisten" and self._listening.pop(pair.fileno(), None) is not None:
                try:
                    self._epoll.unregister(pair.fileno())
                except OSError:
                    pass                      # paused after an accept error
                self._gone.add(pair.fileno())
                pair.close()
        return False

    def _turn(self, pair: _Pair, fd: int, events: int) -> None:
        if fd == pair.a:
            out_dir, in_dir = pair.ab, pair.ba              # fd is out_dir's source, in_dir's dst
        else:
            out_dir, in_dir = pair.ba, pair.ab
        if events & _ERR:
            code = out_dir.src_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._end(pair, (out_dir.name, ConnectionError(code, os.strerror(code))))
                return
        progressed = False
        try:
            if in_dir.pending and events & (_OUT | _BAD):
                progressed = self._flush(in_dir, pair)
            if not out_dir.eof and not out_dir.pending and events & (_IN | _BAD):
                progressed |= self._pump(out_dir, pair, events & (_RDHUP | _BAD))
        except _DirectionError as e:
            self._end(pair, (e.direction, e.error))
            return
        if out_dir.done and in_dir.done:
            self._end(pair, None)
            return
        if events & _BAD and not progressed:
            # hung up with nothing left to move through this socket: nothing will change now
            self._end(pair, (out_dir.name, ConnectionResetError(errno.ECONNRESET, "peer hung up")))
            return
        self._rearm(out_dir, in_dir)
        self._rearm(in_dir, out_dir)

    def _pump(self, d: _Direction, pair: _Pair, fin: int = 0) -> bool:
        """Move what src has into the pipe, then on to dst; True if anything happened. ``fin``:
        the peer has sent its FIN, so read on to the EOF now. A short splice does not prove the
        receive queue drained, even with the FIN in: the pipe also fills by its buffer slots
        (one per skb fragment, e.g. 64 NIC segments of 1448 bytes), so EOF is only taken from
        a splice that returns 0."""
        for _ in range(8):                    # bulk: a few bites per turn, then let others run
            if d.pipe is None:
                d.pipe = self._pipes.pop() if self._pipes else self._new_pipe()
            try:
                n = os.splice(d.src, d.pipe[1], CHUNK, flags=_FLAGS)
            except BlockingIOError:
                self._release(d)
                return False
            except OSError as e:
                raise _DirectionError(d.name, e) from None
            if n == 0:
                d.eof = True
                self._release(d)
                self._shut(d, pair)
                return True
            d.pending += n
            if not self._flush(d, pair) or (n < PIPE_SIZE and not fin):
                return True
        return True

    def _flush(self, d: _Direction, pair: _Pair) -> bool:
        """Write the pipe's bytes to dst; True when the pipe is empty afterwards."""
        assert d.pipe is not None
        r, dst, counters = d.pipe[0], d.dst, pair.counters
        while d.pending:
            try:
                n = os.splice(r, dst, d.pending, flags=_FLAGS)
            except BlockingIOError:
                return False
            except OSError as e:
                raise _DirectionError(d.name, e) from None
            d.pending -= n
            if d.forward:
                counters.a_to_b += n
            else:
                counters.b_to_a += n
        self._release(d)
        if d.eof:
            self._shut(d, pair)
        return True

    @staticmethod
    def _shut(d: _Direction, pair: _Pair) -> None:
        """Pass EOF on: dst is shut for writing once everything before it was written (unless
        the other direction is done too and the pair is ``closing``: the close sends the FIN)."""
        if d.done or d.pending:
            return
        d.done = True
        if pair.closing and (pair.ba if d is pair.ab else pair.ab).done:
            return
        try:
            d.dst_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                              # the peer is gone; the other direction will say so

    def _rearm(self, d: _Direction, other: _Direction) -> None:
        """Watch ``d.src`` for what is wanted now: IN while ``d`` may read, OUT while ``other``
        (the opposite direction) has bytes for it. Nothing wanted: leave the epoll set. A hung-up socket (both
        ways shut, bytes still queued behind a slow reader) would otherwise report EPOLLHUP on
        every turn."""
        mask = _IN if not d.eof and not d.pending else 0
        if other.pending:
            mask |= _OUT
        old = d.mask
        if mask == old:
            return
        d.mask = mask
        if mask == 0:
            self._epoll.unregister(d.src)
        elif old == 0:
            self._epoll.register(d.src, mask)
        else:
            self._epoll.modify(d.src, mask)

    def _end(self, pair: _Pair, error: tuple[str, BaseException] | None) -> None:
        """Stop watching the pair, return its pipes and tell the trio side."""
        if pair.closed:
            return
        pair.closed = True
        pair.error = error
        # a closing pair's sockets are closed in finish(), which takes them out of the set
        watched = not (pair.closing and error is None)
        pairs, gone = self._pairs, self._gone
        for d in (pair.ab, pair.ba):
            pairs.pop(d.src, None)
            gone.add(d.src)
            if d.mask and watched:
                try:
                    self._epoll.unregister(d.src)
                except (OSError, ValueError):
                    pass
            if d.pipe is not None:
                if d.pending:                 # bytes stuck in it: not reusable
                    os.close(d.pipe[0])
                    os.close(d.pipe[1])
                    d.pipe = None
                else:
                    self._release(d)
        try:
            pair.finish(pair)
        except trio.RunFinishedError:
            pass
        except Exception:
            log.exception("splice engine: a relay's end callback failed")

    # --- pipes ----------------------------------------------------------------------------------

    def _release(self, d: _Direction) -> None:
        if d.pipe is None or d.pending:
            return
        if len(self._pipes) < PIPE_POOL:
            self._pipes.append(d.pipe)
        else:
            os.close(d.pipe[0])
            os.close(d.pipe[1])
        d.pipe = None

    @staticmethod
    def _new_pipe() -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                              # over /proc/sys/fs/pipe-max-size: 64 KiB it is
        return r, w

