"""watch.py: watch fan-out -- wakes watchers when the revision moves.

Owns the Hub (the latest committed revision, and an Event to wait on for the next one) and the
watch loop, which reads events from the store in worker threads and yields them in order.
Knows nothing of HTTP: the API turns ``Event.to_json()`` into lines and CompactedError into 410.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import trio

from controller.store import Event, Store


class Hub:
    """The latest published revision, and a way to wait until it moves past a value.

    Create it with the store's revision (``Hub(store.revision)``) and ``publish`` after each
    committed write. Follows trio's "a new Event for each one -- they're cheap" pattern.
    """

    def __init__(self, revision: int = 0) -> None:
        self._revision = revision
        self._moved = trio.Event()
        self._watchers = 0

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def watchers(self) -> int:
        """How many watches are running (for a metrics gauge)."""
        return self._watchers

    def publish(self, revision: int) -> None:
        """Record that ``revision`` is committed and wake every waiter.

        Concurrent writers may publish out of order; an older revision is ignored.
        """
        if revision <= self._revision:
            return
        self._revision = revision
        moved, self._moved = self._moved, trio.Event()
        moved.set()

    async def wait_past(self, revision: int) -> None:
        """Return once the published revision is greater than ``revision``."""
        while self._revision <= revision:
            await self._moved.wait()

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Count one watcher in ``watchers`` for the duration of the block."""
        self._watchers += 1
        try:
            yield
        finally:
            self._watchers -= 1


async def watch(store: Store, hub: Hub, since: int, *, kinds: set[str] | None = None,
                namespace: str | None = None, page_size: int = 1000,
                idle: float | None = None, sync_marks: bool = False) -> AsyncIterator[Event]:
    """Yield every event with revision > ``since``, in (revision, seq) order, then wait for more.

    Only events whose object's kind is in ``kinds`` (if given) and whose namespace is
    ``namespace`` (if given) are yielded; none is missed or repeated. Runs until cancelled or
    closed; close it deterministically with ``contextlib.aclosing`` so ``hub.watchers`` stays
    exact. Raises CompactedError (from the store) when the log no longer reaches back to where
    the watch is, at start or later if this watcher falls too far behind.

    With ``idle`` set, a BOOKMARK event carrying the current revision is yielded after that
    many seconds without a matching event, so clients can advance and dead peers are noticed.
    With ``sync_marks``, a BOOKMARK also follows each burst of events once the watch has caught
    up with the store, so a client knows a transaction is complete and can act on it at once.
    """
    with hub.watching():
        cursor = since
        unmarked = False
        while True:
            events = await trio.to_thread.run_sync(store.events_since, cursor, page_size)
            for event in events:
                meta = event.object["metadata"]
                if ((kinds is None or event.object["kind"] in kinds)
                        and (namespace is None or (meta.get("namespace") or "") == namespace)):
                    unmarked = True
                    yield event
                cursor = event.revision
            if len(events) >= page_size:
                continue  # the log may go on past this page
            if sync_marks and unmarked:
                unmarked = False
                yield _bookmark(cursor)
            # Everything up to the store's revision at the read is consumed, and the hub is
            # level-triggered: a write committed after the read makes this return at once.
            with trio.move_on_after(idle if idle is not None else float("inf")) as waited:
                await hub.wait_past(cursor)
            if waited.cancelled_caught:
                yield _bookmark(cursor)


def _bookmark(revision: int) -> Event:
    return Event("BOOKMARK", revision, {"metadata": {"resourceVersion": str(revision)}})
