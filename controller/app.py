"""app.py: the controller's composition root — the one place that wires its parts.

Opens the store and the identity ledger, loads the CA, and serves the API (15012) and metrics
(15014) until cancelled or signalled (SIGTERM/SIGINT), closing both databases on the way out.
"""
from __future__ import annotations

import datetime as dt
import logging
import signal
import ssl

import trio

from controller import datadir, sdnotify
from controller.ca import CertificateAuthority
from controller.handlers import Api
from controller.httpd import Response, serve
from controller.identity_api import IdentityApi
from controller.ledger import Ledger
from controller.metrics import CONTENT_TYPE, ControllerMetrics
from controller.store import Store
from controller.watch import Hub

log = logging.getLogger("nodemesh.controller")


class _ServerTls:
    """The API's TLS context, rebuilt when the CA rotates or a retired root's grace ends."""

    def __init__(self, d: datadir.DataDir, ca: CertificateAuthority):
        self.d, self.ca = d, ca
        self._key: tuple | None = None
        self._ctx: ssl.SSLContext | None = None

    def invalidate(self) -> None:
        self._key = None

    def __call__(self) -> ssl.SSLContext:
        bundle = self.ca.bundle_pem(dt.datetime.now(dt.timezone.utc))
        key = (bundle, self.d.server_cert.stat().st_mtime_ns)
        if key != self._key:
            self._ctx, self._key = datadir.server_ssl_context(self.d, bundle), key
        return self._ctx


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
    ca = CertificateAuthority.from_datadir(d)
    tls = _ServerTls(d, ca)
    store = Store.open(d.store)
    ledger = Ledger(d.identity_db)
    try:
        hub = Hub(store.revision)
        metrics = ControllerMetrics(counts=store.counts, size_bytes=store.size_bytes,
                                    revision=lambda: store.revision, watchers=lambda: hub.watchers)
        identity = IdentityApi(d=d, settings=settings, ca=ca, ledger=ledger, store=store, on_rotate=tls.invalidate)
        handler = Api(store=store, hub=hub, metrics=metrics, trust_domain=settings.trust_domain,
                      routes=identity.routes())

        async def metrics_handler(req):
            if req.path != "/metrics":
                return Response.json(404, {"message": "see /metrics"})
            return Response(200, metrics.render(), CONTENT_TYPE)

        async with trio.open_nursery() as nursery:
            bound_api = await nursery.start(lambda task_status: serve(
                handler, api_host, api_port, ssl_context=tls, task_status=task_status))
            bound_metrics = await nursery.start(lambda task_status: serve(
                metrics_handler, metrics_host, metrics_port, task_status=task_status))
            log.info("controller for trust domain %s: API https://%s:%d, metrics http://%s:%d/metrics, "
                     "store %s at resourceVersion %d", settings.trust_domain, api_host, bound_api,
                     metrics_host, bound_metrics, d.store, store.revision)
            task_status.started((bound_api, bound_metrics))
            sdnotify.notify("READY=1", f"STATUS=serving resourceVersion {store.revision} on :{bound_api}")
            if (interval := sdnotify.watchdog_interval()) is not None:
                nursery.start_soon(sdnotify.feed_watchdog, interval)
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
    finally:
        store.close()
        ledger.close()


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            log.info("received %s, shutting down", signal.Signals(sig).name)
            sdnotify.notify("STOPPING=1")
            scope.cancel()
            return
