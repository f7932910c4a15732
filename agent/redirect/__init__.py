"""agent/redirect: getting a workload's traffic into the node proxy — kernel only.

The only runtime code that touches bcc (in a child process, ``ebpf_build``), libbpf
(``bpfmaps``) or iptables. Each module plans (pure) and then applies; every kernel change is
idempotent and undone by the same module. ``origdst`` answers where a redirected connection
was going. Knows nothing of the data path, the snapshot's decisions or the control plane: it
is told which workloads to enrol. Importing the package imports nothing else, so callers pay
only for the module they use.
"""
