"""agent/sync: the agent's side of the control plane.

``client`` (the controller API over HTTPS, the agent's one HTTP client), ``join`` (the node
identity: join once with a token, then reuse and renew), ``follow`` (keep the snapshot in step
with the controller's stream) and ``snapshot_file`` (the last good state on disk). Knows nothing
of sockets in pods, the kernel or the data path; it publishes snapshots to a ``StateHolder``.
"""
