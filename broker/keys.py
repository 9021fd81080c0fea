"""User ID -> public key bindings: the first key that registers an ID owns it, across restarts."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class KeyRegistry(Protocol):
    def bind(self, user: str, key: bytes) -> bool:
        """Bind ``user`` to ``key`` if unbound; True if ``user`` is (now) bound to ``key``."""

    def lookup(self, user: str) -> bytes | None: ...


class SqliteKeyRegistry:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync per bind
        self._db.execute("CREATE TABLE IF NOT EXISTS user_keys (user TEXT PRIMARY KEY, key BLOB NOT NULL)")
        self._cache: dict[str, bytes] = dict(self._db.execute("SELECT user, key FROM user_keys"))

    def bind(self, user: str, key: bytes) -> bool:
        bound = self._cache.get(user)
        if bound is not None:
            return bound == key
        self._db.execute("INSERT INTO user_keys (user, key) VALUES (?, ?)", (user, key))
        self._cache[user] = key
        log.info("user=%s bound to a new key", user)
        return True

    def lookup(self, user: str) -> bytes | None:
        return self._cache.get(user)

    def close(self) -> None:
        self._db.close()
