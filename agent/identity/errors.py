"""errors.py: the typed errors of agent/identity, each carrying the data to say what went wrong.

Owns the error classes only; the other modules raise them. ``IdentityError`` is the base a
caller catches once (STYLE habit 3).
"""
from __future__ import annotations

from collections.abc import Callable


class IdentityError(Exception):
    """Base of every error raised by ``agent.identity``."""


class SignerError(IdentityError):
    """The signer (the controller) did not answer a CSR for ``uri``; ``cause`` is what it raised."""

    def __init__(self, uri: str, cause: BaseException):
        self.uri = uri
        self.cause = cause
        super().__init__(f"{uri}: certificate request failed: {type(cause).__name__}: {cause}")


class BadCertificate(IdentityError):
    """The signer's answer for ``uri`` was not accepted; ``reason`` says which check failed."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: certificate rejected: {reason}")


class BadBundle(IdentityError):
    """A trust bundle that is not one or more PEM CA certificates."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"trust bundle rejected: {reason}")


class X509ChildError(IdentityError):
    """The child process that makes keys and checks certificates (x509_proc.py) failed: it did
    not start, crashed, was killed, timed out or answered nonsense; ``reason`` says which."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"x509 child process: {reason}")


class NotCertified(IdentityError):
    """No usable certificate for ``uri`` (never certified, expired or forgotten)."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"{uri}: not certified: {reason}")


class PeerIdentityError(IdentityError):
    """The peer of a TLS connection has no usable SPIFFE identity; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"peer identity: {reason}")


class PeerNotAllowed(IdentityError):
    """The peer ``peer`` (a URI) is not among ``allowed`` (a set of URIs or a predicate)."""

    def __init__(self, peer: str, allowed: frozenset[str] | Callable[[str], bool]):
        self.peer = peer
        self.allowed = allowed
        if callable(allowed):
            what = f"refused by {getattr(allowed, '__qualname__', repr(allowed))}"
        else:
            what = f"allowed: {', '.join(sorted(allowed)) or 'nobody'}"
        super().__init__(f"peer {peer} is not allowed ({what})")
