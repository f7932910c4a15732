"""Validate one decoded document (a dict) and build its resource: ``from_dict``.

Owns the field paths and the wording of every problem, and the rules of Mesh (those of
AuthorizationPolicy are ``decode_policy.py``'s); the rules it shares with the fast path
(``decode_fast.py``, tried first) are ``rules.py``'s. Knows nothing of YAML, JSON or files: it
takes what a decoder produced and returns a resource or raises ``ManifestError`` listing every
problem in the document.
"""
from __future__ import annotations

from typing import Any

from controller.api import fields as f
from controller.api import rules as r
from controller.api.decode_fast import fast_decode
from controller.api.decode_policy import policy_spec
from controller.api.duration import parse_duration
from controller.api.errors import FieldError, InvalidDuration, ManifestError, Problem, shown
from controller.api.meta import ObjectMeta
from controller.api.resources import (
    API_VERSION, NO_LOCALITY, AuthorizationPolicy, LoadBalancer, Locality, Mesh, MeshSpec, Resource,
    Service, ServicePort, ServiceSpec, Workload, WorkloadSpec)
from controller.api.spiffe import trust_domain_error

Errs = list[FieldError]
_CLASSES: dict[str, type] = {c.kind: c for c in (Mesh, Workload, Service, AuthorizationPolicy)}
_MIN_TTL, _MAX_TTL = 600.0, 8760 * 3600.0


def from_dict(doc: dict, *, source: str = "<input>", index: int = 0,
              default_namespace: str = "default") -> Resource:
    """Validate a decoded document and return its resource, with defaults filled in.

    ``index`` is the document's number in ``source`` (counting from 1) for messages.
    Raises ``ManifestError`` listing every problem found in the document.
    """
    fast = fast_decode(doc, default_namespace)   # exactly valid documents; the rest explained below
    if fast is not None:
        return fast
    resource, ref, errs = decode_document(doc, default_namespace=default_namespace)
    if errs:
        raise ManifestError([Problem(source, index, ref, e.path, e.message) for e in errs])
    assert resource is not None
    return resource


def decode_document(doc: object, *, default_namespace: str = "default",
                    path: str = "") -> tuple[Resource | None, str, list[FieldError]]:
    """Validate ``doc`` found at ``path`` (``""``, or ``items[2]`` inside a List).

    Returns (resource or None, the ref naming it in messages, every error found).
    """
    errs: Errs = []
    m = f.mapping(doc, path or "<root>", errs,
                  "a mapping with apiVersion, kind, metadata and spec")
    if m is None:
        return None, "document", errs
    f.check_fields(m, path, r.TOP_FIELDS, errs)
    api_version = m.get("apiVersion")       # the common, valid case first; get_str explains the rest
    if api_version != API_VERSION:
        api_version = f.get_str(m, "apiVersion", path, errs, check=_api_version_error)
    kind = m.get("kind")
    if type(kind) is not str or kind not in _CLASSES:
        kind = f.get_str(m, "kind", path, errs, check=_kind_error)
    cls = _CLASSES.get(kind or "")
    meta = _metadata(m, path, errs, cls, default_namespace)
    ref = _ref(m, cls, default_namespace)
    if cls is None:
        return None, ref, errs
    spec_path = f.join(path, "spec")
    raw_spec = m.get("spec")
    if raw_spec is None and cls in (Mesh, AuthorizationPolicy):
        raw_spec = {}
    elif raw_spec is None:
        errs.append(FieldError(spec_path, "required field is missing"))
    spec = None
    if raw_spec is not None:
        spec_map = f.mapping(raw_spec, spec_path, errs)
        if spec_map is not None:
            spec = _SPECS[cls](spec_map, spec_path, errs)
    if errs or api_version is None or meta is None or spec is None:
        return None, ref, errs
    return cls(metadata=meta, spec=spec), ref, errs


def _api_version_error(s: str) -> str | None:
    return None if s == API_VERSION else f"must be {API_VERSION!r}, got {shown(s)}"


def _kind_error(s: str) -> str | None:
    if s in _CLASSES:
        return None
    hint = f.suggest(s, list(_CLASSES))
    tail = f"; did you mean {hint!r}?" if hint else ""
    return f"must be one of {', '.join(_CLASSES)}, got {shown(s)}{tail}"


