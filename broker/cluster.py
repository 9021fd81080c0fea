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
  disconnected reader missed; Pub/Sub would not).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.directory import Location
from broker.keys import KeyLimits, TicketBook
from broker.store import QueueLimits, StoreUnavailable
from common.crypto import KEY_BYTES, Identity
from common.errors import ErrorCode
from common.protocol import PeerUpdate, pack

log = logging.getLogger(__name__)

PRESENCE_MAXLEN = 100_000  # entries kept in the presence stream; a broker further behind re-snapshots
INBOX_MAXLEN = 100_000  # a dead broker's inbox is deleted when it is reaped
READ_BLOCK_MS = 250  # the reader thread's XREAD timeout: bounds how long close() waits for it
COUNT_REFRESH = 2.0  # seconds a cached queue length is trusted for the queue bound
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError)


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

_APPEND = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

_PENDING = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then out[#out + 1] = id; out[#out + 1] = v else redis.call('ZREM', KEYS[2], id) end
end
return out
"""


def _loc(where: Location) -> str:
    return f"{where.broker.hex()}/{where.conn.hex()}"


def _parse_loc(text: str | bytes) -> Location:
    if isinstance(text, bytes):
        text = text.decode()
    broker, conn = text.split("/")[:2]
    return Location(bytes.fromhex(broker), bytes.fromhex(conn))


def connect(url: str, *, reader: bool = False) -> redis.Redis:
    # No retries and short timeouts: during an outage the broker loop must keep answering heartbeats.
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=None if reader else 2.0,
                                retry=Retry(NoBackoff(), 0), health_check_interval=0)


def shared_broker_identity(r: redis.Redis, keys: RedisKeys, local: Path) -> Identity:
    """All brokers behind one address present one CURVE key (clients pin it): the first broker to
    start stores its key in Redis (an existing ``broker.key`` is kept), the others use that one."""
    candidate = Identity.load_or_create(local) if local.exists() else Identity.generate()
    r.set(keys.broker_key, candidate.private_bytes(), nx=True)
    raw = r.get(keys.broker_key)
    if raw is None or len(raw) != KEY_BYTES:
        raise RuntimeError(f"{keys.broker_key} in Redis is not a {KEY_BYTES}-byte key")
    return Identity.from_private_bytes(raw)


class RedisDirectory:
    """The cluster's peer directory: authoritative in Redis, replicated here from the presence stream."""

    shared = True

    def __init__(self, r: redis.Redis, broker_id: bytes, keys: RedisKeys, wall_ms: Callable[[], int]) -> None:
        self._r, self._keys, self._wall_ms = r, keys, wall_ms
        self.broker_id = broker_id
        self.me = broker_id.hex()
        self.epoch = b""
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
        self.resync()

    def _presence_keys(self) -> list[str]:
        k = self._keys
        return [k.online, k.seq, k.presence, k.broker_users(self.me)]

    # --- PeerDirectory ------------------------------------------------------
    def claim(self, user: str, where: Location, token: bytes = b"") -> bool:
        result = self._claim(keys=self._presence_keys() + [self._keys.known],
                             args=[user, _loc(where), token.hex(), PRESENCE_MAXLEN])
        if result == 0:
            return False
        self._local[user] = where
        self._known.add(user)
        return True

    def take_over(self, user: str, where: Location, token: bytes) -> Location | None:
        k = self._keys
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
        return bool(self._release(keys=self._presence_keys(), args=[user, _loc(where), PRESENCE_MAXLEN]))

    def locate(self, user: str) -> Location | None:
        return self._local.get(user) or self._replica.get(user)

    def is_known(self, user: str) -> bool:
        if user in self._known or user in self._replica:
            return True
        if self._r.sismember(self._keys.known, user):
            self._known.add(user)
            return True
        return False

    def online(self) -> list[str]:
        return sorted(self._replica)

    def next_seq(self) -> int:
        return self._seq  # unused: the scripts number every change

    def seq(self) -> int:
        return self._seq

    # --- the replica (Clone pattern) ---------------------------------------
    def resync(self) -> None:
        """Reload the whole list from Redis (at start, after a gap or an outage)."""
        epoch, seq, pos, flat = self._snapshot(
            keys=[self._keys.epoch, self._keys.seq, self._keys.presence, self._keys.online], args=[os.urandom(8)])
        self.epoch, self._seq = epoch, int(seq)
        if self.stream_pos == "0-0":
            self.stream_pos = pos.decode() if isinstance(pos, bytes) else pos
        self._replica = {flat[i].decode(): _parse_loc(flat[i + 1]) for i in range(0, len(flat), 2)}
        log.info("presence replica at seq %d: %d users online in the cluster", self._seq, len(self._replica))

    def apply(self, fields: dict[bytes, bytes]) -> list[bytes] | None:
        """One presence-stream entry: the PEER_UPDATE to republish, or None (already seen, or a gap)."""
        seq, user, online = int(fields[b"s"]), fields[b"u"].decode(), fields[b"o"] == b"1"
        if seq <= self._seq:
            return None
        if seq != self._seq + 1:
            log.warning("presence stream gap (%d after %d): re-snapshot", seq, self._seq)
            self.resync()
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

    def reap(self) -> list[str]:
        k = self._keys
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
        if int(self._r.hget(self._ids, key) or 0) >= self.limits.ids_per_key:
            return ErrorCode.TOO_MANY_IDS
        if self._r.hlen(self._hash) >= self.limits.bound_ids:
            return ErrorCode.REGISTRY_FULL
        return None

    def bind(self, user: str, key: bytes) -> ErrorCode | None:
        if self._cache.get(user) == key:
            return None
        verdict = self._VERDICTS[int(self._bind(keys=[self._hash, self._ids],
                                                args=[user, key, self.limits.ids_per_key, self.limits.bound_ids]))]
        if verdict is None:
            self._cache[user] = key
            self._bound_keys.add(key)
            log.info("user=%s bound", user)
        return verdict

    def lookup(self, user: str) -> bytes | None:
        key = self._cache.get(user)
        if key is None:
            key = self._r.hget(self._hash, user)
            if key is not None:
                self._cache[user] = key
        return key

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        refused = self._tickets.issue(key, now)
        if refused is None:
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

    The per-user bound is checked against a cached length (refreshed every few seconds), so two
    brokers racing for one queue may overshoot it by a batch. Expired frames are dropped when read,
    and a queue untouched for its TTL disappears with its keys.
    """

    durable = True

    def __init__(self, link: ClusterLink, limits: QueueLimits = QueueLimits()) -> None:
        self._link, self._r, self._keys = link, link.redis, link.keys
        self.limits = limits
        self._append = self._r.register_script(_APPEND)
        self._pending = self._r.register_script(_PENDING)
        self._counts: dict[str, tuple[int, float]] = {}

    def _count(self, user: str) -> int:
        count, at = self._counts.get(user, (0, -1e9))
        now = time.monotonic()
        if now - at > COUNT_REFRESH:
            try:
                count = self._r.hlen(self._keys.queue(user)[0])
            except REDIS_ERRORS as exc:
                raise StoreUnavailable(str(exc)) from exc
            self._counts[user] = (count, now)
        return count

    def append(self, msg_id: bytes, recipient: str, header: bytes, expires_ms: int) -> bool:
        count = self._count(recipient)
        if count >= self.limits.max_per_user:
            return False
        ttl_ms = max(1, int(self.limits.ttl_seconds * 1000))
        self._append(keys=list(self._keys.queue(recipient)),
                     args=[msg_id, struct.pack(">q", expires_ms) + header, ttl_ms], client=self._link.pipe)
        self._counts[recipient] = (count + 1, self._counts[recipient][1])
        return True

    def pending(self, recipient: str, now_ms: int) -> list[bytes]:
        self._link.flush_soon()  # this batch's appends must be visible to the read
        h, z, _ = self._keys.queue(recipient)
        try:
            flat = self._pending(keys=[h, z])
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        out = []
        for i in range(0, len(flat), 2):
            msg_id, value = flat[i], flat[i + 1]
            if struct.unpack(">q", value[:8])[0] > now_ms:
                out.append(value[8:])
            else:
                self.consume(recipient, msg_id)
        return out

    def consume(self, recipient: str, msg_id: bytes) -> None:
        h, z, _ = self._keys.queue(recipient)
        self._link.pipe.hdel(h, msg_id)
        self._link.pipe.zrem(z, msg_id)
        if recipient in self._counts:
            count, at = self._counts[recipient]
            self._counts[recipient] = (max(0, count - 1), at)

    def expire(self, now_ms: int) -> int:
        return 0  # lazily in pending(); abandoned queues expire with their keys

    def commit(self) -> None:
        self._link.flush()

    def rollback(self) -> None:
        self._link.discard()
        self._counts.clear()

    def close(self) -> None:
        pass


class ClusterLink:
    """The broker's side of the cluster: Redis connections, liveness, its inbox and the presence feed.

    One reader thread (owned here, joined in ``close``) blocks on XREAD over this broker's inbox
    and the presence stream and hands entries to the broker loop through a queue plus ``wake``.
    """

    def __init__(self, url: str, broker_id: bytes, ttl: float, wake: Callable[[], None],
                 keys: RedisKeys = RedisKeys()) -> None:
        self.url, self.broker_id, self.me, self.keys = url, broker_id, broker_id.hex(), keys
        self.ttl_ms = max(1, int(ttl * 1000))
        self.redis = connect(url)
        self.pipe = self.redis.pipeline(transaction=False)
        self._pipe_failed: Exception | None = None
        self.inbox = keys.inbox(self.me)
        self._wake = wake
        self.entries: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._was_down = False
        self.redis.ping()
        self.refresh()

    # --- group commit --------------------------------------------------------
    def forward(self, broker: bytes, user: str, frames) -> None:
        fields: dict[str, Any] = {"k": "f", "u": user, "h": bytes(frames[0])}
        if len(frames) > 1:
            fields["p"] = bytes(frames[1])
        self.pipe.xadd(self.keys.inbox(broker.hex()), fields, maxlen=INBOX_MAXLEN, approximate=True)

    def kick(self, broker: bytes, conn: bytes, user: str) -> None:
        self.pipe.xadd(self.keys.inbox(broker.hex()), {"k": "k", "u": user, "c": conn},
                       maxlen=INBOX_MAXLEN, approximate=True)

    def flush_soon(self) -> None:
        """Run what is queued now; a failure surfaces at the next ``flush`` (so nothing gets acked)."""
        if len(self.pipe) and self._pipe_failed is None:
            try:
                self.pipe.execute()
            except REDIS_ERRORS as exc:
                self._pipe_failed = exc
                self.pipe.reset()

    def flush(self) -> None:
        failed, self._pipe_failed = self._pipe_failed, None
        if failed is not None:
            self.pipe.reset()
            raise StoreUnavailable(f"redis: {failed}")
        if len(self.pipe):
            try:
                self.pipe.execute()
            except REDIS_ERRORS as exc:
                self.pipe.reset()
                raise StoreUnavailable(f"redis: {exc}") from exc

    def discard(self) -> None:
        self.pipe.reset()
        self._pipe_failed = None

    # --- liveness -------------------------------------------------------------
    def refresh(self) -> bool:
        """Renew this broker's liveness key; True if it had lapsed (others may have reaped us)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.alive(self.me), 1, px=self.ttl_ms, get=True)
        pipe.sadd(self.keys.brokers, self.me)
        previous, _ = pipe.execute()
        return previous is None

    def drop_inboxes(self, brokers: list[str]) -> None:
        if brokers:
            self.redis.delete(*(self.keys.inbox(b) for b in brokers))

    # --- the reader thread ------------------------------------------------------
    def start_reader(self, presence_pos: str) -> None:
        self._reader = threading.Thread(target=self._read, args=(presence_pos,), name="cluster-reader", daemon=True)
        self._reader.start()

    def _read(self, presence_pos: str) -> None:
        r = connect(self.url, reader=True)
        positions = {self.inbox: "$", self.keys.presence: presence_pos}
        try:
            positions[self.inbox] = self._last_id(r, self.inbox)
        except REDIS_ERRORS:
            pass
        backoff = 0.05
        while not self._stop.is_set():
            try:
                reply = r.xread(positions, count=1000, block=READ_BLOCK_MS)
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
                if kind == "inbox":
                    try:
                        r.xtrim(self.inbox, minid=items[-1][0])
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
