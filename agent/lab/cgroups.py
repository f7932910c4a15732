"""cgroups.py: the lab's cgroup v2 subtree — find or mount the hierarchy, make, empty and remove.

A lab process enters its cgroup *before* ``ip netns exec`` (which remounts /sys, hiding
/sys/fs/cgroup): ``wrap`` builds the ``sh -c 'echo $$ > .../cgroup.procs; exec ...'`` prefix that
does this for a process about to be started. ``kill_tree`` and ``remove_tree`` empty and remove a
subtree whatever is left in it, so ``lab down`` works after a crash. Knows nothing of netns.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")   # hybrid layout first, as on these machines


class CgroupError(Exception):
    pass


def _cgroup2_mounts() -> set[str]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            out.add(left.split()[4])
    return out


def find_root(mount: bool = False) -> str | None:
    """Where cgroup v2 is mounted; with ``mount``, mount it at /sys/fs/cgroup/unified if absent."""
    mounts = _cgroup2_mounts()
    for path in CANDIDATES:
        if path in mounts:
            return path
    if mounts:
        return sorted(mounts)[0]
    if not mount:
        return None
    os.makedirs(CANDIDATES[0], exist_ok=True)
    p = subprocess.run(["mount", "-t", "cgroup2", "none", CANDIDATES[0]], capture_output=True, text=True)
    if p.returncode != 0:
        raise CgroupError(f"cannot mount cgroup2 at {CANDIDATES[0]}: {p.stderr.strip()}")
    return CANDIDATES[0]


def ensure(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def wrap(cgroup: str, argv: list[str]) -> list[str]:
    """``argv`` prefixed so that the process joins ``cgroup`` first, then execs ``argv`` (same pid)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]


def enter(cgroup: str) -> None:
    """Move the calling process into ``cgroup``."""
    Path(cgroup, "cgroup.procs").write_text(f"{os.getpid()}\n")


def pids(cgroup: str) -> list[int]:
    """Processes in ``cgroup`` and below."""
    out = []
    for dirpath, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            try:
                out += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return out


def kill_tree(cgroup: str, timeout: float = 5.0) -> int:
    """SIGKILL every process in ``cgroup`` and below and wait until it is empty; returns how many."""
    victims = pids(cgroup)
    if not victims:
        return 0
    kill_file = Path(cgroup, "cgroup.kill")
    if kill_file.exists():
        kill_file.write_text("1\n")
    else:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while pids(cgroup) and time.monotonic() < deadline:
        for pid in victims:       # our own children would stay as zombies in the cgroup until reaped
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.02)
    if pids(cgroup):
        raise CgroupError(f"processes {pids(cgroup)} in {cgroup} did not die")
    return len(victims)


def remove_tree(cgroup: str) -> None:
    """Remove ``cgroup`` and its children (deepest first); kill_tree it first. Gone is fine."""
    if not os.path.isdir(cgroup):
        return
    for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda t: -t[0].count("/")):
        for attempt in range(50):     # EBUSY for a moment while the last exit is accounted
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if attempt == 49:
                    raise CgroupError(f"cannot remove {dirpath}: {e}") from None
                time.sleep(0.02)
