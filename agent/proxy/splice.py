"""splice.py: the plaintext relay — TCP socket pairs moved by the kernel (``splice(2)`` through
pooled pipes) on a reactor's thread (reactor.py), with half-close, reset on error, exact counts.
Knows nothing of epoll, timers or connects (its descriptors and their handlers go to the reactor
through its public verbs), nor of what the bytes are, identities or policy; it never closes a
pair's sockets: they stay the caller's, as with ``relay.relay``.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
from typing import Callable

import trio

from agent.proxy.reactor import BAD, ERR, IN, OUT, Reactor
from agent.proxy.relay import RelayCounters, RelayError, RelayResult, abort, relay

log = logging.getLogger("nodemesh.agent.splice")

CHUNK = 1 << 20            # the most one splice() may move; a pipe holds 64 KiB by default
PIPE_SIZE = 256 * 1024     # F_SETPIPE_SZ: bulk moves in 256 KiB bites (ztunnel's largest read)
PIPE_POOL = 64             # empty pipes kept for reuse
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_RDHUP = select.EPOLLRDHUP  # in IN: the peer's FIN comes with its last data, EOF read in that turn
_F_SETPIPE_SZ = 1031


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
        self.mask = IN


class _Pair:
    """Two sockets relayed both ways; ``turn`` is the reactor's handler of both (a bound method:
    one dict lookup and one call per event, as before the split)."""

    __slots__ = ("engine", "a", "b", "ab", "ba", "counters", "finish", "error", "closed", "closing")

    def __init__(self, engine: SpliceEngine, a, b, counters: RelayCounters, finish,
                 closing: bool) -> None:
        self.engine = engine
        self.ab, self.ba = ab, ba = _Direction(a, b, "a_to_b"), _Direction(b, a, "b_to_a")
        self.a, self.b = ab.src, ba.src
        self.counters = counters
        self.finish = finish                  # finish(pair), on the engine thread, once at the end
        self.error: tuple[str, BaseException] | None = None
        self.closed = False
        self.closing = closing                # finish() closes both sockets at once

    def turn(self, fd: int, events: int) -> None:
        """The reactor's handler for ``fd`` (a or b): move what can move now."""
        if self.closed:
            return
        engine = self.engine
        if fd == self.a:
            out_dir, in_dir = self.ab, self.ba              # fd is out_dir's source, in_dir's dst
        else:
            out_dir, in_dir = self.ba, self.ab
        try:
            if events & ERR:
                code = out_dir.src_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    engine._end(self, (out_dir.name, ConnectionError(code, os.strerror(code))))
                    return
            progressed = False
            if in_dir.pending and events & (OUT | BAD):
                progressed = engine._flush(in_dir, self)
            if not out_dir.eof and not out_dir.pending and events & (IN | BAD):
                progressed |= engine._pump(out_dir, self, events & (_RDHUP | BAD))
            if out_dir.done and in_dir.done:
                engine._end(self, None)
                return
            if events & BAD and not progressed:
                # hung up with nothing left to move through this socket: nothing will change now
                engine._end(self, (out_dir.name,
                                   ConnectionResetError(errno.ECONNRESET, "peer hung up")))
                return
            engine._rearm(out_dir, in_dir)
            engine._rearm(in_dir, out_dir)
        except _DirectionError as e:
            engine._end(self, (e.direction, e.error))
        except Exception as e:               # never let one connection's bug leave it hanging
            log.exception("splice engine: unexpected error on fd %d", fd)
            engine._end(self, (out_dir.name, e))


class SpliceEngine:
    """Relay TCP socket pairs in the kernel from one thread: the relay, on its own ``reactor``.

    Why: trio pays a try / EAGAIN / wait / retry and a task switch per ``recv``/``send``; here a
    1 KB message costs one ``epoll_wait`` turn and two ``splice`` calls, and bulk data never
    enters Python (BENCHMARKS.md, scenarios a and d). ``relay`` keeps ``relay.relay``'s contract.

    Start ``run`` with ``nursery.start``; then ``await engine.relay(a, b, counters=...)`` with
    two connected ``trio.SocketStream``s. Until ``run`` has started (or after it ended),
    ``available`` is False and ``relay`` hands the pair to ``relay.relay`` instead. ``run``,
    ``later``, ``connect``, ``listen`` and ``unlisten`` are the reactor's (see there), for the
    fast path, which runs on the same thread.
    """

    def __init__(self) -> None:
        self.reactor = reactor = Reactor("nodemesh-splice")
        self._pairs: set[_Pair] = set()       # adopted and not ended
        self._pipes: list[tuple[int, int]] = []
        reactor.at_stop(self._stopped)
        # the reactor's verbs as they are: no wrapper per call
        self.run, self.later, self.connect, self.listen, self.unlisten = (
            reactor.run, reactor.later, reactor.connect, reactor.listen, reactor.unlisten)

    @property
    def available(self) -> bool:
        return self.reactor.available

    def __len__(self) -> int:
        return len(self._pairs)

    # --- trio thread ----------------------------------------------------------------------------

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
            self.cancel(pair)
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
        pair = _Pair(self, a, b, counters, on_end, closing)
        self._pairs.add(pair)
        turn = pair.turn
        self.reactor.add(pair.a, IN, turn)   # the engine thread sees data from here on
        self.reactor.add(pair.b, IN, turn)
        return pair

    def cancel(self, pair: _Pair) -> None:
        """End ``pair`` as failed (its ``on_end`` runs on the engine thread); from any thread."""
        self.reactor.post(self._cancel, pair)

    # --- the engine thread ----------------------------------------------------------------------

    def _cancel(self, pair: _Pair) -> None:
        if not pair.closed:
            self._end(pair, ("a_to_b", _Cancelled("cancelled")))

    def _stopped(self) -> None:
        """The reactor's thread has ended: fail the pairs still relaying, close the pipes."""
        for pair in list(self._pairs):
            self._end(pair, ("a_to_b", _Cancelled("agent shutting down")))
        for fd in [fd for p in self._pipes for fd in p]:
            os.close(fd)
        self._pipes.clear()

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
        (the opposite direction) has bytes for it. Nothing wanted: leave the epoll set. A
        hung-up socket (both ways shut, bytes still queued behind a slow reader) would otherwise
        report EPOLLHUP on every turn."""
        mask = IN if not d.eof and not d.pending else 0
        if other.pending:
            mask |= OUT
        old = d.mask
        if mask != old:
            d.mask = mask
            self.reactor.rearm(d.src, old, mask)

    def _end(self, pair: _Pair, error: tuple[str, BaseException] | None) -> None:
        """Stop watching the pair, return its pipes and tell the trio side."""
        if pair.closed:
            return
        pair.closed = True
        pair.error = error
        self._pairs.discard(pair)
        # a closing pair's sockets are closed in finish(), which takes them out of the set
        watched = not (pair.closing and error is None)
        remove = self.reactor.remove
        for d in (pair.ab, pair.ba):
            remove(d.src, watched=watched and d.mask != 0)
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
