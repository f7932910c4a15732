"""sync.py: keeps the agent's snapshot in step with the controller; the last good one on disk.

Pure core: ``Resources`` (raw objects by key at a version, changed by watch events) and
``build`` (decode + ``Snapshot.build``, raising ``Rejected``). Thin shell: ``run_sync`` follows
the watch stream, rebuilds after each complete transaction (the controller marks them with a
BOOKMARK), publishes what builds, writes it to disk, and reports the version it serves (or
why it refused one). A controller outage only pauses updates: the proxy keeps serving.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import trio

from agent.controlplane import ControlPlane, ControlPlaneError, Refused
from agent.identity.store import write_private
from agent.state import Snapshot, SnapshotError, StateHolder
from controller import api

log = logging.getLogger("nodemesh.agent.sync")

Key = tuple[str, str, str]


class Rejected(Exception):
    """An update that cannot be served; the old snapshot stays. The message says what is wrong."""


@dataclass
class Resources:
    """The controller's objects as last seen, by key, and the revision they were seen at."""

    version: int = 0
    objects: dict[Key, dict] = field(default_factory=dict)

    def apply(self, event: dict) -> bool:
        """Apply one watch event; returns True if it changed the objects."""
        kind, obj = event["type"], event["object"]
        rv = int(obj.get("metadata", {}).get("resourceVersion") or self.version)
        self.version = max(self.version, rv)
        if kind == "BOOKMARK":
            return False
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if kind == "DELETED":
            return self.objects.pop(key, None) is not None
        self.objects[key] = obj
        return True


class Decoder:
    """Decodes raw objects into resources, caching by (key, resourceVersion): a delta decodes only what changed."""

    def __init__(self) -> None:
        self._cache: dict[Key, tuple[str, api.Resource]] = {}

    def build(self, res: Resources, *, node: str) -> Snapshot:
        decoded, problems, live = [], [], set()
        for key, obj in res.objects.items():
            live.add(key)
            rv = obj["metadata"].get("resourceVersion", "")
            hit = self._cache.get(key)
            if hit and hit[0] == rv:
                decoded.append(hit[1])
                continue
            try:
                r = api.from_dict(obj, source="controller", index=0)
            except api.ManifestError as e:
                problems.append(str(e))
                continue
            self._cache[key] = (rv, r)
            decoded.append(r)
        for gone in set(self._cache) - live:
            del self._cache[gone]
        if problems:
            raise Rejected("; ".join(problems))
        try:
            return Snapshot.build(decoded, version=res.version, node=node)
        except SnapshotError as e:
            raise Rejected(str(e)) from None


# --- disk ---------------------------------------------------------------------------------

def save(path: Path, res: Resources) -> None:
    """Write the objects atomically (temp file, fsync, rename): a crash leaves the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": res.version, "items": list(res.objects.values())}, separators=(",", ":"))
    write_private(path, body.encode())


def load(path: Path) -> Resources | None:
    try:
        raw = json.loads(path.read_text())
        res = Resources(version=int(raw["version"]))
        for obj in raw["items"]:
            res.apply({"type": "ADDED", "object": obj})
        res.version = int(raw["version"])
        return res
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable snapshot %s: %s", path, e)
        return None


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
                await _rebuild(decoder, res, holder, node=node, path=path, status=status, report=report)
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


async def _rebuild(decoder: Decoder, res: Resources, holder: StateHolder, *, node: str, path: Path,
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
        await trio.to_thread.run_sync(save, path, res)
        log.info("serving version %d (%d workloads, %d services, %d policies)", res.version,
                 len(snap.workloads), len(snap.services), len(snap.policies))
    if report is not None:
        try:
            await report(status)
        except ControlPlaneError as e:
            log.warning("could not report version %d to the controller: %s", status.version, e)
