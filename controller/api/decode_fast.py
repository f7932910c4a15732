"""The happy path of ``from_dict``: ``fast_decode`` builds a Workload or Service from a document
that is exactly valid, or returns None and lets ``decode.py`` (the detailed validator) say why.

Owns no rule of its own: every rule is ``rules.py``'s, the one ``decode.py`` applies too, checked
here without paths or error lists; it must not import ``decode.py`` (which calls it first). It
must give the same resource ``decode_document`` gives whenever it gives one
(tests/controller/api/test_decode_fast.py compares the two on random documents). Values that
repeat across objects (namespaces, nodes, ports, localities) are checked, and immutable parts
built, once. Other kinds, and anything unusual (a subclass of dict, str or int, an IPv6 literal
that is not canonical), go to the detailed path. No I/O.
"""
from __future__ import annotations

from typing import Any, Callable

from controller.api import rules as r
from controller.api.fields import EMPTY_MAP
from controller.api.ip import canonical_ip
from controller.api.meta import FrozenDict, ObjectMeta
from controller.api.resources import (API_VERSION, NO_LOCALITY, LoadBalancer, Locality, Service,
                                      ServicePort, ServiceSpec, Workload, WorkloadSpec)

# the rules as sets, for ``keys() <=`` and ``in``
_TOP, _META = frozenset(r.TOP_FIELDS), frozenset(r.META_FIELDS)
_WORKLOAD, _LOCALITY = frozenset(r.WORKLOAD_FIELDS), frozenset(r.LOCALITY_FIELDS)
_SERVICE, _PORT = frozenset(r.SERVICE_FIELDS), frozenset(r.SERVICE_PORT_FIELDS)
_LB = frozenset(r.LOAD_BALANCER_FIELDS)
_PROTOCOLS, _ALGORITHMS = frozenset(r.PROTOCOLS), frozenset(r.ALGORITHMS)
_DEFAULT_LB = LoadBalancer()
_LIMIT = 8192   # entries per memo; a memo that grows past it starts again


class _Valid:
    """The strings ``check`` accepts, remembered (the checks are pure)."""

    __slots__ = ("check", "seen")

    def __init__(self, check: Callable[[str], str | None]) -> None:
        self.check, self.seen = check, set()

    def __call__(self, s: object) -> bool:
        if type(s) is not str:
            return False
        if s in self.seen:
            return True
        if self.check(s) is not None:
            return False
        if len(self.seen) >= _LIMIT:
            self.seen.clear()
        self.seen.add(s)
        return True


# namespaces, port names, nodes, service accounts: few values, repeated across objects
_namespace = _Valid(r.namespace_error)
_port_name = _Valid(r.port_name_error)
_node = _Valid(r.node_error)
_account = _Valid(r.service_account_error)
_cgroup = _Valid(r.cgroup_error)


def _name(s: object) -> bool:
    """``r.name_error(s) is None`` for a str (object names are unique: nothing to remember)."""
    return type(s) is str and r.name_error(s) is None


_ports: dict[tuple, ServicePort] = {}
_localities: dict[tuple, Locality] = {}


