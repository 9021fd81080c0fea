"""Store-and-forward: the broker's durable per-recipient queues.

Every durable frame (message, file offer, receipt) is appended here before its
sender is acknowledged, and stays until its recipient *consumes* it. The shell
commits once per batch of frames (group commit) and only then sends the
acknowledgements, so an acknowledged frame survives a SIGKILL at any moment:
SQLite in WAL mode has written it to the OS once the commit returns
(``fsync=True`` also makes it survive power loss or a kernel crash).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_per_user: int = 10_000
    ttl_seconds: float = 7 * 24 * 3600.0


class StoreUnavailable(Exception):
    """A shared store (Redis) could not be reached: nothing of the batch is durable."""


class MessageStore(Protocol):
    durable: bool

    def append(self, msg_id: bytes, recipient: str, header: bytes, expires_ms: int) -> bool:
        """Queue ``header`` for ``recipient``; False if their queue is full. Idempotent by id."""

    def pending(self, recipient: str, now_ms: int) -> list[bytes]:
        """Unexpired frames queued for ``recipient``, oldest first."""

    def consume(self, recipient: str, msg_id: bytes) -> None: ...

    def expire(self, now_ms: int) -> int: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class NoStore:
    """Durability off: nothing is queued; offline recipients get an error."""

    durable = False

    def append(self, msg_id: bytes, recipient: str, header: bytes, expires_ms: int) -> bool:
        return False

    def pending(self, recipient: str, now_ms: int) -> list[bytes]:
        return []

    def consume(self, recipient: str, msg_id: bytes) -> None:
        pass

    def expire(self, now_ms: int) -> int:
        return 0

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class SqliteMessageStore:
    durable = True

    def __init__(self, path: Path, limits: QueueLimits = QueueLimits(), fsync: bool = False) -> None:
        self.limits = limits
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # OFF still hands every commit to the OS (a killed broker loses nothing) but never fsyncs,
        # which removes the checkpoint stalls from the latency tail; FULL survives power loss too.
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.execute("""CREATE TABLE IF NOT EXISTS queue (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id BLOB NOT NULL,
            recipient TEXT NOT NULL,
            header BLOB NOT NULL,
            expires_ms INTEGER NOT NULL,
            UNIQUE (recipient, msg_id))""")
        self._db.execute("CREATE INDEX IF NOT EXISTS queue_by_recipient ON queue (recipient, seq)")
        self._counts: dict[str, int] = dict(
            self._db.execute("SELECT recipient, COUNT(*) FROM queue GROUP BY recipient"))
        self._in_tx = False

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def append(self, msg_id: bytes, recipient: str, header: bytes, expires_ms: int) -> bool:
        if self._counts.get(recipient, 0) >= self.limits.max_per_user:
            return False
        self._begin()
        cur = self._db.execute(
            "INSERT OR IGNORE INTO queue (msg_id, recipient, header, expires_ms) VALUES (?, ?, ?, ?)",
            (msg_id, recipient, header, expires_ms))
        if cur.rowcount:
            self._counts[recipient] = self._counts.get(recipient, 0) + 1
        return True

    def pending(self, recipient: str, now_ms: int) -> list[bytes]:
        if not self._counts.get(recipient):
            return []
        rows = self._db.execute("SELECT header FROM queue WHERE recipient = ? AND expires_ms > ? ORDER BY seq",
                                (recipient, now_ms))
        return [row[0] for row in rows]

    def consume(self, recipient: str, msg_id: bytes) -> None:
        self._begin()
        cur = self._db.execute("DELETE FROM queue WHERE recipient = ? AND msg_id = ?", (recipient, msg_id))
        if cur.rowcount:
            self._counts[recipient] -= 1

    def expire(self, now_ms: int) -> int:
        self._begin()
        expired = self._db.execute(
            "SELECT recipient, COUNT(*) FROM queue WHERE expires_ms <= ? GROUP BY recipient", (now_ms,)).fetchall()
        self._db.execute("DELETE FROM queue WHERE expires_ms <= ?", (now_ms,))
        for recipient, count in expired:
            self._counts[recipient] -= count
            log.info("user=%s %d queued frames expired", recipient, count)
        return sum(count for _, count in expired)

    def queued(self, recipient: str) -> int:
        return self._counts.get(recipient, 0)

    def commit(self) -> None:
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def rollback(self) -> None:
        if self._in_tx:
            self._db.execute("ROLLBACK")
            self._in_tx = False
            self._counts = dict(self._db.execute("SELECT recipient, COUNT(*) FROM queue GROUP BY recipient"))

    def close(self) -> None:
        self.commit()
        self._db.close()
