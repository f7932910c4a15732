"""store.py: the embedded store -- durable resources and an event log under one revision.

Owns one SQLite file: objects keyed by ``(kind, namespace, name)``, the event log, and the
global revision (like etcd's: every write call is one transaction and bumps it by exactly one
if it changes anything). Standard library only: no HTTP, no trio, no validation. Objects arrive
validated and canonicalised and are opaque here beyond ``kind`` and ``metadata.name/namespace``.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
DEFAULT_RETAIN_EVENTS = 10_000

Key = tuple[str, str, str]
"""``(kind, namespace, name)``; cluster-scoped kinds use namespace ``""``."""

ChangeType = Literal["ADDED", "MODIFIED", "DELETED", "UNCHANGED"]

SERVER_FIELDS = ("uid", "creationTimestamp", "resourceVersion")
"""``metadata`` fields the store sets; they never count as a change of content."""

_SCHEMA = (
    """CREATE TABLE objects (
        kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, namespace, name)
    ) WITHOUT ROWID""",
    # id grows with (revision, seq) and only a prefix is ever deleted, so it counts the log.
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        revision INTEGER NOT NULL, seq INTEGER NOT NULL,
        type TEXT NOT NULL, body TEXT NOT NULL,
        UNIQUE (revision, seq)
    )""",
    # compacted: every event with revision <= compacted has been dropped from the log.
    """CREATE TABLE state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL,
        compacted INTEGER NOT NULL
    )""",
    "INSERT INTO state (id, revision, compacted) VALUES (1, 0, 0)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class StoreError(Exception):
    """Base of the store's errors."""


class ConflictError(StoreError):
    """A batch conflicts with itself or with the stored state; nothing was written.

    ``reason`` is ``"duplicate"`` (the key appears twice in one batch) or ``"stale"`` (the
    caller's ``metadata.resourceVersion`` is ``given`` but the stored one is ``stored``, which
    is ``None`` when the object does not exist).
    """

    def __init__(self, key: Key, reason: str, given: str | None = None,
                 stored: str | None = None) -> None:
        self.key, self.reason, self.given, self.stored = key, reason, given, stored
        if reason == "duplicate":
            msg = f"{format_key(key)} appears more than once in one batch"
        else:
            msg = (f"{format_key(key)}: resourceVersion {given!r} given, "
                   f"stored is {stored!r}" + (" (no such object)" if stored is None else ""))
        super().__init__(msg)


class NotFoundError(StoreError):
    """``key`` does not exist; nothing was written."""

    def __init__(self, key: Key) -> None:
        self.key = key
        super().__init__(f"{format_key(key)} not found")


class CompactedError(StoreError):
    """Events after ``requested`` are no longer all in the log (HTTP 410 Gone).

    ``oldest_available`` is the smallest revision ``events_since`` still accepts; a client
    should list again and watch from the list's revision.
    """

    def __init__(self, oldest_available: int, requested: int) -> None:
        self.oldest_available, self.requested = oldest_available, requested
        super().__init__(f"revision {requested} is compacted; "
                         f"oldest available is {oldest_available}")


class SchemaVersionError(StoreError):
    """The database was written by a newer nodemesh (schema ``found`` > ``supported``)."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        self.path, self.found, self.supported = path, found, supported
        super().__init__(f"{path}: schema version {found} is newer than this nodemesh "
                         f"supports ({supported}); upgrade nodemesh or restore a backup")


@dataclass(frozen=True, slots=True)
class Change:
    """What one write did to one key; ``object`` is the state after it (before, if DELETED)."""
    type: ChangeType
    key: Key
    object: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The revision after a write (unchanged if nothing changed) and one Change per input."""
    revision: int
    changes: list[Change]


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the event log; ``(revision, seq)`` orders events totally."""
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    revision: int
    object: dict[str, Any]
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """The watch wire form, as the Kubernetes API sends it."""
        return {"type": self.type, "object": self.object}


def format_key(key: Key) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def key_of(obj: dict[str, Any]) -> Key:
    """The store key of ``obj``; ``ValueError`` if it has no kind or metadata.name."""
    try:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace") or "", meta["name"])
    except (KeyError, TypeError, AttributeError):
        raise ValueError("object needs kind and metadata.name") from None
    if not all(isinstance(part, str) for part in key) or not key[0] or not key[2]:
        raise ValueError(f"bad object key {key!r}")
    return key


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _content(obj: dict[str, Any]) -> str:
    """Canonical JSON of ``obj`` without the server-set metadata fields."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in SERVER_FIELDS}
    return _dumps({**obj, "metadata": meta})


