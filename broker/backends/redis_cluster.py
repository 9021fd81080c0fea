"""Cluster mode: many brokers behind one address, sharing their state through Redis.

What is shared, and how (docs/SCALING.md has the numbers):

* ``RedisDirectory`` - who is online on which broker. Claims and releases are Lua scripts that
  update the online hash, take the next global sequence number (INCR) and append the change to
  one presence stream, atomically, so the stream *is* the ordered peer-list history. Every broker
  keeps a replica of the list built from that stream (the Clone pattern, broker side) and
  republishes each change on its own PUB: all brokers publish the same ``(epoch, seq)`` sequence.
  Each broker refreshes a liveness key every heartbeat; any broker reaps one whose key expired.
* ``RedisKeyRegistry`` - user-ID-to-key bindings (first key wins, HSETNX).
* ``RedisMessageStore`` - the durable offline queues (store-and-forward), one hash + sorted set
  per recipient, written in the batch's pipeline: one round trip per group commit.
* Cross-broker delivery: each broker reads its own inbox stream (Streams keep what a briefly
  disconnected reader missed; Pub/Sub would not), bounded in entries and in bytes.

Redis outages (``RedisHealth``): every call has a short timeout, and after one failure every call
fails at once until a probe, at doubling intervals, finds Redis back; meanwhile the broker serves
its own clients, and on recovery the shell reconciles presence (``RedisDirectory.reconcile``).

The routing core stays sans-I/O: it emits ``Forward``/``Kick`` actions and the shell hands them to
``ClusterLink``, which owns the Redis connections and the one reader thread.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from p2pchat.broker.core.directory import Location
from p2pchat.broker.backends.sqlite_keys import KeyLimits, TicketBook
from p2pchat.broker.backends.sqlite_store import QueueLimits, Refusal, StoreUnavailable
from p2pchat.common.crypto import KEY_BYTES, Identity
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import PeerUpdate, pack

log = logging.getLogger(__name__)

PRESENCE_MAXLEN = 100_000  # entries kept in the presence stream; a broker further behind re-snapshots
# A broker's unread inbox: further forwards to a full one are dropped (durable frames still wait in
# their recipient's queue; chunks are asked for again by the transfer's credit/stall logic).
INBOX_MAXLEN = 10_000  # entries
INBOX_MAX_BYTES = 128 * 1024 * 1024  # header + payload bytes
READ_BLOCK_MS = 250  # the reader thread's XREAD timeout: bounds how long close() waits for it
COUNT_REFRESH = 2.0  # seconds a cached queue length is trusted for the queue bound
REDIS_ERRORS = redis.RedisError  # unreachable, timed out, loading, read-only, OOM (maxmemory), ...
# The errors that mean Redis cannot serve us now (others answer one request; redis-py handles some itself).
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError, redis.ReadOnlyError,
           redis.exceptions.MasterDownError)
TIMEOUT_MIN, TIMEOUT_MAX = 0.25, 1.0  # per call: half a heartbeat, within these bounds
RETRY_MIN, RETRY_MAX = 0.25, 4.0  # seconds between probes while Redis is down, doubling


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Key names. Everything the presence scripts touch shares the ``{p2p}`` hash tag (one Redis
    Cluster slot); per-user queues and per-broker inboxes are tagged by user and broker, so they
    spread over the slots."""

    prefix: str = "p2p"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def __getattr__(self, name: str) -> str:  # epoch, seq, online, presence, brokers, known, keys, broker_key
        if name.startswith("_"):
            raise AttributeError(name)
        return f"{self.tag}:{name}"

    def alive(self, broker: str) -> str:
        return f"{self.tag}:alive:{broker}"

    def broker_users(self, broker: str) -> str:
        return f"{self.tag}:bu:{broker}"

    def inbox(self, broker: str) -> str:
        return f"{self.prefix}:inbox:{{{broker}}}"

    def queue(self, user: str) -> tuple[str, str, str]:
        base = f"{self.prefix}:q:{{{user}}}"
        return base + ":h", base + ":z", base + ":n"


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

