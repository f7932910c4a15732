"""topo.py: the benchmark's world — one pod network namespace, the app in it, our mesh and the
C baselines set up to do the same job on the same path.

The pod netns holds the app (nginx serving 1 KiB over HTTP on POD_IP:8080 and iperf3 on
POD_IP:5201) and the load generator. Our mesh: a real controller and a real ``nodemesh agent
run --redirect iptables`` (the pattern of tests/agent/test_agent_process.py); the client calls
the Service VIP, the iptables redirect sends it to the agent's in-pod 15001 listener, and the
agent takes the same-node fast path (plaintext L4) to the app. The baselines listen on
127.0.0.1 inside the same pod netns and forward to the same app, each with one worker and
16 KiB buffers. Only addresses inside this netns and the host's loopback are used.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.procs import Supervisor

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENVOY = str(Path(sys.executable).parent / "envoy")

POD_IP = "10.250.0.2"
CLIENT_IP = "10.250.1.2"                 # (b): the client pod on the other node
VIP = "10.96.0.10"
HTTP_PORT, BULK_PORT = 8080, 5201        # the app's ports (Service ports 80 and 5201)
BUF = 16 * 1024                          # every C baseline's per-direction buffer

# Where each target listens, per app port: (host, port) the client dials inside the pod.
TARGETS = ("direct", "nodemesh", "haproxy", "nginx", "envoy")
_BASE_PORT = {"haproxy": 18000, "nginx": 18100, "envoy": 18200}


def target_address(target: str, app_port: int) -> tuple[str, int]:
    if target == "direct":
        return POD_IP, app_port
    if target == "nodemesh":
        return VIP, 80 if app_port == HTTP_PORT else app_port
    return "127.0.0.1", _BASE_PORT[target] + (1 if app_port == HTTP_PORT else 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


# --- the pod netns ------------------------------------------------------------------------------

class PodNetns:
    """A pod netns like the agent test's: lo up with POD_IP, a veth route for the service range,
    and sysctls so a few seconds of connection churn neither run out of ports nor leave
    conntrack entries behind for long."""

    def __init__(self, ip: str = POD_IP) -> None:
        self.ip = ip
        self.name = f"nmbench-{uuid.uuid4().hex[:6]}"
        self.path = f"/var/run/netns/{self.name}"
        self.cgroup = f"{cgroup2_root()}/{self.name}"   # the pod's processes, for the eBPF redirect

    def __enter__(self) -> PodNetns:
        os.makedirs(self.cgroup, exist_ok=True)
        sh("ip", "netns", "add", self.name)
        try:
            n = self.name
            sh("ip", "-n", n, "link", "set", "lo", "up")
            sh("ip", "-n", n, "addr", "add", f"{self.ip}/32", "dev", "lo")
            sh("ip", "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
            for dev in ("v0", "v1"):
                sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", n, "route", "add", "10.96.0.0/16", "dev", "v0")
            for key, value in (("net.ipv4.tcp_tw_reuse", "1"),
                               ("net.ipv4.ip_local_port_range", "10000 65000"),
                               ("net.core.somaxconn", "4096")):
                sh("ip", "netns", "exec", n, "sysctl", "-q", "-w", f"{key}={value}")
            # conntrack is per netns once the nat rules exist; keep its TIME_WAIT entries short
            sh("ip", "netns", "exec", n, "sysctl", "-q", "-w",
               "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1", check=False)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        sh("ip", "netns", "del", self.name, check=False)
        for _ in range(50):                  # its last processes may still be exiting
            try:
                os.rmdir(self.cgroup)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def cgroup2_root() -> str:
    """Where cgroup v2 is mounted (/sys/fs/cgroup/unified on these hybrid machines)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if len(f) > 2 and f[2] == "cgroup2":
            return f[1]
    raise RuntimeError("no cgroup2 mount: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")


# --- the app --------------------------------------------------------------------------------------

def start_app(sup: Supervisor, ns: PodNetns, tmp: Path) -> None:
    """nginx (one worker) serving /1k (1024 bytes) on POD_IP:8080, and iperf3 -s on POD_IP:5201."""
    www = tmp / "www"
    www.mkdir()
    (www / "1k").write_bytes(b"x" * 1024)
    conf = tmp / "app-nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/app-nginx.pid;
