"""constants.py: the agent's fixed numbers, written once (DESIGN "Ports"; the proxy's mark).

The same ports as Istio's ztunnel, so operators recognise them. The eBPF programs get them as
cflags (``agent.redirect.ebpf_build``) and the iptables rules as text; nothing else spells them out.
"""
from __future__ import annotations

OUTBOUND_PORT = 15001        # each pod netns: outbound capture
INBOUND_PLAIN_PORT = 15006   # each pod netns: plaintext from outside the mesh
INBOUND_HBONE_PORT = 15008   # each pod netns: HBONE (mTLS, HTTP/2 CONNECT)
IN_POD_PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, INBOUND_HBONE_PORT)

ADMIN_PORT = 15000           # agent, 127.0.0.1: /config_dump, /certs, /workloads, /logging, /check
METRICS_PORT = 15020         # agent: Prometheus /metrics
READY_PORT = 15021           # agent: /healthz/ready

PROXY_MARK = 0x539           # SO_MARK on the proxy's own sockets; every redirect rule skips it

KHEADERS = "/var/lib/nodemesh/kheaders"   # the kernel-header tree for bcc, built by scripts/setup.sh
