"""procs.py: processes the harness starts, and what /proc says about them.

Owns starting processes (optionally inside a netns), killing every one of them at the end even
on error, checking that they are still alive after each run, and reading CPU time and memory
from /proc. Knows nothing of what the processes are.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessDied(RuntimeError):
    """A supervised process exited while it was still needed; the message has its log's tail."""


def netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


# The pod's cgroup directory, when the agent redirects with eBPF (its connect4 program is on the
# pod's cgroup): load generators join it before entering the netns (``ip netns exec`` remounts
# /sys, KERNEL-NOTES). None with the iptables redirect.
CLIENT_CGROUP: str | None = None


def client_argv(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` as a client inside the pod: its netns and, with eBPF, its cgroup."""
    inner = netns_argv(netns, argv)
    if CLIENT_CGROUP is None:
        return inner
    return ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", CLIENT_CGROUP, *inner]


class Supervisor:
    """Starts processes in their own session, each logging to a file; ``close`` ends them all.

    Used as a context manager: every process started here is killed (SIGTERM, then SIGKILL
    after a grace period) when the block ends, however it ends.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, tuple] = {}

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, name: str, argv: list[str], *, netns: str | None = None, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        p = subprocess.Popen(netns_argv(netns, argv), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        log.close()
        self.procs[name] = p
        self.specs[name] = (argv, netns, env, cwd)
        return p

    def restart(self, name: str, argv: list[str] | None = None) -> subprocess.Popen:
        """Stop ``name`` and start it again the same way (or with ``argv``)."""
        old_argv, netns, env, cwd = self.specs[name]
        self.stop(name)
        return self.start(name, argv or old_argv, netns=netns, env=env, cwd=cwd)

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return (self.logdir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self, *names: str) -> None:
        """Raise ProcessDied if any of ``names`` (default: all) has exited."""
        for name in names or tuple(self.procs):
            p = self.procs[name]
            if p.poll() is not None:
                raise ProcessDied(f"{name} (pid {p.pid}) exited with {p.returncode}:\n{self.log_tail(name)}")

    def stop(self, name: str, grace: float = 10.0) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        return _end(p, grace)

    def close(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)


def _end(p: subprocess.Popen, grace: float) -> int | None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)      # its own session: the process and its children
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return p.wait(timeout=5)
    # reap children left in its session (nginx workers) if the leader already went
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return p.returncode


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (nginx master + worker, ip-netns-exec chains)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (all their threads), in seconds, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])   # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    """Resident set size of ``pids``, in KiB (VmRSS)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class CpuMeter:
    """CPU seconds a process tree spends between ``start`` and ``stop``."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t0 = self.c0 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = cpu_seconds(descendants(self.pid)) if self.pid else 0.0

    def stop(self) -> float:
        return (cpu_seconds(descendants(self.pid)) - self.c0) if self.pid else 0.0
