"""The cluster's peer directory: authoritative in Redis, replicated in every broker (the Clone pattern).

Claims and releases are Lua scripts that update the online hash, take the next global sequence
number (INCR) and append the change to one presence stream, atomically, so the stream *is* the
ordered peer-list history. The link's reader thread (redis_link.py) feeds the stream's entries to
``RedisDirectory.feed``; ``changes()`` applies them to the replica and hands them to the core,
which publishes them: every broker publishes the same ``(epoch, seq)`` sequence.
"""

from __future__ import annotations

import logging
import os
import queue
from collections import deque

import redis

from p2pchat.broker.backends.redis_health import REDIS_ERRORS, RedisHealth, unavailable_on_error
from p2pchat.broker.backends.redis_schema import RedisKeys, format_location, parse_location
from p2pchat.broker.core.ports import Location, PresenceChange, StoreUnavailable

log = logging.getLogger(__name__)

PRESENCE_MAXLEN = 100_000  # entries kept in the presence stream; a broker further behind re-snapshots

# --- Lua: each presence change is one atomic step: online hash + global seq + presence stream ---------
_CLAIM = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if string.sub(cur, 1, #ARGV[2] + 1) == ARGV[2] .. '/' then return -1 end
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '/' .. ARGV[3])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 's', seq, 'u', ARGV[1], 'o', 1, 'l', ARGV[2])
return seq
"""

# Take a user over from another broker: allowed for the session's own token, or when that broker
# stopped refreshing its liveness key (it crashed); or claim it if it was reaped meanwhile.
# Returns the previous "broker/conn" ("/" when there was none).
_TAKE_OVER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then cur = '//' .. ARGV[3] end
local b, c, t = string.match(cur, '^([^/]*)/([^/]*)/(.*)$')
if b == ARGV[5] then return false end
if t ~= ARGV[3] and redis.call('EXISTS', ARGV[6] .. b) == 1 then return false end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '/' .. ARGV[3])
if b ~= '' then redis.call('SREM', ARGV[7] .. b, ARGV[1]) end
redis.call('SADD', KEYS[4], ARGV[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 's', seq, 'u', ARGV[1], 'o', 1, 'l', ARGV[2])
return b .. '/' .. c
"""

