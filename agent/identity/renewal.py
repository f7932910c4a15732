"""renewal.py: when to renew a certificate and how long to wait after a failed request.

Pure: functions of their inputs and an injected ``rng``; no clock, no I/O, no trio.
"""
from __future__ import annotations

import datetime as dt
import random

RENEW_FRACTION = 0.5      # renew at half life (DESIGN.md, Identity) ...
JITTER_FRACTION = 0.05    # ... give or take up to 5% of the lifetime, so agents don't renew in step
BACKOFF_FIRST = 1.0       # seconds before the first retry; doubles per failure
BACKOFF_CAP = 60.0        # never wait longer than this between attempts


def renew_at(not_before: dt.datetime, not_after: dt.datetime, rng: random.Random) -> dt.datetime:
    """The moment to start renewing: ``not_before + lifetime * (0.5 ± up to 0.05)``."""
    lifetime = not_after - not_before
    return not_before + lifetime * (RENEW_FRACTION + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION))


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait after failure number ``attempt`` (0 for the first failure).

    The ceiling is ``1s * 2**attempt`` capped at 60 s; the wait is drawn uniformly from
    [ceiling/2, ceiling] ("equal jitter"), so retries spread out but never come sooner than half.
    """
    ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** min(max(attempt, 0), 32))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)
