"""A user's conversations and outbox, in SQLite (WAL) in the user's directory.

Outgoing messages are written here (state ``queued``) before they are sent,
so the outbox survives a crash and is sent again after a restart; incoming
ones are written before the broker is told to forget them (CONSUME), and the
message id makes every message appear exactly once however often it arrives.

Writes are batched and kept in memory until their COMMIT succeeds: when the
disk is full, the commit raises ``StorageError`` (the caller holds back what
depended on it) and the next commit writes the whole backlog again.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from p2pchat.common.errors import ErrorCode, StorageError

log = logging.getLogger(__name__)

# Delivery states of an outgoing message, in the order they can only advance.
STATES = ("queued", "sent", "stored", "delivered", "read")
FAILED = "failed"
# Off that line: the recipient could not open it (sealed to a key it no longer has) and it waits for the
# user to accept the recipient's new key; then it is sealed again and goes out like a queued one.
UNDECRYPTABLE = "undecryptable"
RESEALED = "resealed"
MAX_RESEALS = 1  # a message the recipient cannot open after this many re-seals fails (no loop with a liar)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    msg_id: bytes
    peer: str
    outgoing: bool
    text: str
    ts: int  # sender's clock, ms
    state: str  # outgoing: one of STATES or "failed"; incoming: "received" or "read"
    room: bytes | None = None  # a room's message (``peer`` is its author, ourselves for an outgoing one)


class History:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS messages (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                msg_id BLOB NOT NULL UNIQUE,
                peer TEXT NOT NULL,
                outgoing INTEGER NOT NULL,
                text TEXT NOT NULL,
                ts INTEGER NOT NULL,
                state TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS messages_by_peer ON messages (peer, seq);
            CREATE INDEX IF NOT EXISTS messages_outbox ON messages (state) WHERE state = 'queued';
            CREATE INDEX IF NOT EXISTS messages_waiting ON messages (state, peer)
                WHERE state IN ('undecryptable', 'resealed');
            CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(text, content='messages', content_rowid='seq');
            CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
                INSERT INTO messages_fts (rowid, text) VALUES (new.seq, new.text);
            END;
        """)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
        if "reseals" not in columns:
            self._db.execute("ALTER TABLE messages ADD COLUMN reseals INTEGER NOT NULL DEFAULT 0")  # older files
        if "room" not in columns:  # direct messages have none; a room's are found by it (docs/ROOMS-DESIGN.md §6)
            self._db.execute("ALTER TABLE messages ADD COLUMN room BLOB")
        self._db.executescript("""
            CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, seq) WHERE room IS NOT NULL;
            CREATE TABLE IF NOT EXISTS rooms (rid BLOB PRIMARY KEY, name TEXT NOT NULL, topic TEXT NOT NULL);
        """)
        self._in_tx = False
        self._unsaved: list[tuple[str, tuple]] = []  # writes since the last successful commit, in order
        self._failing = False  # a write or commit failed: the next commit retries the whole backlog

    # --- writes (batched: the client commits once per batch of frames) ------------
    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
            for sql, args in self._unsaved:  # what an earlier failed commit lost, again
                self._db.execute(sql, args)

    def _write(self, sql: str, args: tuple) -> int:
        """Run one write in the open batch and remember it; its rowcount, or -1 if it could not run now."""
        if self._failing:
            self._unsaved.append((sql, args))
            return -1  # kept for the next commit; replaying the backlog at every write would be quadratic
        joined = False
        try:
            self._begin()  # replays an earlier failed batch, so before this write joins the list
            self._unsaved.append((sql, args))
            joined = True
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as exc:  # the disk filled up mid-batch: the commit reports it and retries
            if not joined:
                self._unsaved.append((sql, args))
            self._abandon(exc)
            return -1

    def add_outgoing(self, msg_id: bytes, peer: str, text: str, ts: int, room: bytes | None = None) -> None:
        self._write("INSERT OR IGNORE INTO messages (msg_id, peer, outgoing, text, ts, state, room) "
                    "VALUES (?, ?, 1, ?, ?, 'queued', ?)", (msg_id, peer, text, ts, room))

    def add_echo(self, msg_id: bytes, peer: str, text: str, ts: int, room: bytes | None = None) -> bool:
        """Our message sent from another device (already stored at the broker); False if it is known here."""
        return self._write("INSERT OR IGNORE INTO messages (msg_id, peer, outgoing, text, ts, state, room) "
                           "VALUES (?, ?, 1, ?, ?, 'stored', ?)", (msg_id, peer, text, ts, room)) != 0

    def read_elsewhere(self, msg_id: bytes) -> str | None:
        """Another device of ours showed received message ``msg_id``: read here too; its sender, or None if it was
        not unread here."""
        row = self._db.execute("SELECT peer FROM messages WHERE msg_id = ? AND outgoing = 0 AND state = 'received'",
                               (msg_id,)).fetchone()
        if row is None:
            return None
        self._write("UPDATE messages SET state = 'read' WHERE msg_id = ? AND outgoing = 0", (msg_id,))
        return row[0]

    def add_incoming(self, msg_id: bytes, peer: str, text: str, ts: int, room: bytes | None = None) -> bool:
        """False if this message was already received (a redelivery)."""
        return self._write("INSERT OR IGNORE INTO messages (msg_id, peer, outgoing, text, ts, state, room) "
                           "VALUES (?, ?, 0, ?, ?, 'received', ?)", (msg_id, peer, text, ts, room)) != 0

    def save_room(self, rid: bytes, name: str, topic: str) -> None:
        """A room's name and topic as last heard, so its history can be found by name later."""
        self._write("INSERT INTO rooms (rid, name, topic) VALUES (?, ?, ?) "
                    "ON CONFLICT (rid) DO UPDATE SET name = excluded.name, topic = excluded.topic", (rid, name, topic))

    def advance(self, msg_id: bytes, state: str) -> bool:
        """Move an outgoing message forward to ``state``; False if it was already there or beyond."""
        rank = STATES.index(state)
        earlier = (*STATES[:rank], RESEALED) if rank else ()  # a resealed one is as good as queued
        return self._write(
            f"UPDATE messages SET state = ? WHERE msg_id = ? AND outgoing = 1 AND state IN "
            f"({','.join('?' * len(earlier))})", (state, msg_id, *earlier)) != 0

    def fail(self, msg_id: bytes) -> None:
        self._write("UPDATE messages SET state = ? WHERE msg_id = ? AND state IN ('queued', 'resealed')",
                    (FAILED, msg_id))

    def undecryptable(self, msg_id: bytes, peer: str) -> str | None:
        """``peer`` could not open our message ``msg_id``: it waits for a re-seal (``UNDECRYPTABLE``), or fails
        once it was re-sealed ``MAX_RESEALS`` times (``FAILED``). None if it is not ours to ``peer`` in flight
        (unknown, already failed or waiting, or already delivered: the claim contradicts a receipt)."""
        changed = self._write(
            "UPDATE messages SET state = CASE WHEN reseals >= ? THEN 'failed' ELSE 'undecryptable' END "
            "WHERE msg_id = ? AND peer = ? AND outgoing = 1 AND state IN ('sent', 'stored')",
            (MAX_RESEALS, msg_id, peer))
        if changed < 1:
            return None
        row = self._db.execute("SELECT state FROM messages WHERE msg_id = ?", (msg_id,)).fetchone()
        return row[0] if row else None

    def reseal(self, peer: str) -> list[HistoryEntry]:
        """The messages to ``peer`` waiting for a re-seal, oldest first, now ``RESEALED`` (outbox again)."""
        entries = self._entries("WHERE peer = ? AND outgoing = 1 AND state = 'undecryptable' ORDER BY seq", (peer,))
        for entry in entries:
            self._write("UPDATE messages SET state = 'resealed', reseals = reseals + 1 WHERE msg_id = ?",
                        (entry.msg_id,))
        return entries

    def waiting_peers(self) -> list[str]:
        """Peers some of our messages wait for a re-seal to."""
        return [row[0] for row in self._db.execute(
            "SELECT DISTINCT peer FROM messages WHERE state = 'undecryptable' ORDER BY peer")]

    def mark_read(self, peer: str) -> list[bytes]:
        """Mark ``peer``'s received messages read; returns their ids."""
        ids = [row[0] for row in self._db.execute(
            "SELECT msg_id FROM messages WHERE peer = ? AND room IS NULL AND outgoing = 0 AND state = 'received'",
            (peer,))]
        self._write("UPDATE messages SET state = 'read' WHERE peer = ? AND room IS NULL AND outgoing = 0 "
                    "AND state = 'received'", (peer,))
        return ids

    def mark_room_read(self, rid: bytes) -> int:
        """Mark the room's received messages read; how many were unread."""
        return max(0, self._write("UPDATE messages SET state = 'read' WHERE room = ? AND outgoing = 0 "
                                  "AND state = 'received'", (rid,)))

    def unread(self) -> dict[str | bytes, int]:
        """Unread received messages per peer (direct) and per room id."""
        rows = self._db.execute("SELECT COALESCE(room, peer), COUNT(*) FROM messages WHERE outgoing = 0 "
                                "AND state = 'received' GROUP BY COALESCE(room, peer)")
        return {key: count for key, count in rows}

    @property
    def unsaved(self) -> int:
        """Writes not yet committed (kept in memory while the disk is full)."""
        return len(self._unsaved)

    def commit(self) -> None:
        """Make every write so far durable; StorageError if SQLite cannot (they are kept and retried)."""
        if not self._unsaved:
            return
        self._failing = False
        try:
            self._begin()
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon(exc)
            code = ErrorCode.NO_SPACE if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL \
                else ErrorCode.UNWRITABLE
            raise StorageError(f"cannot save the history ({exc}); {len(self._unsaved)} changes kept in memory, "
                               "retried", code) from None
        self._in_tx = False
        self._unsaved.clear()

    def _abandon(self, exc: sqlite3.Error) -> None:
        """End the failed batch: roll back whatever SQLite still has open, keep our copy of the writes."""
        self._in_tx = False
        self._failing = True
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("history rollback failed after %s", exc)

    def close(self) -> None:
        try:
            self.commit()
        except StorageError as exc:
            log.error("closing with unsaved history: %s", exc.message)
        self._db.close()

    # --- reads ------------------------------------------------------------------------
    def outbox(self) -> list[HistoryEntry]:
        return self._entries("WHERE outgoing = 1 AND state IN ('queued', 'resealed') ORDER BY seq", ())

    def conversation(self, peer: str, limit: int = 200) -> list[HistoryEntry]:
        rows = self._entries("WHERE peer = ? AND room IS NULL ORDER BY seq DESC LIMIT ?", (peer, limit))
        return rows[::-1]

    def room_conversation(self, rid: bytes, limit: int = 200) -> list[HistoryEntry]:
        rows = self._entries("WHERE room = ? ORDER BY seq DESC LIMIT ?", (rid, limit))
        return rows[::-1]

    def room_names(self) -> dict[bytes, str]:
        """Every room we have history of: id -> name as last heard."""
        return {rid: name for rid, name in self._db.execute("SELECT rid, name FROM rooms ORDER BY name")}

    def room_named(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT rid FROM rooms WHERE name = ? COLLATE NOCASE", (name,)).fetchone()
        return row[0] if row else None

    def search(self, query: str, peer: str | None = None, limit: int = 100,
               newest_first: bool = False) -> list[HistoryEntry]:
        """Full-text search (every word must match, prefixes allowed): the ``limit`` oldest matches,
        oldest first, or with ``newest_first`` the ``limit`` newest, newest first."""
        words = [w.replace('"', '""') for w in query.split()]
        if not words:
            return []
        match = " ".join(f'"{w}"*' for w in words)
        where = "WHERE seq IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
        args: tuple = (match,)
        if type(peer) is bytes:  # a room's
            where += " AND room = ?"
            args += (peer,)
        elif peer is not None:
            where += " AND peer = ? AND room IS NULL"
            args += (peer,)
        order = "DESC" if newest_first else "ASC"
        return self._entries(f"{where} ORDER BY seq {order} LIMIT ?", (*args, limit))

    def peers(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT peer FROM messages WHERE room IS NULL "
                                                   "ORDER BY peer")]

    def _entries(self, clause: str, args: tuple) -> list[HistoryEntry]:
        rows = self._db.execute(f"SELECT msg_id, peer, outgoing, text, ts, state, room FROM messages {clause}", args)
        return [HistoryEntry(r[0], r[1], bool(r[2]), r[3], r[4], r[5], r[6]) for r in rows]
