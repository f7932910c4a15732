"""telemetry.py: the proxy's ``telemetry`` object — turns a finished connection record into
metrics (metrics.py) and one access-log line (accesslog.py).

The proxy calls ``opened(rec)`` once a connection is set up (destination decided and reached)
and ``closed(rec)`` in its ``finally`` (see agent/proxy/inbound.py), each counted with the
labels known at that moment, as Istio does. A connection refused before it was set up (denied,
no route) is counted as opened and closed at close. ``rec`` is read by
attribute only (agent/observe/record.py ``ConnRecord``), so this module imports nothing of the
proxy. Never raises: a failure is logged and that connection's report is dropped.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable

from agent.observe.accesslog import AccessLog, connection_line
from agent.observe.metrics import UNKNOWN, AgentMetrics, ConnectionLabels

log = logging.getLogger("nodemesh.agent.telemetry")


class Telemetry:
    def __init__(self, metrics: AgentMetrics, access_log: AccessLog | None = None) -> None:
        self.metrics, self.access_log = metrics, access_log

    def opened(self, rec: Any) -> None:
        """Count a connection the proxy has set up (its destination is known by then)."""
        try:
            self.metrics.connection_opened(labels_of(rec))
            rec.opened = True
        except Exception:  # telemetry must never break the data path
            log.exception("counting an opened connection failed")

    def report(self, batch: Iterable[tuple[bool, Any]]) -> None:
        """``opened(rec)`` (when the flag is true) or ``closed(rec)`` for each of a batch, in
        order, with one flush of the access log at the end."""
        for opened, rec in batch:
            if opened:
                self.opened(rec)
            else:
                self.closed(rec, flush=False)
        if self.access_log is not None:
            self.access_log.flush()

    def closed(self, rec: Any, *, flush: bool = True) -> None:
        """Count the connection's close, its bytes and a denial, and write its access-log line
        (flushed unless ``flush`` is false: ``report`` flushes once per batch).

        A connection refused before it was set up (denied, no route) counts as opened here.
        """
        try:
            labels = labels_of(rec)
            m = self.metrics
            if not getattr(rec, "opened", False):
                m.connection_opened(labels)
            m.connection_closed(labels, sent=rec.response_bytes, received=rec.request_bytes)
            if rec.decision == "deny":
                m.policy_denied(policy=rec.policy, rule=rec.rule, reporter=rec.reporter,
                                destination_workload=labels.destination_workload,
                                destination_workload_namespace=labels.destination_workload_namespace)
            if self.access_log is not None:
                self.access_log.write_line(line_of(rec), flush=flush)
        except Exception:  # telemetry must never break the data path
            log.exception("reporting a connection failed; dropping its metrics and log line")


_LABELS: dict[tuple, ConnectionLabels] = {}   # interned: a connection's labels are built once
_LABELS_MAX = 50_000                           # per distinct label set, not per connection


def labels_of(rec: Any) -> ConnectionLabels:
    """The metric labels of a connection record (the same object for equal labels)."""
    src, dst = rec.src_workload, rec.dst_workload
    if src is not None:
        sw, sn = src.metadata.name, src.metadata.namespace
    else:
        sw = sn = UNKNOWN
    if dst is not None:
        dw, dn = dst.metadata.name, dst.metadata.namespace
    else:
        dw = dn = UNKNOWN
    key = (rec.reporter, sw, sn, rec.src_identity or UNKNOWN, dw, dn, rec.dst_identity or UNKNOWN,
           rec.dst_service or UNKNOWN, rec.security, rec.flags or "-")   # CONNECTION_LABELS order
    labels = _LABELS.get(key)
    if labels is None:
        if len(_LABELS) >= _LABELS_MAX:
            _LABELS.clear()
        labels = _LABELS[key] = ConnectionLabels(*key)
    return labels


def line_of(rec: Any, *, now: float | None = None) -> str:
    """The access-log line of a connection record; ``now`` is ``time.monotonic()`` at close."""
    src, dst = rec.src_workload, rec.dst_workload
    if now is None:
        now = getattr(rec, "end", None) or time.monotonic()
    return connection_line(
        start_time=rec.start_wall, duration=now - rec.start, reporter=rec.reporter,
        src_address=rec.src_address,
        src_workload=src.metadata.name if src is not None else None,
        src_namespace=src.metadata.namespace if src is not None else None,
        src_identity=rec.src_identity,
        dst_address=rec.dst_address, dst_service=rec.dst_service,
        dst_workload=dst.metadata.name if dst is not None else None,
        dst_namespace=dst.metadata.namespace if dst is not None else None,
        dst_identity=rec.dst_identity,
        protocol=rec.protocol, bytes_sent=rec.response_bytes, bytes_received=rec.request_bytes,
        security=rec.security, decision=rec.decision, policy=rec.policy, rule=rec.rule,
        reason=rec.reason, response_flags=rec.flags or "-", error=rec.error,
    )


def record_of(rec: Any, *, now: float | None = None) -> dict:
    """The access-log record of a connection record, as a dict (``line_of`` decoded)."""
    return json.loads(line_of(rec, now=now))
