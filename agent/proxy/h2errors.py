"""h2errors.py: the HBONE tunnel's error types (HTTP/2 level), shared by h2conn and h2stream.

No I/O. Local and remote protocol errors are kept apart (h11 style); every error is an
HboneError, so a per-connection task ends in one except.
"""
from __future__ import annotations

import h2.errors

from agent.proxy import ProxyError

CANCEL = h2.errors.ErrorCodes.CANCEL
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR

Headers = list[tuple[bytes, bytes]]


class HboneError(ProxyError):
    """Base of the HBONE tunnel's errors."""


class StreamReset(HboneError):
    """A stream ended by RST_STREAM; ``remote`` tells who reset it (RFC 9113 §6.4)."""

    def __init__(self, error_code: int, remote: bool = True) -> None:
        super().__init__(error_code, remote)   # args kept whole, so copy.copy() works
        self.error_code = int(error_code)
        self.remote = remote

    def __str__(self) -> str:
        return f"stream reset by {'peer' if self.remote else 'us'} ({_code_name(self.error_code)})"


class ProtocolError(HboneError):
    """An HTTP/2 protocol violation; see the Local/Remote subclasses for whose."""

    def __init__(self, detail: str, error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(detail, error_code)
        self.detail = detail
        self.error_code = int(error_code)

    def __str__(self) -> str:
        return f"{self.detail} ({_code_name(self.error_code)})"


class LocalProtocolError(ProtocolError):
    """We tried something HTTP/2 forbids in the connection's current state."""


class RemoteProtocolError(ProtocolError):
    """The peer broke HTTP/2; the connection is torn down with GOAWAY."""


class ConnectionLost(HboneError):
    """The connection under a stream failed or closed before the stream finished."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"
