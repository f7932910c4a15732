"""PMap: an edit never changes the map it started from, and the result equals the same edits
made to a dict, through growth, shrinking and re-sharding."""
from __future__ import annotations

import random

import pytest

from agent.state.pmap import PMap


@pytest.mark.parametrize("seed", range(6))
def test_edits_equal_a_dict_and_never_change_the_old_map(seed):
    rng = random.Random(seed)
    ref: dict = {}
    m: PMap = PMap()
    history: list[tuple[PMap, dict]] = []
    for step in range(400):
        e = m.edit()
        for _ in range(rng.choice([1, 1, 3, 20, 200 if step < 50 else 1])):
            k = (rng.choice("abc"), rng.randrange(600 if step < 200 else 60))
            if rng.random() < 0.4 or step > 300:
                assert e.pop(k, None) == ref.pop(k, None)
            else:
                ref[k] = e[k] = rng.random()
            assert len(e) == len(ref)
        m = e.finish()
        history.append((m, dict(ref)))
        assert m == ref and len(m) == len(ref) and dict(m.items()) == ref
        assert sorted(m) == sorted(ref) and sorted(m.values()) == sorted(ref.values())
        k = next(iter(ref), ("z", 0))
        assert m.get(k) == ref.get(k) and (k in m) == (k in ref)
    for old, want in history:   # every earlier version is as it was when finished
        assert old == want and PMap(want) == old


def test_delete_missing_raises_and_maps_compare_by_content():
    e = PMap({1: "a"}).edit()
    with pytest.raises(KeyError):
        del e[2]
    del e[1]
    assert e.finish() == PMap() == {}
    assert PMap({i: i for i in range(100)}) == PMap({i: i for i in reversed(range(100))})
    assert PMap({1: 1}) != PMap({1: 2}) and PMap({1: 1}) != {2: 1}
    with pytest.raises(KeyError):
        PMap({1: 1})[2]
