"""cli.py: ``nodemesh lab up|status|exec|down`` — a whole mesh on one machine, in network namespaces.

``up`` plans the topology (topology.py), makes it (net.py, cgroups.py), starts the controller in
the host netns, one agent per node netns and the demo apps in their pods as real processes
(procs.py), applies the demo mesh generated from the topology (demo.py) and waits until every
agent is ready. Talks to the controller only through the ``nodemesh`` command, so the lab runs
exactly what users run. Everything it makes is named ``nmlab*``, so ``down`` cleans up even after
a crash or without the run dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from agent.lab import cgroups, demo, net, procs
from agent.lab.topology import CONTROLLER_IP, PREFIX, Node, PlanError, Topology, plan

DEFAULT_RUN = Path(os.environ.get("NODEMESH_LAB_DIR", "/run/nodemesh-lab"))
NODEMESH = [sys.executable, "-m", "controller.cli"]
READY_PORT = 15021
ADMIN_PORT = 15000              # the agent's default admin address, 127.0.0.1 in its node netns
SYSTEM_CGROUP = "system"        # <cgroup root>/nmlab/system/<process>: the controller and the agents
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class LabConfig:
    """What ``up`` was asked for; saved as ``<run>/lab.json`` for status, exec and a second up."""

    nodes: int
    pods_per_node: int
    redirect: str
    cgroup_root: str
    api_port: int
    metrics_port: int

    def topology(self) -> Topology:
        return plan(self.nodes, self.pods_per_node, cgroup_root=self.cgroup_root)

    @property
    def controller_url(self) -> str:
        return f"https://{CONTROLLER_IP}:{self.api_port}"


def _load(run: Path) -> LabConfig | None:
    try:
        return LabConfig(**json.loads((run / "lab.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _env(run: Path) -> dict[str, str]:
    """Our environment without proxy settings (lab traffic never leaves the machine)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    return {**env, "NODEMESH_CONFIG": str(run / "config.yaml"), "PYTHONUNBUFFERED": "1"}


def _nodemesh(*args: str, run: Path, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*NODEMESH, *args], env=_env(run), capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise click.ClickException(f"'nodemesh {' '.join(args)}' failed:\n{p.stderr.strip() or p.stdout.strip()}")
    return p


def _need_root(verb: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"lab {verb} needs root (network namespaces, cgroups): sudo scripts/lab {verb}")


run_option = click.option("--dir", "run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
                          show_default=True, help="The lab's run dir: state, logs, pid files (env NODEMESH_LAB_DIR).")


@click.group()
def lab() -> None:
    """The network-namespace lab: a whole mesh on this machine."""


# --- up ---------------------------------------------------------------------------------------

@lab.command()
@run_option
@click.option("--nodes", default=2, show_default=True, help="Nodes (network namespaces nmlab-node-N), each with an agent.")
@click.option("--pods-per-node", default=2, show_default=True, help="App pods per node (web and echo, alternating).")
@click.option("--redirect", type=click.Choice(["ebpf", "iptables", "auto"]), default="auto", show_default=True,
              help="The agents' redirect mode (agent run --redirect).")
