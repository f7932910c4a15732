"""agent/proxy: the node proxy's data path (listeners, HBONE tunnel, byte relay, live connections).

Rule: modules here move bytes and enforce decisions made elsewhere (policy, balancer); they do
not decide. Every error the proxy raises on purpose derives from ``ProxyError``, so each
per-connection task can end in one ``except ProxyError`` and log.
"""


class ProxyError(Exception):
    """Base of the node proxy's own errors (HBONE, relay, ...)."""
