"""app.py: the controller's composition root — the one place that wires its parts.

Opens the store, builds the TLS context, and serves the API (15012) and metrics (15014)
until cancelled or signalled (SIGTERM/SIGINT), closing the store on the way out.
"""
from __future__ import annotations

import logging
import signal

import trio

from controller import datadir
from controller.handlers import Api
from controller.httpd import Response, serve
from controller.metrics import CONTENT_TYPE, ControllerMetrics
from controller.store import Store
from controller.watch import Hub

log = logging.getLogger("nodemesh.controller")


async def run(
    d: datadir.DataDir,
    *,
    api_host: str = "0.0.0.0",
    api_port: int = 15012,
    metrics_host: str = "0.0.0.0",
    metrics_port: int = 15014,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the controller; ``task_status.started((api_port, metrics_port))`` once both listen."""
    settings = datadir.load_settings(d)
    ssl_context = datadir.server_ssl_context(d)
    store = Store.open(d.store)
    try:
        hub = Hub(store.revision)
        metrics = ControllerMetrics(counts=store.counts, size_bytes=store.size_bytes,
                                    revision=lambda: store.revision, watchers=lambda: hub.watchers)
        handler = Api(store=store, hub=hub, metrics=metrics, trust_domain=settings.trust_domain)

        async def metrics_handler(req):
            if req.path != "/metrics":
                return Response.json(404, {"message": "see /metrics"})
            return Response(200, metrics.render(), CONTENT_TYPE)

        async with trio.open_nursery() as nursery:
            bound_api = await nursery.start(lambda task_status: serve(
                handler, api_host, api_port, ssl_context=ssl_context, task_status=task_status))
            bound_metrics = await nursery.start(lambda task_status: serve(
                metrics_handler, metrics_host, metrics_port, task_status=task_status))
            log.info("controller for trust domain %s: API https://%s:%d, metrics http://%s:%d/metrics, "
                     "store %s at resourceVersion %d", settings.trust_domain, api_host, bound_api,
                     metrics_host, bound_metrics, d.store, store.revision)
            task_status.started((bound_api, bound_metrics))
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
    finally:
        store.close()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("received %s, shutting down", signal.Signals(sig).name)
            scope.cancel()
            return
