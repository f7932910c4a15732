"""agent/redirect: getting a workload's traffic into the node proxy, and the proxy's sockets into pods.

The only runtime code that imports bcc or pyroute2. Each module plans (pure) and then applies;
every kernel change is idempotent and undone by the same module. ``netns`` creates sockets
inside pod network namespaces; ``origdst`` answers where a redirected connection was going.
Importing the package imports nothing else, so callers pay only for the module they use.
"""
