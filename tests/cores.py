"""What core tests plug into the sans-I/O cores instead of the shells: an in-memory key registry,
deterministic identities and id sources (so hypothesis and the replay test see the same bytes twice)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from p2pchat.broker.core.ports import BindingChange
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ErrorCode


class KeyBook:
    """An in-memory KeyRegistry: the first key to register a user ID owns it, until ``move`` or ``release``."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self.recovery: dict[str, bytes] = {}
        self._changes: list[BindingChange] = []

    def bind(self, user: str, key: bytes, recovery: bytes | None = None) -> ErrorCode | None:
        if self._keys.setdefault(user, key) != key:
            return ErrorCode.ID_TAKEN
        if recovery is not None:
            self.recovery.setdefault(user, recovery)
        return None

    def lookup(self, user: str) -> bytes | None:
        return self._keys.get(user)

    def move(self, user: str, key: bytes, why: str = "recovered") -> None:
        self._keys[user] = key
        self._changes.append(BindingChange(user, key, why))

    def release(self, user: str) -> None:
        del self._keys[user]
        self._changes.append(BindingChange(user, None, "released"))

    def changes(self, now: float) -> list[BindingChange]:
        found, self._changes = self._changes, []
        return found


def identity(user: str) -> Identity:
    return Identity.from_private_bytes(hashlib.sha256(b"identity " + user.encode()).digest())


def id_source(seed: str = "ids") -> Callable[[], bytes]:
    """A deterministic ``new_id``: 16 bytes derived from ``seed`` and a counter."""
    count = 0

    def new_id() -> bytes:
        nonlocal count
        count += 1
        return hashlib.sha256(b"%s %d" % (seed.encode(), count)).digest()[:16]

    return new_id
