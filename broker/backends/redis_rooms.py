"""The cluster's rooms in Redis (docs/ROOMS-DESIGN.md §2.3), every key in the ``{p2p}`` slot.

A room is one msgpack value ``{p2p}:room:<rid hex>`` = ``[name, topic, owner, epoch, seq, [[user, role, joined,
since_ms, delivered, read], ...]]``; ``{p2p}:rname`` maps folded names to rids, ``{p2p}:urooms:<user>`` and
``{p2p}:uinv:<user>`` are the sets of rids a user has joined or is invited to (the bounds count them).

A change is an optimistic transaction rather than a Lua script: WATCH ``{p2p}:rooms_ver``, compute with the
rule table (broker/core/rooms.py, so the rules are written once), then MULTI ... INCR rooms_ver ... EXEC,
again if another broker changed a room meanwhile. Room changes are rare, so retries are too. No cache yet:
each read asks Redis (the message path's cache and its invalidation come with the fan-out, step 3).
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import redis

from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.backends.room_registry import Result, RuleBackedRooms
from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Member, Role, Room, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits


def _pack(room: Room) -> bytes:
    members = [[m.user, int(m.role), m.joined, m.since_ms, m.delivered, m.read] for m in room.members]
    return msgpack.packb([room.name, room.topic, room.owner, room.epoch, room.seq, members])


def _unpack(rid: bytes, raw: bytes) -> Room:
    name, topic, owner, epoch, seq, members = msgpack.unpackb(raw)
    return Room(rid, name, topic, owner, epoch, seq,
                tuple(Member(user, Role(role), joined, *rest) for user, role, joined, *rest in members))


class RedisRoomRegistry(RuleBackedRooms):
    def __init__(self, r: redis.Redis, keys: RedisKeys, limits: RoomLimits = RoomLimits()) -> None:
        self._r, self._keys, self.limits = r, keys, limits

    def get(self, rid: bytes) -> Room | None:
        raw = self._r.get(self._keys.room(rid))
        return None if raw is None else _unpack(rid, raw)

    def _rids(self, user: str, joined: bool) -> list[bytes]:
        return list(self._r.smembers(self._keys.user_rooms(user, joined)))

    def _holder(self, name: str) -> bytes | None:
        return self._r.hget(self._keys.rname, rules.fold(name))

    def _room_count(self) -> int:
        return self._r.hlen(self._keys.rname)

    def _change(self, rid: bytes, compute: Callable[[], Result]) -> Result:
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._keys.rooms_ver)
                    old = self.get(rid)
                    result = compute()
                    if isinstance(result, RoomRefusal) or result == old:
                        return result
                    pipe.multi()
                    pipe.incr(self._keys.rooms_ver)
                    self._write(pipe, rid, old, result)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def _write(self, pipe, rid: bytes, old: Room | None, new: Room | None) -> None:
        if old is not None:
            pipe.hdel(self._keys.rname, rules.fold(old.name))
            for member in old.members:
                pipe.srem(self._keys.user_rooms(member.user, member.joined), rid)
        if new is None:
            pipe.delete(self._keys.room(rid))
            return
        pipe.set(self._keys.room(rid), _pack(new))
        pipe.hset(self._keys.rname, rules.fold(new.name), rid)
        for member in new.members:
            pipe.sadd(self._keys.user_rooms(member.user, member.joined), rid)

    def close(self) -> None:
        self._r.close()