# Move a user between two connections of this broker: the peer list does not change. 0 if it is not
# at the old one any more (taken over or reaped meanwhile).
_HAND_OVER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or string.sub(cur, 1, #ARGV[2] + 1) ~= ARGV[2] .. '/' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. '/' .. ARGV[4])
return 1
"""

_RELEASE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or string.sub(cur, 1, #ARGV[2] + 1) ~= ARGV[2] .. '/' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 's', seq, 'u', ARGV[1], 'o', 0, 'l', '')
return seq
"""

# Any broker may run this: brokers whose liveness key expired lose their users (announced offline).
_REAP = """
local dead = {}
for _, b in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if redis.call('EXISTS', ARGV[1] .. b) == 0 then
    for _, u in ipairs(redis.call('SMEMBERS', ARGV[2] .. b)) do
      local cur = redis.call('HGET', KEYS[1], u)
      if cur and string.sub(cur, 1, #b + 1) == b .. '/' then
        redis.call('HDEL', KEYS[1], u)
        local seq = redis.call('INCR', KEYS[2])
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 's', seq, 'u', u, 'o', 0, 'l', '')
      end
    end
    redis.call('DEL', ARGV[2] .. b)
    redis.call('SREM', KEYS[4], b)
    dead[#dead + 1] = b
  end
end
return dead
"""

# The replica's starting point: epoch (made on first use), seq, stream position and the list, at once.
_SNAPSHOT = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local pos = '0-0'
if #last > 0 then pos = last[1][1] end
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]) or '0', pos, redis.call('HGETALL', KEYS[4])}
"""


class RedisDirectory:
    """The ``PeerDirectory`` of cluster mode.

    While Redis is down it keeps working for this broker's own sessions: claims and releases change
    only the local view, other brokers' users cannot be located, and ``reconcile`` brings Redis in
    line with the sessions that exist here once it is back.

    It still holds one session per user ID, whatever its device (``dev`` is not stored): another device
    of an online ID is refused as online elsewhere.
    """

    def __init__(self, r: redis.Redis, broker_id: bytes, keys: RedisKeys, health: RedisHealth,
                 settle: float) -> None:
        self._r, self._keys, self._health = r, keys, health
        self.broker_id = broker_id
        self.me = broker_id.hex()
        self.epoch = os.urandom(8)  # until Redis gives the cluster's (a degraded start has none)
        self._local: dict[str, Location] = {}  # this broker's sessions: known at once, before the stream says so
        self._tokens: dict[str, bytes] = {}  # and their tokens, to claim them again after an outage
        self._replica: dict[str, Location] = {}  # everyone, as of self._seq
        self._known: set[str] = set()
        self._seq = 0
        self.stream_pos = "0-0"
        self.feed: queue.SimpleQueue[dict[bytes, bytes]] = queue.SimpleQueue()  # presence entries, from the reader
        # Another broker may queue a frame for a user claimed here before its replica shows the claim,
        # after this broker's first page: such users are paged once more, ``settle`` seconds later.
        self._settle = settle
        self._claimed: list[str] = []
        self._recheck: deque[tuple[float, str]] = deque()
        self._claim = r.register_script(_CLAIM)
        self._take_over = r.register_script(_TAKE_OVER)
        self._hand_over = r.register_script(_HAND_OVER)
        self._release = r.register_script(_RELEASE)
        self._reap = r.register_script(_REAP)
        self._snapshot = r.register_script(_SNAPSHOT)
        self._stale = False  # a gap could not be re-snapshotted (Redis down): ignore the feed until resync()
        try:
            self.resync()
        except StoreUnavailable as exc:
            self.stream_pos = "$"  # the first snapshot, once Redis is back, says where the feed starts
            log.warning("starting DEGRADED, without the cluster's peer list (%s): serving local clients only", exc)

    def _presence_keys(self) -> list[str]:
        k = self._keys
        return [k.online, k.seq, k.presence, k.broker_users(self.me)]

    def _held_here(self, user: str, where: Location, token: bytes) -> None:
        self._local[user], self._tokens[user] = where, token
        self._claimed.append(user)

    # --- PeerDirectory ------------------------------------------------------
    def claim(self, user: str, dev: int, where: Location, token: bytes) -> bool:
        try:
            result = self._run_claim(user, where, token)
        except REDIS_ERRORS:  # Redis down: this broker's word for now; reconcile() claims it later
            held = self._local.get(user)
            result = 0 if held is not None and held != where else 1
            if result:
                self._replica[user] = where
        if result == 0:
            return False
        self._held_here(user, where, token)
        self._known.add(user)
        return True

    def _run_claim(self, user: str, where: Location, token: bytes) -> int:
        return self._claim(keys=self._presence_keys() + [self._keys.known],
                           args=[user, format_location(where), token.hex(), PRESENCE_MAXLEN])

    def take_over(self, user: str, dev: int, where: Location, token: bytes) -> Location | None:
        with unavailable_on_error():
            previous = self._run_take_over(user, where, token)
        if previous is None:
            return None
        self._held_here(user, where, token)
        return parse_location(previous)

    def _run_take_over(self, user: str, where: Location, token: bytes) -> bytes | None:
        k = self._keys
        return self._take_over(keys=self._presence_keys(),
                               args=[user, format_location(where), token.hex(), PRESENCE_MAXLEN, self.me,
                                     k.alive(""), k.broker_users("")])

    def hand_over(self, user: str, dev: int, old: Location, new: Location, token: bytes) -> None:
        try:
            moved = self._hand_over(keys=[self._keys.online], args=[user, format_location(old),
                                                                    format_location(new), token.hex()])
        except REDIS_ERRORS:  # Redis down: here at once; reconcile() moves it in Redis later
            moved = 1
        if moved:
            self._held_here(user, new, token)
            if self._replica.get(user) == old:
                self._replica[user] = new
        else:  # no longer ours in Redis: claim it like a new session
            self._local.pop(user, None)
            self._tokens.pop(user, None)
            self.claim(user, dev, new, token)

    def release(self, user: str, dev: int, where: Location) -> None:
        if self._local.get(user) == where:
            del self._local[user], self._tokens[user]
        try:
            self._release(keys=self._presence_keys(), args=[user, format_location(where), PRESENCE_MAXLEN])
        except REDIS_ERRORS:  # Redis down: gone here at once; reconcile() releases it in Redis later
            if self._replica.get(user) == where:
                del self._replica[user]

    def changes(self) -> list[PresenceChange]:
        out: list[PresenceChange] = []
        feed = self.feed
        while not feed.empty():
            change = self._apply(feed.get_nowait())
            if change is not None:
                out.append(change)
        return out

    def recheck(self, now: float) -> list[str]:
        for user in self._claimed:
            self._recheck.append((now + self._settle, user))
        self._claimed.clear()
        due = []
        while self._recheck and self._recheck[0][0] <= now:
            due.append(self._recheck.popleft()[1])
        return due

    def locate(self, user: str) -> tuple[Location, ...]:
        where = self._local.get(user)
        if where is None and self._health.available:  # else other brokers are out of reach
            where = self._replica.get(user)
        return () if where is None else (where,)

    def is_known(self, user: str) -> bool:
        if user in self._known or user in self._replica:
            return True
        with unavailable_on_error():
            known = self._r.sismember(self._keys.known, user)
        if known:
            self._known.add(user)
        return bool(known)

    def online(self) -> list[str]:
        return sorted(self._replica)

    def seq(self) -> int:
        return self._seq

    # --- the replica (Clone pattern) ---------------------------------------
    def resync(self) -> None:
        """Reload the whole list from Redis (at start, after a gap or an outage)."""
        with unavailable_on_error():
            epoch, seq, pos, flat = self._snapshot(
                keys=[self._keys.epoch, self._keys.seq, self._keys.presence, self._keys.online],
                args=[os.urandom(8)])
        self.epoch, self._seq, self._stale = epoch, int(seq), False
        if self.stream_pos in ("0-0", "$"):  # the reader starts where this snapshot ends
            self.stream_pos = pos.decode() if isinstance(pos, bytes) else pos
        self._replica = {flat[i].decode(): parse_location(flat[i + 1]) for i in range(0, len(flat), 2)}
        log.info("presence replica at seq %d: %d users online in the cluster", self._seq, len(self._replica))

    def _apply(self, fields: dict[bytes, bytes]) -> PresenceChange | None:
        """One presence-stream entry: the change to publish, or None (already seen, or a gap)."""
        seq, user, online = int(fields[b"s"]), fields[b"u"].decode(), fields[b"o"] == b"1"
        if seq <= self._seq or self._stale:
            return None
        if seq != self._seq + 1:
            log.warning("presence stream gap (%d after %d): re-snapshot", seq, self._seq)
            try:
                self.resync()
            except StoreUnavailable:
                self._stale = True  # Redis is down: the recovery's reconcile re-snapshots
            return None
        self._seq = seq
        if online:
            where = parse_location(fields[b"l"])
            self._replica[user] = where
            self._known.add(user)
            if where.broker != self.broker_id:
                self._local.pop(user, None)  # taken over elsewhere
                self._tokens.pop(user, None)
        else:
            self._replica.pop(user, None)
        return PresenceChange(seq, user, online)

    def reconcile(self) -> tuple[list[tuple[Location, str]], list[tuple[bytes, str]]]:
        """After an outage, make Redis agree with this broker's sessions: release what Redis still holds
        here but ended meanwhile (no ghosts), claim what started (taking it over from a dead broker, or
        from another broker by the same token), then re-snapshot.

        Returns the (previous location, user) sessions to kick elsewhere, and the (conn, user) sessions
        here that lost their ID to a live session elsewhere. Raises ``StoreUnavailable`` if Redis fails
        again (call it again later).
        """
        k = self._keys
        with unavailable_on_error():
            held = [u.decode() for u in self._r.smembers(k.broker_users(self.me))]
            pipe = self._r.pipeline(transaction=False)
            for user in held:
                pipe.hget(k.online, user)
            for user, at in zip(held, pipe.execute()):
                where = parse_location(at) if at else None
                if where is None or where.broker != self.broker_id:
                    self._r.srem(k.broker_users(self.me), user)
                elif self._local.get(user) != where:
                    self._release(keys=self._presence_keys(), args=[user, format_location(where), PRESENCE_MAXLEN])
                    log.info("user=%s left during the redis outage: released", user)
            kicks, lost = [], []
            for user, where in list(self._local.items()):
                token = self._tokens[user]
                if self._run_claim(user, where, token) != 0:
                    continue
                previous = self._run_take_over(user, where, token)
                if previous is None:
                    log.warning("user=%s conn=%s lost its ID to a session elsewhere during the redis outage",
                                user, where.conn.hex())
                    lost.append((where.conn, user))
                    del self._local[user], self._tokens[user]
                elif parse_location(previous).broker:  # not just reaped meanwhile: end the session there
                    kicks.append((parse_location(previous), user))
        self.resync()
        log.info("cluster state reconciled: %d sessions here, %d taken over, %d lost", len(self._local), len(kicks),
                 len(lost))
        return kicks, lost

    def reap(self) -> list[str]:
        """Take the users of brokers that stopped refreshing their liveness key offline; those brokers."""
        k = self._keys
        with unavailable_on_error():
            dead = self._reap(keys=[k.online, k.seq, k.presence, k.brokers],
                              args=[k.alive(""), k.broker_users(""), PRESENCE_MAXLEN])
        return [b.decode() if isinstance(b, bytes) else b for b in dead]
