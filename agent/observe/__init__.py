"""agent/observe: the agent's observability shell — Prometheus metrics, JSON access logs (and
the ``ConnRecord`` they are made from), the small HTTP server behind the admin (15000), metrics
(15020) and readiness (15021) ports, and the doctor behind ``nodemesh check``.

Rule: nothing here decides anything about traffic, and nothing on the data path may raise from
here. Modules take what they report as values or callables; they import nothing of agent/proxy,
agent/redirect or agent/sync (the layering contract says so).
"""
