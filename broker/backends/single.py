"""A single broker's ports: keys and queues in SQLite under its data directory, the directory and the link
slots in process, no other brokers. Cluster mode wires ``ClusterBackend`` (redis_cluster.py) in instead."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink, NoStore
from p2pchat.broker.backends.sqlite_keys import SqliteKeyRegistry
from p2pchat.broker.backends.sqlite_rooms import SqliteRoomRegistry
from p2pchat.broker.backends.sqlite_store import SqliteMessageStore
from p2pchat.broker.backends.tickets import KeyLimits
from p2pchat.broker.core.pake_slots import PakeSlots
from p2pchat.broker.core.ports import QueueLimits, StoreUnavailable
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ErrorCode


class SingleBackend:
    def __init__(self, data_dir: Path, epoch: bytes, *, durable: bool = True, fsync: bool = False,
                 queue_limits: QueueLimits = QueueLimits(), key_limits: KeyLimits = KeyLimits()) -> None:
        self.identity = Identity.load_or_create(data_dir / "broker.key")
        self.keys = SqliteKeyRegistry(data_dir / "keys.sqlite", key_limits)
        self.rooms = SqliteRoomRegistry(data_dir / "rooms.sqlite")
        self.store: SqliteMessageStore | NoStore = (
            SqliteMessageStore(data_dir / "queue.sqlite", queue_limits, fsync) if durable else NoStore())
        self.directory = LocalDirectory(epoch)
        self.link = LocalLink()
        self.pake_slots = PakeSlots()
        self.description = ""

    def start(self) -> None:
        pass  # nothing arrives from other brokers

    def commit(self) -> None:
        """The batch's queue writes; ``StoreUnavailable`` (storage_full) if SQLite or the disk refused them."""
        try:
            self.store.commit()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"commit failed: {exc}", ErrorCode.STORAGE_FULL) from exc

    def rollback(self) -> None:
        self.store.rollback()

    def close(self) -> None:
        self.keys.close()
        self.rooms.close()
        self.store.close()
