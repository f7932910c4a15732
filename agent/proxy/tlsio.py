"""tlsio.py: one TLS connection over a non-blocking socket, its record I/O done in C.

Owns the bytes between an ``ssl.SSLObject`` (over two memory BIOs) and a plain non-blocking
socket that trio only polls (``wait_readable``/``wait_writable``). Writes are synchronous when
the kernel takes them, so a caller can write from its own task without a hand-off, and a write
can never be half-cancelled; ``finish_send`` completes what the kernel could not take at once.
Knows nothing of HTTP/2 or identities: certificate checks are the context's and the caller's.
(trio.SSLStream does the same job as a Python state machine; per small record it costs several
times more CPU.) ``Wire`` names that write interface for its users (h2conn); ``StreamWire``
gives it to any trio stream, every write then going through ``finish_send``.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
from typing import Protocol

import trio

_RECV_SIZE = 256 * 1024
_scratch = threading.local()


def _read_buffers() -> tuple[memoryview, memoryview]:
    """This thread's two read buffers (ciphertext, plaintext), shared by its connections.

    Sharing is safe because every use is synchronous: filled and copied out with no await
    in between. One pair per thread keeps idle connections small (512 KiB each otherwise).
    """
    try:
        return _scratch.views
    except AttributeError:
        _scratch.views = (memoryview(bytearray(_RECV_SIZE)), memoryview(bytearray(_RECV_SIZE)))
        return _scratch.views


class Wire(Protocol):
    """A transport written synchronously where the kernel allows (TlsTransport, StreamWire)."""

    def try_send(self, data: bytes) -> bool: ...      # sync; False: finish_send must run
    def queue(self, data: bytes) -> None: ...         # sync; sent by the next finish_send
    async def finish_send(self) -> None: ...
    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...
    @property
    def unsent(self) -> int: ...                      # bytes queued, not yet taken by the kernel


class StreamWire:
    """A trio stream as a Wire: every write goes through ``finish_send``."""

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


class TlsTransport:
    """TLS over ``sock`` (a connected stdlib socket this object now owns).

    Call ``do_handshake`` first. Then one task may be in ``receive_some`` while another
    writes: ``try_send``/``queue`` (synchronous) and ``finish_send`` (one task at a time).
    Errors surface as ``trio.BrokenResourceError`` whose ``__cause__`` is the ssl/OS error;
    use after ``aclose`` raises ``trio.ClosedResourceError``.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._pending = bytearray()   # ciphertext the kernel did not take yet
        self._closed = False
        self._eof = False             # the peer's close_notify was read: b"" from now on
        self._error: BaseException | None = None   # a read error behind data already returned

    @classmethod
    def over(cls, stream: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None = None, share: bool = False) -> TlsTransport:
        """Take ``stream``'s socket over: the stream is left closed and must not be used; with
        ``share`` the stream stays open on a duplicate of the socket (its owner may still ask
        it for addresses and must close it too; the connection ends when both are closed)."""
        fd = os.dup(stream.socket.fileno()) if share else stream.socket.detach()
        return cls(socket.socket(fileno=fd), context, server_side=server_side,
                   server_hostname=server_hostname)

    @classmethod
    def take_over(cls, tls: trio.SSLStream) -> TlsTransport | None:
        """The same connection as ``tls`` (a trio.SSLStream not yet handshaken, over a TCP
        socket) with the same context and side; None if ``tls`` is anything else.

        ``tls`` must not be used afterwards, but its ``transport_stream`` stays open (its
        owner may hold it for the peer's address): close it as well when done.
        """
        once = getattr(tls, "_handshook", None)
        transport = getattr(tls, "transport_stream", None)
        if (not isinstance(tls, trio.SSLStream) or once is None or getattr(once, "started", True)
                or type(transport) is not trio.SocketStream):
            return None
        return cls.over(transport, tls.context, server_side=tls.server_side,
                        server_hostname=tls.server_hostname, share=True)

    # --- what the handshake established (the same calls as ssl.SSLObject) ---------------

    def getpeercert(self, binary_form: bool = False):
        return self._ssl.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def version(self) -> str | None:
        return self._ssl.version()

    def getpeername(self):
        return self._sock.getpeername()

    # --- I/O -------------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (with the context's verification) to its end."""
        self._check_open()
        while True:
            try:
                self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except (ssl.SSLError, OSError) as e:
                self._push_quietly()        # the alert, if any, so the peer learns why
                raise trio.BrokenResourceError(f"TLS handshake failed: {e!r}") from e
            await self.finish_send()
            if done:
                return
            await self._fill()

    @property
    def unsent(self) -> int:
        """Ciphertext queued that the kernel has not taken yet."""
        return len(self._pending) + self._out.pending

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext from the peer, at most ``max_bytes``; b"" once the peer has closed with
        close_notify. A TCP close without it (a truncation) or a bad record raises
        ``trio.BrokenResourceError``, as trio.SSLStream does — after the data before it."""
        if self._closed:
            raise trio.ClosedResourceError("TLS connection was closed")
        if self._error is not None:
            raise trio.BrokenResourceError(f"TLS read failed: {self._error!r}") from self._error
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        n = min(max_bytes or _RECV_SIZE, _RECV_SIZE)
        tls, incoming = self._ssl, self._in
        view = _read_buffers()[1]
        while True:
            # Ask TLS only when it has bytes to work on: a refusal (SSLWantReadError) costs
            # more than the decryption of a small record.
            if not (incoming.pending or tls.pending() or incoming.eof):
                await self._fill()
                continue
            try:
                # Into a buffer kept for the purpose: a fresh 256 KiB bytes object per read
                # costs an mmap, an mremap and a munmap in malloc.
                got = tls.read(n, view)
            except ssl.SSLWantReadError:
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                self._eof = True
                return b""
            except (ssl.SSLError, OSError) as e:    # SSLEOFError: TCP closed, no close_notify
                self._error = e
                raise trio.BrokenResourceError(f"TLS read failed: {e!r}") from e
            if not got:
                self._eof = True
                return b""
            while got < n and incoming.pending:      # further whole records already here
                try:
                    more = tls.read(n - got, view[got:])
                except ssl.SSLWantReadError:
                    break                            # an incomplete record: later
                except ssl.SSLZeroReturnError:
                    self._eof = True                 # close_notify after the data
                    break
                except (ssl.SSLError, OSError) as e:
                    self._error = e                  # raised by the next read, after this data
                    break
                if not more:
                    self._eof = True
                    break
                got += more
            if self._out.pending:          # TLS itself answered something (key update)
                self._push_quietly()
            return bytes(view[:got])

    async def _fill(self) -> None:
        """Wait for ciphertext and feed it to TLS (EOF included)."""
        await trio.lowlevel.wait_readable(self._sock)
        cipher = _read_buffers()[0]
        try:
            n = self._sock.recv_into(cipher)
        except BlockingIOError:
            return
        except OSError as e:
            raise trio.BrokenResourceError(f"socket read failed: {e!r}") from e
        if n:
            self._in.write(cipher[:n])
        else:
            self._in.write_eof()

    def queue(self, data: bytes) -> None:
        """Encrypt ``data`` for sending later (by ``try_send`` or ``finish_send``)."""
        if self._closed:
            raise trio.ClosedResourceError("TLS connection was closed")
        if data:
            try:
                self._ssl.write(data)
            except (ssl.SSLError, OSError) as e:
                raise trio.BrokenResourceError(f"TLS write failed: {e!r}") from e

    def try_send(self, data: bytes) -> bool:
        """Encrypt ``data`` and give the kernel all it takes now, without blocking.

        Returns True when nothing is left over, False when ``finish_send`` must run.
        """
        self.queue(data)          # the common case: one record, then one send in _push
        return self._push()

    async def finish_send(self) -> None:
        """Send everything queued so far, waiting for the socket as needed."""
        while not self._push():
            await trio.lowlevel.wait_writable(self._sock)

    def _push(self) -> bool:
        if self._closed:
            raise trio.ClosedResourceError("TLS connection was closed")
        out = self._out.read() if self._out.pending else b""
        if self._pending:
            self._pending += out
            buf: bytes | bytearray = self._pending
        elif out:
            buf = out
        else:
            return True
        try:
            sent = self._sock.send(buf)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise trio.BrokenResourceError(f"socket write failed: {e!r}") from e
        if sent == len(buf):
            self._pending.clear()
            return True
        if buf is self._pending:
            del self._pending[:sent]
        else:
            self._pending += memoryview(buf)[sent:]
        return False

    def _push_quietly(self) -> None:
        try:
            self._push()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS connection was closed")

    async def aclose(self) -> None:
        """Send close_notify (with what is still queued, as far as the socket takes it
        while the caller waits), then close the socket."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            try:
                self._ssl.unwrap()
            except (ssl.SSLError, OSError):
                pass                        # close_notify queued; the peer's is not awaited
            try:
                await self.finish_send()
            except trio.BrokenResourceError:
                pass
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket now (no close_notify)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
