"""What both key registries (sqlite_keys.py, redis_keys.py) keep beside a binding: its recovery state, and one
durable audit record per change made to it after it was bound (a recovery, an operator's move or release, a
device linked or unlinked).

The audit records are also how a running broker learns of changes made elsewhere: it reads the records
newer than the last it saw (``KeyRegistry.changes``) and closes the sessions of keys that lost their ID.
"""

from __future__ import annotations

import enum
import getpass
import os
import socket
from dataclasses import dataclass

from p2pchat.broker.core.ports import BindingChange
from p2pchat.common.crypto import fingerprint


class Change(str, enum.Enum):
    RECOVERED = "recovered"  # by the ID's recovery phrase, through the key service
    MOVED = "moved"  # by the operator, to a key they named
    RELEASED = "released"  # by the operator: the next key to register the ID gets it
    LINKED = "linked"  # a device added by the account key's link proof (old key none, new key the device's)
    UNLINKED = "unlinked"  # a device removed by its unlink proof (old key the device's, new key none)

    @property
    def keeps_recovery(self) -> bool:
        """Whether the binding keeps its recovery key: the operator's move and release forget it."""
        return self not in (Change.MOVED, Change.RELEASED)


@dataclass(frozen=True, slots=True)
class RecoveryState:
    """A bound ID's recovery key (None: it has none) and generation (raised by every change, never reused)."""

    recovery: bytes | None
    generation: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: str  # SQLite: the row's number; Redis: the stream entry's id
    at_ms: int  # wall clock
    user: str
    change: Change
    old_key: bytes | None
    new_key: bytes | None
    generation: int  # after the change
    origin: str  # who made it: "key service 192.0.2.7", "operator alice@host pid 123"

    def describe(self) -> str:
        old = fingerprint(self.old_key) if self.old_key else "none"
        new = fingerprint(self.new_key) if self.new_key else "none"
        return f"user={self.user} {self.change.value} by {self.origin}: key {old} -> {new} (generation " \
               f"{self.generation})"

    def binding_change(self) -> BindingChange:
        """What ``KeyRegistry.changes`` reports: the ID's new key, or for an unlink the key that left."""
        key = self.old_key if self.change is Change.UNLINKED else self.new_key
        return BindingChange(self.user, key, self.change.value)


def operator_origin() -> str:
    """The audit's ``origin`` of an admin command: who ran it, where."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = f"uid {os.getuid()}"
    return f"operator {who}@{socket.gethostname()} pid {os.getpid()}"
