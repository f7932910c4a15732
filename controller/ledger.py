"""ledger.py: durable identity records — one-time join tokens and the certificates issued.

SQLite (``identity.db`` in the data dir, WAL, synchronous=FULL). Tokens are stored as a
SHA-256 of their secret, never in the clear; redeeming is one atomic UPDATE, so a token works
once even under concurrent joins. Pure storage: no HTTP, no CA, no trio.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, node TEXT NOT NULL, secret_sha256 BLOB NOT NULL,
    created REAL NOT NULL, expires REAL NOT NULL, used REAL, used_by TEXT);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY, node TEXT NOT NULL, identity TEXT NOT NULL, issuer TEXT NOT NULL,
    not_before REAL NOT NULL, not_after REAL NOT NULL);
CREATE INDEX IF NOT EXISTS issued_by_node ON issued (node, identity, not_after);
CREATE INDEX IF NOT EXISTS issued_by_issuer ON issued (issuer, not_after);
CREATE TABLE IF NOT EXISTS node_status (
    node TEXT PRIMARY KEY, version INTEGER NOT NULL, ready INTEGER NOT NULL, error TEXT NOT NULL,
    reported REAL NOT NULL);
"""


class TokenRefused(Exception):
    """A join token was not accepted. ``reason`` is one of: malformed, unknown, forged, used, expired."""

    def __init__(self, reason: str, message: str, node: str = ""):
        super().__init__(message)
        self.reason, self.node = reason, node


@dataclass(frozen=True)
class Issued:
    serial: str
    node: str
    identity: str
    issuer: str
    not_before: float
    not_after: float


class Ledger:
    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- join tokens -------------------------------------------------------------------------

    def create_token(self, node: str, *, ttl: float, now: float) -> str:
        """Return a new one-time token ``<id>.<secret>`` for ``node``, valid ``ttl`` seconds."""
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("INSERT INTO tokens (id, node, secret_sha256, created, expires) VALUES (?,?,?,?,?)",
                             (token_id, node, _sha(secret), now, now + ttl))
        return f"{token_id}.{secret}"

    def redeem(self, token: str, *, now: float, by: str) -> str:
        """Spend a token; return its node or raise TokenRefused saying why."""
        token_id, dot, secret = token.strip().partition(".")
        if not dot or not token_id or not secret:
            raise TokenRefused("malformed", "the join token is malformed (expected '<id>.<secret>' "
                                            "as printed by 'nodemesh token create')")
        with self._lock:
            row = self._db.execute("SELECT node, secret_sha256, expires, used, used_by FROM tokens WHERE id = ?",
                                   (token_id,)).fetchone()
            if row is None:
                raise TokenRefused("unknown", "the join token is not known to this controller "
                                              "(mistyped, forged, or made by another controller)")
            node, digest, expires, used, used_by = row
            if not hmac.compare_digest(digest, _sha(secret)):
                raise TokenRefused("forged", "the join token's secret does not match (forged or mistyped)", node)
            if used is not None:
                raise TokenRefused("used", f"the join token for node {node} was already used (by {used_by}); "
                                           "create a new one with 'nodemesh token create'", node)
            if now >= expires:
                raise TokenRefused("expired", f"the join token for node {node} expired; create a new one "
                                              "with 'nodemesh token create'", node)
            cur = self._db.execute("UPDATE tokens SET used = ?, used_by = ? WHERE id = ? AND used IS NULL",
                                   (now, by, token_id))
            if cur.rowcount != 1:  # lost a race with a concurrent join
                raise TokenRefused("used", f"the join token for node {node} was already used", node)
        return node

    # --- issued certificates -----------------------------------------------------------------

    def record(self, issued: Issued) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO issued VALUES (?,?,?,?,?,?)",
                             (issued.serial, issued.node, issued.identity, issued.issuer,
                              issued.not_before, issued.not_after))

    def last_expiry_by(self, issuer: str) -> float | None:
        """The latest not_after of anything ``issuer`` signed (None if nothing)."""
        with self._lock:
            (value,) = self._db.execute("SELECT MAX(not_after) FROM issued WHERE issuer = ?", (issuer,)).fetchone()
        return value

    # --- node status (acknowledged versions) -------------------------------------------------

    def report(self, status: NodeStatus) -> None:
        with self._lock:
            _report(self._db, status)

    def node_statuses(self) -> dict[str, NodeStatus]:
        with self._lock:
            rows = self._db.execute("SELECT node, version, ready, error, reported FROM node_status").fetchall()
        return {r[0]: NodeStatus(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows}

    def current(self, *, now: float) -> list[Issued]:
        """The newest unexpired certificate of each (node, identity), ordered by node and identity."""
        with self._lock:
            rows = self._db.execute(
                "SELECT serial, node, identity, issuer, not_before, MAX(not_after) FROM issued "
                "WHERE not_after > ? GROUP BY node, identity ORDER BY node, identity", (now,)).fetchall()
        return [Issued(*r) for r in rows]


@dataclass(frozen=True)
class NodeStatus:
    node: str
    version: int      # the resourceVersion the agent serves
    ready: bool
    error: str        # the last rejected update or failure, "" when healthy
    reported: float   # when the agent last reported


def _report(db, status: NodeStatus) -> None:
    db.execute("INSERT OR REPLACE INTO node_status VALUES (?,?,?,?,?)",
               (status.node, status.version, int(status.ready), status.error, status.reported))


def _sha(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()
