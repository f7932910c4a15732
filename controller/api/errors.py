"""Typed errors of the resource contract: what went wrong, where, with the data to say so.

Owns the error classes, the one-line message format of a manifest problem and how a value is
shown in one. Knows nothing about YAML, kinds or validation rules; the other modules raise these.
"""
from __future__ import annotations

from dataclasses import dataclass


def shown(v: object, limit: int = 60) -> str:
    """``repr`` of a value, shortened for messages."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class ApiError(Exception):
    """Base of every error raised by ``controller.api``."""


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of one document: ``path`` like ``spec.ports[1].targetPort``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class Problem:
    """One problem in one document of one source.

    ``index`` counts documents from 1; ``ref`` names the object (``Service shop/web``,
    ``Mesh default``) or is ``document`` when kind or name are not known.
    """

    source: str
    index: int
    ref: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: document {self.index}: {self.ref}: {self.path}: {self.message}"


class ManifestError(ApiError):
    """One or more documents are invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class UnknownKind(ApiError):
    """A kind name (kind, plural, singular or short name) that no registered kind answers to."""

    def __init__(self, name: str, valid: tuple[str, ...]):
        self.name = name
        self.valid = tuple(valid)
        super().__init__(f"unknown kind {name!r}: expected one of {', '.join(self.valid)}")


class InvalidSpiffeId(ApiError):
    """A string that is not a nodemesh SPIFFE ID (``spiffe://td/ns/N/sa/S``)."""

    def __init__(self, value: str, reason: str):
        self.value = value
        self.reason = reason
        super().__init__(f"invalid SPIFFE ID {value!r}: {reason}")


class InvalidDuration(ApiError):
    """A string that is not a Go-style duration such as ``90s``, ``1h30m`` or ``500ms``."""

    def __init__(self, value: object, reason: str):
        self.value = value
        self.reason = reason
        super().__init__(f"invalid duration {value!r}: {reason}")
