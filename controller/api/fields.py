"""Typed reads from untrusted, decoded documents (dicts, lists, scalars), collecting errors.

Owns the strict scalar rules (a string must be a string, an int an int and not a bool),
unknown-field detection with "did you mean", and the wording of type errors. Knows nothing of
kinds; every function appends ``FieldError``s to ``errs`` instead of raising.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from controller.api.errors import FieldError, shown
from controller.api.ip import canonical_ip
from controller.api.meta import FrozenDict, label_key_error, label_value_error
from controller.api.rules import MAX_PORT, MIN_PORT, string_map_ok

Errs = list[FieldError]
MISSING = object()
EMPTY_MAP = FrozenDict()   # the one empty label or annotation map (immutable, so shared)


def join(path: str, key: str) -> str:
    """``spec`` + ``ports`` -> ``spec.ports``; the root path is ""."""
    return f"{path}.{key}" if path else key


def item(path: str, i: int) -> str:
    return f"{path}[{i}]"


def entry(path: str, key: str) -> str:
    """The path of one map entry: ``metadata.labels["app"]``."""
    return f'{path}["{key}"]'


def got(v: object) -> str:
    """Describe a decoded value's type (and a scalar's value) for a 'got ...' message."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"bool {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"{type(v).__name__} {v!r}"
    if isinstance(v, str):
        return f"str {shown(v)}"
    if isinstance(v, dict):
        return "mapping"
    if isinstance(v, list):
        return "list"
    return type(v).__name__


def suggest(key: str, known: tuple[str, ...] | list[str]) -> str | None:
    """A known name that differs from ``key`` only by case or is a close match, if any."""
    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return lowered[key.lower()]
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


def mapping(v: object, path: str, errs: Errs, what: str = "a mapping") -> dict | None:
    if isinstance(v, dict):
        return v
    errs.append(FieldError(path, f"must be {what}, got {got(v)}"))
    return None


def check_fields(m: dict, path: str, known: tuple[str, ...], errs: Errs) -> None:
    """Reject keys of ``m`` that are not in ``known``, suggesting a close known name."""
    for key in m:
        if key in known:
            continue
        name = key if isinstance(key, str) else repr(key)
        hint = suggest(key, known) if isinstance(key, str) else None
        tail = f"did you mean {hint!r}?" if hint else f"expected one of {', '.join(known)}"
        errs.append(FieldError(join(path, name), f"unknown field {name!r}; {tail}"))


def get(m: dict, key: str, path: str, errs: Errs, required: bool) -> Any:
    """``m[key]``, or ``MISSING`` (with an error if required) when absent or null."""
    v = m.get(key)
    if v is None:
        if required:
            errs.append(FieldError(join(path, key), "required field is missing"))
        return MISSING
    return v


def as_str(v: object, path: str, errs: Errs) -> str | None:
    if isinstance(v, str):
        return v
    hint = " (quote it to make it a string)" if isinstance(v, (bool, int, float)) else ""
    errs.append(FieldError(path, f"must be a string, got {got(v)}{hint}"))
    return None


def as_int(v: object, path: str, errs: Errs, lo: int, hi: int) -> int | None:
    if not isinstance(v, int) or isinstance(v, bool):
        errs.append(FieldError(path, f"must be an integer {lo}-{hi}, got {got(v)}"))
        return None
    if not lo <= v <= hi:
        errs.append(FieldError(path, f"must be between {lo} and {hi}, got {v}"))
        return None
    return v


def as_port(v: object, path: str, errs: Errs) -> int | None:
    return as_int(v, path, errs, MIN_PORT, MAX_PORT)


def get_str(m: dict, key: str, path: str, errs: Errs, default: str | None = None,
            check: Callable[[str], str | None] | None = None) -> str | None:
    """A string field: ``default`` when absent (required when default is None), None if invalid."""
    v = m.get(key)
    if v is None:
        if default is None:
            errs.append(FieldError(join(path, key), "required field is missing"))
        return default
    if not isinstance(v, str):
        as_str(v, join(path, key), errs)
        return None
    if check is not None:
        reason = check(v)
        if reason:
            errs.append(FieldError(join(path, key), reason))
            return None
    return v


def get_bool(m: dict, key: str, path: str, errs: Errs, default: bool) -> bool | None:
    v = get(m, key, path, errs, required=False)
    if v is MISSING:
        return default
    if not isinstance(v, bool):
        errs.append(FieldError(join(path, key), f"must be true or false, got {got(v)}"))
        return None
    return v


def get_enum(m: dict, key: str, path: str, errs: Errs, choices: tuple[str, ...],
             default: str) -> str | None:
    v = get(m, key, path, errs, required=False)
    if v is MISSING:
        return default
    if v in choices and isinstance(v, str):
        return v
    shown_v = shown(v) if isinstance(v, str) else got(v)
    message = f"must be one of {', '.join(choices)}, got {shown_v}"
    hint = next((c for c in choices if isinstance(v, str) and c.lower() == v.lower()), None)
    if hint:
        message += f"; did you mean {hint!r}?"
    errs.append(FieldError(join(path, key), message))
    return None


def get_list(m: dict, key: str, path: str, errs: Errs, required: bool = False) -> list | None:
    """A list field: [] when absent and optional, None if missing-but-required or not a list."""
    v = get(m, key, path, errs, required=required)
    if v is MISSING:
        return None if required else []
    if not isinstance(v, list):
        errs.append(FieldError(join(path, key), f"must be a list, got {got(v)}"))
        return None
    return v


def get_items(m: dict, key: str, path: str, errs: Errs,
              read: Callable[[object, str, Errs], Any], required: bool = False,
              unique: bool = False, non_empty: bool = False) -> tuple | None:
    """A list whose items ``read`` validates; None when any item (or the list) is invalid."""
    values = m.get(key)
    if type(values) is not list:   # absent, null or not a list: the general path says which
        values = get_list(m, key, path, errs, required=required)
        if values is None:
            return None
    lpath = join(path, key)
    if non_empty and not values:
        errs.append(FieldError(lpath, "must not be empty"))
        return None
    out, ok, seen = [], True, {}
    for i, v in enumerate(values):
        r = read(v, item(lpath, i), errs)
        if r is None:
            ok = False
            continue
        if unique and r in seen:
            errs.append(FieldError(item(lpath, i), f"duplicate {shown(r)}, already at {item(lpath, seen[r])}"))
            ok = False
            continue
        seen[r] = i
        out.append(r)
    return tuple(out) if ok else None


def get_string_map(m: dict, key: str, path: str, errs: Errs, labels: bool,
                   required: bool = False) -> FrozenDict | None:
    """A label map (``labels=True``: Kubernetes label rules) or annotation map (any string values)."""
    v = m.get(key)
    if v is None:
        if required:
            errs.append(FieldError(join(path, key), "required field is missing"))
            return None
        return EMPTY_MAP
    if not v:
        return EMPTY_MAP if isinstance(v, dict) else _string_map_slow(v, join(path, key), errs, labels)
    if isinstance(v, dict) and string_map_ok(v, labels):
        return FrozenDict(v)
    return _string_map_slow(v, join(path, key), errs, labels)


def _string_map_slow(v: object, mpath: str, errs: Errs, labels: bool) -> FrozenDict | None:
    d = mapping(v, mpath, errs, "a mapping of strings to strings")
    if d is None:
        return None
    out, ok = {}, True
    for k, val in d.items():
        if not isinstance(k, str):
            errs.append(FieldError(mpath, f"keys must be strings, got {got(k)}"))
            ok = False
            continue
        epath = entry(mpath, k)
        reason = label_key_error(k)
        if reason:
            errs.append(FieldError(epath, f"invalid key: {reason}"))
            ok = False
        s = as_str(val, epath, errs)
        if s is None:
            ok = False
            continue
        reason = label_value_error(s) if labels else None
        if reason:
            errs.append(FieldError(epath, reason))
            ok = False
        out[k] = s
    return FrozenDict(out) if ok else None


def as_ip(v: object, path: str, errs: Errs) -> str | None:
    """An IPv4 or IPv6 address literal, normalised (``2001:DB8::1`` -> ``2001:db8::1``)."""
    s = as_str(v, path, errs)
    if s is None:
        return None
    try:
        return canonical_ip(s)
    except ValueError:
        errs.append(FieldError(path, f"must be an IPv4 or IPv6 address, got {shown(s)}"))
        return None
