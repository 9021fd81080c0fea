"""What both room registries share: each change asks the rule table (broker/core/rooms.py) with the counts
its storage keeps, and stores the answer atomically (``_change``, per backend); the invitation sweep is such
a change. The backends are sqlite_rooms.py (single broker) and redis_rooms.py (cluster); message numbers and
marks are theirs alone (each makes them cheap its own way)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Room, RoomEntry, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits

Result = Room | None | RoomRefusal


class RuleBackedRooms:
    """A ``RoomRegistry`` (broker/core/ports.py) but for storage, which a backend supplies."""

    limits: RoomLimits

    # --- storage, per backend ----------------------------------------------------------------------------
    def get(self, rid: bytes) -> Room | None:
        raise NotImplementedError

    def _rids(self, user: str, joined: bool) -> list[bytes]:
        """The rooms ``user`` has joined, or (``joined`` False) is invited to."""
        raise NotImplementedError

    def _pending(self, user: str, now_ms: int) -> int:
        """How many invitations ``user`` has that have not expired at ``now_ms``."""
        raise NotImplementedError

    def _invited_before(self, since_ms: int, limit: int) -> list[bytes]:
        """Up to ``limit`` rooms with an invitation made at or before ``since_ms``."""
        raise NotImplementedError

    def _holder(self, name: str) -> bytes | None:
        """The rid of the live room named ``name`` in any case."""
        raise NotImplementedError

    def _room_count(self) -> int:
        raise NotImplementedError

    def _change(self, rid: bytes, compute: Callable[[], Result]) -> Result:
        """Run ``compute`` on the stored state and store its answer (a room, or None: deleted), atomically."""
        raise NotImplementedError

    # --- the port ----------------------------------------------------------------------------------------
    def _joined(self, user: str) -> int:
        return len(self._rids(user, True))

    def of_user(self, user: str) -> list[RoomEntry]:
        entries = []
        for joined in (True, False):
            for rid in self._rids(user, joined):
                room = self.get(rid)
                member = room.member(user) if room is not None else None
                if member is not None:
                    entries.append(RoomEntry(rid, room.name, room.epoch, member.role, not member.joined))
        return sorted(entries, key=lambda entry: rules.fold(entry.name))

    def create(self, name: str, owner: str, topic: str, now_ms: int) -> Room | RoomRefusal:
        rid = os.urandom(16)  # 128 random bits: never reused in practice

        def compute() -> Result:
            if self._holder(name) is not None:
                return RoomRefusal.ROOM_EXISTS
            return rules.create(rid, name, owner, topic, now_ms, self._joined(owner), self._room_count(), self.limits)

        return self._change(rid, compute)

    def invite(self, rid: bytes, by: str, users: Sequence[str], now_ms: int) -> Room | RoomRefusal:
        return self._change(rid, lambda: rules.invite(self.get(rid), by, users, now_ms,
                                                      lambda user: self._pending(user, now_ms), self.limits))

    def join(self, rid: bytes, user: str, now_ms: int) -> Room | RoomRefusal:
        return self._change(rid, lambda: rules.join(self.get(rid), user, now_ms, self._joined(user), self.limits))

    def leave(self, rid: bytes, user: str) -> Result:
        return self._change(rid, lambda: rules.leave(self.get(rid), user))

    def remove(self, rid: bytes, by: str, user: str) -> Room | RoomRefusal:
        return self._change(rid, lambda: rules.remove(self.get(rid), by, user))

    def set(self, rid: bytes, by: str, name: str | None, topic: str | None) -> Room | RoomRefusal:
        def compute() -> Result:
            result = rules.set_(self.get(rid), by, name, topic)
            if isinstance(result, Room) and self._holder(result.name) not in (None, rid):
                return RoomRefusal.ROOM_EXISTS
            return result

        return self._change(rid, compute)

    def role(self, rid: bytes, by: str, user: str, admin: bool) -> Room | RoomRefusal:
        return self._change(rid, lambda: rules.role(self.get(rid), by, user, admin, self.limits))

    def bump_user(self, user: str) -> list[bytes]:
        bumped = []
        for rid in sorted(self._rids(user, True)):
            before = self.get(rid)
            after = self._change(rid, lambda rid=rid: rules.bump(self.get(rid), user))
            if isinstance(after, Room) and before is not None and after.epoch != before.epoch:
                bumped.append(rid)
        return bumped

    def expire_invitations(self, now_ms: int) -> list[tuple[bytes, str]]:
        gone: list[tuple[bytes, str]] = []
        for rid in self._invited_before(now_ms - self.limits.invite_ttl_ms, self.limits.expire_batch):
            stale: list[str] = []

            def compute(rid: bytes = rid, stale: list[str] = stale) -> Result:
                room = self.get(rid)  # again on a retry (Redis): ``stale`` is what the stored change removed
                stale[:] = [m.user for m in room.members if rules.stale(m, now_ms, self.limits)] if room else []
                return rules.expire(room, now_ms, self.limits)

            self._change(rid, compute)
            gone += [(rid, user) for user in stale]
        return gone
