"""twonode.py: (b) cross-node — a client pod on node-2 calling the app pod on node-1.

The client pod netns (CLIENT_IP) is joined to the app pod netns by a veth pair, as two nodes'
pods would be by a network. Our mesh: node-2's agent captures the client's call to the VIP and
opens an HBONE stream (HTTP/2 CONNECT over mutual TLS 1.3, pooled) to node-1's agent on
POD_IP:15008, which delivers it to the app. Baselines, also two hops with mutual TLS 1.3 and
ECDSA P-256 certificates from the mesh CA: haproxy↔haproxy and Envoy↔Envoy (one worker each,
one TLS connection per client connection; the latency client keeps one connection, so no
handshake is on the measured path for anyone). Only the harness's own iptables rules are added:
they let the direct path and the baselines' ports past the agents' redirect.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from bench import load
from bench.procs import CpuMeter, Supervisor
from bench.topo import BUF, CLIENT_IP, ENVOY, HTTP_PORT, POD_IP, VIP, PodNetns, sh, wait_tcp

B_TARGETS = ("direct", "nodemesh", "haproxy", "envoy")
B_RATE, B_SECONDS = 1000.0, 3.0
_PORTS = {"haproxy": (18301, 18302), "envoy": (18311, 18312)}    # (client side in A, server side in B)


def b_address(target: str) -> tuple[str, int]:
    if target == "direct":
        return POD_IP, HTTP_PORT
    if target == "nodemesh":
        return VIP, 80
    return "127.0.0.1", _PORTS[target][0]


def link_pods(client: PodNetns, server: PodNetns) -> None:
    """A veth pair between the two pods and routes both ways (the VIP range is routed already)."""
    a, b = client.name, server.name
    sh("ip", "-n", a, "link", "add", "n2", "type", "veth", "peer", "name", "n1", "netns", b)
    sh("ip", "-n", a, "link", "set", "n2", "up")
    sh("ip", "-n", b, "link", "set", "n1", "up")
    sh("ip", "-n", a, "route", "add", f"{POD_IP}/32", "dev", "n2")
    sh("ip", "-n", b, "route", "add", f"{CLIENT_IP}/32", "dev", "n1")


def exempt_baselines(client: PodNetns, server: PodNetns) -> None:
    """Our own rules, first in nat OUTPUT (client pod) and PREROUTING (app pod): the direct path
    and the baselines' ports bypass the agents' redirect (they are what we compare against)."""
    ports = f"{HTTP_PORT},18300:18399"
    sh("ip", "netns", "exec", client.name, "iptables", "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp",
       "-d", POD_IP, "-m", "multiport", "--dports", ports, "-j", "ACCEPT")
    sh("ip", "netns", "exec", server.name, "iptables", "-t", "nat", "-I", "PREROUTING", "1", "-p", "tcp",
       "-s", CLIENT_IP, "-m", "multiport", "--dports", ports, "-j", "ACCEPT")


def issue_certs(tmp: Path) -> dict[str, Path]:
    """Server and client certificates (SPIFFE URIs of web and frontend) from the mesh CA."""
    from controller import pki
    ca_dir = tmp / "controller" / "ca"
    issuer = pki.load_issuer(ca_dir / "ca.crt", ca_dir / "ca.key")
    out = {"ca": ca_dir / "bundle.crt"}
    for role, uri in (("server", "spiffe://cluster.local/ns/shop/sa/web"),
                      ("client", "spiffe://cluster.local/ns/shop/sa/frontend")):
        key = pki.generate_key()
        cert = pki.issue(issuer, key.public_key(), now=dt.datetime.now(dt.timezone.utc),
                         ttl=dt.timedelta(hours=2), uris=(uri,))
        crt, k = pki.cert_pem(cert), pki.key_pem(key)
        pki.write_file(tmp / f"b-{role}.crt", crt, secret=False)
        pki.write_file(tmp / f"b-{role}.key", k, secret=True)
        pki.write_file(tmp / f"b-{role}.pem", crt + k, secret=True)
        out[role] = tmp / f"b-{role}"
    return out


def profile_b(sup: Supervisor, client: PodNetns, pid: int, raw: Path, seconds: float = 3.0) -> dict:
    """py-spy on one agent during an extra (b) latency run through the mesh (not counted)."""
    import subprocess
    import time

    from bench.profile import summarize
    from bench.scenarios import PY_SPY
    spy = subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-d", f"{seconds + 1:g}", "-r", "200",
                            "--nonblocking", "-f", "raw", "-o", str(raw)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    load.latency(client.name, *b_address("nodemesh"), rate=B_RATE, seconds=seconds)
    err = spy.communicate(timeout=120)[1]
    sup.check_alive()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err[-500:]}")
    return summarize(raw)


def start_tls_baselines(sup: Supervisor, client: PodNetns, server: PodNetns, tmp: Path) -> dict[str, tuple[int, int]]:
    """haproxy and Envoy pairs; returns target -> (client-side pid, server-side pid)."""
    certs = issue_certs(tmp)
    ca, srv, cli = certs["ca"], certs["server"], certs["client"]
    pids = {}
    hc, hs = _PORTS["haproxy"]
    common = f"""global
    nbthread 1
    maxconn 9000
    tune.bufsize {BUF}
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
"""
    (tmp / "haproxy-b-client.cfg").write_text(common + f"""
