"""limits.py: the agent's file-descriptor budget — raised to what the host allows at start, and
said out loud when it is too low for a node proxy.

Every proxied connection holds two descriptors (client and upstream side), more while a splice
pipe is open, so a stock soft limit of 1024 runs out at a few hundred connections and shows as
``accept ... [Errno 24] Too many open files``. ``plan_nofile`` is pure; ``raise_nofile`` applies it.
"""
from __future__ import annotations

import logging
import resource

log = logging.getLogger("nodemesh.agent")

WANT = 1_048_576      # what the systemd unit asks for (LimitNOFILE) and the DaemonSet inherits
LOW = 65_536          # below this, say so: ~30 000 proxied connections at most


def plan_nofile(soft: int, hard: int, want: int = WANT) -> int:
    """The soft limit to set: ``want``, capped by ``hard`` (unless unlimited), never below ``soft``."""
    cap = want if hard == resource.RLIM_INFINITY else min(want, hard)
    return max(soft, cap)


def low_warning(limit: int, low: int = LOW) -> str | None:
    """What to tell the operator about ``limit``, or None when it is plenty (``low`` or more)."""
    if limit == resource.RLIM_INFINITY or limit >= low:
        return None
    return (f"file-descriptor limit is {limit} (hard limit too): the node proxy can hold only about "
            f"{limit // 2} connections; raise it (systemd LimitNOFILE={WANT}, or ulimit -Hn) and restart")


def raise_nofile(low: int = LOW) -> int:
    """Raise this process's soft RLIMIT_NOFILE as far as the hard limit allows; log a warning when
    the result is below ``low``. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = plan_nofile(soft, hard)
    if new != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as e:        # e.g. above fs.nr_open
            log.warning("cannot raise the file-descriptor limit from %d to %d: %s", soft, new, e)
            new = soft
    warning = low_warning(new, low)
    if warning:
        log.warning("%s", warning)
    return new
