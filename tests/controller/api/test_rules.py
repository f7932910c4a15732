"""Both decoders hold to every rule of ``rules.py``: what one accepts the other accepts, and what
one refuses the other refuses, for each enum value, field name and port bound.

A rule written in only one decoder (the fast path accepting a protocol the detailed validator does
not know, say) fails here: each rule is also changed in ``rules.py`` alone, and both decoders must
follow. So does a rule added to ``rules.py`` without a case below.
"""
from __future__ import annotations

import copy
import importlib

import pytest

from controller.api import decode_fast
from controller.api import rules as r
from controller.api.decode import decode_document

META = {"name": "web", "namespace": "shop", "labels": {"app": "web"}, "annotations": {"a": "b"},
        "uid": "u-1", "resourceVersion": "7", "creationTimestamp": "2024-01-01T00:00:00Z"}
# every field of every object set, so that each allowed field name is accepted
WORKLOAD = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload", "metadata": META,
            "spec": {"node": "node-1", "serviceAccount": "web", "addresses": ["10.0.0.1"],
                     "locality": {"region": "r", "zone": "z", "subzone": "s"},
                     "netns": "/var/run/netns/web", "cgroup": "/sys/fs/cgroup/web", "ports": [80]}}
SERVICE = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service", "metadata": META,
           "spec": {"addresses": ["10.96.0.1"], "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}],
                    "loadBalancer": {"algorithm": "random", "localityFailover": False}}}

# rules.py name -> (document, path to the field holding one of its values)
ENUMS = {"PROTOCOLS": (SERVICE, ("spec", "ports", 0, "protocol")),
         "ALGORITHMS": (SERVICE, ("spec", "loadBalancer", "algorithm"))}
DEFAULTS = {"PROTOCOLS": r.DEFAULT_PROTOCOL, "ALGORITHMS": r.DEFAULT_ALGORITHM}
# rules.py name -> (document, path to the object those fields belong to)
FIELDS = {"TOP_FIELDS": (WORKLOAD, ()), "META_FIELDS": (WORKLOAD, ("metadata",)),
          "SERVER_META_FIELDS": (SERVICE, ("metadata",)),
          "WORKLOAD_FIELDS": (WORKLOAD, ("spec",)), "LOCALITY_FIELDS": (WORKLOAD, ("spec", "locality")),
          "SERVICE_FIELDS": (SERVICE, ("spec",)), "SERVICE_PORT_FIELDS": (SERVICE, ("spec", "ports", 0)),
          "LOAD_BALANCER_FIELDS": (SERVICE, ("spec", "loadBalancer"))}
PORTS = [(WORKLOAD, ("spec", "ports", 0)), (SERVICE, ("spec", "ports", 0, "port")),
         (SERVICE, ("spec", "ports", 0, "targetPort"))]


def tuples_of_rules(suffix: str) -> set[str]:
    return {n for n, v in vars(r).items() if n.isupper() and isinstance(v, tuple) and n.endswith(suffix)}


def with_value(doc: dict, path: tuple, value: object) -> dict:
    """A copy of ``doc`` with the field at ``path`` set to ``value`` (removed for ``...``)."""
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


def at(doc: object, path: tuple) -> object:
    for key in path:
        doc = doc[key]
    return doc


def accepted_by_both(doc: dict):
    fast = decode_fast.fast_decode(copy.deepcopy(doc), "default")
    slow, _, errs = decode_document(copy.deepcopy(doc))
    assert errs == [] and fast is not None, (doc, errs)
    assert repr(fast) == repr(slow)
    return fast


def refused_by_both(doc: dict) -> None:
    assert decode_fast.fast_decode(copy.deepcopy(doc), "default") is None, doc
    assert decode_document(copy.deepcopy(doc))[2], doc


def test_every_rule_has_a_case_here():
    assert tuples_of_rules("") - tuples_of_rules("_FIELDS") == set(ENUMS) == set(DEFAULTS)
    assert tuples_of_rules("_FIELDS") == set(FIELDS)


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_each_enum_value_is_accepted_by_both_and_any_other_refused_by_both(enum):
    doc, path = ENUMS[enum]
    allowed = getattr(r, enum)
    for v in allowed:
        assert repr(v) in repr(accepted_by_both(with_value(doc, path, v)))
    outside = [v.upper() for v in allowed] + [v + " " for v in allowed] + ["", "x", 1, True, [], {}]
    for v in outside:
        assert v not in allowed
        refused_by_both(with_value(doc, path, v))
    for absent in (..., None):
        assert repr(DEFAULTS[enum]) in repr(accepted_by_both(with_value(doc, path, absent)))


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_allowed_field_is_accepted_by_both_and_any_other_refused_by_both(name):
    doc, path = FIELDS[name]
    assert set(getattr(r, name)) <= set(at(doc, path))   # every allowed field is set, and accepted
    accepted_by_both(doc)
    for bogus in ("bogus", getattr(r, name)[0].upper(), 1):
        refused_by_both(with_value(doc, path + (bogus,), "x"))


@pytest.mark.parametrize("doc, path", PORTS)
def test_the_port_range_is_the_same_on_both_paths(doc, path):
    for port in (r.MIN_PORT, r.MAX_PORT):
        accepted_by_both(with_value(doc, path, port))
    for port in (r.MIN_PORT - 1, r.MAX_PORT + 1, True, "80"):
        refused_by_both(with_value(doc, path, port))


@pytest.fixture
def rule_changed(monkeypatch):
    """``rule_changed(name, value)`` sets ``rules.<name>`` for this test; ``decode_fast``, which
    turns the rules into sets when imported, is imported again (``decode`` reads them per call)."""
    def change(name: str, value: tuple) -> None:
        monkeypatch.setattr(r, name, value)
        importlib.reload(decode_fast)
    yield change
    monkeypatch.undo()
    importlib.reload(decode_fast)


NARROWED = {**ENUMS, **{n: v for n, v in FIELDS.items() if n != "SERVER_META_FIELDS"}}  # part of META


@pytest.mark.parametrize("name", sorted(NARROWED))
def test_a_value_taken_out_of_a_rule_is_refused_by_both(name, rule_changed):
    doc, path = NARROWED[name]
    allowed = getattr(r, name)
    used = at(doc, path) if name in ENUMS else allowed[0]
    rule_changed(name, tuple(v for v in allowed if v != used))
    refused_by_both(doc)


@pytest.mark.parametrize("enum", sorted(ENUMS))
def test_a_value_added_to_an_enum_is_accepted_by_both(enum, rule_changed):
    doc, path = ENUMS[enum]
    rule_changed(enum, getattr(r, enum) + ("zz-new",))
    assert "zz-new" in repr(accepted_by_both(with_value(doc, path, "zz-new")))