# KEYS: frames hash, order zset, seq counter, meta hash (bytes "b", per sender "c:S" / "b:S", "i:ID" -> sender).
_APPEND = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
local size = #ARGV[2] - 8
redis.call('HINCRBY', KEYS[4], 'b', size)
redis.call('HINCRBY', KEYS[4], 'c:' .. ARGV[4], 1)
redis.call('HINCRBY', KEYS[4], 'b:' .. ARGV[4], size)
redis.call('HSET', KEYS[4], 'i:' .. ARGV[1], ARGV[4])
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

_CONSUME = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not v then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local size = #v - 8
redis.call('HINCRBY', KEYS[3], 'b', -size)
local s = redis.call('HGET', KEYS[3], 'i:' .. ARGV[1])
if s then
  redis.call('HDEL', KEYS[3], 'i:' .. ARGV[1])
  if redis.call('HINCRBY', KEYS[3], 'c:' .. s, -1) <= 0 then redis.call('HDEL', KEYS[3], 'c:' .. s, 'b:' .. s)
  else redis.call('HINCRBY', KEYS[3], 'b:' .. s, -size) end
end
return 1
"""

# One page of a queue after seq ARGV[1]: {id, seq, frame, ...}.
_PENDING = """
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #ids, 2 do
  local v = redis.call('HGET', KEYS[1], ids[i])
  if v then out[#out + 1] = ids[i]; out[#out + 1] = ids[i + 1]; out[#out + 1] = v
  else redis.call('ZREM', KEYS[2], ids[i]) end
end
return out
"""


# Forward to another broker's inbox unless it is full (entries or bytes); 1 if added, 0 if dropped.
_FORWARD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') + tonumber(ARGV[1]) > tonumber(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('INCRBY', KEYS[2], ARGV[1])
return 1
"""

# The reader took everything up to ARGV[1] (an id just past the last one read): forget it.
_TAKEN = """
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
if redis.call('DECRBY', KEYS[2], ARGV[2]) < 0 then redis.call('SET', KEYS[2], 0) end
"""


def _entry_bytes(header: bytes, payload: bytes | None) -> int:
    return len(header) + (len(payload) if payload is not None else 0)


def _after(entry_id: bytes | str) -> str:
    """The smallest stream id after ``entry_id``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, seq = text.split("-")
    return f"{ms}-{int(seq) + 1}"


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """Any Redis failure, as the one exception the broker core knows: the shared store is unavailable."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def _loc(where: Location) -> str:
    return f"{where.broker.hex()}/{where.conn.hex()}"


def _parse_loc(text: str | bytes) -> Location:
    if isinstance(text, bytes):
        text = text.decode()
    broker, conn = text.split("/")[:2]
    return Location(bytes.fromhex(broker), bytes.fromhex(conn))


class RedisHealth:
    """A circuit breaker in front of Redis, used only by the broker loop's thread.

    After a failure (unreachable, timed out, or an error reply such as OOM) Redis is *down*: every
    call fails at once instead of paying a timeout, until a probe (``probing``) at a doubling
    interval succeeds and the shell, having reconciled, calls ``recovered``.
    """

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.retry_at = 0.0
        self._backoff = RETRY_MIN
        self._probing = False

    @property
    def available(self) -> bool:
        return self.down_since is None

    def check(self) -> None:
        if self.down_since is not None and not self._probing:
            raise redis.ConnectionError("redis is unavailable; retrying in the background")

    def failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("redis unavailable (%s): serving local clients only, retrying with backoff", exc)
        self.retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)

    def due(self, now: float) -> bool:
        return self.down_since is not None and now >= self.retry_at

    def retry_now(self) -> None:
        self.retry_at = 0.0

    @contextmanager
    def probing(self) -> Iterator[None]:
        self._probing = True
        try:
            yield
        finally:
            self._probing = False

    def recovered(self) -> float:
        """Seconds it was down."""
        down, self.down_since, self._backoff = time.monotonic() - (self.down_since or 0.0), None, RETRY_MIN
        return down


