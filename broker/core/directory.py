"""Who is online, and where: the broker's peer directory.

The routing core talks to a ``PeerDirectory``; this module has the in-process
implementation. A multi-broker deployment swaps in a shared one (same
interface), so routing code never knows how many brokers there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Location:
    broker: bytes  # which broker holds the connection
    conn: bytes  # that broker's ROUTER routing id for it


class PeerDirectory(Protocol):
    epoch: bytes  # changes whenever sequence numbers restart
    shared: bool  # True: many brokers share it and it publishes presence itself (broker/backends/redis_cluster.py)

    def claim(self, user: str, where: Location, token: bytes = b"") -> bool:
        """Mark ``user`` online at ``where``; False if online elsewhere already."""

    def take_over(self, user: str, where: Location, token: bytes) -> Location | None:
        """Move ``user`` to ``where`` from another broker's session with the same ``token``, or from a
        broker that stopped refreshing its entries; the previous location, or None if refused."""

    def release(self, user: str, where: Location) -> bool:
        """Mark ``user`` offline if it is still at ``where``; True if it was."""

    def locate(self, user: str) -> Location | None: ...

    def is_known(self, user: str) -> bool:
        """Has ``user`` ever registered (so it is offline, not unknown)?"""

    def online(self) -> list[str]: ...

    def next_seq(self) -> int:
        """Allocate the sequence number of the next peer-list update."""

    def seq(self) -> int:
        """The sequence number of the last update published."""


class LocalDirectory:
    """A single broker's directory, in memory."""

    shared = False

    def __init__(self, epoch: bytes) -> None:
        self.epoch = epoch
        self._online: dict[str, Location] = {}
        self._known: set[str] = set()
        self._seq = 0

    def claim(self, user: str, where: Location, token: bytes = b"") -> bool:
        current = self._online.get(user)
        if current is not None and current != where:
            return False
        self._online[user] = where
        self._known.add(user)
        return True

    def release(self, user: str, where: Location) -> bool:
        if self._online.get(user) != where:
            return False
        del self._online[user]
        return True

    def take_over(self, user: str, where: Location, token: bytes) -> Location | None:
        return None  # one broker: the core hands over its own stale sessions

    def locate(self, user: str) -> Location | None:
        return self._online.get(user)

    def is_known(self, user: str) -> bool:
        return user in self._known

    def online(self) -> list[str]:
        return sorted(self._online)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def seq(self) -> int:
        return self._seq
