"""The cluster's peer directory: authoritative in Redis, replicated in every broker (the Clone pattern).

Claims and releases of a device's session are Lua scripts that update the online hash and the user's
count of sessions, take the next global sequence number (INCR) when the user goes online or offline,
and append the change to one presence stream, atomically, so the stream *is* the ordered history of
sessions and of the peer list. The link's reader thread (redis_link.py) feeds the stream's entries to
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

# --- Lua: each session change is one atomic step: online hash + count + global seq + presence stream -----
# ``online`` maps "user/dev" to "broker/conn/token", ``sessions`` a user to its count of devices online, and
# a broker's set (``bu``) holds its "user/dev" entries. Every change is a presence-stream entry for the
# replicas; only one that takes a user online (its first device) or offline (its last) takes the next
# global seq and is published as a peer_update ('p' 1); the others carry the current seq ('p' 0).
_ENTRY = """
local function entry(user, dev, online, loc, presence, maxlen)
  local seq
  if presence then seq = redis.call('INCR', KEYS[2]) else seq = redis.call('GET', KEYS[2]) or '0' end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 's', seq, 'u', user, 'd', dev, 'o', online, 'l', loc,
             'p', presence and 1 or 0)
end
"""

_CLAIM = _ENTRY + """
local f = ARGV[1] .. '/' .. ARGV[2]
local cur = redis.call('HGET', KEYS[1], f)
if cur then
  if string.sub(cur, 1, #ARGV[3] + 1) == ARGV[3] .. '/' then return -1 end
  return 0
end
redis.call('HSET', KEYS[1], f, ARGV[3] .. '/' .. ARGV[4])
redis.call('SADD', KEYS[4], f)
redis.call('SADD', KEYS[6], ARGV[1])
local n = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
entry(ARGV[1], ARGV[2], 1, ARGV[3], n == 1, ARGV[5])
return 1
"""

# Take a device's session over from another broker: allowed for the session's own token, or when that
# broker stopped refreshing its liveness key (it crashed); or claim it if it was reaped meanwhile.
# Returns the previous "broker/conn" ("/" when there was none).
_TAKE_OVER = _ENTRY + """
local f = ARGV[1] .. '/' .. ARGV[2]
local cur = redis.call('HGET', KEYS[1], f)
local held = cur ~= false
if not held then cur = '//' .. ARGV[4] end
local b, c, t = string.match(cur, '^([^/]*)/([^/]*)/(.*)$')
if b == ARGV[6] then return false end
if t ~= ARGV[4] and redis.call('EXISTS', ARGV[7] .. b) == 1 then return false end
redis.call('HSET', KEYS[1], f, ARGV[3] .. '/' .. ARGV[4])
if b ~= '' then redis.call('SREM', ARGV[8] .. b, f) end
redis.call('SADD', KEYS[4], f)
local n
if held then
  n = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '1')
else
  n = redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
end
entry(ARGV[1], ARGV[2], 1, ARGV[3], n == 1, ARGV[5])
return b .. '/' .. c
"""

# Move a device's session between two connections of this broker: the peer list does not change. 0 if it
# is not at the old one any more (taken over or reaped meanwhile).
_HAND_OVER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or string.sub(cur, 1, #ARGV[2] + 1) ~= ARGV[2] .. '/' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. '/' .. ARGV[4])
return 1
"""

_RELEASE = _ENTRY + """
local f = ARGV[1] .. '/' .. ARGV[2]
local cur = redis.call('HGET', KEYS[1], f)
if not cur or string.sub(cur, 1, #ARGV[3] + 1) ~= ARGV[3] .. '/' then return 0 end
redis.call('HDEL', KEYS[1], f)
redis.call('SREM', KEYS[4], f)
local n = redis.call('HINCRBY', KEYS[5], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[5], ARGV[1]) end
entry(ARGV[1], ARGV[2], 0, '', n <= 0, ARGV[4])
return 1
"""