error_log {tmp}/app-nginx.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    server {{
        listen {POD_IP}:{HTTP_PORT} backlog=4096;
        root {www};
        default_type application/octet-stream;
    }}
}}
""")
    sup.start("app-nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"], netns=ns.name)
    sup.start("app-iperf3", ["iperf3", "-s", "-B", POD_IP, "-p", str(BULK_PORT)], netns=ns.name)
    wait_tcp(ns.name, POD_IP, HTTP_PORT)
    wait_tcp(ns.name, POD_IP, BULK_PORT)


def wait_tcp(netns: str, host: str, port: int, timeout: float = 15.0) -> None:
    code = ("import socket,sys,time\n"
            "d=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "  try: socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close(); break\n"
            "  except OSError:\n"
            "    if time.monotonic()>d: sys.exit(1)\n"
            "    time.sleep(0.05)\n")
    p = subprocess.run(["ip", "netns", "exec", netns, PY, "-c", code, host, str(port), str(timeout)],
                       capture_output=True, text=True, timeout=timeout + 10)
    if p.returncode != 0:
        raise RuntimeError(f"nothing listens on {host}:{port} in {netns} after {timeout}s")


def http_get_in(netns: str, host: str, port: int) -> int:
    """One GET /1k inside the netns; returns the body length (1024 when the path works)."""
    code = ("import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
            "s.sendall(b'GET /1k HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "b=b''\n"
            "while True:\n"
            "  c=s.recv(65536)\n"
            "  if not c: break\n"
            "  b+=c\n"
            "print(len(b.split(b'\\r\\n\\r\\n',1)[1]) if b'\\r\\n\\r\\n' in b else -1)\n")
    p = subprocess.run(procs.client_argv(netns, [PY, "-c", code, host, str(port)]),
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"GET via {host}:{port} failed: {p.stderr.strip()[-300:]}")
    return int(p.stdout.strip())


# --- our mesh ---------------------------------------------------------------------------------------

def manifest(ns: PodNetns, client: PodNetns | None = None) -> str:
    extra = "" if client is None else f"""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {{name: fe-1, namespace: shop, labels: {{app: frontend}}}}
spec: {{node: node-2, serviceAccount: frontend, addresses: [{CLIENT_IP}], netns: {client.path}}}
---"""
    return extra + f"""
apiVersion: nodemesh.io/v1alpha1
kind: Workload
metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}
spec: {{node: node-1, serviceAccount: web, addresses: [{POD_IP}], ports: [{HTTP_PORT}, {BULK_PORT}], netns: {ns.path},
        cgroup: {ns.cgroup}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  addresses: [{VIP}]
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}, {{name: bulk, port: {BULK_PORT}, targetPort: {BULK_PORT}}}]
"""


@dataclass
class Mesh:
    """A controller and one agent (node-1) as real processes, the pod enrolled with ``redirect``."""

    sup: Supervisor
    tmp: Path
    redirect: str = "iptables"
    ctl_port: int = field(default_factory=free_port)
    ctl_mport: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)
    ready: int = field(default_factory=free_port)

    @property
    def env(self) -> dict:
        return {**os.environ, "NODEMESH_CONFIG": str(self.tmp / "nodemesh-config.yaml")}

    def cli(self, *args: str) -> str:
        p = subprocess.run([PY, "-m", "controller.cli", *args], env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"nodemesh {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
        return p.stdout

    def start(self, ns: PodNetns, client: PodNetns | None = None) -> int:
        """Start controller and agent; return the agent's pid once it serves the pod."""
        data = self.tmp / "controller"
        self.cli("controller", "init", "--data-dir", str(data), "--controller-url",
                 f"https://127.0.0.1:{self.ctl_port}")
        self.sup.start("controller", [PY, "-m", "controller.cli", "controller", "run", "--data-dir", str(data),
                                      "--listen", f"127.0.0.1:{self.ctl_port}",
                                      "--metrics-listen", f"127.0.0.1:{self.ctl_mport}"],
                       env=self.env, cwd=ROOT)
        self._wait(lambda: _https_ok(self.ctl_port, data / "ca" / "bundle.crt"), "controller", 30)
        (self.tmp / "mesh.yaml").write_text(manifest(ns, client))
        self.cli("apply", "-f", str(self.tmp / "mesh.yaml"))
        return self.start_agent("node-1")

    def start_agent(self, node: str) -> int:
        """Join ``node`` with a fresh token and start its agent; its pid once it serves its pod."""
        data = self.tmp / "controller"
        token = self.cli("token", "create", "--node", node).strip()
        (self.tmp / f"token-{node}").write_text(token)
        name = "agent" if node == "node-1" else f"agent-{node}"
        ready = self.ready if node == "node-1" else free_port()
        admin = self.admin if node == "node-1" else free_port()
        p = self.sup.start(name, [PY, "-m", "controller.cli", "agent", "run", "--node", node,
                                  "--controller", f"https://127.0.0.1:{self.ctl_port}",
                                  "--state-dir", str(self.tmp / name),
                                  "--admin", f"127.0.0.1:{admin}",
                                  "--metrics", f"127.0.0.1:{self.metrics if node == 'node-1' else free_port()}",
                                  "--ready", f"127.0.0.1:{ready}",
                                  "--access-log", str(self.tmp / f"access-{node}.log"),
                                  "--ca", str(data / "ca" / "bundle.crt"), "--redirect", self.redirect,
                                  "--token", str(self.tmp / f"token-{node}")],
                           env=self.env, cwd=ROOT)
        self._wait(lambda: _http_ok(ready, "/healthz/ready"), name, 60)
        self._wait(lambda: _listening(admin), f"{name} listeners", 30)
        return p.pid

    def restart_agent(self) -> int:
        """A fresh agent process (no token: it has joined already and serves from disk/controller)."""
        argv = list(self.sup.specs["agent"][0])
        if "--token" in argv:
            i = argv.index("--token")
            del argv[i:i + 2]
        p = self.sup.restart("agent", argv)
        self._wait(lambda: _http_ok(self.ready, "/healthz/ready"), "agent", 60)
        self._wait(lambda: _listening(self.admin), "agent listeners", 30)
        return p.pid

    def _wait(self, probe, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sup.check_alive()
            if probe():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout}s")