@click.option("--api-port", default=15012, show_default=True, help="Controller API port (on 10.10.0.1).")
@click.option("--metrics-port", default=15014, show_default=True, help="Controller metrics port (on 10.10.0.1).")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds to wait for every agent to be ready.")
def up(run: Path, nodes: int, pods_per_node: int, redirect: str, api_port: int, metrics_port: int,
       timeout: float) -> None:
    """Build the lab and start the mesh in it. Idempotent: a second up keeps what runs."""
    _need_root("up")
    step = _Progress()
    try:
        root = cgroups.find_root(mount=True)
        cfg = LabConfig(nodes, pods_per_node, redirect, root, api_port, metrics_port)
        topo = cfg.topology()
    except (PlanError, cgroups.CgroupError) as e:
        raise click.ClickException(str(e)) from None
    old = _load(run)
    if old is not None and old != cfg and any(procs.pid_of(run, n) for n in procs.names(run)):
        raise click.ClickException(f"the lab in {run} runs with {_describe(old)}; "
                                   f"run 'lab down{_dir_arg(run)}' first to change it to {_describe(cfg)}")
    run.mkdir(parents=True, exist_ok=True)
    (run / "lab.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    step(f"network: bridge {topo.bridge}, {len(topo.nodes)} node and {len(topo.pods)} pod namespaces")
    try:
        net.apply(topo)
        for path in (f"{topo.cgroup_parent}/{SYSTEM_CGROUP}", *(p.cgroup for p in topo.pods),
                     *(h.cgroup for h in topo.hosts)):
            cgroups.ensure(path)
    except (net.NetError, OSError) as e:
        raise click.ClickException(f"cannot build the lab network: {e}") from None

    data = run / "controller"
    if not (run / "config.yaml").exists() or not (data / "ca" / "bundle.crt").exists():
        step("initialising the controller")
        _nodemesh("controller", "init", "--data-dir", str(data), "--san", topo.controller_ip,
                  "--controller-url", cfg.controller_url, "--write-config", str(run / "config.yaml"), run=run)
    if procs.pid_of(run, "controller") is None:
        step(f"starting the controller on {topo.controller_ip}:{api_port}")
        _start(run, "controller", f"{topo.cgroup_parent}/{SYSTEM_CGROUP}/controller",
               [*NODEMESH, "controller", "run", "--data-dir", str(data),
                "--listen", f"{topo.controller_ip}:{api_port}",
                "--metrics-listen", f"{topo.controller_ip}:{metrics_port}"])
    _start_apps(run, topo.pods, topo.hosts, step)
    step("waiting for the controller")
    _wait_controller(run, topo.controller_ip, api_port)

    starting = [n for n in topo.nodes if procs.pid_of(run, f"agent-{n.name}") is None]
    step("applying the demo mesh" + (f", join tokens for {len(starting)} agents" if starting else ""))
    (run / "mesh.yaml").write_text(demo.manifest(topo))
    with ThreadPoolExecutor(max_workers=8) as pool:
        applying = pool.submit(_nodemesh, "apply", "-f", str(run / "mesh.yaml"), run=run)
        tokens = list(pool.map(lambda n: _token(run, n), starting))
        applied = applying.result().stdout
    if starting:
        step(f"starting {len(starting)} agents (redirect {redirect})")
    for node, token in zip(starting, tokens):
        _start(run, f"agent-{node.name}", f"{topo.cgroup_parent}/{SYSTEM_CGROUP}/agent-{node.name}",
               _agent_argv(run, cfg, node, token))
    step("waiting for every agent to be ready")
    _wait_agents(run, topo, timeout)
    step.done()
    click.echo(applied, nl=False)
    click.echo(_summary(run, cfg, topo, step.elapsed()))


def _start_apps(run: Path, pods, hosts, step, *, here: bool = False) -> None:
    """Start the demo apps of ``pods`` (in their netns) and ``hosts`` (host services: in their
    node's netns, or this one when ``here``, a VM being the node) that do not run yet."""
    apps = [p for p in pods if p.port and procs.pid_of(run, f"app-{p.name}") is None]
    hosts = [h for h in hosts if procs.pid_of(run, f"app-{h.name}") is None]
    if apps or hosts:
        step(f"starting {len(apps)} demo apps in their pods" + (f", {len(hosts)} host service(s)" if hosts else ""))
    for pod in apps:
        args = (["http", "--name", pod.name] if pod.app == "web" else [pod.app]) + ["--port", str(pod.port)]
        _start(run, f"app-{pod.name}", pod.cgroup,
               ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "agent.lab.apps", *args])
    for host in hosts:       # in its node's own netns, in a cgroup of its own: a host workload
        enter = [] if here else ["nsenter", f"--net={host.node_netns_path}", "--"]
        _start(run, f"app-{host.name}", host.cgroup,
               [*enter, sys.executable, "-m", "agent.lab.apps", "http", "--name", host.name, "--port", str(host.port)])


def _start(run: Path, name: str, cgroup: str, argv: list[str]) -> int:
    """Start ``argv`` as lab process ``name``, inside ``cgroup`` from its first instruction on."""
    cgroups.ensure(cgroup)
    return procs.start(run, name, cgroups.wrap(cgroup, argv), env=_env(run), clean_env=True)


def _token(run: Path, node: Node) -> Path:
    path = run / "agents" / f"{node.name}.token"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = _nodemesh("token", "create", "--node", node.name, "--ttl", "10m", run=run).stdout.strip()
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return path