listen out
    bind 127.0.0.1:{hc}
    server peer {POD_IP}:{hs} ssl crt {cli}.pem ca-file {ca} verify required
""")
    (tmp / "haproxy-b-server.cfg").write_text(common + f"""
listen in
    bind {POD_IP}:{hs} ssl crt {srv}.pem ca-file {ca} verify required
    server app {POD_IP}:{HTTP_PORT}
""")
    ps = sup.start("haproxy-b-server", ["haproxy", "-db", "-f", str(tmp / "haproxy-b-server.cfg")], netns=server.name)
    pc = sup.start("haproxy-b-client", ["haproxy", "-db", "-f", str(tmp / "haproxy-b-client.cfg")], netns=client.name)
    pids["haproxy"] = (pc.pid, ps.pid)

    ec, es = _PORTS["envoy"]
    tls_params = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}

    def tls_ctx(role: Path) -> dict:
        return {"tls_params": tls_params,
                "tls_certificates": [{"certificate_chain": {"filename": f"{role}.crt"},
                                      "private_key": {"filename": f"{role}.key"}}],
                "validation_context": {"trusted_ca": {"filename": str(ca)}}}

    def tcp_proxy(cluster: str) -> dict:
        return {"name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": cluster, "cluster": cluster, "idle_timeout": "600s"}}

    def cluster(name: str, port: int, tls: dict | None) -> dict:
        c = {"name": name, "type": "STATIC", "connect_timeout": "5s", "per_connection_buffer_limit_bytes": BUF,
             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                 "address": {"socket_address": {"address": POD_IP, "port_value": port}}}}]}]}}
        if tls:
            c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls}}
        return c

    client_cfg = {"static_resources": {
        "listeners": [{"name": "out", "address": {"socket_address": {"address": "127.0.0.1", "port_value": ec}},
                       "per_connection_buffer_limit_bytes": BUF,
                       "filter_chains": [{"filters": [tcp_proxy("peer")]}]}],
        "clusters": [cluster("peer", es, tls_ctx(cli))]}}
    server_cfg = {"static_resources": {
        "listeners": [{"name": "in", "address": {"socket_address": {"address": POD_IP, "port_value": es}},
                       "per_connection_buffer_limit_bytes": BUF,
                       "filter_chains": [{"filters": [tcp_proxy("app")], "transport_socket": {
                           "name": "envoy.transport_sockets.tls", "typed_config": {
                               "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                               "require_client_certificate": True, "common_tls_context": tls_ctx(srv)}}}]}],
        "clusters": [cluster("app", HTTP_PORT, None)]}}
    (tmp / "envoy-b-client.json").write_text(json.dumps(client_cfg))
    (tmp / "envoy-b-server.json").write_text(json.dumps(server_cfg))
    base = ["--concurrency", "1", "--disable-hot-restart", "-l", "warn"]
    ps = sup.start("envoy-b-server", [ENVOY, "-c", str(tmp / "envoy-b-server.json"), *base], netns=server.name)
    pc = sup.start("envoy-b-client", [ENVOY, "-c", str(tmp / "envoy-b-client.json"), *base], netns=client.name)
    pids["envoy"] = (pc.pid, ps.pid)
    for t, (c_port, s_port) in _PORTS.items():
        wait_tcp(server.name, POD_IP, s_port, timeout=20)
        wait_tcp(client.name, "127.0.0.1", c_port, timeout=20)
    sup.check_alive()
    return pids


def scenario_b(sup: Supervisor, client: PodNetns, pids: dict[str, tuple[int, int] | None], runs: int) -> dict:
    """Fixed 1000 rps through each two-hop path; added latency and CPU per request per side."""
    out: dict = {}

    def add(metric, target, value):
        out.setdefault(metric, {}).setdefault(target, []).append(value)

    targets = [t for t in B_TARGETS if t in pids]
    for run in range(runs):
        k = run % len(targets)
        got = {}
        for t in targets[k:] + targets[:k]:
            meters = [CpuMeter(p) for p in (pids[t] or ())]
            for m in meters:
                m.start()
            lat = load.latency(client.name, *b_address(t), rate=B_RATE, seconds=B_SECONDS)
            used = [m.stop() for m in meters]
            sup.check_alive()
            got[t] = lat
            add("b_late_pct", t, 100 * lat["late"] / lat["scheduled"])
            if meters:
                add("b_cpu_us_per_req_client_side", t, used[0] / lat["n"] * 1e6)
                add("b_cpu_us_per_req_server_side", t, used[1] / lat["n"] * 1e6)
                add("b_cpu_us_per_req_both", t, sum(used) / lat["n"] * 1e6)
        for t, lat in got.items():
            for p in ("p50", "p90", "p99"):
                add(f"b_{p}_us", t, lat[p])
                if t != "direct":
                    add(f"b_added_{p}_us", t, lat[p] - got["direct"][p])
    return out
