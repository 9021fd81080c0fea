"""Store-and-forward: the broker's durable per-recipient queues in SQLite (the single broker's ``QueueStore``).

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
from pathlib import Path

from p2pchat.broker.core.ports import QueueLimits, Refusal, StoreUnavailable
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)


class QueueBook:
    """In-memory counts and bytes of the queues (per recipient, per sender within it, in all), with the
    changes of the open batch journaled so a rollback restores them without re-reading the store."""

    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self.users: dict[str, list[int]] = {}  # recipient -> [count, bytes]
        self.shares: dict[tuple[str, str], list[int]] = {}  # (recipient, sender) -> [count, bytes]
        self.total_bytes = 0
        self._journal: list[tuple[str, str, int, int]] = []

    def refusal(self, sender: str, recipient: str, size: int) -> Refusal | None:
        lim = self.limits
        user = self.users.get(recipient)
        if user is None:
            if len(self.users) >= lim.max_recipients:
                return Refusal.STORE_FULL
            user = [0, 0]
        if self.total_bytes + size > lim.max_total_bytes:
            return Refusal.STORE_FULL
        if user[0] >= lim.max_per_user or user[1] + size > lim.max_bytes_per_user:
            return Refusal.QUEUE_FULL
        share = self.shares.get((recipient, sender), (0, 0))
        if share[0] >= lim.max_per_sender or share[1] + size > lim.max_bytes_per_sender:
            return Refusal.SHARE_FULL
        return None

    def add(self, sender: str, recipient: str, count: int, size: int, journal: bool = True) -> None:
        for table, key in ((self.users, recipient), (self.shares, (recipient, sender))):
            entry = table.get(key)  # type: ignore[attr-defined]
            if entry is None:
                entry = table[key] = [0, 0]  # type: ignore[index]
            entry[0] += count
            entry[1] += size
            if entry[0] <= 0:
                del table[key]  # type: ignore[attr-defined]
        self.total_bytes += size
        if journal:
            self._journal.append((sender, recipient, count, size))

    def committed(self) -> None:
        self._journal.clear()

    def undo(self) -> None:
        for sender, recipient, count, size in reversed(self._journal):
            self.add(sender, recipient, -count, -size, journal=False)
        self._journal.clear()

    def queued(self, recipient: str) -> int:
        return self.users.get(recipient, (0, 0))[0]


CONSUME_BATCH = 500  # ids per DELETE (SQLite allows 32,766 parameters)
_FULL_ERRORS = ("full", "disk i/o error")  # SQLITE_FULL, and SQLITE_IOERR when a write hits ENOSPC


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
            sender TEXT NOT NULL DEFAULT '',
            UNIQUE (recipient, msg_id))""")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(queue)")}
        if "sender" not in columns:  # a store made before per-sender shares
            self._db.execute("ALTER TABLE queue ADD COLUMN sender TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS queue_by_recipient ON queue (recipient, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS queue_by_expiry ON queue (expires_ms)")
        self.book = QueueBook(limits)
        for recipient, sender, count, size in self._db.execute(
                "SELECT recipient, sender, COUNT(*), SUM(length(header)) FROM queue GROUP BY recipient, sender"):
            self.book.add(sender, recipient, count, size, journal=False)
        self._in_tx = False
        self._lost = False  # SQLite rolled the open batch back by itself (disk full)
        self._consumed: dict[str, list[bytes]] = {}  # recipient -> ids consumed in the open batch

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
            self._in_tx = True

    def _write(self, sql: str, args: tuple, rows: bool = False) -> list[tuple] | int | None:
        """Run a write in the batch: the rows it returns (``rows``) or how many it changed; None if the disk
        refused it. (RETURNING costs about as much as the write itself: only where the rows are needed.)"""
        self._begin()
        try:
            cursor = self._db.execute(sql, args)
            return cursor.fetchall() if rows else cursor.rowcount
        except sqlite3.OperationalError as exc:
            if not any(word in str(exc).lower() for word in _FULL_ERRORS):
                raise
            log.warning("queue store refused a write: %s", exc)
            if not self._db.in_transaction:
                self._lost = True  # SQLite undid the whole batch: commit must say so
            return None

    def append(self, msg_id: bytes, sender: str, recipient: str, header: bytes, expires_ms: int) -> Refusal | None:
        refusal = self.book.refusal(sender, recipient, len(header))
        if refusal is not None:
            return refusal
        inserted = self._write("INSERT OR IGNORE INTO queue (msg_id, recipient, header, expires_ms, sender) "
                               "VALUES (?, ?, ?, ?, ?)", (msg_id, recipient, header, expires_ms, sender))
        if inserted is None:
            return Refusal.STORE_FULL
        if inserted:  # not a repeat of a frame already queued
            self.book.add(sender, recipient, 1, len(header))
        return None

    def pending(self, recipient: str, now_ms: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        if not self.book.queued(recipient):
            return []
        return self._db.execute("SELECT seq, header FROM queue WHERE recipient = ? AND seq > ? AND expires_ms > ? "
                                "ORDER BY seq LIMIT ?", (recipient, after, now_ms, limit)).fetchall()

    def consume(self, recipient: str, msg_id: bytes) -> None:
        """Forgotten at the batch's commit: one DELETE per recipient and batch, not one per frame."""
        if self.book.queued(recipient):
            self._consumed.setdefault(recipient, []).append(msg_id)

    def _delete_consumed(self) -> None:
        consumed, self._consumed = self._consumed, {}
        for recipient, ids in consumed.items():
            for start in range(0, len(ids), CONSUME_BATCH):
                part = ids[start:start + CONSUME_BATCH]
                rows = self._write(f"DELETE FROM queue WHERE recipient = ? AND msg_id IN ({','.join('?' * len(part))}) "
                                   "RETURNING sender, length(header)", (recipient, *part), rows=True)
                for sender, size in rows or ():
                    self.book.add(sender, recipient, -1, -size)

    def expire(self, now_ms: int) -> int:
        """One bounded step through the expiry index: the broker loop never scans the table."""
        rows = self._write("DELETE FROM queue WHERE seq IN (SELECT seq FROM queue WHERE expires_ms <= ? "
                           "ORDER BY expires_ms LIMIT ?) RETURNING recipient, sender, length(header)",
                           (now_ms, self.limits.expire_batch), rows=True) or []
        for recipient, sender, size in rows:
            self.book.add(sender, recipient, -1, -size)
        if rows:
            log.info("%d queued frames expired", len(rows))
        return len(rows)

    def queued(self, recipient: str) -> int:
        return self.book.queued(recipient)

    def commit(self) -> None:
        self._delete_consumed()
        lost, self._lost = self._lost, False
        if lost:
            self.rollback()
            raise StoreUnavailable("the disk refused a write; the batch was rolled back", ErrorCode.STORAGE_FULL)
        if self._in_tx:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self.rollback()
                raise StoreUnavailable(f"commit failed: {exc}", ErrorCode.STORAGE_FULL) from exc
            self._in_tx = False
        self.book.committed()

    def rollback(self) -> None:
        # After a failed COMMIT SQLite may already have rolled back (SQLITE_FULL): ask, don't assume.
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                log.warning("rollback: %s", exc)
        self._in_tx = False
        self._lost = False
        self._consumed.clear()
        self.book.undo()

    def close(self) -> None:
        try:
            self.commit()
        except StoreUnavailable as exc:
            log.warning("store closed with its last batch lost: %s", exc)
        self._db.close()
