"""metrics.py: the agent's Prometheus metrics (served on 15020), with Istio's label names.

Owns the counters the data path moves and the gauges read at scrape time. One registry per
agent, never the global one. The hot path (``connection_opened`` / ``connection_closed`` /
``add_bytes``) is one dict lookup on a ``ConnectionLabels`` (hash cached) and a few integer
adds on its cell; call it from the trio thread. Imports neither trio nor agent/proxy.

Metrics (DESIGN.md "Observability"; names and labels are a contract):

- ``nodemesh_tcp_connections_opened_total``, ``nodemesh_tcp_connections_closed_total``,
  ``nodemesh_tcp_sent_bytes_total``, ``nodemesh_tcp_received_bytes_total`` — labels
  ``CONNECTION_LABELS``. As in Istio, *sent* is destination -> source (the response) and
  *received* is source -> destination (the request). Bytes are counted when the connection
  closes; a long connection may report earlier with ``add_bytes`` (then ``connection_closed``
  takes only what is not yet reported).
- ``nodemesh_requests_total`` — ``CONNECTION_LABELS`` + ``response_code``, ``request_protocol``;
  ``nodemesh_request_duration_seconds`` histogram — the same minus ``response_flags`` (L7).
- ``nodemesh_policy_denials_total{policy, rule, reporter, destination_workload,
  destination_workload_namespace}``.
- ``nodemesh_certificate_expiry_timestamp_seconds{identity}``, ``nodemesh_config_version``,
  ``nodemesh_config_rejected_total``, ``nodemesh_listeners{state}`` — read from callables.

``response_flags`` are Envoy-style short flags: ``-`` ok, ``UF`` upstream connect failure,
``UH`` no healthy upstream (no endpoints), ``NR`` no route, ``DENY`` denied by policy, and
nodemesh's own ``PT`` passthrough (destination outside the mesh).
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# prometheus_client is imported at the first scrape, not here: it pulls in http.server, wsgiref,
# email, urllib.request and gzip (~2 MB of a bare agent's RSS) that an agent nobody scrapes never needs.

log = logging.getLogger("nodemesh.agent.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

UNKNOWN = "unknown"  # Istio's value for a label the reporter cannot know

RESPONSE_FLAGS = {
    "-": "no flag: the connection or request completed normally",
    "UF": "upstream connection failure",
    "UH": "no healthy upstream (the service has no endpoints)",
    "NR": "no route for the destination",
    "DENY": "denied by authorization policy (or by the destination's)",
    "PT": "passthrough: the destination is outside the mesh",
}

# Seconds; Istio's millisecond buckets (0.5 ms .. 30 s) in seconds, plus the long tail.
DURATION_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0)


@dataclass(frozen=True, eq=False, slots=True)
class ConnectionLabels:
    """The label values of one connection, in ``CONNECTION_LABELS`` order.

    Hash and equality use a tuple built once at construction, so looking one up on the data
    path costs no allocation. Unknown values are ``"unknown"`` as in Istio; principals are full
    SPIFFE URIs (``spiffe://cluster.local/ns/shop/sa/web``).
    """

    reporter: str                                   # "source" | "destination"
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    connection_security_policy: str = "none"        # "mutual_tls" | "none"
    response_flags: str = "-"                        # see RESPONSE_FLAGS
    _key: tuple = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = tuple(getattr(self, name) for name in CONNECTION_LABELS)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConnectionLabels):
            return NotImplemented
        return self._key == other._key

    def values(self) -> tuple[str, ...]:
        """The label values in ``CONNECTION_LABELS`` order."""
        return self._key


CONNECTION_LABELS: tuple[str, ...] = tuple(
    f.name for f in fields(ConnectionLabels) if not f.name.startswith("_"))
REQUEST_LABELS = CONNECTION_LABELS + ("response_code", "request_protocol")
DURATION_LABELS = tuple(n for n in REQUEST_LABELS if n != "response_flags")
DENIAL_LABELS = ("policy", "rule", "reporter", "destination_workload", "destination_workload_namespace")


class _TcpCell:
    __slots__ = ("opened", "closed", "sent", "received")

    def __init__(self) -> None:
        self.opened = self.closed = self.sent = self.received = 0


class _RequestCell:
    __slots__ = ("count", "buckets", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)   # per bucket, not cumulative; last is +Inf
        self.sum = 0.0


class AgentMetrics:
    """The agent's metrics; ``render()`` is the /metrics body.

    The callables are read at every scrape; one that raises is logged and its metric left out
    of that scrape, so a broken source never breaks /metrics.
    """

    def __init__(
        self,
        *,
        cert_expiry: Callable[[], Mapping[str, float]] | None = None,
        config_version: Callable[[], int] | None = None,
        config_rejected: Callable[[], int] | None = None,
        listeners: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._tcp: dict[ConnectionLabels, _TcpCell] = {}
        self._requests: dict[tuple[ConnectionLabels, str, str], _RequestCell] = {}
        self._denials: dict[tuple[str, ...], int] = {}
        self._cert_expiry, self._config_version = cert_expiry, config_version
        self._config_rejected, self._listeners = config_rejected, listeners
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """This agent's own registry (never the global one), made at the first scrape."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry   # at the first scrape: see the imports
            self._registry = CollectorRegistry()
            self._registry.register(_Collector(self))
        return self._registry

    # --- data path ---------------------------------------------------------------------------

    def _cell(self, labels: ConnectionLabels) -> _TcpCell:
        cell = self._tcp.get(labels)
        if cell is None:
            cell = self._tcp[labels] = _TcpCell()
        return cell

    def connection_opened(self, labels: ConnectionLabels) -> None:
        """Count one opened connection."""
        self._cell(labels).opened += 1

    def connection_closed(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """Count one closed connection and its bytes not yet reported with ``add_bytes``.

        ``sent``: destination -> source (response); ``received``: source -> destination (request).
        """
        cell = self._cell(labels)
        cell.closed += 1
        cell.sent += sent
        cell.received += received

    def add_bytes(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        """Report bytes of a connection still open (a delta since its last report)."""
        cell = self._cell(labels)
        cell.sent += sent
        cell.received += received

    def request_finished(self, labels: ConnectionLabels, *, response_code: int, protocol: str,
                         duration: float) -> None:
        """Count one HTTP request (L7) and observe its duration in seconds.

        ``protocol`` is Istio's request_protocol: ``http`` or ``grpc``.
        """
        key = (labels, str(response_code), protocol)
        cell = self._requests.get(key)
        if cell is None:
            cell = self._requests[key] = _RequestCell()
        cell.count += 1
        cell.sum += duration
        cell.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1

    def policy_denied(self, *, policy: str | None, rule: int | None, reporter: str,
                      destination_workload: str, destination_workload_namespace: str) -> None:
        """Count one denial. ``policy`` is "ns/name" (None: "unknown"); ``rule`` its index (None: "")."""
        key = (policy or UNKNOWN, "" if rule is None else str(rule), reporter,
               destination_workload or UNKNOWN, destination_workload_namespace or UNKNOWN)
        self._denials[key] = self._denials.get(key, 0) + 1

    # --- scrape ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``)."""
        from prometheus_client import generate_latest   # at the first scrape: see the imports
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, m: AgentMetrics) -> None:
        self._m = m

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        m = self._m
        tcp = [
            ("nodemesh_tcp_connections_opened", "TCP connections opened.", "opened"),
            ("nodemesh_tcp_connections_closed", "TCP connections closed.", "closed"),
            ("nodemesh_tcp_sent_bytes", "Bytes sent destination -> source (the response), "
             "counted when the connection closes.", "sent"),
            ("nodemesh_tcp_received_bytes", "Bytes received source -> destination (the request), "
             "counted when the connection closes.", "received"),
        ]
        cells = list(m._tcp.items())
        for name, doc, attr in tcp:
            family = CounterMetricFamily(name, doc, labels=CONNECTION_LABELS)
            for labels, cell in cells:
                family.add_metric(labels.values(), getattr(cell, attr))
            yield family

        requests = CounterMetricFamily("nodemesh_requests", "HTTP requests (L7).", labels=REQUEST_LABELS)
        durations: dict[tuple[str, ...], _RequestCell] = {}
        for (labels, code, protocol), cell in list(m._requests.items()):
            requests.add_metric(labels.values() + (code, protocol), cell.count)
            key = tuple(v for n, v in zip(REQUEST_LABELS, labels.values() + (code, protocol))
                        if n != "response_flags")
            merged = durations.setdefault(key, _RequestCell())
            merged.count += cell.count
            merged.sum += cell.sum
            merged.buckets = [a + b for a, b in zip(merged.buckets, cell.buckets)]
        yield requests
        histogram = HistogramMetricFamily("nodemesh_request_duration_seconds",
                                          "HTTP request duration in seconds (L7).", labels=DURATION_LABELS)
        for key, cell in durations.items():
            cumulative, running = [], 0
            for bound, n in zip((*map(_float_str, DURATION_BUCKETS), "+Inf"), cell.buckets):
                running += n
                cumulative.append((bound, running))
            histogram.add_metric(key, cumulative, cell.sum)
        yield histogram

        denials = CounterMetricFamily("nodemesh_policy_denials",
                                      "Connections or requests denied by authorization policy.",
                                      labels=DENIAL_LABELS)
        for key, n in list(m._denials.items()):
            denials.add_metric(key, n)
        yield denials

        expiry = _read(m._cert_expiry, "certificate expiry")
        if expiry is not None:
            family = GaugeMetricFamily("nodemesh_certificate_expiry_timestamp_seconds",
                                       "When each workload certificate expires (Unix time).",
                                       labels=["identity"])
            for uri, when in sorted(expiry.items()):
                family.add_metric([uri], float(when))
            yield family
        version = _read(m._config_version, "config version")
        if version is not None:
            yield GaugeMetricFamily("nodemesh_config_version",
                                    "The resourceVersion of the snapshot being served.", value=version)
        rejected = _read(m._config_rejected, "config rejections")
        if rejected is not None:
            yield CounterMetricFamily("nodemesh_config_rejected",
                                      "Config updates rejected (the last good one kept).", value=rejected)
        listeners = _read(m._listeners, "listeners")
        if listeners is not None:
            family = GaugeMetricFamily("nodemesh_listeners", "Proxy listeners, by state.", labels=["state"])
            for state, n in sorted(listeners.items()):
                family.add_metric([state], n)
            yield family


def _float_str(bound: float) -> str:
    return repr(float(bound))


def _read(source: Callable | None, what: str):
    if source is None:
        return None
    try:
        return source()
    except Exception:  # a broken source must never break the scrape
        log.exception("metrics: reading %s failed; leaving it out of this scrape", what)
        return None
