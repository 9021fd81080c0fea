"""User ID -> public key bindings in SQLite, and admission tickets for keys that are about to bind one
(the single broker's ``KeyRegistry``; the cluster's is redis_keys.py).

The first key that registers an ID owns it, across restarts. The ZAP handler lets a CURVE key in
only when ``admits(key)``: it is bound to an ID, or it holds a fresh ticket from the key service's
ADMIT request (docs/PROTOCOL.md §10.1). ``admits`` runs on the authenticator thread: it reads
in-memory dicts only (single reads are atomic under the GIL) and never blocks.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from p2pchat.broker.backends.tickets import KeyLimits, TicketBook
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)


class SqliteKeyRegistry:
    def __init__(self, path: Path, limits: KeyLimits = KeyLimits()) -> None:
        self.limits = limits
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync per bind
        self._db.execute("CREATE TABLE IF NOT EXISTS user_keys (user TEXT PRIMARY KEY, key BLOB NOT NULL)")
        self._cache: dict[str, bytes] = dict(self._db.execute("SELECT user, key FROM user_keys"))
        self._ids_of: dict[bytes, int] = {}
        for key in self._cache.values():
            self._ids_of[key] = self._ids_of.get(key, 0) + 1
        self._tickets = TicketBook(limits)

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self._cache.get(user)
        if bound is not None:
            return None if bound == key else ErrorCode.ID_TAKEN
        if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
            return ErrorCode.TOO_MANY_IDS
        if len(self._cache) >= self.limits.bound_ids:
            return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes) -> ErrorCode | None:
        refused = self.can_bind(user, key)
        if refused is not None or user in self._cache:
            return refused
        self._db.execute("INSERT INTO user_keys (user, key) VALUES (?, ?)", (user, key))
        self._cache[user] = key
        self._ids_of[key] = self._ids_of.get(key, 0) + 1
        log.info("user=%s bound to a new key", user)
        return None

    def lookup(self, user: str) -> bytes | None:
        return self._cache.get(user)

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        return self._tickets.issue(key, now)

    def admits(self, key: bytes, now: float) -> bool:
        return key in self._ids_of or self._tickets.holds(key, now)

    def close(self) -> None:
        self._db.close()
