"""snapshot_file.py: the last good snapshot on disk — the controller's objects as last seen,
written atomically and read back at start, so the agent serves through a controller outage and
after its own restart.

``Resources`` is the raw objects by key at a version (what watch events change); ``SnapshotFile``
writes them (temp file, fsync, rename; each object serialised once), ``load`` reads them back
or returns None for a missing or unreadable file. No trio, no decoding: ``follow`` does that.
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from agent.identity.store import write_private

log = logging.getLogger("nodemesh.agent.sync")

Key = tuple[str, str, str]


@dataclass
class Resources:
    """The controller's objects as last seen, by key, and the revision they were seen at.

    ``changed`` collects the keys ``apply`` touched since the ``Decoder`` that follows this
    object (``follower``, the first to build from it) last took them, so a delta costs what
    changed, not the mesh. Change ``objects`` only through ``apply``.
    """

    version: int = 0
    objects: dict[Key, dict] = field(default_factory=dict)
    changed: set[Key] = field(default_factory=set, repr=False, compare=False)
    follower: weakref.ref | None = field(default=None, repr=False, compare=False)

    def apply(self, event: dict) -> bool:
        """Apply one watch event; returns True if it changed the objects."""
        kind, obj = event["type"], event["object"]
        rv = int(obj.get("metadata", {}).get("resourceVersion") or self.version)
        self.version = max(self.version, rv)
        if kind == "BOOKMARK":
            return False
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if kind == "DELETED":
            if self.objects.pop(key, None) is None:
                return False
            self.changed.add(key)
            return True
        self.objects[key] = obj
        self.changed.add(key)
        return True


def save(path: Path, res: Resources) -> None:
    """Write the objects atomically (temp file, fsync, rename): a crash leaves the old or the new."""
    SnapshotFile(path).write(res.version, list(res.objects.values()))


class SnapshotFile:
    """The last good objects on disk, written atomically (temp file, fsync, rename).

    Keeps each object's JSON text by identity (the watch replaces an object, never edits it),
    so a write after a delta serialises only the objects that changed. The cache is edited in
    place, not rebuilt per write: a fresh 10^4-entry dict each time would be a young container
    for the cyclic collector to walk (milliseconds, in whichever thread it strikes: a delta's
    tail). Entries of objects gone are dropped once they are an eighth of the cache; until then
    they keep their object alive, so its id is never reused for another one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._json: dict[int, tuple[dict, str]] = {}

    def write(self, version: int, items: list[dict]) -> None:
        """Write ``items`` at ``version``; ``items`` must not change meanwhile (pass a copy)."""
        cache, dumps = self._json, json.dumps
        parts = []
        for obj in items:
            hit = cache.get(id(obj))
            if hit is None or hit[0] is not obj:
                hit = cache[id(obj)] = (obj, dumps(obj, separators=(",", ":")))
            parts.append(hit[1])
        if len(cache) > len(items) + max(64, len(items) // 8):
            self._json = {id(obj): cache[id(obj)] for obj in items}
        body = f'{{"version":{int(version)},"items":[{",".join(parts)}]}}'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, body.encode())


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