def _ref(m: dict, cls: type | None, default_namespace: str) -> str:
    meta = m.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if cls is None or not isinstance(name, str) or not name:
        return "document"
    if not cls.namespaced:
        return f"{cls.kind} {name}"
    ns = meta.get("namespace") or default_namespace
    return f"{cls.kind} {ns if isinstance(ns, str) else default_namespace}/{name}"


def _metadata(m: dict, path: str, errs: Errs, cls: type | None,
              default_namespace: str) -> ObjectMeta | None:
    mpath = f.join(path, "metadata")
    raw = f.get(m, "metadata", path, errs, required=True)
    if raw is f.MISSING:
        return None
    d = f.mapping(raw, mpath, errs)
    if d is None:
        return None
    n = len(errs)
    f.check_fields(d, mpath, r.META_FIELDS, errs)
    name = f.get_str(d, "name", mpath, errs, check=r.name_error)
    if cls is Mesh and name is not None and name != "default":
        errs.append(FieldError(f.join(mpath, "name"),
                               f"must be 'default' (a mesh has one Mesh), got {shown(name)}"))
    namespace = f.get_str(d, "namespace", mpath, errs, default="", check=r.namespace_error)
    if cls is not None and not cls.namespaced and namespace:
        errs.append(FieldError(f.join(mpath, "namespace"),
                               f"must be omitted: {cls.kind} is cluster-scoped, got {shown(namespace)}"))
    elif cls is not None and cls.namespaced and namespace == "":
        namespace = default_namespace
    labels = f.get_string_map(d, "labels", mpath, errs, labels=True)
    annotations = f.get_string_map(d, "annotations", mpath, errs, labels=False)
    server = [v if type(v := d.get(k, "")) is str else f.get_str(d, k, mpath, errs, default="")
              for k in r.SERVER_META_FIELDS]
    if len(errs) > n or name is None or namespace is None:
        return None
    return ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations,
                      uid=server[0], resource_version=server[1], creation_timestamp=server[2])


# --- Mesh ---------------------------------------------------------------------------------------

def _ttl_error(s: str) -> str | None:
    try:
        seconds = parse_duration(s)
    except InvalidDuration as e:
        return f"must be a duration like '24h' or '90m': {e.reason}"
    if not _MIN_TTL <= seconds <= _MAX_TTL:
        return f"must be between 10m and 8760h, got {shown(s)}"
    return None


def _mesh(d: dict, path: str, errs: Errs) -> MeshSpec | None:
    n = len(errs)
    f.check_fields(d, path, ("trustDomain", "mtls", "defaultAction", "certificateTTL"), errs)
    spec = dict(
        trust_domain=f.get_str(d, "trustDomain", path, errs, default="cluster.local", check=trust_domain_error),
        mtls=f.get_enum(d, "mtls", path, errs, ("STRICT", "PERMISSIVE"), "STRICT"),
        default_action=f.get_enum(d, "defaultAction", path, errs, ("ALLOW", "DENY"), "ALLOW"),
        certificate_ttl=f.get_str(d, "certificateTTL", path, errs, default="24h", check=_ttl_error))
    return None if len(errs) > n else MeshSpec(**spec)


# --- Workload -----------------------------------------------------------------------------------

def _locality(d: dict, path: str, errs: Errs) -> Locality | None:
    raw = f.get(d, "locality", path, errs, required=False)
    if raw is f.MISSING:
        return NO_LOCALITY
    lpath = f.join(path, "locality")
    m = f.mapping(raw, lpath, errs)
    if m is None:
        return None
    n = len(errs)
    f.check_fields(m, lpath, r.LOCALITY_FIELDS, errs)
    parts = {k: f.get_str(m, k, lpath, errs, default="") for k in r.LOCALITY_FIELDS}
    return None if len(errs) > n else Locality(**parts)


