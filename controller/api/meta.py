"""Object metadata and the Kubernetes naming rules every resource shares.

Owns ``ObjectMeta``, the immutable ``FrozenDict`` used for label maps, and the checks for
DNS-1123 names and label/annotation keys and values. Knows nothing of kinds, specs or YAML.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


class FrozenDict(dict):
    """A ``dict`` that cannot change and can be hashed, so resources stay immutable values."""

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("FrozenDict is immutable")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple:
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def freeze(obj: object) -> None:
    """Turn a frozen dataclass's list fields into tuples and dict fields into ``FrozenDict``.

    Lets callers build resources from lists and dicts while the values stay hashable. Only the
    fields annotated as containers (``tuple``, ``dict``, ``list``) are looked at.
    """
    cls = type(obj)
    names = _CONTAINER_FIELDS.get(cls)
    if names is None:
        names = _CONTAINER_FIELDS[cls] = tuple(
            f.name for f in fields(cls)  # type: ignore[arg-type]
            if not isinstance(f.type, str) or f.type.startswith(("tuple", "dict", "list")))
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, list):
            object.__setattr__(obj, name, tuple(v))
        elif isinstance(v, dict) and not isinstance(v, FrozenDict):
            object.__setattr__(obj, name, FrozenDict(v))


_CONTAINER_FIELDS: dict[type, tuple[str, ...]] = {}   # per dataclass, found once


@dataclass(frozen=True)
class ObjectMeta:
    """Name, namespace, labels and annotations; ``resource_version``, ``uid`` and
    ``creation_timestamp`` are set by the server and empty until then."""

    name: str
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=FrozenDict)
    annotations: dict[str, str] = field(default_factory=FrozenDict)
    resource_version: str = ""
    uid: str = ""
    creation_timestamp: str = ""

    def __post_init__(self) -> None:
        freeze(self)


def dns_label_error(s: str) -> str | None:
    """Why ``s`` is not a DNS-1123 label (RFC 1123, as Kubernetes namespaces), or None."""
    if len(s) > 63:
        return f"must be at most 63 characters, got {len(s)}"
    if not _DNS_LABEL.fullmatch(s):
        return ("must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending "
                f"with a letter or digit), got {s!r}")
    return None


def dns_subdomain_error(s: str) -> str | None:
    """Why ``s`` is not a DNS-1123 subdomain (as Kubernetes object names), or None."""
    if len(s) > 253:
        return f"must be at most 253 characters, got {len(s)}"
    if not _DNS_SUBDOMAIN.fullmatch(s):
        return ("must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting "
                f"and ending with a letter or digit), got {s!r}")
    return None


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label/annotation key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return f"key prefix before '/' must not be empty, got {key!r}"
        reason = dns_subdomain_error(prefix)
        if reason:
            return f"key prefix {reason}"
    if not name:
        return f"key name must not be empty, got {key!r}"
    if len(name) > 63:
        return f"key name must be at most 63 characters, got {len(name)}"
    if not _QUALIFIED_NAME.fullmatch(name):
        return ("key name may only contain letters, digits, '-', '_' and '.', starting and ending "
                f"with a letter or digit, got {key!r}")
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes label value (empty, or at most 63 safe characters)."""
    if len(value) > 63:
        return f"value must be at most 63 characters, got {len(value)}"
    if not _LABEL_VALUE.fullmatch(value):
        return ("value may only contain letters, digits, '-', '_' and '.', starting and ending "
                f"with a letter or digit, got {value!r}")
    return None
