"""ratelimit.py: token buckets per key (a caller's address), pure: the caller passes ``now``.

Used for what anonymous callers can reach (``join``): each source gets ``burst`` attempts at
once and ``rate`` more per second after that. Buckets of sources quiet long enough to be full
again are dropped, so the table stays as small as the set of recent sources. No I/O.
"""
from __future__ import annotations


class PerSource:
    """``allow(key, now)``: None when the attempt may go ahead, else seconds until one may."""

    def __init__(self, *, rate: float, burst: int, max_keys: int = 10000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, at)

    def allow(self, key: str, now: float) -> float | None:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return None

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate            # seconds an empty bucket takes to fill
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        while len(self._buckets) >= self.max_keys:   # all busy: forget the oldest
            self._buckets.pop(min(self._buckets, key=lambda k: self._buckets[k][1]))
