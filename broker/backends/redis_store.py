"""The cluster's store-and-forward queues in Redis: one hash + sorted set + meta hash per recipient.

Writes go into the link's pipeline (redis_link.py), so a batch's appends, consumes and forwards
reach Redis in one round trip at the shell's group commit.
"""

from __future__ import annotations

import struct
import time

from p2pchat.broker.backends.redis_health import REDIS_ERRORS, unavailable_on_error
from p2pchat.broker.backends.redis_link import RedisLink
from p2pchat.broker.core.ports import QueueLimits, Refusal, StoreUnavailable

COUNT_REFRESH = 2.0  # seconds a cached queue length is trusted for the queue bound

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


class RedisMessageStore:
    """The ``QueueStore`` of cluster mode, written through the batch pipeline (group commit).

    The per-user and per-sender bounds are checked against cached sizes (refreshed every few
    seconds), so brokers racing for one queue may overshoot them by a batch. Expired frames are
    dropped when read, and a queue untouched for its TTL disappears with its keys. The store-wide
    bounds (``max_total_bytes``, ``max_recipients``) are left to Redis's own ``maxmemory``.
    """

    durable = True

    def __init__(self, link: RedisLink, limits: QueueLimits = QueueLimits()) -> None:
        self._link, self._r, self._keys = link, link.redis, link.keys
        self.limits = limits
        self._append = self._r.register_script(_APPEND)
        self._pending = self._r.register_script(_PENDING)
        self._consume = self._r.register_script(_CONSUME)
        # (recipient, sender) -> [queue count, queue bytes, sender's count, sender's bytes, read at]
        self._sizes: dict[tuple[str, str], list[float]] = {}

    def _sizes_of(self, recipient: str, sender: str) -> list[float]:
        key = (recipient, sender)
        sizes = self._sizes.get(key)
        now = time.monotonic()
        if sizes is None or now - sizes[4] > COUNT_REFRESH:
            pipe = self._r.pipeline(transaction=False)
            pipe.hlen(self._keys.queue(recipient)[0])
            pipe.hmget(self._keys.queue_meta(recipient), "b", "c:" + sender, "b:" + sender)
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
        self._append(keys=[*self._keys.queue(recipient), self._keys.queue_meta(recipient)],
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
            return []  # Redis down: every session's queue is paged again once it is back (``Rejoined``)
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
        self._consume(keys=[h, z, self._keys.queue_meta(recipient)], args=[msg_id], client=self._link.pipe)

    def expire(self, now_ms: int) -> int:
        return 0  # lazily in pending(); abandoned queues expire with their keys

    def forget_sizes(self) -> None:
        """The batch was rolled back: the cached sizes counted its appends."""
        self._sizes.clear()
