"""The ``SenderKeyStore`` of a client on disk: one SQLite table ``sender_keys`` (key, value), WAL.

Each ``put`` and ``delete`` is its own transaction, committed before it returns: ``SenderKeys.seal`` relies on
it to never reuse an iteration after a crash. ``synchronous=NORMAL`` (as the history) survives a killed process;
a power cut may lose the last commits, and even then a reused iteration repeats no AES key, as every message key
is salted by the message's random id. The file holds private signing keys: it lives in the user's private
directory (0700), like the identity key.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from p2pchat.common.errors import ErrorCode, StorageError


class SqliteSenderKeys:
    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS sender_keys (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        except (sqlite3.Error, OSError) as exc:
            raise _storage_error(path, "open", exc) from None

    def load_all(self) -> dict[str, bytes]:
        try:
            return dict(self._db.execute("SELECT key, value FROM sender_keys"))
        except sqlite3.Error as exc:
            raise _storage_error(self._path, "read", exc) from None

    def put(self, key: str, value: bytes) -> None:
        self._write("INSERT OR REPLACE INTO sender_keys (key, value) VALUES (?, ?)", (key, value))

    def delete(self, key: str) -> None:
        self._write("DELETE FROM sender_keys WHERE key = ?", (key,))

    def _write(self, sql: str, args: tuple) -> None:
        try:
            self._db.execute(sql, args)  # autocommit: durable when this returns
        except sqlite3.Error as exc:
            raise _storage_error(self._path, "save", exc) from None

    def close(self) -> None:
        self._db.close()


def _storage_error(path: Path, what: str, exc: Exception) -> StorageError:
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return StorageError(f"cannot {what} the sender keys in {path} ({exc})",
                        ErrorCode.NO_SPACE if full else ErrorCode.UNWRITABLE)
