"""metrics.py: the controller's Prometheus metrics (served on 15014).

One registry per controller (never the global one, so tests can run several side by side).
Gauges about the store and watchers are read at scrape time from callables; this module
imports neither the store nor trio.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ControllerMetrics:
    def __init__(
        self,
        *,
        counts: Callable[[], dict[str, int]],
        size_bytes: Callable[[], int],
        revision: Callable[[], int],
        watchers: Callable[[], int],
    ):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nodemesh_controller_api_requests",
            "API requests served, by verb and HTTP status code.",
            ["verb", "code"],
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(counts, size_bytes, revision, watchers))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, counts, size_bytes, revision, watchers):
        self._counts, self._size, self._revision, self._watchers = counts, size_bytes, revision, watchers

    def collect(self):
        objects = GaugeMetricFamily(
            "nodemesh_controller_store_objects", "Resources in the store, by kind.", labels=["kind"])
        for kind, n in sorted(self._counts().items()):
            objects.add_metric([kind], n)
        yield objects
        yield GaugeMetricFamily(
            "nodemesh_controller_store_size_bytes", "Size of the store's database file.",
            value=self._size())
        yield GaugeMetricFamily(
            "nodemesh_controller_resource_version",
            "The store's current resourceVersion (global revision).", value=self._revision())
        yield GaugeMetricFamily(
            "nodemesh_controller_watchers", "Open watch streams.", value=self._watchers())
