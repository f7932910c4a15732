"""agent/base: the bottom of the agent — what every layer may use and nothing else.

``constants`` holds the fixed numbers (DESIGN "Ports", the proxy's SO_MARK); ``netns`` creates
sockets inside a pod's network namespace. Nothing here imports another part of the agent, knows
a workload, a snapshot or a policy, or holds state beyond a cached namespace handle.
"""
