"""The cluster's user ID -> key bindings (first key wins) and admission tickets, in Redis, and the
one CURVE key every broker behind the cluster's address presents."""

from __future__ import annotations

import logging
from pathlib import Path

import redis

from p2pchat.broker.backends.redis_health import REDIS_ERRORS, unavailable_on_error
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.backends.tickets import KeyLimits, TicketBook
from p2pchat.common.crypto import KEY_BYTES, Identity
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)


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
                self._r.set(self._keys.ticket(key), b"1", px=int(self.limits.ticket_ttl * 1000))
        return refused

    def admits(self, key: bytes, now: float) -> bool:
        if key in self._bound_keys or self._tickets.holds(key, now):
            return True
        try:
            if self._zap.hexists(self._ids, key):
                self._bound_keys.add(key)
                return True
            return bool(self._zap.exists(self._keys.ticket(key)))
        except redis.RedisError as exc:
            log.warning("admission check failed, key refused: %s", exc)
            return False

    def close(self) -> None:
        self._zap.close()
