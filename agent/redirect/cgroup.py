"""cgroup.py: where a Workload's ``spec.cgroup`` is on this machine's cgroup v2 file system (pure
but for reading /proc/self/mounts). Both redirect modes need it: the ebpf mode attaches to the
directory, the iptables mode names the path relative to the mount (``-m cgroup --path``).
"""
from __future__ import annotations

import os
from pathlib import Path

from agent.redirect.base import RedirectError

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup2_mounts(mounts_text: str | None = None) -> list[str]:
    """Mount points of cgroup2 file systems (from /proc/self/mounts unless given)."""
    if mounts_text is None:
        mounts_text = Path("/proc/self/mounts").read_text()
    return [f[1] for f in (line.split() for line in mounts_text.splitlines()) if len(f) > 2 and f[2] == "cgroup2"]


def cgroup_dir(spec_cgroup: str, mounts: list[str]) -> str:
    """The directory of ``spec_cgroup`` on a cgroup2 mount: a path already on one is kept,
    ``/sys/fs/cgroup/X`` maps to ``<mount>/X`` (hybrid layout), a relative path is relative to
    the mount. Raises RedirectError without cgroup2 or for an empty path."""
    if not spec_cgroup:
        raise RedirectError("no cgroup: the ebpf mode attaches to spec.cgroup (use --redirect iptables "
                            "for workloads known only by netns)")
    if not mounts:
        raise RedirectError("no cgroup2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    path = os.path.normpath(spec_cgroup)
    for m in mounts:
        if path == m or path.startswith(m.rstrip("/") + "/"):
            return path
    mount = mounts[0]
    if path == CGROUP_ROOT or path.startswith(CGROUP_ROOT + "/"):
        rest = path[len(CGROUP_ROOT):].lstrip("/")
    elif not os.path.isabs(path):
        rest = path
    else:
        raise RedirectError(f"cgroup {spec_cgroup} is not on the cgroup2 file system ({mount})")
    return os.path.join(mount, rest) if rest else mount


def cgroup_relative(spec_cgroup: str, mounts: list[str]) -> str:
    """``spec_cgroup`` relative to the cgroup2 mount it is on (what ``iptables -m cgroup --path``
    takes); "" for the root. Raises RedirectError as ``cgroup_dir``."""
    path = cgroup_dir(spec_cgroup, mounts)
    for m in sorted(mounts, key=len, reverse=True):
        if path == m or path.startswith(m.rstrip("/") + "/"):
            return os.path.relpath(path, m).lstrip(".")
    return path
