"""procs.py: the lab's background processes — start with a pid file and a log, stop, check.

Every process the lab starts is recorded as ``<run>/pids/<name>.pid`` (pid and start time,
so a recycled pid is never killed by mistake) with its output in ``<run>/logs/<name>.log``.
Knows nothing of what the processes are.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


class ProcError(Exception):
    pass


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def start(run: Path, name: str, argv: list[str], env: dict[str, str] | None = None,
          clean_env: bool = False) -> int:
    """Start ``argv`` in its own session, detached from our terminal; return its pid.

    ``env`` is added to our environment, or with ``clean_env`` is the whole environment."""
    (run / "pids").mkdir(parents=True, exist_ok=True)
    (run / "logs").mkdir(parents=True, exist_ok=True)
    if pid_of(run, name):
        raise ProcError(f"{name} is already running (pid {pid_of(run, name)})")
    log = open(run / "logs" / f"{name}.log", "ab")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             env=dict(env or {}) if clean_env else {**os.environ, **(env or {})})
    finally:
        log.close()
    (run / "pids" / f"{name}.pid").write_text(f"{p.pid} {_start_time(p.pid)}\n")
    return p.pid


def pid_of(run: Path, name: str) -> int | None:
    """The pid of ``name`` if it is still the process we started, else None."""
    try:
        pid_s, started = (run / "pids" / f"{name}.pid").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    if _start_time(pid) != started or _is_zombie(pid):
        return None
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def names(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "pids").glob("*.pid")) if (run / "pids").exists() else []


def stop(run: Path, name: str, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; returns whether a process was running."""
    pid = pid_of(run, name)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_of(run, name) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if pid_of(run, name):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _reap(pid)
    (run / "pids" / f"{name}.pid").unlink(missing_ok=True)
    return pid is not None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_many(run: Path, names_: list[str], timeout: float = 5.0) -> list[str]:
    """``stop`` several at once: SIGTERM to all, wait up to ``timeout`` together, then SIGKILL
    the rest. Returns the names that were running."""
    running = {name: pid for name in names_ if (pid := pid_of(run, name)) is not None}
    for pid in running.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_of(run, n) for n in running):
        for pid in running.values():
            _reap(pid)
        time.sleep(0.05)
    for name in names_:
        stop(run, name, timeout=1.0)    # SIGKILL whatever is left, remove the pid files
    return sorted(running)
