"""profile.py: summarize py-spy's raw (collapsed) stacks into top frames by self and total time."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(f: str) -> str:
    """'relay (agent/proxy/relay.py:103)' -> 'relay (agent/proxy/relay.py)', paths shortened."""
    f = _LINE.sub(")", f.strip())
    f = re.sub(r"\(/.*?/site-packages/", "(", f)
    f = re.sub(r"\(/.*?/lib/python3\.\d+/", "(stdlib/", f)
    f = re.sub(r"\(/work/main/", "(", f)
    return f


def summarize(raw: Path, top: int = 15) -> dict:
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    pct = lambda c: [(f, round(100 * k / total, 1)) for f, k in c.most_common(top)]   # noqa: E731
    return {"samples": total, "self_pct": pct(self_c), "total_pct": pct(incl)}
