"""The node half of `nodemesh check`: the doctor's findings (pure) and `nodemesh agent check`."""
from __future__ import annotations

import os
import subprocess
import sys

from agent.observe.doctor import kernel_findings, node_findings

MOUNTS = ("cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
          "bpf /sys/fs/bpf bpf rw 0 0\n")


def test_kernel_findings_name_the_missing_mounts_and_how_to_mount_them():
    found = dict((m.split(" ")[0], lvl) for lvl, m in kernel_findings(MOUNTS))
    assert found["cgroup"] == "ok" and found["bpffs"] == "ok"
    bare = [m for lvl, m in kernel_findings("proc /proc proc rw 0 0\n") if lvl == "WARN"]
    assert any("mount -t cgroup2" in m for m in bare) and any("mount -t bpf bpf /sys/fs/bpf" in m for m in bare)


def test_node_findings_report_the_mode_each_workload_and_the_hooks():
    workloads = [{"workload": "shop/web-1", "listeners": [15001, 15006, 15008], "error": ""},
                 {"workload": "shop/web-2", "listeners": [], "error": "netns /var/run/netns/x is gone"}]
    found = node_findings("iptables", workloads, [("WARN", "shop/web-1: chain missing")], MOUNTS)
    assert ("ok", "redirect mode in force: iptables") in found
    assert ("ok", "shop/web-1: listeners [15001, 15006, 15008]") in found
    assert ("FAIL", "shop/web-2: listeners none (netns /var/run/netns/x is gone)") in found
    assert found[-1] == ("WARN", "shop/web-1: chain missing")


def test_agent_check_is_a_preflight_that_needs_no_agent():
    p = subprocess.run([sys.executable, "-m", "controller.cli", "agent", "check"], env=dict(os.environ),
                       capture_output=True, text=True, timeout=60)
    lines = p.stdout.splitlines()
    assert lines[0].startswith("ok    kernel "), p.stdout + p.stderr
    assert any("kernel headers for bcc" in line or "kernel header tree" in line for line in lines)
    assert p.returncode == (1 if any(line.startswith("FAIL") for line in lines) else 0)
