"""canonical_ip: its IPv4 fast path answers exactly as ``str(ipaddress.ip_address(s))`` does."""
from __future__ import annotations

import ipaddress
import random

import pytest

from controller.api.ip import canonical_ip


def reference(s: str) -> str | None:
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        return None


def ours(s: str) -> str | None:
    try:
        return canonical_ip(s)
    except ValueError:
        return None


EDGES = ["0.0.0.0", "255.255.255.255", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.04",
         "1.2.3.4 ", " 1.2.3.4", "1.2.3.4\n", "1..3.4", "1.2.3.", "٣.2.3.4", "1.2.3.4a", "+1.2.3.4",
         "1.2.3.0x1", "10.96.0.10", "199.249.250.251", "2001:DB8::1", "::ffff:1.2.3.4", "fd00::a",
         "", "::", "1.2.3.4/32", "1000.2.3.4", "0.0.0.00"]


@pytest.mark.parametrize("s", EDGES)
def test_edges(s):
    assert ours(s) == reference(s)


def test_random_dotted_strings():
    rng = random.Random(7)
    for _ in range(20000):
        parts = [rng.choice(["0", "00", "7", "07", "255", "256", "199", "1000", "", "a", "25", "250"])
                 for _ in range(rng.choice([3, 4, 4, 4, 5]))]
        s = ".".join(parts)
        assert ours(s) == reference(s), s
