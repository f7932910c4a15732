"""Validate an AuthorizationPolicy spec: selector, action and rules of sources and operations.

Owns the syntax of principals, namespaces, IP blocks, ports, methods and paths as policies
write them (Istio's forms, with one leading or trailing '*'). Knows nothing of how a policy is
evaluated; that is the agent's ``policy.py``.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from controller.api import fields as f
from controller.api.errors import FieldError, InvalidSpiffeId, shown
from controller.api.meta import dns_label_error
from controller.api.resources import (OPERATION_FIELDS, SOURCE_FIELDS, AuthorizationPolicySpec,
                                      Operation, Rule, Source)
from controller.api.spiffe import parse_principal

Errs = list[FieldError]
# RFC 9110 token characters, without lowercase letters: methods are written in uppercase.
_METHOD = re.compile(r"[A-Z0-9!#$%&'+.^_`|~-]+")
_PRINCIPAL_CHARS = re.compile(r"[a-zA-Z0-9._/-]*")
_PATH_CHARS = re.compile(r"[^\s?#*]*")


def _wildcard(s: str) -> str | None:
    """The part of ``s`` beside its single leading or trailing '*', or None if not a wildcard."""
    if "*" not in s:
        return None
    if s == "*":
        return ""
    if s.count("*") == 1 and (s.startswith("*") or s.endswith("*")):
        return s.strip("*")
    return "!"  # more than one '*', or one in the middle: never valid


def _principal(v: object, path: str, errs: Errs) -> str | None:
    s = f.as_str(v, path, errs)
    if s is None:
        return None
    rest = _wildcard(s)
    if rest is None:
        try:
            parse_principal(s)
        except InvalidSpiffeId as e:
            errs.append(FieldError(path, f"must be a principal like 'cluster.local/ns/shop/sa/web' "
                                         f"or '*', got {shown(s)}: {e.reason}"))
            return None
        return s
    if rest == "!" or not _PRINCIPAL_CHARS.fullmatch(rest) or "//" in rest:
        errs.append(FieldError(path, "a principal pattern may have one '*', only at its start or end, "
                                     f"and otherwise letters, digits, '.', '-', '_' and '/', got {shown(s)}"))
        return None
    return s


def _namespace(v: object, path: str, errs: Errs) -> str | None:
    s = f.as_str(v, path, errs)
    if s is None or s == "*":
        return s
    reason = dns_label_error(s)
    if reason:
        errs.append(FieldError(path, f"namespace {reason} (or '*')"))
        return None
    return s


def _ip_block(v: object, path: str, errs: Errs) -> str | None:
    s = f.as_str(v, path, errs)
    if s is None:
        return None
    try:
        return str(ipaddress.ip_network(s, strict=True)) if "/" in s else str(ipaddress.ip_address(s))
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(s, strict=False)
    except ValueError:
        errs.append(FieldError(path, f"must be a CIDR block like '10.10.0.0/16' or an IP address, got {shown(s)}"))
        return None
    errs.append(FieldError(path, f"has host bits set: got {shown(s)}; did you mean '{net}'?"))
    return None


def _method(v: object, path: str, errs: Errs) -> str | None:
    s = f.as_str(v, path, errs)
    if s is None:
        return None
    if _METHOD.fullmatch(s):
        return s
    hint = f"; did you mean {s.upper()!r}?" if _METHOD.fullmatch(s.upper()) else ""
    errs.append(FieldError(path, f"must be an uppercase HTTP method like GET or POST, got {shown(s)}{hint}"))
    return None


def _path(v: object, path: str, errs: Errs) -> str | None:
    s = f.as_str(v, path, errs)
    if s is None:
        return None
    rest = _wildcard(s)
    bare = s if rest is None else rest
    ok = (rest != "!" and _PATH_CHARS.fullmatch(bare) is not None
          and (s.startswith("/") or (s.startswith("*") and rest is not None)))
    if not ok:
        errs.append(FieldError(path, "must be a path starting with '/' (no '?', '#' or spaces), optionally "
                                     f"with one '*' at its start or end ('/api/*', '*.js', '*'), got {shown(s)}"))
        return None
    return s


_READERS: dict[str, Callable[[object, str, Errs], Any]] = {
    "principals": _principal, "notPrincipals": _principal,
    "namespaces": _namespace, "notNamespaces": _namespace,
    "ipBlocks": _ip_block, "notIpBlocks": _ip_block,
    "ports": f.as_port, "notPorts": f.as_port,
    "methods": _method, "notMethods": _method,
    "paths": _path, "notPaths": _path,
}


def _part(names: tuple[tuple[str, str], ...], cls: type) -> Callable[[object, str, Errs], Any]:
    keys = tuple(k for k, _ in names)

    def read(v: object, path: str, errs: Errs) -> Any:
        m = f.mapping(v, path, errs)
        if m is None:
            return None
        n = len(errs)
        f.check_fields(m, path, keys, errs)
        values = {attr: f.get_items(m, key, path, errs, _READERS[key], unique=True) for key, attr in names}
        if len(errs) > n:
            return None
        if not any(values.values()):
            errs.append(FieldError(path, f"must set at least one field of {', '.join(keys)}; got none"))
            return None
        return cls(**values)

    return read


_source = _part(SOURCE_FIELDS, Source)
_operation = _part(OPERATION_FIELDS, Operation)


def _rule(v: object, path: str, errs: Errs) -> Rule | None:
    m = f.mapping(v, path, errs)
    if m is None:
        return None
    n = len(errs)
    f.check_fields(m, path, ("from", "to"), errs)
    sources = f.get_items(m, "from", path, errs, _source)
    operations = f.get_items(m, "to", path, errs, _operation)
    return None if len(errs) > n else Rule(from_=sources, to=operations)


def policy_spec(d: dict, path: str, errs: Errs) -> AuthorizationPolicySpec | None:
    """Validate an AuthorizationPolicy ``spec`` mapping found at ``path``."""
    n = len(errs)
    f.check_fields(d, path, ("selector", "action", "rules"), errs)
    selector = f.get_string_map(d, "selector", path, errs, labels=True)
    action = f.get_enum(d, "action", path, errs, ("ALLOW", "DENY", "AUDIT"), "ALLOW")
    rules = f.get_items(d, "rules", path, errs, _rule)
    if len(errs) > n:
        return None
    return AuthorizationPolicySpec(selector=selector, action=action, rules=rules)
