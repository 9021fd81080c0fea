"""Rooms in SQLite (the single broker's ``RoomRegistry``; docs/ROOMS-DESIGN.md §2.3).

``rooms.sqlite`` beside ``keys.sqlite``, WAL. Every room is also held in memory (``rid -> Room`` and
``user -> rids``), so a check on the message path is a dict lookup; a change is computed by the rule table
(broker/core/rooms.py) on the cached room and stored in one transaction before it is returned, so a change
that was answered survives a crash. The file has one writer: the broker that opened it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from p2pchat.broker.backends.room_registry import Result, RuleBackedRooms
from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Member, Role, Room, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS rooms (rid BLOB PRIMARY KEY, name TEXT NOT NULL, name_fold TEXT NOT NULL UNIQUE, "
    "topic TEXT NOT NULL, owner TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL)",
    # ``pos``: the order of ``Room.members`` (oldest first: who inherits the owner role).
    "CREATE TABLE IF NOT EXISTS members (rid BLOB NOT NULL, user TEXT NOT NULL, pos INTEGER NOT NULL, "
    "role INTEGER NOT NULL, joined INTEGER NOT NULL, since_ms INTEGER NOT NULL, delivered INTEGER NOT NULL, "
    "read INTEGER NOT NULL, PRIMARY KEY (rid, user))",
    "CREATE INDEX IF NOT EXISTS members_user ON members (user)",
)


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
        members: dict[bytes, list[Member]] = {}
        for rid, user, role, joined, since_ms, delivered, read in self._db.execute(
                "SELECT rid, user, role, joined, since_ms, delivered, read FROM members ORDER BY rid, pos"):
            members.setdefault(rid, []).append(Member(user, Role(role), bool(joined), since_ms, delivered, read))
        for rid, name, topic, owner, epoch, seq in self._db.execute(
                "SELECT rid, name, topic, owner, epoch, seq FROM rooms"):
            self._cache(Room(rid, name, topic, owner, epoch, seq, tuple(members.get(rid, ()))))

    # --- storage -----------------------------------------------------------------------------------------
    def get(self, rid: bytes) -> Room | None:
        return self._rooms.get(rid)

    def _rids(self, user: str, joined: bool) -> list[bytes]:
        return [rid for rid in self._of.get(user, ()) if self._rooms[rid].member(user).joined is joined]

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
                self._write(result)
        self._uncache(old)
        if result is not None:
            self._cache(result)
        return result

    def _write(self, room: Room) -> None:
        self._db.execute(
            "INSERT INTO rooms (rid, name, name_fold, topic, owner, epoch, seq) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (rid) DO UPDATE SET name = excluded.name, name_fold = excluded.name_fold, "
            "topic = excluded.topic, owner = excluded.owner, epoch = excluded.epoch, seq = excluded.seq",
            (room.rid, room.name, rules.fold(room.name), room.topic, room.owner, room.epoch, room.seq))
        self._db.execute("DELETE FROM members WHERE rid = ?", (room.rid,))  # ≤ MAX_ROOM_MEMBERS rows, changes are rare
        self._db.executemany(
            "INSERT INTO members (rid, user, pos, role, joined, since_ms, delivered, read) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(room.rid, m.user, pos, int(m.role), int(m.joined), m.since_ms, m.delivered, m.read)
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

    def close(self) -> None:
        self._db.close()
