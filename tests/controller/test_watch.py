"""Watch fan-out: the Hub, and watches that see every event once, in order, under load."""
from __future__ import annotations

import random
from contextlib import aclosing

import pytest
import trio
import trio.testing

from controller.store import CompactedError, Store
from controller.watch import Hub, watch

NOW = "2025-01-01T00:00:00Z"


def obj(kind: str, name: str, ns: str = "shop", version: int = 0) -> dict:
    meta = {"name": name} if kind == "Mesh" else {"name": name, "namespace": ns}
    return {"apiVersion": "nodemesh.io/v1alpha1", "kind": kind, "metadata": meta,
            "spec": {"version": version}}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


async def write(store: Store, hub: Hub, objects: list[dict]) -> int:
    """One write the way the API does it: apply in a worker thread, then publish."""
    result = await trio.to_thread.run_sync(lambda: store.apply(objects, now=NOW))
    hub.publish(result.revision)
    return result.revision


async def delete(store: Store, hub: Hub, keys: list) -> int:
    result = await trio.to_thread.run_sync(store.delete, keys)
    hub.publish(result.revision)
    return result.revision


async def collect_until(events, stop) -> list:
    seen = []
    async for event in events:
        seen.append(event)
        if stop(event):
            return seen
    raise AssertionError("watch ended")


def is_sentinel(event) -> bool:
    return event.object["metadata"]["name"] == "sentinel"


async def test_hub_wait_past_and_publish():
    hub = Hub(3)
    with trio.fail_after(5):
        await hub.wait_past(2)  # already past: returns at once
        woke = []

        async def waiter(after):
            await hub.wait_past(after)
            woke.append(after)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 3)
            nursery.start_soon(waiter, 4)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish(2)  # older than what the hub has: ignored
            hub.publish(3)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [] and hub.revision == 3
            hub.publish(4)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [3]
            hub.publish(6)
        assert sorted(woke) == [3, 4]
        hub.publish(5)  # a slower writer publishing after a faster one
        assert hub.revision == 6


async def test_concurrent_writers_and_watchers_see_every_event_once_in_order(store):
    rng = random.Random(7)
    hub = Hub(store.revision)
    for i in range(6):  # some history before the watchers start
        await write(store, hub, [obj("Service", f"pre-{i}")])
    starts = {"from-zero": 0, "from-middle": 3, "from-now": store.revision}
    seen: dict[str, list] = {}

    async def watcher(name, since, page_size):
        async with aclosing(watch(store, hub, since, page_size=page_size)) as events:
            seen[name] = await collect_until(events, is_sentinel)

    async def writer(w):
        for i in range(15):
            names = rng.sample(range(6), rng.randint(1, 3))
            batch = [obj(rng.choice(["Service", "Workload"]), f"w{w}-{n}", version=i)
                     for n in names]
            if rng.random() < 0.3:
                batch.append(obj("Mesh", f"mesh-{w}", version=i))
            await write(store, hub, batch)
            if i % 5 == 4:
                items, _ = await trio.to_thread.run_sync(store.list)
                mine = [o for o in items if o["metadata"]["name"].startswith(f"w{w}-")]
                if mine:
                    victim = rng.choice(mine)
                    await delete(store, hub, [(victim["kind"], victim["metadata"]["namespace"],
                                               victim["metadata"]["name"])])

    with trio.fail_after(30):
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watcher, "from-zero", starts["from-zero"], 1000)
            watchers.start_soon(watcher, "from-middle", starts["from-middle"], 2)  # pages
            watchers.start_soon(watcher, "from-now", starts["from-now"], 1000)
            async with trio.open_nursery() as writers:
                for w in range(4):
                    writers.start_soon(writer, w)
            final = await write(store, hub, [obj("Service", "sentinel")])
        assert hub.watchers == 0

    logged = store.events_since(0, limit=100_000)
    for name, since in starts.items():
        got = seen[name]
        order = [(e.revision, e.seq) for e in got]
        assert order == sorted(set(order)), f"{name}: out of order or duplicated"
        assert {e.revision for e in got} == set(range(since + 1, final + 1)), f"{name}: gap"
        assert got == [e for e in logged if e.revision > since], name

    # Replaying the watch from zero rebuilds exactly what the store holds.
    state = {}
    for event in seen["from-zero"]:
        m = event.object["metadata"]
        key = (event.object["kind"], m.get("namespace", ""), m["name"])
        if event.type == "DELETED":
            del state[key]
        else:
            state[key] = event.object
    items, revision = store.list()
    assert revision == final
    assert [state[k] for k in sorted(state)] == items


