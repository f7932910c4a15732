"""agent/state: the immutable snapshot of the mesh the proxy reads, and how it is built.

``snapshot`` (``Snapshot``, ``StateHolder``), ``index`` (the cold build's tables), ``delta`` (the
next tables from a few changed objects), ``pmap`` (the persistent maps behind them) and
``policies`` (AuthorizationPolicies compiled once per version). Plain data and pure functions:
no sockets, no kernel, no decisions about traffic (those are ``agent.decide``'s); trio only in
``StateHolder``. Imports nothing of the agent but ``agent.base``.
"""
