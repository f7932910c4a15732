"""follow.py: keeps the agent's snapshot in step with the controller; the last good one on disk.

Pure core: ``Resources`` (raw objects by key at a version, changed by watch events; in
``snapshot_file``, which keeps them on disk) and ``Decoder.build`` (decode what changed + ``Snapshot.update``, raising ``Rejected``). Thin shell:
``run_sync`` follows the watch stream, rebuilds after each complete transaction (the controller
marks them with a BOOKMARK), publishes what builds, has it written to disk (atomically, in a
worker thread, bursts coalesced) and reports the version it serves (or why it refused one). A
controller outage only pauses updates: the proxy keeps serving.
"""
from __future__ import annotations

import gc
import logging
import random
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import trio

from agent.state.snapshot import Snapshot, SnapshotError, StateHolder
from agent.sync.client import ControlPlane, ControlPlaneError, Refused
from agent.sync.snapshot_file import Key, Resources, SnapshotFile, load
from controller import api

log = logging.getLogger("nodemesh.agent.sync")


class Rejected(Exception):
    """An update that cannot be served; the old snapshot stays. The message says what is wrong."""


class Decoder:
    """Decodes raw objects into resources and builds snapshots, remembering both between builds.

    Objects are cached by (key, resourceVersion), so a delta decodes only what changed; the
    snapshot is updated from the last one that built (``Snapshot.update``), so it costs what
    the change touches. A large change, a new ``Resources`` or another node builds cold.
    """

    def __init__(self) -> None:
        self._cache: dict[Key, tuple[str, api.Resource]] = {}
        self._bad: dict[Key, str] = {}            # objects that do not decode, and why
        self._base: Snapshot | None = None         # the last snapshot built, and what it was built from
        self._pending: set[Key] = set()            # keys changed since ``_base``

    def build(self, res: Resources, *, node: str) -> Snapshot:
        """The snapshot of ``res`` for ``node``; raises ``Rejected`` naming every problem."""
        follower = res.follower() if res.follower is not None else None
        if follower is self:
            touched, res.changed = res.changed, set()
        else:   # not followed by us: compare every object's version with what we decoded
            touched = {k for k, obj in res.objects.items()
                       if (hit := self._cache.get(k)) is None or hit[0] != _rv(obj) or k in self._bad}
            touched |= (self._cache.keys() | self._bad.keys()) - res.objects.keys()
            if follower is None:
                res.follower, res.changed = weakref.ref(self), set()
        with _gc_paused(len(touched) > _LARGE):
            self._decode_all(touched, res.objects)
            self._pending |= touched
            if self._bad:
                raise Rejected("; ".join(self._bad[k] for k in res.objects if k in self._bad))
            base = self._base
            try:
                if base is None or base.node != node or len(self._pending) > max(_LARGE, len(res.objects) // 8):
                    snap = Snapshot.build([self._cache[k][1] for k in res.objects], version=res.version,
                                          node=node)
                else:
                    changes = {k: (hit[1] if (hit := self._cache.get(k)) else None) for k in self._pending}
                    snap = base.update(changes, version=res.version)
            except SnapshotError as e:
                raise Rejected(str(e)) from None
        self._base, self._pending = snap, set()
        return snap

    def _decode_all(self, keys: set[Key], objects: dict[Key, dict]) -> None:
        """Decode the objects now at ``keys`` (forget those gone) unless cached at their version."""
        cache, bad, from_dict, error = self._cache, self._bad, api.from_dict, api.ManifestError
        for key in keys:
            obj = objects.get(key)
            if obj is None:
                cache.pop(key, None)
                bad.pop(key, None)
                continue
            rv = obj["metadata"].get("resourceVersion", "")   # _rv, inline: once per object
            hit = cache.get(key)
            if hit is not None and hit[0] == rv and key not in bad:
                continue
            try:
                r = from_dict(obj, source="controller", index=0)
            except error as e:
                bad[key] = str(e)
                continue
            if bad:
                bad.pop(key, None)
            cache[key] = (rv, r)


def _rv(obj: dict) -> str:
    return obj["metadata"].get("resourceVersion", "")


_LARGE = 64   # changed objects beyond which a build is large: cold, with the collector paused


@contextmanager
def _gc_paused(large: bool) -> Iterator[None]:
    """Pause the cyclic collector for a large build. Decoding and indexing allocate some 10^5
    long-lived objects and no garbage cycles, yet each allocation burst makes the collector walk
    them, and once the whole heap (0.2-0.3 s of a 1 s cold build at 10k endpoints). Refcounting
    frees everything as before; the collector resumes afterwards.

    Resuming would walk every object allocated meanwhile at once (they are all in the youngest
    generation: ~0.1 s at 10k endpoints), so they are first moved to the oldest generation
    (``gc.freeze`` then ``gc.unfreeze``, two list splices), where the next full collection sees
    them as it would have anyway. Skipped when something else keeps objects frozen."""
    if not large or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        gc.enable()


# --- the shell ----------------------------------------------------------------------------

@dataclass
class SyncStatus:
    """What the agent serves and the last refusal, for readiness, metrics and `nodemesh status`."""

    synced: bool = False          # a snapshot (from disk or the controller) is being served
    version: int = 0
    error: str = ""
    rejected_total: int = 0
    connected: bool = False


Report = Callable[[SyncStatus], Awaitable[None]]


async def run_sync(cp: ControlPlane, holder: StateHolder, *, node: str, path: Path, status: SyncStatus,
                   report: Report | None = None, rng: random.Random | None = None,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Follow the controller forever; publish every update that builds.

    Starts from the snapshot on disk (if any) before the controller answers, so a restarted agent
    serves at once. ``task_status.started()`` comes right after that.
    """
    rng = rng or random.Random()
    decoder = Decoder()
    res = load(path)
    if res is not None:
        try:
            holder.publish(decoder.build(res, node=node))
            status.synced, status.version = True, res.version
            log.info("serving snapshot version %d from %s until the controller answers", res.version, path)
        except Rejected as e:
            log.warning("snapshot on disk %s is unusable (%s); waiting for the controller", path, e)
            res = None
    task_status.started()
    saver = _Saver(SnapshotFile(path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(saver.run)
        await _follow(cp, decoder, res, holder, saver, node=node, status=status, report=report, rng=rng)


async def _follow(cp: ControlPlane, decoder: Decoder, res: Resources | None, holder: StateHolder,
                  saver: _Saver, *, node: str, status: SyncStatus, report: Report | None,
                  rng: random.Random) -> None:
    attempt = 0
    attempted = status.version if status.synced else -1  # the last version we tried to build
    while True:
        fresh = Resources() if res is None else None
        try:
            async for event in cp.watch(None if res is None else res.version):
                status.connected, attempt = True, 0
                if event["type"] == "ERROR":
                    log.warning("watch error from the controller: %s; listing again", event["object"].get("message"))
                    res = None
                    break
                target = fresh if fresh is not None else res
                target.apply(event)
                if event["type"] != "BOOKMARK":
                    continue
                if fresh is not None:  # the initial snapshot is complete: it replaces what we had
                    res, fresh = fresh, None
                if res.version == attempted:
                    continue  # a keep-alive: nothing new
                attempted = res.version
                await _rebuild(decoder, res, holder, saver, node=node, status=status, report=report)
        except ControlPlaneError as e:
            if isinstance(e, Refused) and e.code == 410:
                log.warning("the controller no longer has events after version %d; listing again", res.version)
                res = None
                continue
            status.connected = False
            attempt += 1
            delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * (0.5 + rng.random() / 2)
            log.warning("controller unreachable (%s); serving version %d, retrying in %.1fs", e, status.version, delay)
            await trio.sleep(delay)
        else:
            status.connected = False
            await trio.sleep(0.2 if res is None else 0)


async def _rebuild(decoder: Decoder, res: Resources, holder: StateHolder, saver: _Saver, *, node: str,
                   status: SyncStatus, report: Report | None) -> None:
    try:
        snap = decoder.build(res, node=node)
    except Rejected as e:
        status.error = f"version {res.version} rejected: {e}"
        status.rejected_total += 1
        log.error("%s; still serving version %d", status.error, status.version)
    else:
        status.synced, status.version, status.error = True, res.version, ""
        holder.publish(snap)
        saver.offer(res)
        log.info("serving version %d (%d workloads, %d services, %d policies)", res.version,
                 snap.workload_count(), len(snap.services), len(snap.policies))
    if report is not None:
        try:
            await report(status)
        except ControlPlaneError as e:
            log.warning("could not report version %d to the controller: %s", status.version, e)


class _Saver:
    """Puts the last good objects on disk in a worker thread, one write at a time; updates that
    arrive during a write are coalesced into the next, so a burst costs one or two writes and
    never waits for the disk. An update not yet written when the task is cancelled is written
    before it ends; a crash loses at most the writes in flight (the file holds a good version)."""

    def __init__(self, file: SnapshotFile) -> None:
        self._file = file
        self._latest: tuple[int, list[dict]] | None = None
        self._wake = trio.Event()

    def offer(self, res: Resources) -> None:
        """Remember ``res`` as it is now (a copy of its object list) for the next write."""
        self._latest = (res.version, list(res.objects.values()))
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self._write()
        finally:
            with trio.CancelScope(shield=True):
                await self._write()

    async def _write(self) -> None:
        latest = self._latest
        if latest is None:
            return
        try:
            await trio.to_thread.run_sync(self._file.write, *latest)
        except OSError as e:
            log.error("could not write snapshot version %d to %s: %s", latest[0], self._file.path, e)
        if self._latest is latest:   # cleared only once written (or failed): a cancel before keeps it
            self._latest = None
