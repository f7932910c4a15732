"""accesslog.py: one JSON line per connection (later per request), written and flushed at once.

Owns the line format and the destination. ``write`` never raises: a destination that fails is
reported once through ``logging`` and its lines are dropped (counted in ``dropped``) until it
works again. Knows nothing of the proxy; the caller passes plain values.

A connection line (``connection_record``) has exactly these keys, in this order; a value the
reporter does not know is ``null``:

    start_time      RFC 3339 UTC with milliseconds, "2025-01-31T12:00:00.123Z"
    duration_ms     int, from accept to close
    reporter        "source" (outbound, the client's node) | "destination" (inbound)
    src             {address, workload, namespace, identity}      identity: SPIFFE URI
    dst             {address, service, workload, namespace, identity}
    protocol        "tcp" | "hbone"
    bytes_sent      int, destination -> source (the response), as Envoy's BYTES_SENT
    bytes_received  int, source -> destination (the request), as Envoy's BYTES_RECEIVED
    security        "mutual_tls" | "none"
    decision        {result: "allow"|"deny", policy: "ns/name"|null, rule: int|null, reason: str}
    response_flags  Envoy-style short flags, see metrics.RESPONSE_FLAGS ("-" when none)
    error           str | null
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

log = logging.getLogger("nodemesh.agent.accesslog")

RECORD_KEYS = ("start_time", "duration_ms", "reporter", "src", "dst", "protocol", "bytes_sent",
               "bytes_received", "security", "decision", "response_flags", "error")


class AccessLog:
    """JSON lines to ``stream`` (a text stream, default stdout) or to a file path (appended).

    A path is opened lazily on the first write and again after a failure, so a log file that
    appears later (a directory created, a disk remounted) starts receiving lines.
    """

    def __init__(self, stream: IO[str] | str | os.PathLike | None = None) -> None:
        if stream is None:
            stream = sys.stdout
        if isinstance(stream, (str, os.PathLike)):
            self._path: str | None = os.fspath(stream)
            self._stream: IO[str] | None = None
        else:
            self._path, self._stream = None, stream
        self.written = 0
        self.dropped = 0
        self._failing = False

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one compact JSON line and flush. Never raises."""
        try:
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n"
            if self._stream is None:
                self._stream = open(self._path, "a", encoding="utf-8")
            self._stream.write(line)
            self._stream.flush()
        except Exception as e:  # the data path must never fail because of its log
            self.dropped += 1
            if self._path is not None:
                self._close()
            if not self._failing:
                self._failing = True
                log.error("access log %s is failing, dropping lines until it works again: %s",
                          self._name(), e)
            return
        self.written += 1
        if self._failing:
            self._failing = False
            log.warning("access log %s works again; %d lines were dropped", self._name(), self.dropped)

    def close(self) -> None:
        """Close a file this log opened (never a stream it was given)."""
        if self._path is not None:
            self._close()

    def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass

    def _name(self) -> str:
        return self._path or getattr(self._stream, "name", repr(self._stream))


def connection_record(
    *,
    start_time: float,
    duration: float,
    reporter: str,
    src_address: str | None = None,
    src_workload: str | None = None,
    src_namespace: str | None = None,
    src_identity: str | None = None,
    dst_address: str | None = None,
    dst_service: str | None = None,
    dst_workload: str | None = None,
    dst_namespace: str | None = None,
    dst_identity: str | None = None,
    protocol: str = "tcp",
    bytes_sent: int = 0,
    bytes_received: int = 0,
    security: str = "none",
    decision: str = "allow",
    policy: str | None = None,
    rule: int | None = None,
    reason: str = "",
    response_flags: str = "-",
    error: str | None = None,
) -> dict[str, Any]:
    """The access-log record of one connection (keys in the module docstring).

    ``start_time`` is Unix time (``time.time()`` at accept); ``duration`` is in seconds. Empty
    strings become ``null``.
    """
    return {
        "start_time": rfc3339(start_time),
        "duration_ms": max(0, round(duration * 1000)),
        "reporter": reporter,
        "src": {"address": src_address or None, "workload": src_workload or None,
                "namespace": src_namespace or None, "identity": src_identity or None},
        "dst": {"address": dst_address or None, "service": dst_service or None,
                "workload": dst_workload or None, "namespace": dst_namespace or None,
                "identity": dst_identity or None},
        "protocol": protocol,
        "bytes_sent": bytes_sent,
        "bytes_received": bytes_received,
        "security": security,
        "decision": {"result": decision, "policy": policy or None, "rule": rule, "reason": reason},
        "response_flags": response_flags,
        "error": error or None,
    }


def rfc3339(when: float) -> str:
    """Unix time as RFC 3339 UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
