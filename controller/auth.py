"""auth.py: who is calling the controller and what they may do.

Callers are told apart by the SPIFFE-style URI SAN of the client certificate that TLS has
already verified against the mesh CA: ``spiffe://<td>/nodemesh/admin/<name>`` is an admin,
``spiffe://<td>/nodemesh/node/<name>`` a node's agent. No certificate means anonymous.
Pure: no sockets, no store.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography import x509

from controller import pki
from controller.api import spiffe


class Role(enum.Enum):
    ANONYMOUS = "anonymous"
    ADMIN = "admin"
    NODE = "node"


class Verb(enum.Enum):
    READ = "read"      # list, get, watch of resources
    WRITE = "write"    # apply, delete
    ISSUE = "issue"    # create join tokens, rotate the CA
    SIGN = "sign"      # get certificates signed for oneself (nodes)


@dataclass(frozen=True)
class Caller:
    role: Role
    name: str = ""

    def __str__(self) -> str:
        return f"{self.role.value}/{self.name}" if self.name else self.role.value


ANONYMOUS = Caller(Role.ANONYMOUS)

_ALLOWED = {
    Role.ADMIN: {Verb.READ, Verb.WRITE, Verb.ISSUE},
    Role.NODE: {Verb.READ, Verb.SIGN},
    Role.ANONYMOUS: set(),
}


class AuthError(Exception):
    """Refused. ``code`` is 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def caller_from_cert(der: bytes | None, trust_domain: str) -> Caller:
    """Return who presented this (already chain-verified) certificate."""
    if not der:
        return ANONYMOUS
    cert = x509.load_der_x509_certificate(der)
    for uri in pki.uri_sans(cert):
        found = spiffe.control_plane_role(uri, trust_domain)
        if found:
            return Caller(Role(found[0]), found[1])
    # A valid mesh certificate that is neither (a workload's, say): known, but no role here.
    return Caller(Role.ANONYMOUS, "certificate without a controller role")


def authorize(caller: Caller, verb: Verb) -> None:
    """Raise AuthError unless ``caller`` may do ``verb``."""
    if verb in _ALLOWED[caller.role]:
        return
    if caller == ANONYMOUS:
        raise AuthError(401, "authentication required: present an admin or node client "
                             "certificate issued by this controller's CA")
    raise AuthError(403, f"{caller} may not {verb.value}")
