"""hyperframe_patch.py: the one reach into hyperframe's internals, a cheaper DATA-frame repr.

h2 4.x formats ``repr(frame)`` for a trace log on every frame it parses, even with logging off
(``H2Connection._receive_frame``), and hyperframe's repr hexlifies the whole payload only to
keep its first 20 hex digits. h2fast takes plain DATA frames that arrive whole, so this is paid
for the frames h2 parses itself: bulk frames larger than one read, and DATA behind another frame
in the same read. ``apply`` swaps in a function with the same output that hexlifies 11 bytes,
only for the hyperframe version it was tested with (``TESTED``); any other version is left
alone. Process-wide; BENCHMARKS.md has the figure that pays for it.
"""
from __future__ import annotations

import logging

import hyperframe
import hyperframe.frame

TESTED = frozenset({"6.1.0"})

log = logging.getLogger(__name__)

original = getattr(hyperframe.frame, "_raw_data_repr", None)


def raw_data_repr(data: bytes | None) -> str:
    """hyperframe 6.1's ``_raw_data_repr``, same output, hexlifying 11 bytes instead of all."""
    if not data:
        return "None"
    r = data[:11].hex()
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


def apply() -> bool:
    """Install ``raw_data_repr`` if this hyperframe is a tested one; returns whether it is in."""
    if original is None or hyperframe.__version__ not in TESTED:
        log.debug("hyperframe %s is not one the repr shortcut was tested with: left alone",
                  hyperframe.__version__)
        return False
    hyperframe.frame._raw_data_repr = raw_data_repr
    return True


def undo() -> None:
    """Put hyperframe's own function back (for benchmarks and tests)."""
    if original is not None:
        hyperframe.frame._raw_data_repr = original
