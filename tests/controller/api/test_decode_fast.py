"""The fast decode path gives exactly what the detailed validator gives, or nothing.

Random documents, valid and invalid, near the shapes the controller sends: whenever
``fast_decode`` returns a resource, ``decode_document`` accepts the document and returns an equal
resource (same repr, same key); for valid documents of the usual shapes the fast path answers.
"""
from __future__ import annotations

import copy
import random

import pytest

from bench.config_scale import objects
from controller.api import ManifestError, from_dict
from controller.api.decode import decode_document
from controller.api.decode_fast import fast_decode

WORKLOAD = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"app": "web", "version": "v1"}},
            "spec": {"node": "node-1", "serviceAccount": "web", "addresses": ["10.0.0.1"],
                     "ports": [8080], "netns": "/var/run/netns/pod-1"}}
SERVICE = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7"},
           "spec": {"addresses": ["10.96.0.1"], "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "http"}]}}

# values a field may take: valid ones and the ways a field goes wrong
ANY = [None, "", 0, 1, -1, 65536, True, False, 1.5, [], {}, "x", "web", "Web", "a/b", "bad name",
       "/var/run/netns/x", "/sys/fs/cgroup/a", "/sys/fs/cgroup", "/a/../b", "relative",
       "10.0.0.2", "10.0.0.01", "2001:DB8::1", "2001:db8::1", "::ffff:10.0.0.1", "300.1.1.1",
       ["10.0.0.3"], ["10.0.0.3", "10.0.0.3"], ["10.0.0.4", "2001:db8::4"], [8080, 8080], [1, 2],
       [True], ["80"], {"app": "x"}, {"app": ""}, {"": "x"}, {"a/b": "c"}, {"app": 1},
       {1: "x"}, {"k": "v" * 64}, "tcp", "http", "http2", "HTTP", "ewma", "random", "x" * 64,
       "ns-1", "default", "a.b", "a..b", "a" * 253, "a" * 254, "a." * 126 + "a", {"region": "r"}, {"region": 0}, {"zone": "z", "x": 1},
       {"algorithm": "random"}, {"localityFailover": False}, {"localityFailover": 0},
       {"algorithm": None, "localityFailover": None}, {"port": 80}, [{"port": 80}],
       [{"port": 80}, {"port": 80}], [{"name": "a", "port": 80}, {"name": "a", "port": 81}],
       [{"name": "", "port": 80, "targetPort": None}], [{"port": True}], [{"port": 80, "bogus": 1}],
       [{"port": 80, "protocol": None, "name": None}], [{"port": 80, "targetPort": 0}], [80]]
PATHS = [("metadata",), ("spec",), ("apiVersion",), ("kind",), ("bogus",)]
META = ["name", "namespace", "labels", "annotations", "uid", "resourceVersion", "creationTimestamp",
        "bogus"]
WSPEC = ["node", "serviceAccount", "addresses", "locality", "netns", "cgroup", "ports", "bogus"]
SSPEC = ["addresses", "selector", "ports", "loadBalancer", "bogus"]


def mutate(rng: random.Random, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.random()
        if where < 0.1:
            target, key = doc, rng.choice(PATHS)[0]
        elif where < 0.4:
            target, key = doc["metadata"] if isinstance(doc.get("metadata"), dict) else doc, rng.choice(META)
        else:
            spec = doc.get("spec")
            if not isinstance(spec, dict):
                continue
            target, key = spec, rng.choice(WSPEC if doc.get("kind") == "Workload" else SSPEC)
        if rng.random() < 0.15:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(rng.choice(ANY))
    return doc


def check(doc: object) -> bool:
    """Compare the two paths on ``doc``; True if the fast path answered."""
    fast = fast_decode(copy.deepcopy(doc), "default")
    slow, _, errs = decode_document(copy.deepcopy(doc), default_namespace="default")
    if fast is None:
        return False
    assert errs == [], (doc, errs)
    assert repr(fast) == repr(slow) and fast == slow and fast.key == slow.key, doc
    assert hash(fast.metadata.labels) == hash(slow.metadata.labels)
    return True


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_agrees_with_the_detailed_validator(seed):
    rng = random.Random(seed)
    answered = rejected = 0
    for _ in range(1500):
        doc = mutate(rng, rng.choice([WORKLOAD, SERVICE]))
        answered += check(doc)
        rejected += bool(decode_document(doc)[2])
    assert answered > 100 and rejected > 100        # both sides of the fence were exercised


def test_fast_path_answers_for_usual_documents_and_from_dict_matches():
    for doc in objects(20, 100):
        if doc["kind"] in ("Workload", "Service"):
            assert check(doc), doc
        assert repr(from_dict(doc)) == repr(decode_document(doc)[0])
    for doc in (WORKLOAD, SERVICE):
        assert check(doc)


def test_errors_still_come_from_the_detailed_validator():
    doc = copy.deepcopy(SERVICE)
    doc["spec"]["ports"] = [{"name": "a", "port": 80}, {"name": "a", "port": 80}]
    with pytest.raises(ManifestError) as e:
        from_dict(doc, source="controller")
    assert 'duplicate name' in str(e.value) and "duplicate port" in str(e.value)


@pytest.mark.parametrize("field", ["name", "namespace"])
def test_every_value_of_a_name_field(field):
    for base in (WORKLOAD, SERVICE):
        for v in ANY:
            doc = copy.deepcopy(base)
            doc["metadata"][field] = copy.deepcopy(v)
            check(doc)
