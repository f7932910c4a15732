"""agent/decide: the proxy's decisions, as pure functions of a snapshot and the facts.

``authorize`` (policy decision order), ``balancer`` (endpoint choice), ``plan`` (where an
outgoing connection goes) and ``connection`` (the one plan -> pick -> authorize sequence both
outbound paths run); later the route, retry and rate-limit arithmetic. No sockets, no trio, no
kernel, no clocks or randomness of their own (``now`` and ``rng`` come in): the handlers decide
with these, then do. Imports ``agent.state`` and ``agent.base`` only.
"""


class DecisionError(Exception):
    """Base of the typed errors a decision raises (``plan.NoRoute``)."""
