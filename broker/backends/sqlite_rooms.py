"""Rooms in SQLite (the single broker's ``RoomRegistry``; docs/ROOMS-DESIGN.md §2.3).

``rooms.sqlite`` beside ``keys.sqlite``, WAL. Every room is also held in memory (``rid -> Room`` and
``user -> rids``), so a check on the message path is a dict lookup; a change is computed by the rule table
(broker/core/rooms.py) on the cached room and stored in one transaction before it is returned, so a change
that was answered survives a crash. The file has one writer: the broker that opened it.

A message costs no disk write: its number comes from a counter in memory, and ``rooms.seq`` holds a
reservation ``SEQ_BLOCK`` ahead, written before a number above it is handed out; after a restart or a crash
numbering goes on above the reservation (a gap, never a repeat). Marks are kept in memory too and written to
``members`` at each ``expire_invitations`` (the broker's once-a-second housekeeping) and at ``close``: a crash
loses the marks since, which members report again with their next history commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from p2pchat.broker.backends.room_registry import Result, RuleBackedRooms
from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Member, Role, Room, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits

SEQ_BLOCK = 1000  # message numbers reserved per write of ``rooms.seq``

_SCHEMA = (
    # ``seq``: the reservation, not the last number handed out (that one is in memory only).
    "CREATE TABLE IF NOT EXISTS rooms (rid BLOB PRIMARY KEY, name TEXT NOT NULL, name_fold TEXT NOT NULL UNIQUE, "
    "topic TEXT NOT NULL, owner TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL)",
    # ``pos``: the order of ``Room.members`` (oldest first: who inherits the owner role). ``delivered``, ``read``:
    # the marks of a joined member, as last written.
    "CREATE TABLE IF NOT EXISTS members (rid BLOB NOT NULL, user TEXT NOT NULL, pos INTEGER NOT NULL, "
    "role INTEGER NOT NULL, joined INTEGER NOT NULL, since_ms INTEGER NOT NULL, delivered INTEGER NOT NULL, "
    "read INTEGER NOT NULL, PRIMARY KEY (rid, user))",
    "CREATE INDEX IF NOT EXISTS members_user ON members (user)",
    "CREATE INDEX IF NOT EXISTS members_invited ON members (since_ms) WHERE joined = 0",  # the expiry sweep
)

Marks = dict[str, tuple[int, int]]  # a room's joined members -> (delivered, read)


class SqliteRoomRegistry(RuleBackedRooms):
    def __init__(self, path: Path, limits: RoomLimits = RoomLimits()) -> None:
        self.limits = limits
        # "IMMEDIATE": each `with self._db` is one write transaction (BEGIN IMMEDIATE ... COMMIT or ROLLBACK)
        self._db = sqlite3.connect(path, isolation_level="IMMEDIATE", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync
        with self._db:
            for statement in _SCHEMA:
                self._db.execute(statement)
        self._rooms: dict[bytes, Room] = {}
        self._of: dict[str, set[bytes]] = {}
        self._names: dict[str, bytes] = {}  # folded name -> rid
        self._reserved: dict[bytes, int] = {}  # rid -> the highest number ``rooms.seq`` lets us hand out
        self._marks: dict[bytes, Marks] = {}
        self._unwritten: set[tuple[bytes, str]] = set()  # marks changed since they were last written
        members: dict[bytes, list[Member]] = {}
        for rid, user, role, joined, since_ms, delivered, read in self._db.execute(
                "SELECT rid, user, role, joined, since_ms, delivered, read FROM members ORDER BY rid, pos"):
            members.setdefault(rid, []).append(Member(user, Role(role), bool(joined), since_ms))
            if joined:
                self._marks.setdefault(rid, {})[user] = (delivered, read)
        for rid, name, topic, owner, epoch, seq in self._db.execute(
                "SELECT rid, name, topic, owner, epoch, seq FROM rooms"):
            self._reserved[rid] = seq  # numbers up to it may have been handed out before a crash
            self._cache(Room(rid, name, topic, owner, epoch, seq, tuple(members.get(rid, ()))))

    # --- storage -----------------------------------------------------------------------------------------
    def get(self, rid: bytes) -> Room | None:
        return self._rooms.get(rid)

    def _rids(self, user: str, joined: bool) -> list[bytes]:
        return [rid for rid in self._of.get(user, ()) if self._rooms[rid].member(user).joined is joined]

    def _pending(self, user: str, now_ms: int) -> int:
        return sum(not rules.stale(self._rooms[rid].member(user), now_ms, self.limits)
                   for rid in self._rids(user, False))

    def _invited_before(self, since_ms: int, limit: int) -> list[bytes]:
        return [rid for rid, in self._db.execute(
            "SELECT DISTINCT rid FROM members WHERE joined = 0 AND since_ms <= ? LIMIT ?", (since_ms, limit))]

    def _holder(self, name: str) -> bytes | None:
        return self._names.get(rules.fold(name))

    def _room_count(self) -> int:
        return len(self._rooms)

    def _change(self, rid: bytes, compute: Callable[[], Result]) -> Result:
        old = self._rooms.get(rid)
        result = compute()
        if isinstance(result, RoomRefusal) or result == old:
            return result
        with self._db:
            if result is None:
                self._db.execute("DELETE FROM members WHERE rid = ?", (rid,))
                self._db.execute("DELETE FROM rooms WHERE rid = ?", (rid,))
            else:
                marks = self._marks.get(rid, {})
                marks = {m.user: marks.get(m.user, (0, 0)) for m in result.members if m.joined}  # leavers': gone
                self._write(result, marks)
        self._uncache(old)
        if result is None:
            self._marks.pop(rid, None)
            self._reserved.pop(rid, None)
        else:
            self._cache(result)
            self._marks[rid] = marks
            self._reserved.setdefault(rid, 0)  # a new room: ``rooms.seq`` was written as 0
        return result

    def _write(self, room: Room, marks: Marks) -> None:
        self._db.execute(
            "INSERT INTO rooms (rid, name, name_fold, topic, owner, epoch, seq) VALUES (?, ?, ?, ?, ?, ?, 0) "
            "ON CONFLICT (rid) DO UPDATE SET name = excluded.name, name_fold = excluded.name_fold, "
            "topic = excluded.topic, owner = excluded.owner, epoch = excluded.epoch",  # seq: next_seq's alone
            (room.rid, room.name, rules.fold(room.name), room.topic, room.owner, room.epoch))
        self._db.execute("DELETE FROM members WHERE rid = ?", (room.rid,))  # ≤ MAX_ROOM_MEMBERS rows, changes are rare
        self._db.executemany(
            "INSERT INTO members (rid, user, pos, role, joined, since_ms, delivered, read) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(room.rid, m.user, pos, int(m.role), int(m.joined), m.since_ms, *marks.get(m.user, (0, 0)))
             for pos, m in enumerate(room.members)])

    def _cache(self, room: Room) -> None:
        self._uncache(self._rooms.get(room.rid))
        self._rooms[room.rid] = room
        self._names[rules.fold(room.name)] = room.rid
        for member in room.members:
            self._of.setdefault(member.user, set()).add(room.rid)

    def _uncache(self, room: Room | None) -> None:
        if room is None:
            return
        self._rooms.pop(room.rid, None)
        self._names.pop(rules.fold(room.name), None)
        for member in room.members:
            rids = self._of.get(member.user)
            rids.discard(room.rid)
            if not rids:
                del self._of[member.user]

    # --- message numbers and marks -----------------------------------------------------------------------
    def next_seq(self, rid: bytes) -> int | None:
        room = self._rooms.get(rid)
        if room is None:
            return None
        seq = room.seq + 1
        if seq > self._reserved[rid]:
            with self._db:  # before the number is out: a crash from here on resumes above the reservation
                self._db.execute("UPDATE rooms SET seq = ? WHERE rid = ?", (seq + SEQ_BLOCK - 1, rid))
            self._reserved[rid] = seq + SEQ_BLOCK - 1
        self._rooms[rid] = replace(room, seq=seq)
        return seq

    def mark(self, rid: bytes, user: str, delivered: int, read: int | None) -> None:
        marks = self._marks.get(rid)
        if marks is None or user not in marks:  # only joined members have marks
            return
        raised = rules.raised(marks[user], delivered, read, self._rooms[rid].seq)
        if raised != marks[user]:
            marks[user] = raised
            self._unwritten.add((rid, user))

    def marks(self, rid: bytes) -> dict[str, tuple[int, int]]:
        return dict(self._marks.get(rid, {}))

    def _write_marks(self) -> None:
        rows = [(*self._marks[rid][user], rid, user) for rid, user in self._unwritten
                if user in self._marks.get(rid, ())]
        self._unwritten.clear()
        if rows:
            with self._db:
                self._db.executemany("UPDATE members SET delivered = ?, read = ? WHERE rid = ? AND user = ?", rows)

    def expire_invitations(self, now_ms: int) -> list[tuple[bytes, str]]:
        self._write_marks()
        return super().expire_invitations(now_ms)

    def close(self) -> None:
        self._write_marks()
        self._db.close()
