"""accesslog.py: one JSON line per connection (later per request), written and flushed at once
(or, for a batch of reports, at the end of the batch).

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
from json.encoder import encode_basestring
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
        except Exception as e:
            self._failed(e)
            return
        self.write_line(line)

    def write_line(self, line: str, *, flush: bool = True) -> None:
        """Write one finished JSON line (ending in a newline); flush unless told not to (a batch
        calls ``flush`` once at its end). Never raises."""
        try:
            if self._stream is None:
                self._stream = open(self._path, "a", encoding="utf-8")
            self._stream.write(line)
            if flush:
                self._stream.flush()
        except Exception as e:  # the data path must never fail because of its log
            self._failed(e)
            return
        self.written += 1
        if self._failing:
            self._failing = False
            log.warning("access log %s works again; %d lines were dropped", self._name(), self.dropped)

    def flush(self) -> None:
        """Flush lines written with ``flush=False``. Never raises."""
        try:
            if self._stream is not None:
                self._stream.flush()
        except Exception as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.dropped += 1
        if self._path is not None:
            self._close()
        if not self._failing:
            self._failing = True
            log.error("access log %s is failing, dropping lines until it works again: %s",
                      self._name(), e)

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


def connection_record(**fields: Any) -> dict[str, Any]:
    """The access-log record of one connection as a dict (keys in the module docstring); takes
    ``connection_line``'s arguments and is exactly its line, decoded."""
    return json.loads(connection_line(**fields))


def connection_line(
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
) -> str:
    """The access-log line of one connection: compact JSON, keys in the module docstring's
    order, ending in a newline (what ``json.dumps`` with ``ensure_ascii=False`` would write, at
    a tenth of its cost: this runs once per connection).

    ``start_time`` is Unix time (``time.time()`` at accept); ``duration`` is in seconds. Empty
    strings become ``null``.
    """
    s = encode_basestring
    return (f'{{"start_time":"{rfc3339(start_time)}","duration_ms":{max(0, round(duration * 1000))},'
            f'"reporter":{s(reporter)},'
            f'"src":{{"address":{_opt(src_address)},"workload":{_opt(src_workload)},'
            f'"namespace":{_opt(src_namespace)},"identity":{_opt(src_identity)}}},'
            f'"dst":{{"address":{_opt(dst_address)},"service":{_opt(dst_service)},'
            f'"workload":{_opt(dst_workload)},"namespace":{_opt(dst_namespace)},'
            f'"identity":{_opt(dst_identity)}}},'
            f'"protocol":{s(protocol)},"bytes_sent":{int(bytes_sent)},'
            f'"bytes_received":{int(bytes_received)},"security":{s(security)},'
            f'"decision":{{"result":{s(decision)},"policy":{_opt(policy)},'
            f'"rule":{"null" if rule is None else int(rule)},"reason":{s(str(reason))}}},'
            f'"response_flags":{s(response_flags)},"error":{_opt(error)}}}\n')


def _opt(value: Any) -> str:
    """A JSON string, or null for None and the empty string."""
    return encode_basestring(value if isinstance(value, str) else str(value)) if value else "null"


_second: tuple[int, str] = (-1, "")   # the Unix second last formatted, its "YYYY-MM-DDTHH:MM:SS"


def rfc3339(when: float) -> str:
    """Unix time as RFC 3339 UTC with milliseconds: ``2025-01-31T12:00:00.123Z``.

    The date and time of day are formatted once per second (the last second is remembered);
    the milliseconds are added to it."""
    global _second
    sec, us = divmod(round(when * 1_000_000), 1_000_000)   # to the µs first, as datetime does
    last, text = _second
    if last != sec:
        text = datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (sec, text)
    ms = us // 1000
    return f"{text}.{ms:03d}Z"
