"""A single broker's ports that keep nothing on disk: the peer directory in memory, the link to
other brokers (there are none), and the store that stores nothing (durability off).

The SQLite store and key registry are in sqlite_store.py and sqlite_keys.py; the cluster's Redis
versions of every port in redis_*.py.
"""

from __future__ import annotations

from p2pchat.broker.core.ports import Frames, LinkEvent, Location, PresenceChange, Refusal


class LocalDirectory:
    """One broker's directory, in memory: it numbers its own changes."""

    def __init__(self, epoch: bytes) -> None:
        self.epoch = epoch
        self._online: dict[str, dict[int, Location]] = {}  # user -> device -> its session
        self._known: set[str] = set()
        self._seq = 0
        self._changes: list[PresenceChange] = []

    def claim(self, user: str, dev: int, where: Location, token: bytes) -> bool:
        sessions = self._online.get(user)
        if sessions is None:
            self._online[user] = {dev: where}
            self._known.add(user)
            self._change(user, True)
            return True
        current = sessions.get(dev)
        if current is not None:
            return current == where
        sessions[dev] = where  # another device of an online user: no presence change
        return True

    def take_over(self, user: str, dev: int, where: Location, token: bytes) -> Location | None:
        return None  # no other broker to take a session from: the core hands over its own stale ones

    def hand_over(self, user: str, dev: int, old: Location, new: Location, token: bytes) -> None:
        sessions = self._online.get(user)
        if sessions is not None and sessions.get(dev) == old:
            sessions[dev] = new

    def release(self, user: str, dev: int, where: Location) -> None:
        sessions = self._online.get(user)
        if sessions is None or sessions.get(dev) != where:
            return
        del sessions[dev]
        if not sessions:  # its last device: the user goes offline
            del self._online[user]
            self._change(user, False)

    def _change(self, user: str, online: bool) -> None:
        self._seq += 1
        self._changes.append(PresenceChange(self._seq, user, online))

    def changes(self) -> list[PresenceChange]:
        if not self._changes:
            return []
        changes, self._changes = self._changes, []
        return changes

    def recheck(self, now: float) -> list[str]:
        return []  # a claim is seen at once: no queue write can miss it

    def locate(self, user: str) -> tuple[Location, ...]:
        sessions = self._online.get(user)
        if sessions is None:
            return ()
        return tuple(sessions[dev] for dev in sorted(sessions)) if len(sessions) > 1 else tuple(sessions.values())

    def locate_device(self, user: str, dev: int) -> Location | None:
        return self._online.get(user, {}).get(dev)

    def is_known(self, user: str) -> bool:
        return user in self._known

    def online(self) -> list[str]:
        return sorted(self._online)

    def seq(self) -> int:
        return self._seq


class LocalLink:
    """One broker alone: its directory locates nobody on another broker, so nothing leaves or arrives."""

    def forward(self, broker: bytes, user: str, frames: Frames) -> None:
        raise RuntimeError(f"user={user}: no broker {broker.hex()} to forward to (a single broker has no others)")

    def kick(self, broker: bytes, conn: bytes, user: str) -> None:
        raise RuntimeError(f"user={user}: no broker {broker.hex()} to tell (a single broker has no others)")

    def receive(self, now: float) -> list[LinkEvent]:
        return []


class NoStore:
    """Durability off: nothing is queued; offline recipients get an error."""

    durable = False

    def append(self, msg_id: bytes, sender: str, recipient: str, header: bytes, expires_ms: int) -> Refusal | None:
        return Refusal.STORE_FULL

    def pending(self, recipient: str, now_ms: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        return []

    def consume(self, recipient: str, msg_id: bytes) -> None:
        pass

    def expire(self, now_ms: int) -> int:
        return 0

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass
