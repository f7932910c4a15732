"""The embedded store: revisions, apply/delete semantics, durability, the event log."""
from __future__ import annotations

import copy
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.store import (
    CompactedError,
    ConflictError,
    NotFoundError,
    SchemaVersionError,
    Store,
    StoreError,
)

NOW = "2025-01-01T00:00:00Z"
LATER = "2025-01-02T00:00:00Z"
REPO = Path(__file__).resolve().parents[2]


def svc(name: str, ns: str = "shop", port: int = 80, labels: dict | None = None) -> dict:
    meta: dict = {"name": name, "namespace": ns}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service", "metadata": meta,
            "spec": {"ports": [{"port": port}]}}


def mesh(name: str = "default") -> dict:
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": name},
            "spec": {"trustDomain": "cluster.local"}}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


def all_events(store: Store) -> list[tuple[int, int, str, str]]:
    return [(e.revision, e.seq, e.type, e.object["metadata"]["name"])
            for e in store.events_since(0, limit=100_000)]


def test_new_store_is_empty_at_revision_zero(store):
    assert store.revision == 0
    assert store.list() == ([], 0)
    assert store.events_since(0) == []
    assert store.counts() == {}
    assert store.size_bytes() > 0


def test_create_sets_server_fields(store):
    given = svc("web", labels={"app": "web"})
    before = copy.deepcopy(given)
    result = store.apply([given], now=NOW)
    assert given == before, "apply must not modify the caller's objects"
    assert result.revision == 1 == store.revision
    [change] = result.changes
    assert (change.type, change.key) == ("ADDED", ("Service", "shop", "web"))
    meta = change.object["metadata"]
    assert meta["resourceVersion"] == "1"
    assert meta["creationTimestamp"] == NOW
    assert len(meta["uid"]) == 36
    assert store.get("Service", "shop", "web") == change.object
    [event] = store.events_since(0)
    assert (event.type, event.revision, event.seq) == ("ADDED", 1, 0)
    assert event.to_json() == {"type": "ADDED", "object": change.object}


def test_update_keeps_uid_and_creation_replaces_the_rest(store):
    created = store.apply([svc("web", labels={"app": "web", "tier": "front"})], now=NOW)
    uid = created.changes[0].object["metadata"]["uid"]
    result = store.apply([svc("web", port=8080, labels={"app": "web"})], now=LATER)
    assert result.revision == 2
    [change] = result.changes
    assert change.type == "MODIFIED"
    stored = store.get("Service", "shop", "web")
    assert stored == change.object
    assert stored["metadata"] == {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                                  "uid": uid, "creationTimestamp": NOW, "resourceVersion": "2"}
    assert stored["spec"] == {"ports": [{"port": 8080}]}
    # Removing labels altogether is a change too: apply replaces the whole object.
    store.apply([svc("web", port=8080)], now=LATER)
    assert "labels" not in store.get("Service", "shop", "web")["metadata"]
    assert store.revision == 3


def test_unchanged_object_makes_no_event_and_keeps_the_revision(store):
    first = store.apply([svc("web")], now=NOW).changes[0].object
    # Server fields the caller sends back (e.g. from a get) do not count as content.
    again = copy.deepcopy(first)
    again["metadata"]["uid"] = "someone-else"
    again["metadata"]["creationTimestamp"] = LATER
    result = store.apply([again], now=LATER)
    assert result.revision == 1 == store.revision
    [change] = result.changes
    assert change.type == "UNCHANGED"
    assert change.object == first
    assert store.get("Service", "shop", "web") == first
    assert len(store.events_since(0)) == 1


def test_a_changing_batch_bumps_the_revision_exactly_once(store):
    store.apply([svc("a"), svc("b")], now=NOW)
    result = store.apply([svc("a"), svc("b", port=81), svc("c"), mesh()], now=NOW)
    assert result.revision == 2
    assert [c.type for c in result.changes] == ["UNCHANGED", "MODIFIED", "ADDED", "ADDED"]
    assert [c.object["metadata"]["resourceVersion"] for c in result.changes] == ["1", "2", "2", "2"]
    assert all_events(store) == [(1, 0, "ADDED", "a"), (1, 1, "ADDED", "b"),
                                 (2, 0, "MODIFIED", "b"), (2, 1, "ADDED", "c"),
                                 (2, 2, "ADDED", "default")]


def test_cluster_scoped_kind_uses_empty_namespace(store):
    [change] = store.apply([mesh()], now=NOW).changes
    assert change.key == ("Mesh", "", "default")
    assert store.get("Mesh", "", "default")["kind"] == "Mesh"
    assert store.list(namespace="")[0] == [change.object]


def snapshot(store: Store):
    return store.revision, store.list(), all_events(store)


