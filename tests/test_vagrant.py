"""vagrant/: the Vagrantfile parses, declares the lab's topology, and its provisioning scripts
really make a mesh — run, unchanged, inside the netns lab's node namespaces.

Vagrant and a hypervisor cannot run here, so three things stand in for them, and only them:
``ruby -c`` for the syntax; a stand-in for Vagrant's configuration DSL (``VAGRANT_STUB`` below:
it records the VMs, networks and provisioners the Vagrantfile declares, and runs nothing) for
what the file says; and network namespaces on the lab's fabric for the VMs, in which the real
provisioning scripts install nodemesh with the real install scripts (below a temporary root per
"VM", as one machine has one /opt) and start it as systemd would. The lab's namespaces have no
way out, so the "VMs" install from a wheelhouse the test builds first (``PIP_FIND_LINKS``,
``PIP_NO_INDEX``) where a VM would reach PyPI.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.lab import cgroups, net
from agent.lab.topology import PREFIX, plan

ROOT = Path(__file__).resolve().parents[1]
VAGRANT = ROOT / "vagrant"
FABRIC, CONTROLLER_IP = "192.168.56.0/24", "192.168.56.10"

# Vagrant's configuration DSL, as far as the Vagrantfile uses it: records, never runs anything.
VAGRANT_STUB = r'''
require "json"
$vms = []
class Rec
  attr_reader :data
  def initialize(data) = @data = data
  def method_missing(name, *args, **kw, &blk)
    if name.to_s.end_with?("=")
      @data[name.to_s.chomp("=")] = args[0]
    elsif blk
      sub = Rec.new({}); blk.call(sub); (@data[name.to_s] ||= []) << { "args" => args, "kw" => kw, "body" => sub.data }
    else
      (@data[name.to_s] ||= []) << { "args" => args, "kw" => kw }
    end
    self
  end
  def respond_to_missing?(*) = true
end
class VmRec < Rec
  def define(name, **kw, &blk)
    sub = Config.new; blk.call(sub); $vms << { "name" => name, "kw" => kw, "vm" => sub.vm.data }
  end
end
class Config
  attr_reader :vm
  def initialize = @vm = VmRec.new({})
end
module Vagrant
  def self.configure(version)
    top = Config.new; yield top
    puts JSON.generate({ "version" => version, "top" => top.vm.data, "vms" => $vms })
  end
end
load ARGV[0]
'''


def ruby(*args: str, env: dict | None = None, cwd: Path = VAGRANT) -> str:
    p = subprocess.run(["ruby", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr
    return p.stdout


def declared(nodes: int) -> dict:
    """What the Vagrantfile declares with NODEMESH_NODES=nodes, through the DSL stand-in."""
    stub = VAGRANT / ".vagrant-stub.rb"
    stub.write_text(VAGRANT_STUB)
    try:
        return json.loads(ruby(str(stub), "Vagrantfile", env={"NODEMESH_NODES": str(nodes)}))
    finally:
        stub.unlink()


def test_the_vagrantfile_and_topology_parse():
    for f in ("Vagrantfile", "topology.rb"):
        assert "Syntax OK" in ruby("-c", f)


@pytest.mark.parametrize("nodes", [2, 3])
def test_the_vagrant_topology_is_the_labs_on_another_fabric(nodes):
    topo = json.loads(ruby("-rjson", "-e", 'require_relative "topology"; puts JSON.generate(NodemeshLab.to_h)',
                           env={"NODEMESH_NODES": str(nodes)}))
    lab = plan(nodes, topo["pods_per_node"], fabric=topo["fabric"], controller_ip=topo["controller_ip"])
    assert (topo["fabric"], topo["controller_ip"]) == (FABRIC, CONTROLLER_IP)
    assert [(n["name"], n["address"], n["pod_cidr"], n["zone"]) for n in topo["nodes"]] == \
        [(n.name, n.fabric_address, n.pod_cidr, n.zone) for n in lab.nodes]
    # and the same shape as `scripts/lab up`'s, the fabric aside
    default = plan(nodes, topo["pods_per_node"])
    assert [(n.name, n.pod_cidr, n.zone, [p.name for p in n.pods]) for n in lab.nodes] == \
        [(n.name, n.pod_cidr, n.zone, [p.name for p in n.pods]) for n in default.nodes]


@pytest.mark.parametrize("nodes", [2, 3])
def test_the_vagrantfile_declares_a_controller_and_the_nodes_provisioned_by_the_scripts(nodes):
    d = declared(nodes)
    lab = plan(nodes, 2, fabric=FABRIC, controller_ip=CONTROLLER_IP)
    assert [vm["name"] for vm in d["vms"]] == ["controller"] + [n.name for n in lab.nodes]
    addresses = {vm["name"]: vm["vm"]["network"][0]["kw"]["ip"] for vm in d["vms"]}
    assert addresses == {"controller": CONTROLLER_IP, **{n.name: n.fabric_address for n in lab.nodes}}
    for vm in d["vms"]:
        (prov,) = vm["vm"]["provision"]
        script = VAGRANT / prov["kw"]["path"]
        assert prov["args"] == ["shell"] and script.is_file() and os.access(script, os.X_OK), script
        args = prov["kw"]["args"]
        if vm["name"] == "controller":
            assert script.name == "controller.sh" and args[2:] == [CONTROLLER_IP, str(nodes), "2"]
        else:
            assert script.name == "node.sh" and args[2:6] == [vm["name"], str(nodes), "2", f"https://{CONTROLLER_IP}:15012"]
    scripts = [p for p in (VAGRANT / "provision").glob("*.sh")]
    for s in scripts:
        assert subprocess.run(["bash", "-n", str(s)], capture_output=True).returncode == 0, s


# --- the provisioning scripts, run in the lab's node namespaces -------------------------------

def _stop(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)                  # the agent undoes its redirects on SIGTERM
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _get_in(netns: str, url: str) -> str:
    code = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    p = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.root
def test_the_provisioning_scripts_make_a_mesh_in_the_labs_node_namespaces(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, cgroups, iptables")
    topo = plan(2, 2)                                  # the lab's own fabric: nothing leaves the machine
    shared = tmp_path / "shared"
    roots = {name: tmp_path / name for name in ("controller", *(n.name for n in topo.nodes))}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NODEMESH_CONFIG")}
    url = f"https://{topo.controller_ip}:15012"
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(wheels),
                        str(ROOT), "setuptools>=68", "wheel"],   # and what building the checkout needs
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    env.update(PIP_FIND_LINKS=str(wheels), PIP_NO_INDEX="1")
    try:
        net.apply_fabric(topo)                          # the "VMs": node netns on the fabric, nothing behind
        p = subprocess.run([str(VAGRANT / "provision" / "controller.sh"), str(ROOT), str(shared),
                            topo.controller_ip, "2", "2"], env={**env, "NODEMESH_ROOT": str(roots["controller"]), "NODEMESH_FABRIC": topo.fabric_cidr},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        assert (shared / "ca.crt").is_file() and (shared / "node-2.token").is_file()
        for node in topo.nodes:
            p = subprocess.run(["nsenter", f"--net={node.netns_path}", "--",
                                str(VAGRANT / "provision" / "node.sh"), str(ROOT), str(shared), node.name, "2", "2",
                                url, "iptables"],
                               env={**env, "NODEMESH_ROOT": str(roots[node.name]), "NODEMESH_FABRIC": topo.fabric_cidr},
                               capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, f"{node.name}:\n{p.stderr[-4000:]}"
            assert f"{node.name} ready" in p.stderr
        # client-1 (node-1) reaches the web Service over the mesh (its zone's replica first, as the
        # demo's ewma + localityFailover asks), and web-2 on node-2 by its address: HBONE between the VMs
        assert _get_in(f"{PREFIX}-client-1", "http://10.96.0.10/vip").split()[0] in ("web-1", "web-2")
        assert _get_in(f"{PREFIX}-client-1", "http://10.10.2.2:8080/far") == "web-2 /far\n"
        # a second run of a node's provisioning changes nothing and still ends ready
        node = topo.nodes[1]
        p = subprocess.run(["nsenter", f"--net={node.netns_path}", "--", str(VAGRANT / "provision" / "node.sh"),
                            str(ROOT), str(shared), node.name, "2", "2", url, "iptables"],
                           env={**env, "NODEMESH_ROOT": str(roots[node.name]), "NODEMESH_FABRIC": topo.fabric_cidr},
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "already runs" in p.stderr, p.stderr[-3000:]
    finally:
        for node in topo.nodes:
            _stop(roots[node.name] / "run" / "nodemesh-agent.pid")
            subprocess.run(["nsenter", f"--net={node.netns_path}", "--",
                            str(roots[node.name] / "opt/nodemesh/venv/bin/nodemesh"), "lab", "node", "down",
                            "--node", node.name, "--dir", str(roots[node.name] / "run/nodemesh-lab"),
                            "--fabric", topo.fabric_cidr], capture_output=True, timeout=120, env=env)
        _stop(roots["controller"] / "run" / "nodemesh-controller.pid")
        root = cgroups.find_root()
        if root and os.path.isdir(f"{root}/{PREFIX}"):
            cgroups.kill_tree(f"{root}/{PREFIX}")
            cgroups.remove_tree(f"{root}/{PREFIX}")
        net.teardown()
        shutil.rmtree(tmp_path, ignore_errors=True)
