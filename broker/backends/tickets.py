"""Admission tickets for keys about to bind a user ID, and the bounds of the key registries.

Shared by the SQLite (sqlite_keys.py) and Redis (redis_keys.py) registries; the key service
issues tickets and the ZAP handler honours them (docs/PROTOCOL.md §10.1).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from p2pchat.common.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class KeyLimits:
    ids_per_key: int = 4  # one person's installations may share a key; an ID farm may not
    bound_ids: int = 1_000_000  # every binding is kept for good
    pending_tickets: int = 10_000  # admitted keys that have not registered yet
    ticket_ttl: float = 60.0  # seconds a ticket admits its key


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

    def revoke(self, key: bytes) -> None:
        """``key`` is admitted no more (an unlinked device)."""
        self._expires.pop(key, None)

    def holds(self, key: bytes, now: float) -> bool:
        expires = self._expires.get(key)
        return expires is not None and expires > now
