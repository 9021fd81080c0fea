"""User ID -> device key bindings in SQLite, and admission tickets for keys that are about to bind one
(the single broker's ``KeyRegistry``; the cluster's is redis_keys.py).

The first key that registers an ID owns it as the ID's device 1, across restarts, until the ID's recovery
phrase or the operator moves it (docs/PROTOCOL.md §10.2); the account key's link proofs add devices and its
unlink proofs remove them (§10.2.1). An ID's devices are rows of ``devices``; its account row
(``user_recovery``: recovery key, generation, and the last device-list version) outlives a release, so
neither a generation nor a device number is ever used twice for an ID. A ``keys.sqlite`` of the one-key-per-ID
schema (``user_keys``) is migrated at open, each binding becoming device 1 at version 1; one of schema 1 gets
the columns of link proofs (``gen``, ``proof``).

The ZAP handler lets a CURVE key in only when ``admits(key)``: it is a device of an ID, or it holds a fresh
ticket from the key service's ADMIT request (§10.1). ``admits`` runs on the authenticator thread: it reads in-memory dicts only (single reads are
atomic under the GIL) and never blocks.

Moves and releases may come from another process (``p2pchat broker admin`` on a running broker's data
directory): each writes an audit record in the same transaction, and ``changes`` reads the records it has
not seen whenever SQLite's ``data_version`` says another connection committed.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from pathlib import Path

from p2pchat.broker.backends.audit import AuditRecord, Change, RecoveryState
from p2pchat.broker.backends.tickets import KeyLimits, TicketBook
from p2pchat.broker.core.ports import CHANGES_POLL, BindingChange, Device, DeviceList
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import MAX_DEVICES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # PRAGMA user_version: 0 the one-key-per-ID schema (user_keys), 1 devices without link proofs
_SCHEMA = (
    # Kept when a binding is released, so a generation or a device number is never used twice for an ID.
    "CREATE TABLE IF NOT EXISTS user_recovery (user TEXT PRIMARY KEY, recovery BLOB, "
    "generation INTEGER NOT NULL DEFAULT 0, ver INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS devices (user TEXT NOT NULL, id INTEGER NOT NULL, key BLOB NOT NULL, "
    "name TEXT NOT NULL DEFAULT '', flags INTEGER NOT NULL DEFAULT 0, added_ms INTEGER NOT NULL, "
    "gen INTEGER NOT NULL DEFAULT 0, proof BLOB NOT NULL DEFAULT x'', PRIMARY KEY (user, id), UNIQUE (user, key))",
    "CREATE TABLE IF NOT EXISTS key_audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, "
    "user TEXT NOT NULL, change TEXT NOT NULL, old_key BLOB, new_key BLOB, generation INTEGER NOT NULL, "
    "origin TEXT NOT NULL)",
)

_DEVICE_COLUMNS = "id, key, name, flags, added_ms, gen, proof"  # a ``Device``'s fields, in order


class SqliteKeyRegistry:
    def __init__(self, path: Path, limits: KeyLimits = KeyLimits()) -> None:
        self.limits = limits
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync per bind
        self._migrate()
        self._cache: dict[str, DeviceList] = {}
        self._ids_of: dict[bytes, int] = {}  # device key -> IDs it is a device of: what ZAP admits
        rows = self._db.execute(f"SELECT user, ver, {_DEVICE_COLUMNS} FROM devices JOIN user_recovery USING (user) "
                                "ORDER BY user, id")
        for user, group in itertools.groupby(rows, key=lambda row: row[0]):
            entries = list(group)
            self._cache_devices(user, DeviceList(entries[0][1], tuple(Device(*row[2:]) for row in entries)))
        self._recoverable: set[str] = set()  # IDs seen with a recovery key in this run: no write at each register
        self._tickets = TicketBook(limits)
        self._audit_seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM key_audit").fetchone()[0]
        self._version = self._data_version()
        self._wrote = False  # a change of ours to read back from the audit
        self._next_poll = 0.0

    def _migrate(self) -> None:
        """Create the schema; a one-key-per-ID file's bindings become device 1 at list version 1, and a schema 1
        file's devices get empty link proofs (one transaction: another process opening the file meanwhile waits,
        then finds it migrated)."""
        with self._transaction():
            if self._db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
                return
            legacy = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'user_keys'"
                                      ).fetchone()
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(user_recovery)")}
            if columns and "ver" not in columns:  # made by the one-key-per-ID code
                self._db.execute("ALTER TABLE user_recovery ADD COLUMN ver INTEGER NOT NULL DEFAULT 0")
            for statement in _SCHEMA:
                self._db.execute(statement)
            if "gen" not in {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}:  # schema 1
                self._db.execute("ALTER TABLE devices ADD COLUMN gen INTEGER NOT NULL DEFAULT 0")
                self._db.execute("ALTER TABLE devices ADD COLUMN proof BLOB NOT NULL DEFAULT x''")
            if legacy:
                now_ms = int(time.time() * 1000)
                self._db.execute("INSERT INTO devices (user, id, key, added_ms) SELECT user, 1, key, ? FROM user_keys",
                                 (now_ms,))
                self._db.execute("INSERT INTO user_recovery (user, ver) SELECT user, 1 FROM user_keys WHERE true "
                                 "ON CONFLICT (user) DO UPDATE SET ver = 1")
                count = self._db.execute("SELECT COUNT(*) FROM user_keys").fetchone()[0]
                self._db.execute("DROP TABLE user_keys")
                log.info("%d key bindings migrated to devices (each is its ID's device 1)", count)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self._cache.get(user)
        if bound is not None:
            return None if bound.find(key) is not None else ErrorCode.ID_TAKEN
        if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
            return ErrorCode.TOO_MANY_IDS
        if len(self._cache) >= self.limits.bound_ids:
            return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes, recovery: bytes | None = None) -> ErrorCode | None:
        refused = self.can_bind(user, key)
        if refused is not None:
            return refused
        if user in self._cache:
            if recovery is not None and user not in self._recoverable:
                self._keep_recovery(user, recovery)
            return None
        with self._transaction():
            # A new binding takes the recovery key it is given (none: none), whatever an earlier one had.
            self._db.execute("INSERT INTO user_recovery (user, recovery) VALUES (?, ?) ON CONFLICT (user) "
                             "DO UPDATE SET recovery = excluded.recovery", (user, recovery))
            self._replace_devices(user, key)
        self._cache_devices(user, self._read_devices(user))
        if recovery is not None:
            self._recoverable.add(user)
        log.info("user=%s bound to a new key%s", user, "" if recovery else " (no recovery key)")
        return None

    def _keep_recovery(self, user: str, recovery: bytes) -> None:
        """A binding made without a recovery key takes the first one its key registers with; one it has stays."""
        cursor = self._db.execute("INSERT INTO user_recovery (user, recovery) VALUES (?, ?) ON CONFLICT (user) "
                                  "DO UPDATE SET recovery = excluded.recovery WHERE recovery IS NULL",
                                  (user, recovery))
        if cursor.rowcount:
            log.info("user=%s recovery key kept", user)
        self._recoverable.add(user)

    def lookup(self, user: str) -> bytes | None:
        devices = self._cache.get(user)
        return devices.primary.key if devices is not None else None

    def devices(self, user: str, fresh: bool = False) -> DeviceList | None:
        return self._cache.get(user)  # the broker is the only writer of its devices: the cache is fresh

    def describe_device(self, user: str, dev: int, flags: int, name: str | None) -> None:
        devices = self._cache.get(user)
        device = next((d for d in devices.devices if d.id == dev), None) if devices else None
        if device is None or (device.flags | flags == device.flags and (device.name or not name)):
            return  # nothing new: no write at each register
        with self._transaction():
            self._db.execute("UPDATE devices SET flags = flags | ?, name = CASE name WHEN '' THEN ? ELSE name END "
                             "WHERE user = ? AND id = ?", (flags, name or "", user, dev))
        self._cache_devices(user, self._read_devices(user))

    def recovery_state(self, user: str) -> RecoveryState | None:
        """The recovery key and generation of ``user``'s binding; None if it is unbound."""
        if user not in self._cache:
            return None
        row = self._db.execute("SELECT recovery, generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
        return RecoveryState(*row) if row else RecoveryState(None, 0)

    def move(self, user: str, key: bytes, change: Change, origin: str,
             generation: int | None = None) -> ErrorCode | None:
        """Bind ``user`` to ``key`` instead (if it is still at ``generation``, when given); why not, or None."""
        with self._transaction():
            devices = self._read_devices(user)
            old = devices.primary.key if devices else None
            state = self._db.execute("SELECT generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
            current = state[0] if state else 0
            if generation is not None and (old is None or current != generation):
                return ErrorCode.RECOVERY_REFUSED  # moved meanwhile: the proof names a generation that is gone
            if devices is not None and [d.key for d in devices.devices] == [key]:
                return None
            if devices is None or devices.find(key) is None:
                if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
                    return ErrorCode.TOO_MANY_IDS
            self._replace_devices(user, key)  # the key becomes the ID's only device
            self._write_change(user, change, old, key, current + 1, origin)
        self._reload(user)  # at once: the ZAP handler admits the new key, and only it
        return None

    def release(self, user: str, origin: str) -> bool:
        """Unbind ``user`` (and forget its recovery key): the next key to register it gets it. False if unbound."""
        with self._transaction():
            devices = self._read_devices(user)
            if devices is None:
                return False
            old = devices.primary.key
            self._db.execute("DELETE FROM devices WHERE user = ?", (user,))
            current = self._db.execute("SELECT generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
            self._write_change(user, Change.RELEASED, old, None, (current[0] if current else 0) + 1, origin)
        self._reload(user)
        return True

    def link_device(self, user: str, key: bytes, generation: int, proof: bytes, origin: str,
                    name: str = "") -> ErrorCode | None:
        """Add ``key`` as a device of ``user`` with the account key's link ``proof`` (checked by the caller), if
        the binding is still at ``generation``; why not, or None (also when ``key`` is a device of it already)."""
        with self._transaction():
            devices = self._read_devices(user)
            if devices is not None and devices.find(key) is not None:
                return None
            state = self._db.execute("SELECT recovery, generation FROM user_recovery WHERE user = ?",
                                     (user,)).fetchone()
            if devices is None or state is None or state[0] is None or state[1] != generation:
                return ErrorCode.RECOVERY_REFUSED  # unbound, no account key, or changed since the proof was made
            if len(devices.devices) >= MAX_DEVICES:
                return ErrorCode.TOO_MANY_DEVICES
            if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
                return ErrorCode.TOO_MANY_IDS
            self._db.execute("INSERT INTO devices (user, id, key, name, added_ms, gen, proof) VALUES (?, ?, ?, ?, ?, "
                             "?, ?)", (user, self._next_ver(user), key, name, int(time.time() * 1000), generation,
                                       proof))
            self._write_change(user, Change.LINKED, None, key, generation + 1, origin)
        self._reload(user)  # at once: the ZAP handler admits the new device
        return None

    def unlink_device(self, user: str, key: bytes, generation: int | None, origin: str) -> ErrorCode | None:
        """Remove the device ``key`` of ``user`` (if the binding is still at ``generation``, when given); why
        not, or None. The last device is never removed (the operator releases an ID)."""
        with self._transaction():
            devices = self._read_devices(user)
            current = self._db.execute("SELECT generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
            if devices is None or (generation is not None and current[0] != generation):
                return ErrorCode.RECOVERY_REFUSED
            if devices.find(key) is None:
                return ErrorCode.DEVICES_CHANGED
            if len(devices.devices) == 1:
                return ErrorCode.LINK_FAILED
            self._next_ver(user)
            self._db.execute("DELETE FROM devices WHERE user = ? AND key = ?", (user, key))
            self._write_change(user, Change.UNLINKED, key, None, current[0] + 1, origin)
        self._reload(user)  # at once: the ZAP handler refuses the key (unless it is a device of another ID)
        self._tickets.revoke(key)
        return None

    def audit(self, user: str | None = None, after: int = 0) -> list[AuditRecord]:
        """The changes recorded after record ``after`` (of ``user`` only, if given), oldest first."""
        query = ("SELECT seq, at_ms, user, change, old_key, new_key, generation, origin FROM key_audit WHERE seq > ?"
                 + (" AND user = ?" if user else "") + " ORDER BY seq")
        rows = self._db.execute(query, (after, user) if user else (after,))
        return [AuditRecord(str(seq), at_ms, who, Change(change), old, new, gen, origin)
                for seq, at_ms, who, change, old, new, gen, origin in rows]

    def changes(self, now: float) -> list[BindingChange]:
        if not self._wrote and now < self._next_poll:
            return []
        self._next_poll = now + CHANGES_POLL
        version = self._data_version()
        if not self._wrote and version == self._version:
            return []
        self._version, self._wrote = version, False
        found: list[BindingChange] = []
        for record in self.audit(after=self._audit_seq):
            self._audit_seq = int(record.seq)
            self._reload(record.user)
            log.warning("binding changed: %s", record.describe())
            found.append(record.binding_change())
        return found

    def _write_change(self, user: str, change: Change, old: bytes | None, new: bytes | None, generation: int,
                      origin: str) -> None:
        """The binding's new generation and its audit record (inside the caller's transaction)."""
        # The operator's changes forget the recovery key: whoever they hand the ID to (or its next owner, after a
        # release) registers their own, so a phrase that was lost or stolen stops working.
        recovery = "" if change.keeps_recovery else ", recovery = NULL"
        self._db.execute("INSERT INTO user_recovery (user, generation) VALUES (?, ?) ON CONFLICT (user) "
                         f"DO UPDATE SET generation = excluded.generation{recovery}", (user, generation))
        self._db.execute("INSERT INTO key_audit (at_ms, user, change, old_key, new_key, generation, origin) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (int(time.time() * 1000), user, change.value, old, new, generation, origin))
        self._wrote = True

    def _replace_devices(self, user: str, key: bytes) -> None:
        """``key`` becomes ``user``'s only device, numbered by the next list version (inside the caller's
        transaction)."""
        ver = self._next_ver(user)
        self._db.execute("DELETE FROM devices WHERE user = ?", (user,))
        self._db.execute("INSERT INTO devices (user, id, key, added_ms) VALUES (?, ?, ?, ?)",
                         (user, ver, key, int(time.time() * 1000)))

    def _next_ver(self, user: str) -> int:
        """Raise ``user``'s device-list version (inside the caller's transaction); a device added now is numbered
        by it."""
        return self._db.execute("INSERT INTO user_recovery (user, ver) VALUES (?, 1) ON CONFLICT (user) "
                                "DO UPDATE SET ver = ver + 1 RETURNING ver", (user,)).fetchone()[0]

    def _read_devices(self, user: str) -> DeviceList | None:
        rows = self._db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user = ? ORDER BY id",
                                (user,)).fetchall()
        if not rows:
            return None
        ver = self._db.execute("SELECT ver FROM user_recovery WHERE user = ?", (user,)).fetchone()[0]
        return DeviceList(ver, tuple(Device(*row) for row in rows))

    def _reload(self, user: str) -> None:
        """Take ``user``'s binding from the database into the caches (after a change recorded in the audit)."""
        self._recoverable.discard(user)
        self._cache_devices(user, self._read_devices(user))

    def _cache_devices(self, user: str, devices: DeviceList | None) -> None:
        """Cache ``user``'s devices (None: unbound), and count which keys ZAP admits."""
        # New keys counted before old ones are dropped: a key in both is never missing for the ZAP thread.
        for device in devices.devices if devices else ():
            self._ids_of[device.key] = self._ids_of.get(device.key, 0) + 1
        old = self._cache.pop(user, None)
        if devices is not None:
            self._cache[user] = devices
        for device in old.devices if old else ():
            left = self._ids_of[device.key] - 1
            if left:
                self._ids_of[device.key] = left
            else:
                del self._ids_of[device.key]  # the ZAP handler lets the key in no more

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _data_version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        return self._tickets.issue(key, now)

    def admits(self, key: bytes, now: float) -> bool:
        return key in self._ids_of or self._tickets.holds(key, now)

    def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): the connection is in autocommit mode otherwise.
    Taking the write lock first means a concurrent admin command waits (busy timeout) instead of failing."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type | None, *_: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
