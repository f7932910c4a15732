"""record.py: ``ConnRecord``, what the data path fills in about one connection as it goes.

The proxy writes it, ``telemetry`` turns it into metrics and an access-log line. Plain data:
no I/O, and nothing here knows how a connection is proxied.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from controller.api import Workload


@dataclass
class ConnRecord:
    """Facts about one proxied connection, filled in as it goes (see agent/observe)."""

    reporter: str                      # "source" (outbound) or "destination" (inbound)
    src_address: str
    src_workload: Workload | None = None
    src_identity: str = ""
    dst_address: str = ""
    dst_service: str = ""
    dst_workload: Workload | None = None
    dst_identity: str = ""
    protocol: str = "tcp"              # tcp | hbone
    security: str = "none"             # mutual_tls | none
    decision: str = "allow"            # allow | deny
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    flags: str = "-"
    error: str | None = None
    request_bytes: int = 0             # source -> destination (Istio's tcp_received_bytes)
    response_bytes: int = 0            # destination -> source (Istio's tcp_sent_bytes)
    opened: bool = False               # counted as opened (telemetry sets it)
    start_wall: float = field(default_factory=time.time)
    start: float = field(default_factory=time.monotonic)
    end: float | None = None           # monotonic time it closed, when reported later than that
