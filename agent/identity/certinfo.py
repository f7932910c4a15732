"""certinfo.py: what the agent knows of an accepted certificate, without parsing one.

``x509`` (in the child process, with cryptography) fills it in; ``x509_proc`` carries it over
the pipe; the identity manager schedules renewals by it. Plain data, no imports of the agent.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Leaf:
    """What the agent needs to know of an accepted leaf certificate."""

    not_before: dt.datetime
    not_after: dt.datetime
    serial: int
