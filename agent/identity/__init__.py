"""agent.identity: keys, CSRs, certificate refresh and TLS contexts of the agent's identities.

``x509`` is the one module here that imports cryptography, and only the child process of
``x509_proc`` imports it; the agent imports nothing of the controller but ``controller.api``.
The manager and TLS names load on first use, so that child imports no more than errors and x509.
"""
from __future__ import annotations

import importlib

from agent.identity.errors import (
    BadBundle, BadCertificate, IdentityError, NotCertified, PeerIdentityError, PeerNotAllowed,
    SignerError, X509ChildError,
)

_LAZY = {"Certified": "manager", "IdentityManager": "manager", "Signer": "manager", "SignResult": "manager",
         "check_peer": "tls", "peer_identity": "tls"}

__all__ = [
    "BadBundle", "BadCertificate", "Certified", "IdentityError", "IdentityManager", "NotCertified",
    "PeerIdentityError", "PeerNotAllowed", "SignResult", "Signer", "SignerError", "X509ChildError",
    "check_peer", "peer_identity",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = found
    return found