def _workload(d: dict, path: str, errs: Errs) -> WorkloadSpec | None:
    n = len(errs)
    f.check_fields(d, path, r.WORKLOAD_FIELDS, errs)
    spec: dict[str, Any] = dict(
        node=f.get_str(d, "node", path, errs, check=r.node_error),
        service_account=f.get_str(d, "serviceAccount", path, errs, default=r.DEFAULT_SERVICE_ACCOUNT,
                                  check=r.service_account_error),
        addresses=f.get_items(d, "addresses", path, errs, f.as_ip, required=True, unique=True,
                              non_empty=True),
        locality=_locality(d, path, errs),
        netns=f.get_str(d, "netns", path, errs, default="", check=r.abs_path_error),
        cgroup=f.get_str(d, "cgroup", path, errs, default="", check=r.cgroup_error),
        ports=f.get_items(d, "ports", path, errs, f.as_port, unique=True))
    if d.get("netns") is None and d.get("cgroup") is None:
        errs.append(FieldError(path, "must set netns (a pod) or cgroup (a host process), or both; got neither"))
    return None if len(errs) > n else WorkloadSpec(**spec)


# --- Service ------------------------------------------------------------------------------------

def _service_port(v: object, path: str, errs: Errs) -> ServicePort | None:
    m = f.mapping(v, path, errs)
    if m is None:
        return None
    n = len(errs)
    f.check_fields(m, path, r.SERVICE_PORT_FIELDS, errs)
    name = f.get_str(m, "name", path, errs, default="", check=lambda s: s and r.port_name_error(s))
    raw_port = f.get(m, "port", path, errs, required=True)
    port = None if raw_port is f.MISSING else f.as_port(raw_port, f.join(path, "port"), errs)
    raw_target = f.get(m, "targetPort", path, errs, required=False)
    target = port if raw_target is f.MISSING else f.as_port(raw_target, f.join(path, "targetPort"), errs)
    protocol = f.get_enum(m, "protocol", path, errs, r.PROTOCOLS, r.DEFAULT_PROTOCOL)
    if len(errs) > n or port is None:
        return None
    return ServicePort(name=name or "", port=port, target_port=target or port,
                       protocol=protocol or r.DEFAULT_PROTOCOL)


def _unique_ports(raw: list, path: str, errs: Errs) -> None:
    """Names (when given) and ports must be unique; checked on the raw items so that a
    duplicate is reported even when the item has other problems."""
    for key in ("name", "port"):
        seen: dict[object, int] = {}
        for i, p in enumerate(raw):
            v = p.get(key) if isinstance(p, dict) else None
            if v is None or v == "" or isinstance(v, (bool, dict, list)):
                continue
            if v in seen:
                errs.append(FieldError(f.join(f.item(path, i), key),
                                       f"duplicate {key} {shown(v)}, already used by {f.item(path, seen[v])}"))
            else:
                seen[v] = i


def _load_balancer(d: dict, path: str, errs: Errs) -> LoadBalancer | None:
    raw = f.get(d, "loadBalancer", path, errs, required=False)
    if raw is f.MISSING:
        return LoadBalancer()
    lpath = f.join(path, "loadBalancer")
    m = f.mapping(raw, lpath, errs)
    if m is None:
        return None
    n = len(errs)
    f.check_fields(m, lpath, r.LOAD_BALANCER_FIELDS, errs)
    algorithm = f.get_enum(m, "algorithm", lpath, errs, r.ALGORITHMS, r.DEFAULT_ALGORITHM)
    failover = f.get_bool(m, "localityFailover", lpath, errs, default=r.DEFAULT_LOCALITY_FAILOVER)
    return None if len(errs) > n else LoadBalancer(algorithm=algorithm, locality_failover=failover)


def _service(d: dict, path: str, errs: Errs) -> ServiceSpec | None:
    n = len(errs)
    f.check_fields(d, path, r.SERVICE_FIELDS, errs)
    addresses = f.get_items(d, "addresses", path, errs, f.as_ip, required=True, unique=True,
                            non_empty=True)
    selector = f.get_string_map(d, "selector", path, errs, labels=True, required=True)
    if selector is not None and not selector:
        errs.append(FieldError(f.join(path, "selector"),
                               "must not be empty: it picks the workloads behind the service"))
    ports = f.get_items(d, "ports", path, errs, _service_port, required=True, non_empty=True)
    if isinstance(d.get("ports"), list):
        _unique_ports(d["ports"], f.join(path, "ports"), errs)
    lb = _load_balancer(d, path, errs)
    if len(errs) > n:
        return None
    return ServiceSpec(addresses=addresses, selector=selector, ports=ports, load_balancer=lb)


_SPECS: dict[type, Any] = {Mesh: _mesh, Workload: _workload, Service: _service,
                           AuthorizationPolicy: policy_spec}
