"""User ID -> public key bindings, and admission tickets for keys that are about to bind one.

The first key that registers an ID owns it, across restarts. The ZAP handler lets a CURVE key in
only when ``admits(key)``: it is bound to an ID, or it holds a fresh ticket from the key service's
ADMIT request (docs/PROTOCOL.md §10.1). ``admits`` runs on the authenticator thread: it reads
in-memory dicts only (single reads are atomic under the GIL) and never blocks.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    ids_per_key: int = 4  # one person's installations may share a key; an ID farm may not
    bound_ids: int = 1_000_000  # every binding is kept for good
    pending_tickets: int = 10_000  # admitted keys that have not registered yet
    ticket_ttl: float = 60.0  # seconds a ticket admits its key


REFUSALS = {  # why a key gets no ID (or no ticket), for the ERROR or ERR line
    ErrorCode.ID_TAKEN: "user ID {user!r} belongs to another key",
    ErrorCode.TOO_MANY_IDS: "this key has claimed as many user IDs as the broker allows",
    ErrorCode.REGISTRY_FULL: "the broker binds no more user IDs",
    ErrorCode.ADMISSION_FULL: "too many admissions pending; retry later",
}


class KeyRegistry(Protocol):
    def bind(self, user: str, key: bytes) -> ErrorCode | None:
        """Bind ``user`` to ``key`` if unbound; None if ``user`` is (now) bound to ``key``, else why not."""

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        """What ``bind`` would answer, without binding."""

    def lookup(self, user: str) -> bytes | None: ...

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        """Admit ``key`` to the CURVE sockets until ``now + ticket_ttl``; an error when too many are pending."""

    def admits(self, key: bytes, now: float) -> bool:
        """Bound to an ID, or holding a fresh ticket (thread-safe, non-blocking: the ZAP thread asks)."""

    def close(self) -> None: ...


class TicketBook:
    """Pending tickets, oldest first: with one TTL, expiry order is issue order."""

    def __init__(self, limits: KeyLimits) -> None:
        self.limits = limits
        self._expires: OrderedDict[bytes, float] = OrderedDict()

    def issue(self, key: bytes, now: float) -> ErrorCode | None:
        expires = self._expires
        while expires and next(iter(expires.values())) <= now:
            expires.popitem(last=False)
        if key not in expires and len(expires) >= self.limits.pending_tickets:
            return ErrorCode.ADMISSION_FULL
        expires.pop(key, None)
        expires[key] = now + self.limits.ticket_ttl
        return None

    def holds(self, key: bytes, now: float) -> bool:
        expires = self._expires.get(key)
        return expires is not None and expires > now


class SqliteKeyRegistry:
    def __init__(self, path: Path, limits: KeyLimits = KeyLimits()) -> None:
        self.limits = limits
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a killed broker without fsync per bind
        self._db.execute("CREATE TABLE IF NOT EXISTS user_keys (user TEXT PRIMARY KEY, key BLOB NOT NULL)")
        self._cache: dict[str, bytes] = dict(self._db.execute("SELECT user, key FROM user_keys"))
        self._ids_of: dict[bytes, int] = {}
        for key in self._cache.values():
            self._ids_of[key] = self._ids_of.get(key, 0) + 1
        self._tickets = TicketBook(limits)

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self._cache.get(user)
        if bound is not None:
            return None if bound == key else ErrorCode.ID_TAKEN
        if self._ids_of.get(key, 0) >= self.limits.ids_per_key:
            return ErrorCode.TOO_MANY_IDS
        if len(self._cache) >= self.limits.bound_ids:
            return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes) -> ErrorCode | None:
        refused = self.can_bind(user, key)
        if refused is not None or user in self._cache:
            return refused
        self._db.execute("INSERT INTO user_keys (user, key) VALUES (?, ?)", (user, key))
        self._cache[user] = key
        self._ids_of[key] = self._ids_of.get(key, 0) + 1
        log.info("user=%s bound to a new key", user)
        return None

    def lookup(self, user: str) -> bytes | None:
        return self._cache.get(user)

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        return self._tickets.issue(key, now)

    def admits(self, key: bytes, now: float) -> bool:
        return key in self._ids_of or self._tickets.holds(key, now)

    def close(self) -> None:
        self._db.close()