class _HealthGuard:
    """Mixin for a redis-py connection class: fail at once while ``health`` says down; report failures."""

    def __init__(self, *args: Any, health: RedisHealth, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._health = health

    def connect(self, *args: Any, **kwargs: Any) -> None:
        self._health.check()
        try:
            super().connect(*args, **kwargs)  # type: ignore[misc]
        except OUTAGES as exc:
            self._health.failed(exc)
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._health.check()
        try:
            super().send_packed_command(command, check_health)  # type: ignore[misc]
        except OUTAGES as exc:
            self._health.failed(exc)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except OUTAGES as exc:
            self._health.failed(exc)
            raise
        except redis.ResponseError as exc:
            if str(exc).startswith("MISCONF"):  # cannot persist (disk full): refuses writes
                self._health.failed(exc)
            raise


def connect(url: str, timeout: float, *, health: RedisHealth | None = None, reader: bool = False) -> redis.Redis:
    """A client with no retries and short timeouts, so an outage never holds the broker loop for long;
    with ``health``, calls fail at once while it says Redis is down."""
    pool = redis.ConnectionPool.from_url(url, socket_connect_timeout=timeout,
                                         socket_timeout=timeout + (READ_BLOCK_MS / 1000 if reader else 0.0),
                                         retry=Retry(NoBackoff(), 0), health_check_interval=0)
    if health is not None:
        pool.connection_class = type(f"Guarded{pool.connection_class.__name__}",
                                     (_HealthGuard, pool.connection_class), {})
        pool.connection_kwargs["health"] = health
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def shared_broker_identity(r: redis.Redis, keys: RedisKeys, local: Path) -> Identity:
    """All brokers behind one address present one CURVE key (clients pin it): the first broker to
    start stores its key in Redis (an existing ``broker.key`` is kept), the others use that one.
    The cluster's key is also kept in ``local``, so a broker starting while Redis is down (degraded)
    presents it too."""
    candidate = Identity.load_or_create(local)
    try:
        r.set(keys.broker_key, candidate.private_bytes(), nx=True)
        raw = r.get(keys.broker_key)
    except REDIS_ERRORS as exc:
        log.warning("redis unreachable at start (%s): presenting the broker key kept in %s", exc, local)
        return candidate
    if raw is None or len(raw) != KEY_BYTES:
        raise RuntimeError(f"{keys.broker_key} in Redis is not a {KEY_BYTES}-byte key")
    shared = Identity.from_private_bytes(raw)
    if raw != candidate.private_bytes():
        shared.save(local)
    return shared


class RedisDirectory:
    """The cluster's peer directory: authoritative in Redis, replicated here from the presence stream.

    While Redis is down it keeps working for this broker's own sessions: claims and releases change
    only the local view, other brokers' users cannot be located, and ``reconcile`` brings Redis in
    line with the sessions that exist once it is back.
    """

    shared = True

    def __init__(self, r: redis.Redis, broker_id: bytes, keys: RedisKeys, wall_ms: Callable[[], int],
                 health: RedisHealth) -> None:
        self._r, self._keys, self._wall_ms, self._health = r, keys, wall_ms, health
        self.broker_id = broker_id
        self.me = broker_id.hex()
        self.epoch = os.urandom(8)  # until Redis gives the cluster's (a degraded start has none)
        self._local: dict[str, Location] = {}  # this broker's sessions: known at once, before the stream says so
        self._replica: dict[str, Location] = {}  # everyone, as of self._seq
        self._known: set[str] = set()
        self._seq = 0
        self.stream_pos = "0-0"
        self._claim = r.register_script(_CLAIM)
        self._take_over = r.register_script(_TAKE_OVER)
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

    # --- PeerDirectory ------------------------------------------------------
    def claim(self, user: str, where: Location, token: bytes = b"") -> bool:
        try:
            result = self._claim(keys=self._presence_keys() + [self._keys.known],
                                 args=[user, _loc(where), token.hex(), PRESENCE_MAXLEN])
        except REDIS_ERRORS:  # Redis down: this broker's word for now; reconcile() claims it later
            held = self._local.get(user)
            result = 0 if held is not None and held != where else 1
            if result:
                self._replica[user] = where
        if result == 0:
            return False
        self._local[user] = where
        self._known.add(user)
        return True

    def take_over(self, user: str, where: Location, token: bytes) -> Location | None:
        k = self._keys
        with unavailable_on_error():
            previous = self._take_over(keys=self._presence_keys(),
                                       args=[user, _loc(where), token.hex(), PRESENCE_MAXLEN, self.me,
                                             k.alive(""), k.broker_users("")])
        if previous is None:
            return None
        self._local[user] = where
        return _parse_loc(previous)

    def release(self, user: str, where: Location) -> bool:
        if self._local.get(user) == where:
            del self._local[user]
        try:
            return bool(self._release(keys=self._presence_keys(), args=[user, _loc(where), PRESENCE_MAXLEN]))
        except REDIS_ERRORS:  # Redis down: gone here at once; reconcile() releases it in Redis later
            if self._replica.get(user) == where:
                del self._replica[user]
            return True

    def locate(self, user: str) -> Location | None:
        if not self._health.available:  # other brokers are out of reach
            return self._local.get(user)
        return self._local.get(user) or self._replica.get(user)

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

    def next_seq(self) -> int:
        return self._seq  # unused: the scripts number every change

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
        self._replica = {flat[i].decode(): _parse_loc(flat[i + 1]) for i in range(0, len(flat), 2)}
        log.info("presence replica at seq %d: %d users online in the cluster", self._seq, len(self._replica))

    def apply(self, fields: dict[bytes, bytes]) -> list[bytes] | None:
        """One presence-stream entry: the PEER_UPDATE to republish, or None (already seen, or a gap)."""
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
            where = _parse_loc(fields[b"l"])
            self._replica[user] = where
            self._known.add(user)
            if where.broker != self.broker_id:
                self._local.pop(user, None)  # taken over elsewhere
        else:
            self._replica.pop(user, None)
        return pack(PeerUpdate(self.epoch, seq, user, online), self._wall_ms())

    def reconcile(self, sessions: list[tuple[str, bytes, bytes]]
                  ) -> tuple[list[tuple[Location, str]], list[tuple[bytes, str]]]:
        """After an outage, make Redis agree with this broker's ``sessions`` (user, conn, token): release
        what Redis still holds here but ended meanwhile (no ghosts), claim what started (taking it over
        from a dead broker, or from another broker by the same token), then re-snapshot.

        Returns the (previous location, user) sessions to kick elsewhere, and the (conn, user) sessions
        here that lost their ID to a live session elsewhere. Raises ``StoreUnavailable`` if Redis fails
        again (call it again later).
        """
        k, here = self._keys, {user: Location(self.broker_id, conn) for user, conn, _ in sessions}
        with unavailable_on_error():
            held = [u.decode() for u in self._r.smembers(k.broker_users(self.me))]
            pipe = self._r.pipeline(transaction=False)
            for user in held:
                pipe.hget(k.online, user)
            for user, at in zip(held, pipe.execute()):
                where = _parse_loc(at) if at else None
                if where is None or where.broker != self.broker_id:
                    self._r.srem(k.broker_users(self.me), user)
                elif here.get(user) != where:
                    self._release(keys=self._presence_keys(), args=[user, _loc(where), PRESENCE_MAXLEN])
                    log.info("user=%s left during the redis outage: released", user)
            kicks, lost, local = [], [], {}
            for user, conn, token in sessions:
                where = here[user]
                if self._claim(keys=self._presence_keys() + [k.known],
                               args=[user, _loc(where), token.hex(), PRESENCE_MAXLEN]) == 0:
                    previous = self._take_over(keys=self._presence_keys(),
                                               args=[user, _loc(where), token.hex(), PRESENCE_MAXLEN, self.me,
                                                     k.alive(""), k.broker_users("")])
                    if previous is None:
                        lost.append((conn, user))
                        continue
                    if _parse_loc(previous).broker:  # not just reaped meanwhile: end the session there
                        kicks.append((_parse_loc(previous), user))
                local[user] = where
        self._local = local
        self.resync()
        return kicks, lost

    def reap(self) -> list[str]:
        k = self._keys
        with unavailable_on_error():
            dead = self._reap(keys=[k.online, k.seq, k.presence, k.brokers],
                              args=[k.alive(""), k.broker_users(""), PRESENCE_MAXLEN])
        return [b.decode() if isinstance(b, bytes) else b for b in dead]


class RedisKeyRegistry:
    """User ID -> key, first key wins, shared by every broker; tickets shared too (a client may ask one
    broker's key service and land on another's ROUTER). Positive answers cached; the ZAP thread asks
    Redis only on a miss, on its own connection with a short timeout, and refuses when Redis is away."""

    # Atomic bind with the per-key and global caps: 0 bound, 1 taken, 2 too many IDs for the key, 3 full.
    _BIND = """
    local bound = redis.call('HGET', KEYS[1], ARGV[1])
    if bound then
      if bound ~= ARGV[2] then return 1 end
      redis.call('HSETNX', KEYS[2], ARGV[2], 1)  -- bound before IDs were counted: admitted by ZAP from now on
      return 0
    end
    if tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') >= tonumber(ARGV[3]) then return 2 end
    if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 3 end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
    return 0
    """
    _VERDICTS = (None, ErrorCode.ID_TAKEN, ErrorCode.TOO_MANY_IDS, ErrorCode.REGISTRY_FULL)
    ZAP_TIMEOUT = 0.2  # seconds: ZAP requests are served one at a time

    def __init__(self, r: redis.Redis, keys: RedisKeys, limits: KeyLimits = KeyLimits()) -> None:
        self._r, self._hash, self._ids, self._keys = r, keys.keys, keys.key_ids, keys
        self.limits = limits
        self._cache: dict[str, bytes] = {}
        self._bound_keys: set[bytes] = set()
        self._tickets = TicketBook(limits)  # this broker's pending tickets: the cap is per broker
        self._bind = r.register_script(self._BIND)
        pool = r.connection_pool
        self._zap = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **{**pool.connection_kwargs, "socket_timeout": self.ZAP_TIMEOUT,
                                                       "socket_connect_timeout": self.ZAP_TIMEOUT}))

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        bound = self.lookup(user)
        if bound is not None:
            return None if bound == key else ErrorCode.ID_TAKEN
        with unavailable_on_error():  # Redis down: only IDs bound (and cached) before can register
            if int(self._r.hget(self._ids, key) or 0) >= self.limits.ids_per_key:
                return ErrorCode.TOO_MANY_IDS
            if self._r.hlen(self._hash) >= self.limits.bound_ids:
                return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes) -> ErrorCode | None:
        if self._cache.get(user) == key:
            return None
        with unavailable_on_error():
            verdict = self._VERDICTS[int(self._bind(keys=[self._hash, self._ids], args=[
                user, key, self.limits.ids_per_key, self.limits.bound_ids]))]
        if verdict is None:
            self._cache[user] = key
            self._bound_keys.add(key)
            log.info("user=%s bound", user)
        return verdict

    def lookup(self, user: str) -> bytes | None:
        key = self._cache.get(user)
        if key is None:
            with unavailable_on_error():
                key = self._r.hget(self._hash, user)
            if key is not None:
                self._cache[user] = key
        return key

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        refused = self._tickets.issue(key, now)
        if refused is None:
            with unavailable_on_error():
                self._r.set(self._ticket(key), b"1", px=int(self.limits.ticket_ttl * 1000))
        return refused

    def admits(self, key: bytes, now: float) -> bool:
        if key in self._bound_keys or self._tickets.holds(key, now):
            return True
        try:
            if self._zap.hexists(self._ids, key):
                self._bound_keys.add(key)
                return True
            return bool(self._zap.exists(self._ticket(key)))
        except redis.RedisError as exc:
            log.warning("admission check failed, key refused: %s", exc)
            return False

    def _ticket(self, key: bytes) -> str:
        return f"{self._keys.tag}:ticket:{key.hex()}"

    def close(self) -> None:
        self._zap.close()