class Store:
    """Resources and their event log in one SQLite file (WAL, ``synchronous=FULL``).

    One connection guarded by a lock, so methods may be called from worker threads
    (``trio.to_thread.run_sync``). A committed write is durable, ``kill -9`` included.
    Exactly one Store should own a file: the ``revision`` property is cached in memory.
    """

    def __init__(self, path: Path, *, retain_events: int = DEFAULT_RETAIN_EVENTS) -> None:
        """Open ``path``, creating the schema if the file is new.

        Raises SchemaVersionError if the file comes from a newer nodemesh.
        """
        if retain_events < 1:
            raise ValueError("retain_events must be at least 1")
        self.path = Path(path)
        self.retain_events = retain_events
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot enable WAL (journal_mode is {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            with self._transaction("IMMEDIATE") as db:
                found = db.execute("PRAGMA user_version").fetchone()[0]
                if found > SCHEMA_VERSION:
                    raise SchemaVersionError(self.path, found, SCHEMA_VERSION)
                if found == 0:
                    for statement in _SCHEMA:
                        db.execute(statement)
                self._revision = db.execute("SELECT revision FROM state").fetchone()[0]
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, path: Path, *, retain_events: int = DEFAULT_RETAIN_EVENTS) -> Store:
        """Open or create the store at ``path``; see ``Store.__init__``."""
        return cls(path, retain_events=retain_events)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def revision(self) -> int:
        """The revision of the last committed write (0 for an empty store)."""
        return self._revision

    @contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        """One SQLite transaction under the lock: committed on success, rolled back on any error."""
        with self._lock:
            self._db.execute(f"BEGIN {mode}")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- writes ---------------------------------------------------------------------------

    def apply(self, objects: list[dict[str, Any]], *, now: str) -> WriteResult:
        """Create or update ``objects`` (each replaces the whole stored object) in one transaction.

        The store sets ``metadata.uid`` (kept on update), ``metadata.creationTimestamp``
        (``now`` on create, kept on update) and ``metadata.resourceVersion``. An object equal
        to the stored one apart from those fields is UNCHANGED and makes no event; if nothing
        changed the revision stays. Otherwise the revision moves by one and every changed
        object carries it. ``objects`` are not modified.

        Raises ConflictError (duplicate key in the batch, or a ``metadata.resourceVersion``
        that differs from the stored one) and ValueError (an object without a key); on any
        error nothing is written.
        """
        batch: list[tuple[Key, dict[str, Any]]] = []
        seen: set[Key] = set()
        for obj in objects:
            key = key_of(obj)
            if key in seen:
                raise ConflictError(key, "duplicate")
            seen.add(key)
            batch.append((key, json.loads(_dumps(obj))))  # a private deep copy, JSON-checked

        with self._transaction("IMMEDIATE") as db:
            current = db.execute("SELECT revision FROM state").fetchone()[0]
            revision = current + 1
            changes: list[Change] = []
            for key, obj in batch:
                row = db.execute("SELECT body FROM objects WHERE kind = ? AND namespace = ? "
                                 "AND name = ?", key).fetchone()
                stored = json.loads(row[0]) if row else None
                stored_rv = stored["metadata"]["resourceVersion"] if stored else None
                given_rv = obj["metadata"].get("resourceVersion") or None
                if given_rv is not None and given_rv != stored_rv:
                    raise ConflictError(key, "stale", given_rv, stored_rv)
                if stored is not None and _content(stored) == _content(obj):
                    changes.append(Change("UNCHANGED", key, stored))
                    continue
                meta = obj["metadata"]
                meta["uid"] = stored["metadata"]["uid"] if stored else str(uuid.uuid4())
                meta["creationTimestamp"] = (stored["metadata"]["creationTimestamp"]
                                             if stored else now)
                meta["resourceVersion"] = str(revision)
                changes.append(Change("MODIFIED" if stored else "ADDED", key, obj))

            changed = [c for c in changes if c.type != "UNCHANGED"]
            if not changed:
                return WriteResult(current, changes)
            for seq, change in enumerate(changed):
                body = _dumps(change.object)
                db.execute("INSERT INTO objects (kind, namespace, name, body) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (kind, namespace, name) DO UPDATE SET body = excluded.body",
                           (*change.key, body))
                db.execute("INSERT INTO events (revision, seq, type, body) VALUES (?, ?, ?, ?)",
                           (revision, seq, change.type, body))
            self._finish_write(db, revision)
        self._revision = revision
        return WriteResult(revision, changes)

    def delete(self, keys: list[Key]) -> WriteResult:
        """Delete ``keys`` in one transaction; each makes a DELETED event with its last state.

        The events' objects carry the new revision as resourceVersion. Raises NotFoundError
        for a missing key and ConflictError for a key given twice; then nothing is deleted.
        """
        wanted: dict[Key, None] = {}
        for key in keys:
            key = tuple(key)
            if key in wanted:
                raise ConflictError(key, "duplicate")
            wanted[key] = None
        if not wanted:
            return WriteResult(self._revision, [])

        with self._transaction("IMMEDIATE") as db:
            revision = db.execute("SELECT revision FROM state").fetchone()[0] + 1
            changes: list[Change] = []
            for seq, key in enumerate(wanted):
                row = db.execute("SELECT body FROM objects WHERE kind = ? AND namespace = ? "
                                 "AND name = ?", key).fetchone()
                if row is None:
                    raise NotFoundError(key)
                obj = json.loads(row[0])
                obj["metadata"]["resourceVersion"] = str(revision)
                db.execute("DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?", key)
                db.execute("INSERT INTO events (revision, seq, type, body) VALUES (?, ?, ?, ?)",
                           (revision, seq, "DELETED", _dumps(obj)))
                changes.append(Change("DELETED", key, obj))
            self._finish_write(db, revision)
        self._revision = revision
        return WriteResult(revision, changes)

    def _finish_write(self, db: sqlite3.Connection, revision: int) -> None:
        """Record ``revision`` and compact the log to the last ``retain_events`` events.

        Compaction drops whole revisions only, so it may keep a few more events than asked;
        it touches just the revisions that fell out of the window (indexed, cheap).
        """
        db.execute("UPDATE state SET revision = ?", (revision,))
        last_id = db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        first_kept = last_id - self.retain_events + 1
        if db.execute("SELECT MIN(id) FROM events").fetchone()[0] >= first_kept:
            return
        boundary = db.execute("SELECT revision FROM events WHERE id >= ? ORDER BY id LIMIT 1",
                              (first_kept,)).fetchone()[0]
        db.execute("DELETE FROM events WHERE revision < ?", (boundary,))
        db.execute("UPDATE state SET compacted = MAX(compacted, ?)", (boundary - 1,))

    # -- reads ----------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object, or None."""
        with self._transaction() as db:
            row = db.execute("SELECT body FROM objects WHERE kind = ? AND namespace = ? "
                             "AND name = ?", (kind, namespace, name)).fetchone()
        return json.loads(row[0]) if row else None

    def list(self, kind: str | None = None,
             namespace: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Objects (optionally of one kind / namespace) sorted by key, and the revision read at.

        Watching from that revision misses nothing and repeats nothing.
        """
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if namespace is not None:
            where.append("namespace = ?")
            args.append(namespace)
        sql = "SELECT body FROM objects"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY kind, namespace, name"
        with self._transaction() as db:
            rows = db.execute(sql, args).fetchall()
            revision = db.execute("SELECT revision FROM state").fetchone()[0]
        return [json.loads(body) for (body,) in rows], revision

    def events_since(self, revision: int, limit: int = 1000) -> list[Event]:
        """Events with revision > ``revision``, ordered by (revision, seq).

        Returns at most ``limit`` events, except that it never splits a revision: the last
        revision is returned whole. Fewer than ``limit`` events means the log was read to its
        end. Raises CompactedError if events after ``revision`` were compacted away.
        """
        if revision < 0 or limit < 1:
            raise ValueError("revision must be >= 0 and limit >= 1")
        columns = "SELECT type, revision, seq, body FROM events"
        with self._transaction() as db:
            compacted = db.execute("SELECT compacted FROM state").fetchone()[0]
            if revision < compacted:
                raise CompactedError(compacted, revision)
            rows = db.execute(f"{columns} WHERE revision > ? ORDER BY revision, seq LIMIT ?",
                              (revision, limit)).fetchall()
            if len(rows) == limit:
                _, last_revision, last_seq, _ = rows[-1]
                rows += db.execute(f"{columns} WHERE revision = ? AND seq > ? ORDER BY seq",
                                   (last_revision, last_seq)).fetchall()
        return [Event(type_, rev, json.loads(body), seq) for type_, rev, seq, body in rows]

    def counts(self) -> dict[str, int]:
        """Number of stored objects per kind."""
        with self._transaction() as db:
            rows = db.execute("SELECT kind, COUNT(*) FROM objects GROUP BY kind").fetchall()
        return dict(rows)

    def size_bytes(self) -> int:
        """Bytes on disk: the database file plus its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total