def _new(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of the frozen dataclass ``cls`` holding ``fields`` (every field, already as
    ``__init__`` and ``__post_init__`` would store it: tuples, FrozenDicts), without running them.
    Set one by one, in field order, as ``__init__`` does: the instance then keeps the class's
    shared-key attribute storage (assigning a whole ``__dict__`` would take twice the memory)."""
    obj = _object_new(cls)
    for name, value in fields.items():
        _setattr(obj, name, value)
    return obj


_object_new, _setattr = object.__new__, object.__setattr__


def _string_map(v: object, labels: bool) -> FrozenDict | None:
    if v is None:
        return EMPTY_MAP
    if type(v) is not dict:
        return None
    if not v:
        return EMPTY_MAP
    return FrozenDict(v) if r.string_map_ok(v, labels) else None


def _ips(v: object) -> tuple[str, ...] | None:
    """Non-empty, unique, each an IP literal: canonical forms, as ``f.as_ip`` gives them."""
    if type(v) is not list or not v:
        return None
    out = []
    for s in v:
        if type(s) is not str:
            return None
        try:
            out.append(canonical_ip(s))
        except ValueError:
            return None
    if len(set(out)) != len(out):
        return None
    return tuple(out)


def _int_port(v: object) -> bool:
    return type(v) is int and r.MIN_PORT <= v <= r.MAX_PORT


def fast_decode(doc: object, default_namespace: str) -> Workload | Service | None:
    """The Workload or Service ``doc`` describes if it is valid as it stands, else None (which
    says nothing: the detailed path decides)."""
    if type(doc) is not dict or not doc.keys() <= _TOP or doc.get("apiVersion") != API_VERSION:
        return None
    kind = doc.get("kind")
    if kind == "Workload":
        spec_of: Callable[[dict], Any] = _workload
        cls: type = Workload
    elif kind == "Service":
        spec_of, cls = _service, Service
    else:
        return None
    m = doc.get("metadata")
    if type(m) is not dict or not m.keys() <= _META:
        return None
    name, ns = m.get("name"), m.get("namespace")
    if not _name(name):
        return None
    if ns is None:
        ns = default_namespace
    elif type(ns) is not str or (ns not in _namespace.seen and not _namespace(ns)):
        return None
    labels = _string_map(m.get("labels"), True)
    annotations = _string_map(m.get("annotations"), False)
    if labels is None or annotations is None:
        return None
    server = []
    for k in r.SERVER_META_FIELDS:
        v = m.get(k)
        if v is None:
            v = ""
        elif type(v) is not str:
            return None
        server.append(v)
    raw_spec = doc.get("spec")
    if type(raw_spec) is not dict:
        return None
    spec = spec_of(raw_spec)
    if spec is None:
        return None
    meta = _object_new(ObjectMeta)   # _new, unrolled: this runs once per object
    _setattr(meta, "name", name)
    _setattr(meta, "namespace", ns)
    _setattr(meta, "labels", labels)
    _setattr(meta, "annotations", annotations)
    _setattr(meta, "resource_version", server[1])
    _setattr(meta, "uid", server[0])
    _setattr(meta, "creation_timestamp", server[2])
    obj = _object_new(cls)
    _setattr(obj, "metadata", meta)
    _setattr(obj, "spec", spec)
    _setattr(obj, "key", (cls.kind, ns, name))   # what Resource.key computes on first use
    return obj


def _workload(s: dict) -> WorkloadSpec | None:
    if not s.keys() <= _WORKLOAD:
        return None
    node, account = s.get("node"), s.get("serviceAccount")
    netns, cgroup = s.get("netns"), s.get("cgroup")
    if type(node) is not str or not (node in _node.seen or _node(node)):
        return None
    if account is not None and (type(account) is not str
                                or not (account in _account.seen or _account(account))):
        return None
    if netns is None and cgroup is None:
        return None
    if (netns is not None and (type(netns) is not str or r.abs_path_error(netns) is not None)) \
            or (cgroup is not None and not _cgroup(cgroup)):
        return None
    addresses = _ips(s.get("addresses"))
    if addresses is None:
        return None
    raw_ports = s.get("ports")
    if raw_ports is None:
        ports: tuple = ()
    elif type(raw_ports) is not list or not all(_int_port(p) for p in raw_ports) \
            or len(set(raw_ports)) != len(raw_ports):
        return None
    else:
        ports = tuple(raw_ports)
    locality = _locality(s.get("locality"))
    if locality is None:
        return None
    spec = _object_new(WorkloadSpec)   # _new, unrolled
    _setattr(spec, "node", node)
    _setattr(spec, "addresses", addresses)
    _setattr(spec, "service_account", r.DEFAULT_SERVICE_ACCOUNT if account is None else account)
    _setattr(spec, "locality", locality)
    _setattr(spec, "netns", netns or "")
    _setattr(spec, "cgroup", cgroup or "")
    _setattr(spec, "ports", ports)
    return spec


def _locality(v: object) -> Locality | None:
    if v is None:
        return NO_LOCALITY
    if type(v) is not dict or not v.keys() <= _LOCALITY:
        return None
    parts = tuple("" if (x := v.get(k)) is None else x for k in r.LOCALITY_FIELDS)
    if type(parts[0]) is not str or type(parts[1]) is not str or type(parts[2]) is not str:
        return None
    loc = _localities.get(parts)
    if loc is None:
        if len(_localities) >= _LIMIT:
            _localities.clear()
        loc = _localities[parts] = Locality(region=parts[0], zone=parts[1], subzone=parts[2])
    return loc


def _service(s: dict) -> ServiceSpec | None:
    if not s.keys() <= _SERVICE:
        return None
    addresses = _ips(s.get("addresses"))
    selector = s.get("selector")
    if addresses is None or type(selector) is not dict or not selector \
            or not r.string_map_ok(selector, True):
        return None
    raw = s.get("ports")
    if type(raw) is not list or not raw:
        return None
    ports = []
    for p in raw:
        sp = _service_port(p)
        if sp is None:
            return None
        ports.append(sp)
    names = [p.name for p in ports if p.name]
    if len(set(names)) != len(names) or len({p.port for p in ports}) != len(ports):
        return None
    lb = _load_balancer(s.get("loadBalancer"))
    if lb is None:
        return None
    return _new(ServiceSpec, {"addresses": addresses, "selector": FrozenDict(selector),
                              "ports": tuple(ports), "load_balancer": lb})


def _service_port(p: object) -> ServicePort | None:
    if type(p) is not dict or not p.keys() <= _PORT:
        return None
    name, port, target, protocol = p.get("name"), p.get("port"), p.get("targetPort"), p.get("protocol")
    if name is None or name == "":
        name = ""
    elif not _port_name(name):
        return None
    if not _int_port(port) or not (target is None or _int_port(target)):
        return None
    if protocol is None:
        protocol = r.DEFAULT_PROTOCOL
    elif type(protocol) is not str or protocol not in _PROTOCOLS:
        return None
    parts = (name, port, target or port, protocol)
    sp = _ports.get(parts)
    if sp is None:
        if len(_ports) >= _LIMIT:
            _ports.clear()
        sp = _ports[parts] = ServicePort(name=name, port=port, target_port=parts[2], protocol=protocol)
    return sp


def _load_balancer(v: object) -> LoadBalancer | None:
    if v is None:
        return _DEFAULT_LB
    if type(v) is not dict or not v.keys() <= _LB:
        return None
    algorithm, failover = v.get("algorithm"), v.get("localityFailover")
    if algorithm is None:
        algorithm = r.DEFAULT_ALGORITHM
    if failover is None:
        failover = r.DEFAULT_LOCALITY_FAILOVER
    if type(algorithm) is not str or algorithm not in _ALGORITHMS or type(failover) is not bool:
        return None
    if algorithm == _DEFAULT_LB.algorithm and failover is _DEFAULT_LB.locality_failover:
        return _DEFAULT_LB
    return LoadBalancer(algorithm=algorithm, locality_failover=failover)