def _https_ok(port: int, ca: Path) -> bool:
    import ssl
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s, ctx.wrap_socket(s, server_hostname="127.0.0.1"):
            return True
    except (OSError, ssl.SSLError):
        return False


def _http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
            return head.startswith(b"HTTP/1.") and head[8:13] == b" 200 "
    except OSError:
        return False


def _listening(admin: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", admin), timeout=1) as s:
            s.sendall(b"GET /workloads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            body = b""
            while chunk := s.recv(65536):
                body += chunk
        ws = json.loads(body.split(b"\r\n\r\n", 1)[1])
        return bool(ws) and 15001 in ws[0].get("listeners", [])
    except (OSError, ValueError, IndexError):
        return False


# --- the C baselines ----------------------------------------------------------------------------

def restart_baseline(sup: Supervisor, ns: PodNetns, name: str) -> int:
    pid = sup.restart(name).pid
    wait_tcp(ns.name, *target_address(name, HTTP_PORT), timeout=20)
    sup.check_alive(name)
    return pid


def start_baselines(sup: Supervisor, ns: PodNetns, tmp: Path, which: tuple[str, ...]) -> dict[str, int]:
    """Start the chosen baselines inside the pod netns; return their pids (the tree root)."""
    pids = {}
    ports = (HTTP_PORT, BULK_PORT)
    if "haproxy" in which:
        fronts = "".join(f"""
listen l{p}
    bind {target_address('haproxy', p)[0]}:{target_address('haproxy', p)[1]}
    server app {POD_IP}:{p}
""" for p in ports)
        conf = tmp / "haproxy.cfg"
        conf.write_text(f"""
global
    nbthread 1
    maxconn 9000
    tune.bufsize {BUF}
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
{fronts}""")
        pids["haproxy"] = sup.start("haproxy", ["haproxy", "-db", "-f", str(conf)], netns=ns.name).pid
    if "nginx" in which:
        servers = "".join(f"""
    server {{ listen {target_address('nginx', p)[0]}:{target_address('nginx', p)[1]} backlog=4096;
             proxy_pass {POD_IP}:{p}; proxy_buffer_size {BUF // 1024}k; proxy_timeout 600s; }}""" for p in ports)
        conf = tmp / "nginx-stream.conf"
        conf.write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx-stream.pid;
error_log {tmp}/nginx-stream.err warn;
events {{ worker_connections 8192; }}
stream {{{servers}
}}
""")
        pids["nginx"] = sup.start("nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"], netns=ns.name).pid
    if "envoy" in which:
        listeners = [{
            "name": f"l{p}",
            "address": {"socket_address": {"address": target_address("envoy", p)[0],
                                           "port_value": target_address("envoy", p)[1]}},
            "per_connection_buffer_limit_bytes": BUF,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                 "stat_prefix": f"l{p}", "cluster": f"c{p}", "idle_timeout": "600s"}}]}],
        } for p in ports]
        clusters = [{
            "name": f"c{p}", "type": "STATIC", "connect_timeout": "5s",
            "per_connection_buffer_limit_bytes": BUF,
            "load_assignment": {"cluster_name": f"c{p}", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": POD_IP, "port_value": p}}}}]}]},
        } for p in ports]
        conf = tmp / "envoy.json"
        conf.write_text(json.dumps({"static_resources": {"listeners": listeners, "clusters": clusters}}))
        pids["envoy"] = sup.start("envoy", [ENVOY, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
                                            "-l", "warn"], netns=ns.name).pid
    for name in pids:
        wait_tcp(ns.name, *target_address(name, HTTP_PORT), timeout=20)
        sup.check_alive(name)
    return pids
