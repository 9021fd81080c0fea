"""The cluster's rooms in Redis (docs/ROOMS-DESIGN.md §2.3), every key in the ``{p2p}`` slot.

A room is one msgpack value ``{p2p}:room:<rid hex>`` = ``[name, topic, owner, epoch, [[user, role, joined,
since_ms], ...]]``; ``{p2p}:rname`` maps folded names to rids, ``{p2p}:urooms:<user>`` is the set of rids a user
has joined and ``{p2p}:uinv:<user>`` the sorted set of those it is invited to (score: when), so the bound on
pending invitations counts the live ones in one ZCOUNT. ``{p2p}:rinvites`` (member rid + user, score: when)
is the expiry sweep's index.

A change is an optimistic transaction rather than a Lua script: WATCH ``{p2p}:rooms_ver``, compute with the
rule table (broker/core/rooms.py, so the rules are written once), then MULTI ... INCR rooms_ver ... EXEC,
again if another broker changed a room meanwhile. Room changes are rare, so retries are too. No cache: ``get``
is one MGET (the room and its number), which the message path pays once per message.

Message numbers are shared by every broker of the cluster: ``{p2p}:rseq:<rid hex>``, INCR by a script that
first checks the room exists (one round trip per message). Marks are a hash per room, ``{p2p}:rmarks:<rid
hex>`` (``d:<user>``, ``r:<user>``), raised by a script that checks membership against ``urooms`` (a leave's
transaction deletes the leaver's marks, so the two cannot interleave).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import msgpack
import redis

from p2pchat.broker.backends.redis_health import unavailable_on_error
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.backends.room_registry import Result, RuleBackedRooms
from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Member, Role, Room, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits

# KEYS: the room, its number. A room that is gone (or never was) hands out nothing.
_NEXT_SEQ = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('INCR', KEYS[2])
"""

# KEYS: the user's joined rooms, the room's marks, its number; ARGV: rid, user, delivered, read ('': unchanged).
# rules.raised in Lua: a mark only goes up, and never past the last number handed out.
_MARK = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
local seq = redis.call('GET', KEYS[3]) or '0'
local function raise(field, value)
  if value == '' then return end
  if tonumber(value) > tonumber(seq) then value = seq end
  if tonumber(value) > tonumber(redis.call('HGET', KEYS[2], field) or '0') then
    redis.call('HSET', KEYS[2], field, value)
  end
end
raise('d:' .. ARGV[2], ARGV[3])
raise('r:' .. ARGV[2], ARGV[4])
return 1
"""


_ROLES = tuple(Role)  # Role(n) costs as much as the rest of a member's unpacking


def _pack(room: Room) -> bytes:
    members = [[m.user, int(m.role), m.joined, m.since_ms] for m in room.members]
    return msgpack.packb([room.name, room.topic, room.owner, room.epoch, members])


def _unpack(rid: bytes, raw: bytes, seq: bytes | None) -> Room:
    name, topic, owner, epoch, members = msgpack.unpackb(raw)
    return Room(rid, name, topic, owner, epoch, int(seq or 0),
                tuple(Member(user, _ROLES[role], joined, since_ms) for user, role, joined, since_ms in members))


def _guarded(method: Callable) -> Callable:
    """A Redis failure becomes the one exception the broker core knows (``StoreUnavailable``): the request gets
    ``storage_unavailable`` and changes nothing."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        with unavailable_on_error():
            return method(*args, **kwargs)

    return guarded


class RedisRoomRegistry(RuleBackedRooms):
    def __init__(self, r: redis.Redis, keys: RedisKeys, limits: RoomLimits = RoomLimits()) -> None:
        self._r, self._keys, self.limits = r, keys, limits
        self._next_seq, self._mark = r.register_script(_NEXT_SEQ), r.register_script(_MARK)

    @_guarded
    def get(self, rid: bytes) -> Room | None:
        raw, seq = self._r.mget(self._keys.room(rid), self._keys.room_seq(rid))
        return None if raw is None else _unpack(rid, raw, seq)

    @_guarded
    def _rids(self, user: str, joined: bool) -> list[bytes]:
        if joined:
            return list(self._r.smembers(self._keys.user_rooms(user, True)))
        return self._r.zrange(self._keys.user_rooms(user, False), 0, -1)

    @_guarded
    def _pending(self, user: str, now_ms: int) -> int:
        return self._r.zcount(self._keys.user_rooms(user, False), f"({now_ms - self.limits.invite_ttl_ms}", "+inf")

    @_guarded
    def _invited_before(self, since_ms: int, limit: int) -> list[bytes]:
        entries = self._r.zrangebyscore(self._keys.rinvites, "-inf", since_ms, start=0, num=limit)
        return list(dict.fromkeys(entry[:16] for entry in entries))  # an entry is rid + user

    @_guarded
    def _holder(self, name: str) -> bytes | None:
        return self._r.hget(self._keys.rname, rules.fold(name))

    @_guarded
    def _room_count(self) -> int:
        return self._r.hlen(self._keys.rname)

    @_guarded
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
                if member.joined:
                    pipe.srem(self._keys.user_rooms(member.user, True), rid)
                else:
                    pipe.zrem(self._keys.user_rooms(member.user, False), rid)
                    pipe.zrem(self._keys.rinvites, rid + member.user.encode())
        if new is None:
            pipe.delete(self._keys.room(rid), self._keys.room_seq(rid), self._keys.room_marks(rid))
            return
        pipe.set(self._keys.room(rid), _pack(new))
        pipe.hset(self._keys.rname, rules.fold(new.name), rid)
        for member in new.members:
            if member.joined:
                pipe.sadd(self._keys.user_rooms(member.user, True), rid)
            else:
                pipe.zadd(self._keys.user_rooms(member.user, False), {rid: member.since_ms})
                pipe.zadd(self._keys.rinvites, {rid + member.user.encode(): member.since_ms})
        still = {m.user for m in new.members if m.joined}
        left = [m.user for m in old.members if m.joined and m.user not in still] if old else []
        if left:  # marks are a joined member's only: one who leaves starts from 0 if it ever comes back
            pipe.hdel(self._keys.room_marks(rid), *(f"{kind}:{user}" for user in left for kind in "dr"))

    # --- message numbers and marks -----------------------------------------------------------------------
    @_guarded
    def next_seq(self, rid: bytes) -> int | None:
        return self._next_seq(keys=[self._keys.room(rid), self._keys.room_seq(rid)])

    @_guarded
    def mark(self, rid: bytes, user: str, delivered: int, read: int | None) -> None:
        self._mark(keys=[self._keys.user_rooms(user, True), self._keys.room_marks(rid), self._keys.room_seq(rid)],
                   args=[rid, user, int(delivered), "" if read is None else int(read)])

    @_guarded
    def marks(self, rid: bytes) -> dict[str, tuple[int, int]]:
        with self._r.pipeline() as pipe:  # MULTI: the members and their marks as of one moment
            raw, stored = pipe.get(self._keys.room(rid)).hgetall(self._keys.room_marks(rid)).execute()
        if raw is None:
            return {}
        marks = {field.decode(): int(value) for field, value in stored.items()}
        return {m.user: (marks.get(f"d:{m.user}", 0), marks.get(f"r:{m.user}", 0))
                for m in _unpack(rid, raw, None).members if m.joined}

    def close(self) -> None:
        self._r.close()
