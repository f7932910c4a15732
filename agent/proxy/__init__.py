"""agent/proxy: the node proxy's data path (listeners, HBONE tunnel, byte relay, live connections).

Rule: modules here move bytes and enforce decisions made elsewhere (``agent.decide``); they do
not decide, and they know nothing of the kernel's redirect rules (``agent.redirect``) or the
control plane (``agent.sync``). Every error the proxy raises on purpose derives from
``ProxyError``, so each per-connection task can end in one ``except ProxyError`` and log.
"""


class ProxyError(Exception):
    """Base of the node proxy's own errors (HBONE, relay, ...)."""