class RedisMessageStore:
    """Store-and-forward queues in Redis, written through the batch pipeline (group commit).

    The per-user and per-sender bounds are checked against cached sizes (refreshed every few
    seconds), so brokers racing for one queue may overshoot them by a batch. Expired frames are
    dropped when read, and a queue untouched for its TTL disappears with its keys. The store-wide
    bounds (``max_total_bytes``, ``max_recipients``) are left to Redis's own ``maxmemory``.
    """

    durable = True

    def __init__(self, link: ClusterLink, limits: QueueLimits = QueueLimits()) -> None:
        self._link, self._r, self._keys = link, link.redis, link.keys
        self.limits = limits
        self._append = self._r.register_script(_APPEND)
        self._pending = self._r.register_script(_PENDING)
        self._consume = self._r.register_script(_CONSUME)
        # (recipient, sender) -> [queue count, queue bytes, sender's count, sender's bytes, read at]
        self._sizes: dict[tuple[str, str], list[float]] = {}

    def _meta(self, user: str) -> str:
        return self._keys.queue(user)[0][:-2] + ":m"

    def _sizes_of(self, recipient: str, sender: str) -> list[float]:
        key = (recipient, sender)
        sizes = self._sizes.get(key)
        now = time.monotonic()
        if sizes is None or now - sizes[4] > COUNT_REFRESH:
            pipe = self._r.pipeline(transaction=False)
            pipe.hlen(self._keys.queue(recipient)[0])
            pipe.hmget(self._meta(recipient), "b", "c:" + sender, "b:" + sender)
            try:
                count, (size, share, share_size) = pipe.execute()
            except REDIS_ERRORS as exc:
                raise StoreUnavailable(str(exc)) from exc
            if len(self._sizes) >= 100_000:  # a cache, bounded
                self._sizes.clear()
            sizes = self._sizes[key] = [count, int(size or 0), int(share or 0), int(share_size or 0), now]
        return sizes

    def append(self, msg_id: bytes, sender: str, recipient: str, header: bytes, expires_ms: int) -> Refusal | None:
        with unavailable_on_error():  # down: refuse now rather than fail the whole batch's commit
            self._link.health.check()
        sizes, lim, size = self._sizes_of(recipient, sender), self.limits, len(header)
        if sizes[0] >= lim.max_per_user or sizes[1] + size > lim.max_bytes_per_user:
            return Refusal.QUEUE_FULL
        if sizes[2] >= lim.max_per_sender or sizes[3] + size > lim.max_bytes_per_sender:
            return Refusal.SHARE_FULL
        ttl_ms = max(1, int(self.limits.ttl_seconds * 1000))
        self._append(keys=[*self._keys.queue(recipient), self._meta(recipient)],
                     args=[msg_id, struct.pack(">q", expires_ms) + header, ttl_ms, sender], client=self._link.pipe)
        for i, grow in enumerate((1, size, 1, size)):
            sizes[i] += grow
        return None

    def pending(self, recipient: str, now_ms: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        self._link.flush_soon()  # this batch's appends must be visible to the read
        h, z, _ = self._keys.queue(recipient)
        try:
            flat = self._pending(keys=[h, z], args=[after, limit])
        except REDIS_ERRORS:
            return []  # Redis down: the shell has every session's queue delivered again once it is back
        out = []
        for i in range(0, len(flat), 3):
            msg_id, seq, value = flat[i], int(float(flat[i + 1])), flat[i + 2]
            if struct.unpack(">q", value[:8])[0] > now_ms:
                out.append((seq, value[8:]))
            else:
                self.consume(recipient, msg_id)
        return out

    def consume(self, recipient: str, msg_id: bytes) -> None:
        if not self._link.health.available:
            return  # the frame stays queued and comes again after the outage; clients drop duplicates by id
        h, z, _ = self._keys.queue(recipient)
        # The cached sizes catch up within COUNT_REFRESH: a full queue refuses a little longer.
        self._consume(keys=[h, z, self._meta(recipient)], args=[msg_id], client=self._link.pipe)

    def expire(self, now_ms: int) -> int:
        return 0  # lazily in pending(); abandoned queues expire with their keys

    def commit(self) -> None:
        self._link.flush()

    def rollback(self) -> None:
        self._link.discard()
        self._sizes.clear()

    def close(self) -> None:
        pass


class ClusterLink:
    """The broker's side of the cluster: Redis connections, liveness, its inbox and the presence feed.

    One reader thread (owned here, joined in ``close``) blocks on XREAD over this broker's inbox
    and the presence stream and hands entries to the broker loop through a queue plus ``wake``.
    Calls from the broker loop go through ``health`` (``RedisHealth``): short timeouts, then fail fast.
    """

    def __init__(self, url: str, broker_id: bytes, ttl: float, wake: Callable[[], None],
                 keys: RedisKeys = RedisKeys(), timeout: float = TIMEOUT_MAX) -> None:
        self.url, self.broker_id, self.me, self.keys = url, broker_id, broker_id.hex(), keys
        self.ttl_ms = max(1, int(ttl * 1000))
        self.timeout = timeout
        self.health = RedisHealth()
        self.redis = connect(url, timeout, health=self.health)
        self.pipe = self.redis.pipeline(transaction=False)
        self._pipe_failed: Exception | None = None
        self._forwards: list[int] = []  # positions of this pipeline's forwards, to count the refused ones
        self._refused, self._next_refused_log = 0, 0.0
        self.inbox = keys.inbox(self.me)
        self._forward = self.redis.register_script(_FORWARD)
        self._wake = wake
        self.entries: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._was_down = False
        try:
            self.refresh()
        except StoreUnavailable:
            pass  # started degraded (RedisHealth said so); the shell probes with backoff

    # --- group commit --------------------------------------------------------
    def forward(self, broker: bytes, user: str, frames) -> None:
        header, payload = bytes(frames[0]), bytes(frames[1]) if len(frames) > 1 else None
        fields = ["k", "f", "u", user, "h", header] + (["p", payload] if payload is not None else [])
        self._add_to_inbox(broker, _entry_bytes(header, payload), fields)

    def kick(self, broker: bytes, conn: bytes, user: str) -> None:
        self._add_to_inbox(broker, 0, ["k", "k", "u", user, "c", conn])

    def _add_to_inbox(self, broker: bytes, size: int, fields: list) -> None:
        if not self.health.available:
            self._refused += 1  # unreachable now: durable frames wait in their queue, transfers ask again
            return
        inbox = self.keys.inbox(broker.hex())
        self._forwards.append(len(self.pipe))
        self._forward(keys=[inbox, inbox + ":bytes"], args=[size, INBOX_MAXLEN, INBOX_MAX_BYTES, *fields],
                      client=self.pipe)

    def _execute(self) -> None:
        forwards, self._forwards = self._forwards, []
        try:
            results = self.pipe.execute()
        except REDIS_ERRORS:
            self.pipe.reset()
            raise
        self._refused += sum(1 for i in forwards if results[i] == 0)
        now = time.monotonic()
        if self._refused and now >= self._next_refused_log:  # aggregated: one line per 10 s at most
            log.warning("%d frames for other brokers dropped (inbox full or redis down); durable ones wait in "
                        "their queues, file chunks are asked for again", self._refused)
            self._refused, self._next_refused_log = 0, now + 10.0

    def flush_soon(self) -> None:
        """Run what is queued now; a failure surfaces at the next ``flush`` (so nothing gets acked)."""
        if len(self.pipe) and self._pipe_failed is None:
            try:
                self._execute()
            except REDIS_ERRORS as exc:
                self._pipe_failed = exc

    def flush(self) -> None:
        failed, self._pipe_failed = self._pipe_failed, None
        if failed is not None:
            self.discard()
            raise StoreUnavailable(f"redis: {failed}")
        if len(self.pipe):
            with unavailable_on_error():
                self._execute()

    def discard(self) -> None:
        self.pipe.reset()
        self._forwards = []
        self._pipe_failed = None

    # --- liveness -------------------------------------------------------------
    def refresh(self) -> bool:
        """Renew this broker's liveness key; True if it had lapsed (others may have reaped us)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.alive(self.me), 1, px=self.ttl_ms, get=True)
        pipe.sadd(self.keys.brokers, self.me)
        with unavailable_on_error():
            previous, _ = pipe.execute()
        return previous is None

    def drop_inboxes(self, brokers: list[str]) -> None:
        if brokers:
            with unavailable_on_error():
                self.redis.delete(*(self.keys.inbox(b) for b in brokers),
                                  *(self.keys.inbox(b) + ":bytes" for b in brokers))

    # --- the reader thread ------------------------------------------------------
    def start_reader(self, presence_pos: Callable[[], str]) -> None:
        """``presence_pos()``: where the replica's snapshot ends ("$" until a degraded broker has one)."""
        self._reader = threading.Thread(target=self._read, args=(presence_pos,), name="cluster-reader", daemon=True)
        self._reader.start()

    def _read(self, presence_pos: Callable[[], str]) -> None:
        r = connect(self.url, self.timeout, reader=True)
        taken = r.register_script(_TAKEN)
        positions = {self.inbox: "$", self.keys.presence: "$"}
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if positions[self.inbox] == "$":  # the end, as of the first contact: pin it down
                    positions[self.inbox] = self._last_id(r, self.inbox)
                if positions[self.keys.presence] == "$":  # from the end of the replica's snapshot, once it has one
                    positions[self.keys.presence] = presence_pos()
                reading = {name: pos for name, pos in positions.items() if pos != "$"}
                reply = r.xread(reading, count=1000, block=READ_BLOCK_MS)
                backoff = 0.05
            except REDIS_ERRORS as exc:
                if not self._was_down:
                    log.warning("redis unreachable (%s): retrying", exc)
                self._was_down = True
                self.entries.put(("down", None))
                self._wake()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if self._was_down:
                self._was_down = False
                log.info("redis reachable again")
                self.entries.put(("up", None))
            for stream, items in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                kind = "presence" if name == self.keys.presence else "inbox"
                for entry_id, fields in items:
                    self.entries.put((kind, fields))
                positions[name] = items[-1][0]
                if kind == "inbox":  # taken: out of the inbox and its byte count
                    size = sum(_entry_bytes(f.get(b"h", b""), f.get(b"p")) for _, f in items if f[b"k"] == b"f")
                    try:
                        taken(keys=[self.inbox, self.inbox + ":bytes"], args=[_after(items[-1][0]), size])
                    except REDIS_ERRORS:
                        pass
            if reply:
                self._wake()
        r.close()

    @staticmethod
    def _last_id(r: redis.Redis, stream: str) -> str:
        last = r.xrevrange(stream, count=1)
        return last[0][0].decode() if last else "0-0"

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(READ_BLOCK_MS / 1000 + 3)
        try:
            self.redis.delete(self.keys.alive(self.me))  # a clean stop: others reap us at once
        except REDIS_ERRORS:
            pass
        self.redis.close()