def _agent_argv(run: Path, cfg: LabConfig, node: Node, token: Path) -> list[str]:
    """The agent in its node netns. Entered with ``nsenter --net`` rather than ``ip netns exec``:
    the latter remounts /sys, which hides /sys/fs/cgroup (the workloads' cgroups, for the ebpf
    mode) and /sys/fs/bpf from the agent."""
    return ["nsenter", f"--net={node.netns_path}", "--",
            *NODEMESH, "agent", "run", "--node", node.name, "--controller", cfg.controller_url,
            "--ca", str(run / "controller" / "ca" / "bundle.crt"), "--token", str(token),
            "--state-dir", str(run / "agents" / node.name), "--redirect", cfg.redirect,
            "--admin", f"127.0.0.1:{ADMIN_PORT}", "--ready", f"0.0.0.0:{READY_PORT}", "--access-log", str(run / "logs" / f"access-{node.name}.log")]


def _wait_controller(run: Path, host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError as e:
            error = e
        if procs.pid_of(run, "controller") is None:
            raise click.ClickException(f"the controller exited:\n{_tail(run, 'controller')}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"the controller did not listen on {host}:{port} within {timeout:.0f}s "
                                       f"({error}):\n{_tail(run, 'controller')}")
        time.sleep(0.05)


def ready(node: Node, timeout: float = 2.0) -> tuple[bool, str]:
    """The agent's /healthz/ready on the node's fabric address: (ready, what it says)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://{node.fabric_address}:{READY_PORT}/healthz/ready"
    try:
        with opener.open(url, timeout=timeout) as r:
            return True, r.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as e:
        return False, e.read().decode(errors="replace").strip() or str(e)
    except (OSError, urllib.error.URLError) as e:
        return False, f"no answer ({getattr(e, 'reason', e)})"


def hooks(node: Node, timeout: float = 2.0, hosts: tuple = ()) -> tuple[bool, str]:
    """Are the redirect hooks of every pod of ``node`` (and of ``hosts``, its host services) in
    place? From the agent's admin /redirect
    (127.0.0.1:15000 inside the node netns): (all in place, a summary)."""
    p = subprocess.run(["nsenter", f"--net={node.netns_path}", "curl", "-sS", "--max-time", str(timeout),
                        f"http://127.0.0.1:{ADMIN_PORT}/redirect"], capture_output=True, text=True,
                       timeout=timeout + 5, env={k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS})
    try:
        report = json.loads(p.stdout)
        findings = report["findings"]
    except (ValueError, KeyError, TypeError):
        return False, f"no /redirect report ({p.stderr.strip() or p.stdout.strip()[:200]})"
    bad = [f["message"] for f in findings if f["level"] != "ok"]
    names = [pod.name for pod in node.pods] + [h.name for h in hosts if h.node == node.name]
    missing = [name for name in names
               if not any(f["message"].startswith(f"{demo.NAMESPACE}/{name}:") for f in findings)]
    if bad or missing:
        return False, f"redirect {report.get('mode')}: " + "; ".join(bad + [f"{m}: no hooks yet" for m in missing])
    extra = len(names) - len(node.pods)
    return True, (f"redirect {report.get('mode')}: hooks in place for {len(node.pods)} pods"
                  + (f" and {extra} host service(s)" if extra else ""))


def _wait_agents(run: Path, topo: Topology, timeout: float) -> None:
    """Every agent ready (/healthz/ready) and every pod's redirect in place (admin /redirect:
    readiness alone can come a moment before the hooks are attached)."""
    deadline = time.monotonic() + timeout
    pending = list(topo.nodes)
    while pending:
        for node in list(pending):
            if procs.pid_of(run, f"agent-{node.name}") is None:
                raise click.ClickException(f"the agent of {node.name} exited:\n{_tail(run, f'agent-{node.name}')}")
            if ready(node, timeout=1.0)[0] and hooks(node, timeout=1.0, hosts=topo.hosts)[0]:
                pending.remove(node)
        if pending and time.monotonic() > deadline:
            why = "; ".join(f"{n.name}: {ready(n)[1]}, {hooks(n, hosts=topo.hosts)[1]}" for n in pending)
            raise click.ClickException(f"agents not ready within {timeout:.0f}s: {why}\n"
                                       f"(logs: {run}/logs/agent-<node>.log)")
        if pending:
            time.sleep(0.1)


def _tail(run: Path, name: str, chars: int = 2000) -> str:
    try:
        return (run / "logs" / f"{name}.log").read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _describe(cfg: LabConfig) -> str:
    return f"{cfg.nodes} nodes x {cfg.pods_per_node} pods, redirect {cfg.redirect}"


def _dir_arg(run: Path) -> str:
    return "" if run == DEFAULT_RUN else f" --dir {run}"


def _summary(run: Path, cfg: LabConfig, topo: Topology, seconds: float) -> str:
    d = _dir_arg(run)
    nm = Path(sys.executable).parent / "nodemesh"
    lines = [f"\nThe lab is up in {seconds:.1f}s: {_describe(cfg)} (run dir {run}).",
             f"  controller  {cfg.controller_url}   metrics http://{topo.controller_ip}:{cfg.metrics_port}/metrics"]
    for node in topo.nodes:
        lines.append(f"  {node.name:<10}  netns {node.netns}  {node.fabric_address}  zone {node.zone}  "
                     f"agent ready: http://{node.fabric_address}:{READY_PORT}/healthz/ready")
        for pod in node.pods:
            what = f"{pod.app} app on :{pod.port}" if pod.port else "no app: exec into it to call the services"
            lines.append(f"    {pod.name:<10}  netns {pod.netns:<16} {pod.address:<11} {what}")
        for host in (h for h in topo.hosts if h.node == node.name):
            lines.append(f"    {host.name:<10}  host service: no netns (the node's), cgroup {host.cgroup}, "
                         f"{host.address}, http app on :{host.port}")
    lines += [f"  services    web 10.96.0.10:80 -> 8080 (http), echo 10.96.0.20:9000 (tcp), "
              f"hostsvc 10.96.0.30:80 -> 8090 (http, the host service); mTLS STRICT",
              f"  policies    web-from-client, web-from-hostsvc: client and hostsvc may call web; "
              f"echo-only-from-client: web -> echo is denied",
              f"  logs        {run}/logs/  (controller, agent-<node>, access-<node>, app-<pod>)",
              "", "Try:",
              f"  sudo scripts/lab exec{d} client-1 -- curl -s http://10.96.0.10/",
              f"  sudo scripts/lab exec{d} client-1 -- bash -c 'exec 3<>/dev/tcp/10.96.0.20/9000; echo hello >&3; head -1 <&3'",
              f"  sudo scripts/lab exec{d} web-1 -- bash -c 'exec 3<>/dev/tcp/10.96.0.20/9000; echo hello >&3; head -1 <&3'"
              "   # denied",
              f"  sudo scripts/lab exec{d} web-2 -- curl -s http://10.96.0.30/      # a pod calls the host service",
              f"  sudo scripts/lab exec{d} hostsvc-1 -- curl -s http://10.96.0.10/  # the host service calls web",
              f"  sudo NODEMESH_CONFIG={run}/config.yaml {nm} get workloads -A -o wide",
              f"  sudo scripts/lab status{d}",
              f"  sudo scripts/lab down{d}        # remove everything the lab made", ""]
    return "\n".join(lines)


class _Progress:
    def __init__(self):
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, what: str) -> None:
        click.echo(f"[lab {self.elapsed():5.1f}s] {what}", err=True)

    def done(self) -> None:
        self("ready")


# --- status, exec, down -----------------------------------------------------------------------

@lab.command()
@run_option
def status(run: Path) -> None:
    """Show nodes, pods, processes and readiness.

    Lists every node and pod, whether each lab process is alive, each agent's /healthz/ready and
    the controller's workloads; exits 1 unless all is well.
    """
    cfg = _load(run)
    if cfg is None:
        click.echo(f"no lab at {run} (start one with: sudo scripts/lab up)")
        raise SystemExit(1)
    topo = cfg.topology()
    state = net.lab_state() if os.geteuid() == 0 else None
    bad = 0

    def proc(name: str) -> str:
        nonlocal bad
        pid = procs.pid_of(run, name)
        bad += pid is None
        return f"running (pid {pid})" if pid else "NOT RUNNING"

    def ns(name: str) -> str:
        nonlocal bad
        if state is None:
            return name
        bad += name not in state["netns"]
        return name if name in state["netns"] else f"{name} MISSING"

    click.echo(f"lab {run}: {_describe(cfg)}")
    click.echo(f"controller  {proc('controller')}  {cfg.controller_url}  log {run}/logs/controller.log")
    for node in topo.nodes:
        ok, why = ready(node)
        bad += not ok
        click.echo(f"{node.name:<10}  netns {ns(node.netns)}  {node.fabric_address}  zone {node.zone}  "
                   f"agent {proc('agent-' + node.name)}  {why if ok else 'NOT READY: ' + why}")
        if ok and state is not None:
            hooked, what = hooks(node, hosts=topo.hosts)
            bad += not hooked
            click.echo(f"{'':<10}  {what if hooked else 'NOT IN PLACE: ' + what}")
        for pod in node.pods:
            app = f"app {proc('app-' + pod.name)}" if pod.port else "no app"
            click.echo(f"  {pod.name:<10}  netns {ns(pod.netns):<16}  {pod.address:<11} {app}")
        for host in (h for h in topo.hosts if h.node == node.name):
            click.echo(f"  {host.name:<10}  host service (node netns, cgroup {host.cgroup})  {host.address:<11} "
                       f"app {proc('app-' + host.name)}")
    p = _nodemesh("get", "workloads", "-A", "-o", "wide", run=run, check=False)
    click.echo(p.stdout or p.stderr, nl=False)
    if bad or p.returncode:
        raise SystemExit(1)


@lab.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@run_option
@click.argument("pod")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(run: Path, pod: str, cmd: tuple[str, ...]) -> None:
    """Run a command in a pod (its cgroup, then its netns).

    CMD runs in POD's cgroup and network namespace (a node name, node-N, enters that node's
    netns; a host service, hostsvc-1, its cgroup and its node's netns, so CMD is that host
    workload); stdin and stdout pass through and the exit code is CMD's:

        lab exec client-1 -- curl -s http://10.96.0.10/
    """
    _need_root("exec")
    if cmd[:1] == ("--",):
        cmd = cmd[1:]
    if not cmd:
        raise click.UsageError("no command given: lab exec POD -- CMD...")
    cfg = _load(run)
    host = next((h for h in cfg.topology().hosts if h.name == pod), None) if cfg else None
    netns = host.node_netns if host else f"{PREFIX}-{pod}"
    root = cfg.cgroup_root if cfg else cgroups.find_root()
    cgroup = f"{root}/{PREFIX}/{pod}" if root else None
    # `lab node up` on a VM: a host service is a cgroup here, with no netns of its own
    here = cfg is None and not os.path.exists(f"/var/run/netns/{netns}") and bool(cgroup) and os.path.isdir(cgroup)
    if not here and not os.path.exists(f"/var/run/netns/{netns}"):
        have = sorted(n.removeprefix(PREFIX + "-") for n in net.netns_list() if n.startswith(PREFIX + "-"))
        raise click.ClickException(f"no pod or node {pod!r} in the lab; there are: {', '.join(have) or 'none (lab up?)'}")
    if cgroup and os.path.isdir(cgroup) and not pod.startswith("node-"):
        cgroups.enter(cgroup)   # before `ip netns exec`, which remounts /sys
    sys.stdout.flush()
    if here:
        os.execvp(cmd[0], list(cmd))
    os.execvp("ip", ["ip", "netns", "exec", netns, *cmd])


@lab.command()
@run_option
def down(run: Path) -> None:
    """Remove everything the lab made.

    Stops every lab process, then removes every nmlab-* netns (killing what still runs in it),
    host link, the nmlab cgroup subtree (and so its BPF attachments), the lab's netfilter rule
    and the run dir. Safe to run twice, after a crash, or without the run dir.
    """
    _need_root("down")
    t0 = time.monotonic()
    names = procs.names(run)
    agents = [n for n in names if n.startswith("agent-")]
    stopped = procs.stop_many(run, agents)          # agents first: they undo their redirects
    stopped += procs.stop_many(run, [n for n in names if n not in agents])
    root = cgroups.find_root()
    killed = 0
    try:
        if root:
            killed = cgroups.kill_tree(f"{root}/{PREFIX}")
            cgroups.remove_tree(f"{root}/{PREFIX}")
        removed = net.teardown()
    except (cgroups.CgroupError, net.NetError) as e:
        raise click.ClickException(str(e)) from None
    if run.exists():
        shutil.rmtree(run)
    click.echo(f"lab down in {time.monotonic() - t0:.1f}s: stopped {', '.join(stopped) or 'nothing'}"
               f"{f'; killed {killed} leftover processes' if killed else ''}; removed "
               f"{len([r for r in removed if r.startswith('netns')])} netns, "
               f"{len([r for r in removed if r.startswith('link')])} links, the cgroups and {run}")


# --- one node on this host (the Vagrant VMs), and the manifest ---------------------------------

fabric_options = [
    click.option("--nodes", default=2, show_default=True, help="Nodes in the whole lab."),
    click.option("--pods-per-node", default=2, show_default=True, help="App pods per node."),
    click.option("--fabric", default="10.10.0.0/24", show_default=True,
                 help="The network the nodes share; node N is its host 10+N (Vagrant: 192.168.56.0/24)."),
    click.option("--controller-ip", default=None,
                 help="The controller's address on the fabric [default: host 1 of the lab bridge, "
                      "or host 10 of another fabric, as vagrant/topology.rb has it]."),
]


def _fabric_topology(nodes: int, pods_per_node: int, fabric: str, controller_ip: str | None) -> Topology:
    import ipaddress
    try:
        net_ = ipaddress.ip_network(fabric)
        default = CONTROLLER_IP if fabric == "10.10.0.0/24" else str(net_.network_address + 10)
        return plan(nodes, pods_per_node, cgroup_root=cgroups.find_root() or "/sys/fs/cgroup",
                    fabric=fabric, controller_ip=controller_ip or default)
    except (ValueError, PlanError, cgroups.CgroupError) as e:
        raise click.ClickException(str(e)) from None


def _this_node(name: str, nodes: int, pods_per_node: int, fabric: str,
               controller_ip: str | None) -> tuple[Topology, Node]:
    """The lab's topology and node ``name`` of it, or a ClickException saying which exist."""
    topo = _fabric_topology(nodes, pods_per_node, fabric, controller_ip)
    try:
        return topo, topo.node(name)
    except KeyError:
        raise click.ClickException(f"no {name} in a lab of {nodes} nodes (node-1 .. node-{nodes})") from None


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@lab.command()
@_with(fabric_options)
def manifest(nodes: int, pods_per_node: int, fabric: str, controller_ip: str | None) -> None:
    """Print the demo mesh (Mesh, Workloads, Services, policies) for a lab of this shape: what
    `lab up` applies, and what vagrant/'s controller VM applies (`| nodemesh apply -f -`)."""
    click.echo(demo.manifest(_fabric_topology(nodes, pods_per_node, fabric, controller_ip)), nl=False)