def test_duplicate_key_in_batch_writes_nothing(store):
    store.apply([svc("web")], now=NOW)
    before = snapshot(store)
    with pytest.raises(ConflictError) as info:
        store.apply([svc("new"), svc("web", port=1), svc("web", port=2)], now=NOW)
    assert (info.value.key, info.value.reason) == (("Service", "shop", "web"), "duplicate")
    assert snapshot(store) == before


def test_stale_resource_version_writes_nothing(store):
    store.apply([svc("web")], now=NOW)
    store.apply([svc("web", port=81)], now=NOW)
    before = snapshot(store)
    stale = svc("web", port=82)
    stale["metadata"]["resourceVersion"] = "1"
    with pytest.raises(ConflictError) as info:
        store.apply([svc("new"), stale], now=NOW)
    e = info.value
    assert (e.key, e.reason, e.given, e.stored) == (("Service", "shop", "web"), "stale", "1", "2")
    assert "1" in str(e) and "2" in str(e) and "shop/web" in str(e)
    assert snapshot(store) == before
    # A resourceVersion for an object that does not exist is stale too.
    ghost = svc("ghost")
    ghost["metadata"]["resourceVersion"] = "2"
    with pytest.raises(ConflictError) as info:
        store.apply([ghost], now=NOW)
    assert (info.value.given, info.value.stored) == ("2", None)
    assert snapshot(store) == before


def test_matching_resource_version_is_accepted(store):
    store.apply([svc("web")], now=NOW)
    current = svc("web", port=81)
    current["metadata"]["resourceVersion"] = "1"
    result = store.apply([current], now=NOW)
    assert result.changes[0].type == "MODIFIED"
    assert store.get("Service", "shop", "web")["metadata"]["resourceVersion"] == "2"


def test_any_error_mid_batch_rolls_back(store):
    store.apply([svc("web")], now=NOW)
    before = snapshot(store)
    with pytest.raises(TypeError):
        store.apply([svc("new"), {**svc("bad"), "spec": {1, 2}}], now=NOW)
    with pytest.raises(ValueError):
        store.apply([svc("new"), {"kind": "Service", "metadata": {}}], now=NOW)
    assert snapshot(store) == before


def test_empty_batches_change_nothing(store):
    store.apply([svc("web")], now=NOW)
    assert store.apply([], now=NOW).revision == 1
    assert store.delete([]).revision == 1
    assert store.revision == 1


def test_delete_emits_last_state(store):
    store.apply([svc("a", labels={"x": "y"}), svc("b"), mesh()], now=NOW)
    uid = store.get("Service", "shop", "a")["metadata"]["uid"]
    result = store.delete([("Service", "shop", "a"), ("Mesh", "", "default")])
    assert result.revision == 2
    assert [c.type for c in result.changes] == ["DELETED", "DELETED"]
    gone = result.changes[0].object
    assert gone["metadata"]["labels"] == {"x": "y"}
    assert gone["metadata"]["uid"] == uid
    assert gone["metadata"]["resourceVersion"] == "2"
    assert store.get("Service", "shop", "a") is None
    assert store.counts() == {"Service": 1}
    events = store.events_since(1)
    assert [(e.type, e.revision, e.seq) for e in events] == [("DELETED", 2, 0), ("DELETED", 2, 1)]
    assert events[0].object == gone
    # Re-creating gets a fresh uid and creation time.
    again = store.apply([svc("a")], now=LATER).changes[0]
    assert again.type == "ADDED"
    assert again.object["metadata"]["uid"] != uid
    assert again.object["metadata"]["creationTimestamp"] == LATER


def test_delete_missing_key_deletes_nothing(store):
    store.apply([svc("a"), svc("b")], now=NOW)
    before = snapshot(store)
    with pytest.raises(NotFoundError) as info:
        store.delete([("Service", "shop", "a"), ("Service", "shop", "nope")])
    assert info.value.key == ("Service", "shop", "nope")
    assert isinstance(info.value, StoreError)
    with pytest.raises(ConflictError):
        store.delete([("Service", "shop", "a"), ("Service", "shop", "a")])
    assert snapshot(store) == before


def test_list_sorts_filters_and_reports_its_revision(store):
    store.apply([svc("b", ns="shop"), svc("a", ns="zoo"), svc("c", ns="app"), mesh("m")],
                now=NOW)
    store.apply([svc("a", ns="shop")], now=NOW)
    items, revision = store.list()
    assert revision == 2
    keys = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in items]
    assert keys == [("Mesh", "", "m"), ("Service", "app", "c"), ("Service", "shop", "a"),
                    ("Service", "shop", "b"), ("Service", "zoo", "a")]
    names = lambda result: [o["metadata"]["name"] for o in result[0]]  # noqa: E731
    assert names(store.list("Service", "shop")) == ["a", "b"]
    assert names(store.list(namespace="shop")) == ["a", "b"]
    assert names(store.list("Mesh")) == ["m"]
    assert store.list("Nothing") == ([], 2)
    assert store.counts() == {"Mesh": 1, "Service": 4}


