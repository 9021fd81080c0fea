"""Redis outages in cluster mode: short timeouts, then fail fast until a probe finds Redis back.

Every call a broker makes from its loop has a short timeout; after one failure (unreachable, timed
out, or an error reply such as OOM) Redis is *down* for ``RedisHealth`` and every call fails at once
instead of paying a timeout, until a probe at a doubling interval succeeds. Meanwhile the broker
serves its own clients; the link's upkeep (redis_link.py) reconciles presence on recovery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from p2pchat.broker.core.ports import StoreUnavailable

log = logging.getLogger(__name__)

REDIS_ERRORS = redis.RedisError  # unreachable, timed out, loading, read-only, OOM (maxmemory), ...
# The errors that mean Redis cannot serve us now (others answer one request; redis-py handles some itself).
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError, redis.ReadOnlyError,
           redis.exceptions.MasterDownError)
TIMEOUT_MIN, TIMEOUT_MAX = 0.25, 1.0  # per call: half a heartbeat, within these bounds
RETRY_MIN, RETRY_MAX = 0.25, 4.0  # seconds between probes while Redis is down, doubling
READ_BLOCK_MS = 250  # the link's reader thread's XREAD timeout: bounds how long closing waits for it


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """Any Redis failure, as the one exception the broker core knows: the shared store is unavailable."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


class RedisHealth:
    """A circuit breaker in front of Redis, used only by the broker loop's thread.

    After a failure Redis is *down*: every call fails at once until a probe (``probing``) at a
    doubling interval succeeds and the upkeep, having reconciled, calls ``recovered``.
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