@lab.group()
def node() -> None:
    """Make this host one node of a lab: its pods and demo apps (the Vagrant node VMs)."""


@node.command("up")
@run_option
@click.option("--node", "name", required=True, help="Which node this host is (node-N).")
@_with(fabric_options)
def node_up(run: Path, name: str, nodes: int, pods_per_node: int, fabric: str, controller_ip: str | None) -> None:
    """Build this node's demo pods behind this host (network namespaces, cgroups, a pod bridge,
    routes to the other nodes' pods) and start their apps and the node's host services.
    Idempotent. This host must have the node's fabric address (node N: host 10+N)."""
    _need_root("node up")
    topo, me = _this_node(name, nodes, pods_per_node, fabric, controller_ip)
    step = _Progress()
    step(f"{name}: {len(me.pods)} pods behind this host, routes to {nodes - 1} other nodes")
    run.mkdir(parents=True, exist_ok=True)
    hosts = [h for h in topo.hosts if h.node == name]
    try:
        net.apply_node_here(topo, name)
        for path in (*(p.cgroup for p in me.pods), *(h.cgroup for h in hosts)):
            cgroups.ensure(path)
    except (net.NetError, OSError) as e:
        raise click.ClickException(f"cannot build {name}'s pods: {e}") from None
    _start_apps(run, me.pods, hosts, step, here=True)
    step.done()
    click.echo(f"{name}: pods {', '.join(p.name for p in me.pods)}"
               + (f"; host services {', '.join(h.name for h in hosts)}" if hosts else "")
               + f"; try: nodemesh lab exec POD -- CMD")


@node.command("down")
@run_option
@click.option("--node", "name", required=True, help="Which node this host is (node-N).")
@_with(fabric_options)
def node_down(run: Path, name: str, nodes: int, pods_per_node: int, fabric: str, controller_ip: str | None) -> None:
    """Undo `lab node up`: stop the apps, remove the pods, the pod bridge, the routes and the
    lab's cgroups on this host. Safe to run twice."""
    _need_root("node down")
    topo, me = _this_node(name, nodes, pods_per_node, fabric, controller_ip)
    stopped = procs.stop_many(run, procs.names(run))
    try:
        for path in [*(p.cgroup for p in me.pods), *(h.cgroup for h in topo.hosts if h.node == name)]:
            cgroups.kill_tree(path)                 # this node's cgroups only
            cgroups.remove_tree(path)
        with contextlib.suppress(OSError):
            os.rmdir(topo.cgroup_parent)            # the lab's parent, once no node uses it
        removed = net.teardown_node_here(topo, name)
    except (cgroups.CgroupError, net.NetError) as e:
        raise click.ClickException(str(e)) from None
    if run.exists():
        shutil.rmtree(run)
    click.echo(f"{name} down: stopped {', '.join(stopped) or 'nothing'}; removed {len(removed)} namespaces and links")
