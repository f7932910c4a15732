"""agent/lab: the network-namespace lab on one machine (``nodemesh lab up|down|status|exec``).

Tooling, not data path: it builds nodes and pods as namespaces and cgroups, runs a real
controller and one real agent per node as processes, and deploys the demo. It imports nothing
else of the agent (the agents it runs are separate processes) and sits beside ``agent.app``.
"""
