"""What core tests plug into the sans-I/O cores instead of the shells: an in-memory key registry,
deterministic identities and id sources (so hypothesis and the replay test see the same bytes twice)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

from p2pchat.broker.backends.audit import RecoveryState
from p2pchat.broker.core.ports import BindingChange, Device, DeviceList
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ErrorCode


class KeyBook:
    """An in-memory KeyRegistry: the first key to register a user ID owns it as device 1, until ``move`` or
    ``release``."""

    def __init__(self) -> None:
        self._keys: dict[str, DeviceList] = {}
        self._ver: dict[str, int] = {}  # kept after a release, as the real registries keep it
        self.recovery: dict[str, bytes] = {}
        self._changes: list[BindingChange] = []

    def _only(self, user: str, key: bytes) -> None:
        ver = self._ver[user] = self._ver.get(user, 0) + 1
        self._keys[user] = DeviceList(ver, (Device(ver, key),))

    def bind(self, user: str, key: bytes, recovery: bytes | None = None) -> ErrorCode | None:
        if user not in self._keys:
            self._only(user, key)
        elif self._keys[user].find(key) is None:
            return ErrorCode.ID_TAKEN
        if recovery is not None:
            self.recovery.setdefault(user, recovery)
        return None

    def lookup(self, user: str) -> bytes | None:
        devices = self._keys.get(user)
        return devices.primary.key if devices is not None else None

    def devices(self, user: str, fresh: bool = False) -> DeviceList | None:
        return self._keys.get(user)

    def recovery_state(self, user: str) -> RecoveryState | None:
        return RecoveryState(self.recovery.get(user), self._ver[user]) if user in self._keys else None

    def describe_device(self, user: str, dev: int, flags: int, name: str | None) -> None:
        devices = self._keys[user]
        self._keys[user] = dataclasses.replace(devices, devices=tuple(
            dataclasses.replace(d, flags=d.flags | flags, name=d.name or name or "") if d.id == dev else d
            for d in devices.devices))

    def add_device(self, user: str, key: bytes) -> int:
        """Link ``key`` to ``user`` as another device (linking is not on the wire yet); its number."""
        devices = self._keys[user]
        ver = self._ver[user] = devices.ver + 1
        self._keys[user] = DeviceList(ver, devices.devices + (Device(ver, key),))
        return ver

    def move(self, user: str, key: bytes, why: str = "recovered") -> None:
        self._only(user, key)
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
