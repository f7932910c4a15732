"""doctor.py: the node half of ``nodemesh check`` — kernel features and what the agent serves.

Pure collectors return ``(level, message)`` pairs ("ok" | "WARN" | "FAIL"); nothing here changes
the machine. The running agent serves ``node_findings`` at its admin port's /check (which
``nodemesh check --node`` asks over HTTP, so the controller's CLI imports nothing of the agent);
``nodemesh agent check`` prints ``kernel_findings`` on a node where no agent runs yet.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from agent.base import constants

KHEADERS = Path(os.environ.get("BCC_KERNEL_SOURCE", constants.KHEADERS))


def kernel_findings(mounts: str | None = None) -> list[tuple[str, str]]:
    """What this kernel offers the redirect modes."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            mounts = ""
    fstypes = {line.split()[2]: line.split()[1] for line in mounts.splitlines() if len(line.split()) > 2}
    out = [("ok", f"kernel {platform.release()}")]
    out.append(("ok", f"cgroup v2 mounted at {fstypes['cgroup2']}") if "cgroup2" in fstypes
               else ("WARN", "no cgroup v2 mount: the ebpf mode needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)"))
    out.append(("ok", f"bpffs mounted at {fstypes['bpf']}") if "bpf" in fstypes
               else ("WARN", "bpffs is not mounted (mount -t bpf bpf /sys/fs/bpf); the ebpf mode mounts it when it pins"))
    out.append(("ok", f"kernel headers for bcc at {KHEADERS}") if (KHEADERS / "include").is_dir()
               else ("WARN", f"no kernel header tree at {KHEADERS}: the ebpf mode cannot compile (run scripts/setup.sh)"))
    for tool in ("iptables-restore", "nsenter"):
        out.append(("ok", f"{tool} found") if shutil.which(tool)
                   else ("WARN", f"{tool} not found: the iptables mode needs it (apt-get install iptables util-linux)"))
    return out


def node_findings(mode: str, workloads: list[dict], redirect: list[tuple[str, str]],
                  mounts: str | None = None) -> list[tuple[str, str]]:
    """Everything the node half of ``nodemesh check`` reports, as the running agent sees it:
    the kernel, the redirect mode in force, each workload's listeners (``workloads``: the admin
    port's /workloads rows) and each workload's redirect hooks (``redirect``: the redirector's
    findings). Served at the admin port's /check. Pure but for reading /proc/mounts."""
    out = kernel_findings(mounts)
    out.append(("ok", f"redirect mode in force: {mode}"))
    for w in workloads:
        level = "FAIL" if w["error"] else "ok"
        out.append((level, f"{w['workload']}: listeners {w['listeners'] or 'none'}" + (f" ({w['error']})" if w["error"] else "")))
    return out + redirect
