"""Decoder follows Resources incrementally and always builds what a fresh Decoder would; the
snapshot file keeps its format and is written coalesced, the last offered version last."""
from __future__ import annotations

import copy
import json
import random

import pytest
import trio
import trio.testing

from agent.sync.follow import Decoder, Rejected, _Saver
from agent.sync.snapshot_file import Resources, SnapshotFile, load, save
from bench.config_scale import objects
from tests.agent.state.test_delta import check_same


def event(kind: str, obj: dict, rv: int) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = str(rv)
    return {"type": kind, "object": obj}


def cold(res: Resources, node: str = "node-1"):
    return Decoder().build(res, node=node)


def test_decoder_deltas_equal_a_cold_build():
    rng = random.Random(3)
    res = Resources()
    for o in objects(20, 120):
        res.apply({"type": "ADDED", "object": o})
    originals = dict(res.objects)
    decoder = Decoder()
    check_same(decoder.build(res, node="node-1"), cold(res))
    rv = 2
    for step in range(120):
        key = rng.choice(list(res.objects))
        obj = copy.deepcopy(res.objects[key])
        roll = rng.random()
        if key[0] == "Mesh":
            obj["spec"]["mtls"] = rng.choice(["STRICT", "PERMISSIVE"])
            res.apply(event("MODIFIED", obj, rv))
        elif roll < 0.15:
            res.apply(event("DELETED", obj, rv))
        elif roll < 0.2 and key[0] == "Workload":
            obj["spec"]["addresses"] = ["10.96.0.1"]                   # a Service's vip: refused
            res.apply(event("MODIFIED", obj, rv))
        elif roll < 0.25:
            obj["spec"]["bogus"] = 1                                   # does not decode: refused
            res.apply(event("MODIFIED", obj, rv))
        elif key[0] == "Workload":
            obj["metadata"]["labels"] = {"app": f"svc-{rng.randrange(20)}", "version": rng.choice(["v1", "v2"])}
            res.apply(event("MODIFIED", obj, rv))
        else:
            obj["spec"]["ports"][0]["targetPort"] = rng.choice([8080, 9090])
            res.apply(event("MODIFIED", obj, rv))
        res.version = rv
        rv += 1
        try:
            want = cold(res)
        except Rejected as e:
            with pytest.raises(Rejected) as got:
                decoder.build(res, node="node-1")
            assert str(got.value) == str(e)
            # undo it, as an operator would: the object comes back as it was first
            res.apply(event("MODIFIED", originals[key], rv))
            res.version = rv
            rv += 1
            want = cold(res)
        check_same(decoder.build(res, node="node-1"), want)
    # a relist gives a new Resources object: compared by version, still equal to cold
    again = Resources(version=res.version)
    for o in res.objects.values():
        again.apply({"type": "ADDED", "object": o})
    again.version = res.version
    check_same(decoder.build(again, node="node-1"), cold(again))


def test_snapshot_file_format_is_unchanged_and_reuses_json(tmp_path):
    res = Resources()
    for o in objects(5, 20):
        res.apply({"type": "ADDED", "object": o})
    res.version = 9
    path = tmp_path / "snap.json"
    f = SnapshotFile(path)
    f.write(res.version, list(res.objects.values()))
    expected = json.dumps({"version": 9, "items": list(res.objects.values())}, separators=(",", ":"))
    assert path.read_text() == expected
    key = next(k for k in res.objects if k[0] == "Workload")
    res.apply(event("MODIFIED", {**res.objects[key], "metadata": {**res.objects[key]["metadata"],
                                                                   "labels": {"app": "x"}}}, 10))
    f.write(res.version, list(res.objects.values()))
    assert path.read_text() == json.dumps({"version": 10, "items": list(res.objects.values())},
                                          separators=(",", ":"))
    back = load(path)
    assert back.version == 10 and back.objects == res.objects
    save(tmp_path / "other.json", res)
    assert (tmp_path / "other.json").read_text() == path.read_text()


async def test_saver_coalesces_and_writes_the_last_offer_before_ending(tmp_path):
    path = tmp_path / "snap.json"
    saver = _Saver(SnapshotFile(path))
    res = Resources()
    for o in objects(2, 4):
        res.apply({"type": "ADDED", "object": o})
    async with trio.open_nursery() as n:
        n.start_soon(saver.run)
        for v in (1, 2, 3):
            res.version = v
            saver.offer(res)                      # no checkpoint between: one write for all three
        await trio.testing.wait_all_tasks_blocked()
        while not path.exists() or json.loads(path.read_text())["version"] != 3:
            await trio.sleep(0.01)
        res.version = 4
        saver.offer(res)
        n.cancel_scope.cancel()                   # cancelled before it could write: written on the way out
    assert json.loads(path.read_text())["version"] == 4
