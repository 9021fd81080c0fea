"""The cluster's link slots (broker/core/pake_slots.py has the rules), shared in Redis: the two devices of a link
may reach different brokers behind one address.

A slot is the hash ``{p2p}:pake:<n>`` (fields ``A0``..``B3`` and ``closed``) that Redis expires ``ttl`` after
the opening. Two sorted sets find the smallest free number: ``{p2p}:pake_num`` holds the numbers taken (score
the number: a binary search over ranks finds the first gap) and ``{p2p}:pake_exp`` the same numbers by expiry
(Redis's clock, so every broker agrees), from which each opening first removes the expired ones.
"""

from __future__ import annotations

import redis

from p2pchat.broker.backends.redis_health import unavailable_on_error
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.core.pake_slots import MAX_SLOTS, SLOT_TTL, SlotVerdict

# KEYS: pake_num, pake_exp; ARGV: ttl_ms, max_slots, the slot hashes' prefix. {slot} or {-5} (full).
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('ZREM', KEYS[2], gone)
end
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[2]) then return {-5} end
local lo, hi = 0, count  -- the first rank whose number is not rank + 1 (numbers are unique, from 1)
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  if tonumber(redis.call('ZRANGE', KEYS[1], mid, mid)[1]) == mid + 1 then lo = mid + 1 else hi = mid end
end
local slot = lo + 1
redis.call('ZADD', KEYS[1], slot, slot)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), slot)
local hash = ARGV[3] .. slot
redis.call('DEL', hash)
redis.call('HSET', hash, 'open', 1)
redis.call('PEXPIRE', hash, ARGV[1])
return {slot}
"""
# The state of slot KEYS[1] for a put or get: 1 no such slot, 2 closed, else nil.
_LIVE = """
local function refused()
  if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
  if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 2 end
end
"""
# ARGV: side, n, data. 0 posted (or a repeat), else a SlotVerdict.
_PUT = _LIVE + """
local why = refused()
if why then return why end
local n = tonumber(ARGV[2])
local posted = redis.call('HGET', KEYS[1], ARGV[1] .. n)
if posted then if posted == ARGV[3] then return 0 else return 3 end end
if n > 0 and redis.call('HEXISTS', KEYS[1], ARGV[1] .. (n - 1)) == 0 then return 4 end
redis.call('HSET', KEYS[1], ARGV[1] .. n, ARGV[3])
return 0
"""
# ARGV: side, n. {0, data} posted, {0} not yet, {verdict} refused.
_GET = _LIVE + """
local why = refused()
if why then return {why} end
local posted = redis.call('HGET', KEYS[1], ARGV[1] .. ARGV[2])
if posted then return {0, posted} end
return {0}
"""
# A closed slot keeps only its mark, until it expires.
_CLOSE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'closed', 1)
  redis.call('PEXPIRE', KEYS[1], ttl)
end
"""


class RedisPakeSlots:
    """The slot table every broker of a cluster shares (``now`` is not used: Redis's clock decides expiry)."""

    def __init__(self, r: redis.Redis, keys: RedisKeys, ttl: float = SLOT_TTL, max_slots: int = MAX_SLOTS) -> None:
        self.ttl, self.max_slots, self._keys = ttl, max_slots, keys
        self._open, self._put, self._get, self._close = (r.register_script(s) for s in (_OPEN, _PUT, _GET, _CLOSE))

    def open(self, now: float) -> int:
        with unavailable_on_error():
            [slot] = self._open(keys=[self._keys.pake_num, self._keys.pake_exp],
                                args=[int(self.ttl * 1000), self.max_slots, self._keys.pake_prefix])
        if slot < 0:
            raise SlotVerdict(-slot).refusal(0)
        return int(slot)

    def put(self, slot: int, side: str, n: int, data: bytes, now: float) -> None:
        with unavailable_on_error():
            verdict = int(self._put(keys=[self._keys.pake_slot(slot)], args=[side, n, data]))
        if verdict:
            raise SlotVerdict(verdict).refusal(slot, side, n)

    def get(self, slot: int, side: str, n: int, now: float) -> bytes | None:
        with unavailable_on_error():
            answer = self._get(keys=[self._keys.pake_slot(slot)], args=[side, n])
        if answer[0]:
            raise SlotVerdict(answer[0]).refusal(slot, side, n)
        return answer[1] if len(answer) > 1 else None

    def close(self, slot: int, now: float) -> None:
        with unavailable_on_error():
            self._close(keys=[self._keys.pake_slot(slot)])