async def test_filters_by_kind_and_namespace(store):
    hub = Hub(store.revision)
    await write(store, hub, [obj("Service", "a", "shop"), obj("Service", "b", "zoo"),
                             obj("Workload", "c", "shop"), obj("Mesh", "default")])
    await write(store, hub, [obj("Service", "a", "shop", version=1), obj("Workload", "d", "zoo")])
    await delete(store, hub, [("Service", "zoo", "b")])
    await write(store, hub, [obj("Service", "sentinel", "shop"), obj("Mesh", "sentinel"),
                             obj("Workload", "sentinel", "zoo")])

    async def names(**filters):
        async with aclosing(watch(store, hub, 0, **filters)) as events:
            got = await collect_until(events, is_sentinel)
        return [(e.type, e.object["kind"], e.object["metadata"]["name"]) for e in got]

    with trio.fail_after(10):
        assert await names(kinds={"Service"}, namespace="shop") == [
            ("ADDED", "Service", "a"), ("MODIFIED", "Service", "a"),
            ("ADDED", "Service", "sentinel")]
        assert await names(kinds={"Service", "Workload"}, namespace="zoo") == [
            ("ADDED", "Service", "b"), ("ADDED", "Workload", "d"), ("DELETED", "Service", "b"),
            ("ADDED", "Workload", "sentinel")]
        assert await names(kinds={"Mesh"}) == [
            ("ADDED", "Mesh", "default"), ("ADDED", "Mesh", "sentinel")]
        assert await names(namespace="") == [
            ("ADDED", "Mesh", "default"), ("ADDED", "Mesh", "sentinel")]


async def test_watch_waits_for_writes_after_it_caught_up(store):
    hub = Hub(store.revision)
    await write(store, hub, [obj("Service", "a")])
    with trio.fail_after(10):
        async with aclosing(watch(store, hub, 1)) as events:
            async with trio.open_nursery() as nursery:
                got = []

                async def consume():
                    async for event in events:
                        got.append(event.object["metadata"]["name"])
                        if len(got) == 2:
                            return

                nursery.start_soon(consume)
                await trio.testing.wait_all_tasks_blocked()
                assert got == [] and hub.watchers == 1
                await write(store, hub, [obj("Service", "b")])
                await write(store, hub, [obj("Service", "c")])
            assert got == ["b", "c"]


async def test_watch_from_a_hub_behind_the_store_still_reads_every_page(store):
    """A hub that starts behind the store must not strand events past the first page."""
    for i in range(7):
        store.apply([obj("Service", f"s{i}")], now=NOW)
    hub = Hub()  # revision 0, though the store is at 7
    with trio.fail_after(10):
        async with aclosing(watch(store, hub, 0, page_size=2)) as events:
            got = await collect_until(events, lambda e: e.revision == 7)
    assert [e.revision for e in got] == list(range(1, 8))


async def test_watch_from_a_compacted_revision_raises(tmp_path):
    with Store.open(tmp_path / "store.db", retain_events=3) as store:
        hub = Hub(store.revision)
        for i in range(6):
            await write(store, hub, [obj("Service", f"s{i}")])
        with trio.fail_after(10):
            with pytest.raises(CompactedError) as info:
                async with aclosing(watch(store, hub, 1)) as events:
                    async for _ in events:
                        pass
            assert info.value.oldest_available == 3
            assert hub.watchers == 0

            # A watcher that falls behind the log while it runs gets the error too.
            async with aclosing(watch(store, hub, 5, page_size=1)) as events:
                first = await events.__anext__()
                assert first.revision == 6
                for i in range(6):
                    await write(store, hub, [obj("Service", f"t{i}")])
                with pytest.raises(CompactedError):
                    await events.__anext__()
            assert hub.watchers == 0


async def test_watcher_count_goes_up_and_back_down(store):
    hub = Hub(store.revision)
    await write(store, hub, [obj("Service", "a")])
    with trio.fail_after(10):
        started = trio.Event()
        ready = 0

        async def watcher():
            nonlocal ready
            async with aclosing(watch(store, hub, 0)) as events:
                async for _ in events:
                    ready += 1
                    if ready == 3:
                        started.set()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(watcher)
            await started.wait()
            assert hub.watchers == 3
            nursery.cancel_scope.cancel()  # cancelled while waiting on the hub
        assert hub.watchers == 0

        # Closing a watch early (the client went away) unregisters it as well.
        async with aclosing(watch(store, hub, 0)) as events:
            await events.__anext__()
            assert hub.watchers == 1
        assert hub.watchers == 0
        with hub.watching():
            assert hub.watchers == 1
        assert hub.watchers == 0


async def test_idle_watch_yields_bookmarks_with_the_current_revision(store):
    hub = Hub(store.revision)
    store.apply([obj("Service", "a")], now=NOW)
    hub.publish(store.revision)
    async with aclosing(watch(store, hub, 0, idle=0.05)) as events:
        with trio.fail_after(5):
            first = await events.__anext__()
            second = await events.__anext__()
    assert first.type == "ADDED"
    assert second.type == "BOOKMARK" and second.object["metadata"]["resourceVersion"] == str(store.revision)


async def test_sync_marks_follow_each_burst_once_caught_up(store):
    hub = Hub(store.revision)
    async with aclosing(watch(store, hub, 0, sync_marks=True)) as events:
        with trio.fail_after(5):
            await write(store, hub, [obj("Service", "a"), obj("Service", "b")])
            seen = [await events.__anext__() for _ in range(3)]
            await write(store, hub, [obj("Service", "c")])
            seen += [await events.__anext__() for _ in range(2)]
    assert [e.type for e in seen] == ["ADDED", "ADDED", "BOOKMARK", "ADDED", "BOOKMARK"]
    assert [e.revision for e in seen] == [1, 1, 1, 2, 2]
