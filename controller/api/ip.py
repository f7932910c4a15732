"""IP address literals in canonical text form: ``canonical_ip``.

Owns the one rule for normalising an address (``str(ipaddress.ip_address(s))``, the form sockets
report), with a fast path for the common case, a canonical dotted-quad IPv4 literal, that gives
the same answer without building an ``ipaddress`` object. No I/O.
"""
from __future__ import annotations

import ipaddress
import re

# Exactly the IPv4 literals that ``ipaddress`` accepts and prints back unchanged: four decimal
# octets 0-255, ASCII digits only, no leading zeros (which ``ipaddress`` rejects anyway).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def canonical_ip(s: str) -> str:
    """``s`` as ``str(ipaddress.ip_address(s))``: ``2001:DB8::1`` -> ``2001:db8::1``.

    Raises ``ValueError`` (as ``ipaddress`` does) when ``s`` is not an IPv4 or IPv6 literal.
    """
    if _CANONICAL_V4.fullmatch(s):
        return s
    return str(ipaddress.ip_address(s))