# Any broker may run this: brokers whose liveness key expired lose their sessions (users announced
# offline after their last device).
_REAP = _ENTRY + """
local dead = {}
for _, b in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if redis.call('EXISTS', ARGV[1] .. b) == 0 then
    for _, f in ipairs(redis.call('SMEMBERS', ARGV[2] .. b)) do
      local cur = redis.call('HGET', KEYS[1], f)
      if cur and string.sub(cur, 1, #b + 1) == b .. '/' then
        redis.call('HDEL', KEYS[1], f)
        local u, d = string.match(f, '^([^/]*)/?(.*)$')
        local n = redis.call('HINCRBY', KEYS[5], u, -1)
        if n <= 0 then redis.call('HDEL', KEYS[5], u) end
        entry(u, d, 0, '', n <= 0, ARGV[3])
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
    """

    def __init__(self, r: redis.Redis, broker_id: bytes, keys: RedisKeys, health: RedisHealth,
                 settle: float) -> None:
        self._r, self._keys, self._health = r, keys, health
        self.broker_id = broker_id
        self.me = broker_id.hex()
        self.epoch = os.urandom(8)  # until Redis gives the cluster's (a degraded start has none)
        # This broker's sessions, user -> device -> where: known at once, before the stream says so.
        self._local: dict[str, dict[int, Location]] = {}
        self._tokens: dict[tuple[str, int], bytes] = {}  # and their tokens, to claim them again after an outage
        self._replica: dict[str, dict[int, Location]] = {}  # everyone's sessions, as of self._seq
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

    def _session_keys(self) -> list[str]:
        k = self._keys
        return [k.online, k.seq, k.presence, k.broker_users(self.me), k.sessions]

    def _held_here(self, user: str, dev: int, where: Location, token: bytes) -> None:
        self._local.setdefault(user, {})[dev] = where
        self._tokens[user, dev] = token
        self._claimed.append(user)

    def _forget_here(self, user: str, dev: int) -> None:
        sessions = self._local.get(user)
        if sessions is not None and sessions.pop(dev, None) is not None:
            del self._tokens[user, dev]
            if not sessions:
                del self._local[user]

    # --- PeerDirectory ------------------------------------------------------
    def claim(self, user: str, dev: int, where: Location, token: bytes) -> bool:
        try:
            result = self._run_claim(user, dev, where, token)
        except REDIS_ERRORS:  # Redis down: this broker's word for now; reconcile() claims it later
            held = self._local.get(user, {}).get(dev)
            result = 0 if held is not None and held != where else 1
            if result:
                self._replica.setdefault(user, {})[dev] = where
        if result == 0:
            return False
        self._held_here(user, dev, where, token)
        self._known.add(user)
        return True

    def _run_claim(self, user: str, dev: int, where: Location, token: bytes) -> int:
        return self._claim(keys=self._session_keys() + [self._keys.known],
                           args=[user, dev, format_location(where), token.hex(), PRESENCE_MAXLEN])

    def take_over(self, user: str, dev: int, where: Location, token: bytes) -> Location | None:
        with unavailable_on_error():
            previous = self._run_take_over(user, dev, where, token)
        if previous is None:
            return None
        self._held_here(user, dev, where, token)
        return parse_location(previous)

    def _run_take_over(self, user: str, dev: int, where: Location, token: bytes) -> bytes | None:
        k = self._keys
        return self._take_over(keys=self._session_keys(),
                               args=[user, dev, format_location(where), token.hex(), PRESENCE_MAXLEN, self.me,
                                     k.alive(""), k.broker_users("")])

    def hand_over(self, user: str, dev: int, old: Location, new: Location, token: bytes) -> None:
        try:
            moved = self._hand_over(keys=[self._keys.online], args=[f"{user}/{dev}", format_location(old),
                                                                    format_location(new), token.hex()])
        except REDIS_ERRORS:  # Redis down: here at once; reconcile() moves it in Redis later
            moved = 1
        if moved:
            self._held_here(user, dev, new, token)
            sessions = self._replica.get(user)
            if sessions is not None and sessions.get(dev) == old:
                sessions[dev] = new
        else:  # no longer ours in Redis: claim it like a new session
            self._forget_here(user, dev)
            self.claim(user, dev, new, token)

    def release(self, user: str, dev: int, where: Location) -> None:
        if self._local.get(user, {}).get(dev) == where:
            self._forget_here(user, dev)
        try:
            self._release(keys=self._session_keys(), args=[user, dev, format_location(where), PRESENCE_MAXLEN])
        except REDIS_ERRORS:  # Redis down: gone here at once; reconcile() releases it in Redis later
            sessions = self._replica.get(user)
            if sessions is not None and sessions.get(dev) == where:
                del sessions[dev]
                if not sessions:
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
        here = self._local.get(user)
        there = self._replica.get(user) if self._health.available else None  # else other brokers are out of reach
        if not there:
            sessions = here or {}
        elif not here:
            sessions = there
        else:
            sessions = {**there, **here}  # this broker's own sessions are known first
        if len(sessions) < 2:
            return tuple(sessions.values())
        return tuple(sessions[dev] for dev in sorted(sessions))

    def locate_device(self, user: str, dev: int) -> Location | None:
        here = self._local.get(user)
        if here and dev in here:  # this broker's own sessions are known first
            return here[dev]
        there = self._replica.get(user) if self._health.available else None
        return there.get(dev) if there else None

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
        replica: dict[str, dict[int, Location]] = {}
        for i in range(0, len(flat), 2):
            user, _, dev = flat[i].decode().partition("/")
            replica.setdefault(user, {})[int(dev or 0)] = parse_location(flat[i + 1])
        self._replica = replica
        log.info("presence replica at seq %d: %d users online in the cluster", self._seq, len(self._replica))

    def _apply(self, fields: dict[bytes, bytes]) -> PresenceChange | None:
        """One presence-stream entry: the change to publish, or None (already seen, not a presence change, or
        a gap). An entry that is not a presence change carries the seq it came after: it applies at that seq."""
        seq, user, online = int(fields[b"s"]), fields[b"u"].decode(), fields[b"o"] == b"1"
        presence = fields.get(b"p", b"1") == b"1"
        if self._stale or seq < self._seq or (presence and seq == self._seq):
            return None
        if seq != self._seq + presence:
            log.warning("presence stream gap (%d after %d): re-snapshot", seq, self._seq)
            try:
                self.resync()
            except StoreUnavailable:
                self._stale = True  # Redis is down: the recovery's reconcile re-snapshots
            return None
        self._seq = seq
        dev = int(fields.get(b"d") or 0)
        if online:
            where = parse_location(fields[b"l"])
            self._replica.setdefault(user, {})[dev] = where
            self._known.add(user)
            if where.broker != self.broker_id:
                self._forget_here(user, dev)  # taken over elsewhere
        else:
            sessions = self._replica.get(user)
            if sessions is not None:
                sessions.pop(dev, None)
                if not sessions or presence:
                    del self._replica[user]
        return PresenceChange(seq, user, online) if presence else None

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
            held = [f.decode() for f in self._r.smembers(k.broker_users(self.me))]
            pipe = self._r.pipeline(transaction=False)
            for field in held:
                pipe.hget(k.online, field)
            for field, at in zip(held, pipe.execute()):
                where = parse_location(at) if at else None
                user, _, dev = field.partition("/")
                if where is None or where.broker != self.broker_id or not dev:
                    self._r.srem(k.broker_users(self.me), field)
                elif self._local.get(user, {}).get(int(dev)) != where:
                    self._release(keys=self._session_keys(), args=[user, dev, format_location(where),
                                                                    PRESENCE_MAXLEN])
                    log.info("user=%s device %s left during the redis outage: released", user, dev)
            kicks, lost = [], []
            for user, sessions in list(self._local.items()):
                for dev, where in list(sessions.items()):
                    token = self._tokens[user, dev]
                    if self._run_claim(user, dev, where, token) != 0:
                        continue
                    previous = self._run_take_over(user, dev, where, token)
                    if previous is None:
                        log.warning("user=%s conn=%s lost its ID to a session elsewhere during the redis outage",
                                    user, where.conn.hex())
                        lost.append((where.conn, user))
                        self._forget_here(user, dev)
                    elif parse_location(previous).broker:  # not just reaped meanwhile: end the session there
                        kicks.append((parse_location(previous), user))
        self.resync()
        log.info("cluster state reconciled: %d sessions here, %d taken over, %d lost",
                 sum(len(s) for s in self._local.values()), len(kicks), len(lost))
        return kicks, lost

    def reap(self) -> list[str]:
        """Take the sessions of brokers that stopped refreshing their liveness key offline; those brokers."""
        k = self._keys
        with unavailable_on_error():
            dead = self._reap(keys=[k.online, k.seq, k.presence, k.brokers, k.sessions],
                              args=[k.alive(""), k.broker_users(""), PRESENCE_MAXLEN])
        return [b.decode() if isinstance(b, bytes) else b for b in dead]