def test_state_survives_close_and_reopen(tmp_path):
    path = tmp_path / "store.db"
    with Store.open(path) as s:
        s.apply([svc("a"), mesh()], now=NOW)
        s.apply([svc("a", port=81)], now=NOW)
        s.delete([("Mesh", "", "default")])
        before = snapshot(s)
    with Store.open(path) as s:
        assert snapshot(s) == before
        assert s.revision == 3
        assert s.apply([svc("b")], now=NOW).revision == 4


def test_database_is_wal_fully_synced_with_schema_version(tmp_path):
    path = tmp_path / "store.db"
    with Store.open(path) as s:
        # kill -9 cannot show this one (the OS still flushes), a power cut would: FULL = 2.
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        db.execute("PRAGMA user_version = 99")
        db.commit()
    finally:
        db.close()
    with pytest.raises(SchemaVersionError) as info:
        Store.open(path)
    assert (info.value.found, info.value.supported) == (99, 1)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from controller.store import Store

    store = Store.open(Path(sys.argv[1]))
    i = 0
    while True:
        batch = [{"apiVersion": "nodemesh.io/v1alpha1", "kind": "Service",
                  "metadata": {"name": f"svc-{i}-{j}", "namespace": "shop"},
                  "spec": {"payload": "x" * 2000}} for j in range(5)]
        result = store.apply(batch, now="2025-01-01T00:00:00Z")
        print(result.revision, flush=True)
        i += 1
""")


def test_committed_revisions_survive_kill_9(tmp_path):
    path = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=REPO)
    printed: list[int] = []
    try:
        for line in child.stdout:
            printed.append(int(line))
            if len(printed) == 40:
                os.kill(child.pid, signal.SIGKILL)
                break
        printed += [int(line) for line in child.stdout]  # what it printed before dying
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert printed == list(range(1, len(printed) + 1))

    with Store.open(path) as s:
        assert s.revision >= printed[-1]
        events = {e.revision for e in s.events_since(0, limit=100_000)}
        for revision in printed:
            assert revision in events
            for j in range(5):
                obj = s.get("Service", "shop", f"svc-{revision - 1}-{j}")
                assert obj["metadata"]["resourceVersion"] == str(revision)
        assert s.counts() == {"Service": 5 * s.revision}
        assert s.apply([svc("after")], now=NOW).revision == s.revision


def test_events_since_orders_and_never_splits_a_revision(store):
    store.apply([svc("a1"), svc("a2"), svc("a3")], now=NOW)   # revision 1: 3 events
    store.apply([svc("b1")], now=NOW)                         # revision 2
    store.delete([("Service", "shop", "a1"), ("Service", "shop", "b1")])  # revision 3
    order = [(e.revision, e.seq) for e in store.events_since(0)]
    assert order == [(1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (3, 1)]
    assert [(e.revision, e.seq) for e in store.events_since(1)] == [(2, 0), (3, 0), (3, 1)]
    assert store.events_since(3) == []
    assert store.events_since(99) == []
    # limit=2 would cut revision 1; it comes whole instead.
    assert [(e.revision, e.seq) for e in store.events_since(0, limit=2)] == [(1, 0), (1, 1), (1, 2)]
    assert [(e.revision, e.seq) for e in store.events_since(1, limit=2)] == [(2, 0), (3, 0), (3, 1)]
    assert [(e.revision, e.seq) for e in store.events_since(1, limit=1)] == [(2, 0)]


def test_compaction_keeps_the_last_events_and_refuses_older_starts(tmp_path):
    path = tmp_path / "store.db"
    with Store.open(path, retain_events=5) as s:
        for i in range(10):
            s.apply([svc(f"s{i}")], now=NOW)  # revisions 1..10, one event each
        assert [e.revision for e in s.events_since(5)] == [6, 7, 8, 9, 10]
        with pytest.raises(CompactedError) as info:
            s.events_since(4)
        assert (info.value.oldest_available, info.value.requested) == (5, 4)
        with pytest.raises(CompactedError):
            s.events_since(0)
        # A batch bigger than the window is kept whole: revisions are never split.
        s.apply([svc(f"big{j}") for j in range(7)], now=NOW)  # revision 11
        assert [(e.revision, e.seq) for e in s.events_since(10)] == [(11, j) for j in range(7)]
        with pytest.raises(CompactedError) as info:
            s.events_since(9)
        assert info.value.oldest_available == 10
        assert len(s.list()[0]) == 17, "compaction drops events, never objects"
    with Store.open(path, retain_events=5) as s:
        with pytest.raises(CompactedError):
            s.events_since(9)
        assert len(s.events_since(10)) == 7
