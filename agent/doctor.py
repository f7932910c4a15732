"""doctor.py: the node half of ``nodemesh check`` — kernel features and what the local agent reports.

Pure collectors return ``(level, message)`` pairs ("ok" | "WARN" | "FAIL"); nothing here changes
the machine. The agent's own view (redirect mode in force, each workload's hooks) comes from
its admin port, so the check works without root and without importing bcc.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import httpx

KHEADERS = Path(os.environ.get("BCC_KERNEL_SOURCE", "/var/lib/nodemesh/kheaders"))


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


def agent_findings(admin_url: str, ready_url: str, timeout: float = 5.0) -> list[tuple[str, str]]:
    """Ask the local agent how it is doing and whether each workload's redirect is in place."""
    out: list[tuple[str, str]] = []
    try:
        r = httpx.get(ready_url, timeout=timeout)
        out.append(("ok" if r.status_code == 200 else "FAIL", f"agent readiness: {r.text.strip()}"))
        red = httpx.get(f"{admin_url.rstrip('/')}/redirect", timeout=timeout).json()
        workloads = httpx.get(f"{admin_url.rstrip('/')}/workloads", timeout=timeout).json()
    except (httpx.HTTPError, ValueError) as e:
        return [("FAIL", f"no agent answers at {admin_url} ({e}); is 'nodemesh agent run' running on this node?")]
    out.append(("ok", f"redirect mode in force: {red['mode']}"))
    for w in workloads:
        level = "FAIL" if w["error"] else "ok"
        out.append((level, f"{w['workload']}: listeners {w['listeners'] or 'none'}" + (f" ({w['error']})" if w["error"] else "")))
    out += [(f["level"], f["message"]) for f in red["findings"]]
    return out
