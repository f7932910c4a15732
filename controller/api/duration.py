"""Go-style durations (``90s``, ``30m``, ``1h30m``, ``1.5h``, ``500ms``) as float seconds.

Owns the duration grammar of Go's ``time.ParseDuration``; knows nothing of which fields use it
or what ranges they allow.
"""
from __future__ import annotations

import re

from controller.api.errors import InvalidDuration

_UNITS: dict[str, float] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)([a-zA-Zµμ]*)")
_EXAMPLES = "like '90s', '30m', '1h30m', '1.5h' or '500ms'"


def parse_duration(s: str) -> float:
    """Parse a Go duration (units ns, us, ms, s, m, h; a leading sign; bare ``0``) into seconds.

    Raises ``InvalidDuration`` naming what was wrong: not a string, empty, a number without a
    unit, an unknown unit, or stray characters.
    """
    if not isinstance(s, str) or isinstance(s, bool):
        raise InvalidDuration(s, f"must be a string {_EXAMPLES}, got {type(s).__name__}")
    text = s
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise InvalidDuration(s, f"is empty; expected a duration {_EXAMPLES}")
    total = 0.0
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            raise InvalidDuration(s, f"unexpected {text[pos:]!r}; expected a number and a unit, {_EXAMPLES}")
        number, unit = m.groups()
        if not unit:
            raise InvalidDuration(s, f"missing unit after {number!r}; expected one of ns, us, ms, s, m, h")
        if unit not in _UNITS:
            raise InvalidDuration(s, f"unknown unit {unit!r}; expected one of ns, us, ms, s, m, h")
        total += float(number) * _UNITS[unit]
        pos = m.end()
    return sign * total
