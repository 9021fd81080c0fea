"""User ID -> public key bindings in SQLite, and admission tickets for keys that are about to bind one
(the single broker's ``KeyRegistry``; the cluster's is redis_keys.py).

The first key that registers an ID owns it, across restarts, until the ID's recovery phrase or the
operator moves it (docs/PROTOCOL.md §10.2). The ZAP handler lets a CURVE key in only when
``admits(key)``: it is bound to an ID, or it holds a fresh ticket from the key service's ADMIT request
(§10.1). ``admits`` runs on the authenticator thread: it reads in-memory dicts only (single reads are
atomic under the GIL) and never blocks.

Moves and releases may come from another process (``p2pchat broker admin`` on a running broker's data
directory): each writes an audit record in the same transaction, and ``changes`` reads the records it has
not seen whenever SQLite's ``data_version`` says another connection committed.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from p2pchat.broker.backends.audit import AuditRecord, Change, RecoveryState
from p2pchat.broker.backends.tickets import KeyLimits, TicketBook
from p2pchat.broker.core.ports import CHANGES_POLL, BindingChange
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS user_keys (user TEXT PRIMARY KEY, key BLOB NOT NULL)",
    # Kept when a binding is released, so a generation is never used twice for an ID.
    "CREATE TABLE IF NOT EXISTS user_recovery (user TEXT PRIMARY KEY, recovery BLOB, "
    "generation INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS key_audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, "
    "user TEXT NOT NULL, change TEXT NOT NULL, old_key BLOB, new_key BLOB, generation INTEGER NOT NULL, "
    "origin TEXT NOT NULL)",
)


class SqliteKeyRegistry:
    def __init__(self, path: Path, limits: KeyLimits = KeyLimits()) -> None:
        self.limits = limits
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync per bind
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._cache: dict[str, bytes] = dict(self._db.execute("SELECT user, key FROM user_keys"))
        self._ids_of: dict[bytes, int] = {}
        for key in self._cache.values():
            self._ids_of[key] = self._ids_of.get(key, 0) + 1
        self._recoverable: set[str] = set()  # IDs seen with a recovery key in this run: no write at each register
        self._tickets = TicketBook(limits)
        self._audit_seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM key_audit").fetchone()[0]
        self._version = self._data_version()
        self._wrote = False  # a change of ours to read back from the audit
        self._next_poll = 0.0

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self._cache.get(user)
        if bound is not None:
            return None if bound == key else ErrorCode.ID_TAKEN
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
            self._db.execute("INSERT INTO user_keys (user, key) VALUES (?, ?)", (user, key))
            # A new binding takes the recovery key it is given (none: none), whatever an earlier one had.
            self._db.execute("INSERT INTO user_recovery (user, recovery) VALUES (?, ?) ON CONFLICT (user) "
                             "DO UPDATE SET recovery = excluded.recovery", (user, recovery))
        self._cache[user] = key
        self._ids_of[key] = self._ids_of.get(key, 0) + 1
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
        return self._cache.get(user)

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
            old = self._bound(user)
            state = self._db.execute("SELECT generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
            current = state[0] if state else 0
            if generation is not None and (old is None or current != generation):
                return ErrorCode.RECOVERY_REFUSED  # moved meanwhile: the proof names a generation that is gone
            if old == key:
                return None
            if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
                return ErrorCode.TOO_MANY_IDS
            self._db.execute("INSERT INTO user_keys (user, key) VALUES (?, ?) ON CONFLICT (user) "
                             "DO UPDATE SET key = excluded.key", (user, key))
            self._write_change(user, change, old, key, current + 1, origin)
        self._reload(user)  # at once: the ZAP handler admits the new key, and only it
        return None

    def release(self, user: str, origin: str) -> bool:
        """Unbind ``user`` (and forget its recovery key): the next key to register it gets it. False if unbound."""
        with self._transaction():
            old = self._bound(user)
            if old is None:
                return False
            self._db.execute("DELETE FROM user_keys WHERE user = ?", (user,))
            current = self._db.execute("SELECT generation FROM user_recovery WHERE user = ?", (user,)).fetchone()
            self._write_change(user, Change.RELEASED, old, None, (current[0] if current else 0) + 1, origin)
        self._reload(user)
        return True

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
            found.append(BindingChange(record.user, record.new_key, record.change.value))
        return found

    def _write_change(self, user: str, change: Change, old: bytes | None, new: bytes | None, generation: int,
                      origin: str) -> None:
        """The binding's new generation and its audit record (inside the caller's transaction)."""
        # Only a recovery keeps the recovery key: whoever the operator hands the ID to (or its next owner, after a
        # release) registers their own, so a phrase that was lost or stolen stops working.
        recovery = "" if change is Change.RECOVERED else ", recovery = NULL"
        self._db.execute("INSERT INTO user_recovery (user, generation) VALUES (?, ?) ON CONFLICT (user) "
                         f"DO UPDATE SET generation = excluded.generation{recovery}", (user, generation))
        self._db.execute("INSERT INTO key_audit (at_ms, user, change, old_key, new_key, generation, origin) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (int(time.time() * 1000), user, change.value, old, new, generation, origin))
        self._wrote = True

    def _bound(self, user: str) -> bytes | None:
        row = self._db.execute("SELECT key FROM user_keys WHERE user = ?", (user,)).fetchone()
        return row[0] if row else None

    def _reload(self, user: str) -> None:
        """Take ``user``'s binding from the database into the caches (after a change recorded in the audit)."""
        old, new = self._cache.get(user), self._bound(user)
        self._recoverable.discard(user)
        if old == new:
            return
        if old is not None:
            del self._cache[user]
            left = self._ids_of[old] - 1
            if left:
                self._ids_of[old] = left
            else:
                del self._ids_of[old]  # the ZAP handler lets the old key in no more
        if new is not None:
            self._cache[user] = new
            self._ids_of[new] = self._ids_of.get(new, 0) + 1

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
