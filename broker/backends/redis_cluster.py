"""Cluster mode: many brokers behind one address, sharing their state through Redis.

Each port of the routing core (broker/core/ports.py) has a Redis implementation here; the shell
wires ``ClusterBackend`` in instead of the single broker's (backends/single.py) and nothing else
changes. What is shared, and how (docs/SCALING.md has the numbers):

* ``RedisDirectory`` (redis_directory.py) - who is online on which broker, with one global presence
  stream that every broker replicates and republishes (the Clone pattern, broker side).
* ``RedisKeyRegistry`` (redis_keys.py) - user-ID-to-key bindings (first key wins) and tickets, and
  the one CURVE key all brokers present.
* ``RedisMessageStore`` (redis_store.py) - the durable offline queues, written in the batch's
  pipeline: one round trip per group commit.
* ``RedisLink`` (redis_link.py) - frames for other brokers' inboxes, this broker's liveness, and
  the upkeep after an outage; ``RedisHealth`` (redis_health.py) fails calls fast while Redis is down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from p2pchat.broker.backends.in_process import NoStore
from p2pchat.broker.backends.redis_directory import RedisDirectory
from p2pchat.broker.backends.redis_health import TIMEOUT_MAX, TIMEOUT_MIN, RedisHealth, connect
from p2pchat.broker.backends.redis_keys import RedisKeyRegistry, shared_broker_identity
from p2pchat.broker.backends.redis_link import RedisLink
from p2pchat.broker.backends.redis_pake import RedisPakeSlots
from p2pchat.broker.backends.redis_rooms import RedisRoomRegistry
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.backends.redis_store import RedisMessageStore
from p2pchat.broker.backends.tickets import KeyLimits
from p2pchat.broker.core.ports import QueueLimits

log = logging.getLogger(__name__)


class ClusterBackend:
    """The ports of one broker in a cluster, on one Redis (``url``: redis://HOST:PORT/DB)."""

    def __init__(self, url: str, broker_id: bytes, data_dir: Path, *, heartbeat_ivl: float, liveness: int,
                 wake: Callable[[], None], durable: bool = True, queue_limits: QueueLimits = QueueLimits(),
                 key_limits: KeyLimits = KeyLimits(), keys: RedisKeys = RedisKeys()) -> None:
        # Every Redis call is bounded by half a heartbeat (within 0.25-1 s), then fails fast while down.
        timeout = min(TIMEOUT_MAX, max(TIMEOUT_MIN, heartbeat_ivl / 2))
        self.health = RedisHealth()
        r = connect(url, timeout, health=self.health)
        self.directory = RedisDirectory(r, broker_id, keys, self.health, settle=heartbeat_ivl)
        self.link = RedisLink(r, url, self.directory, self.health, heartbeat_ivl=heartbeat_ivl, liveness=liveness,
                              wake=wake, keys=keys, timeout=timeout)
        self.identity = shared_broker_identity(r, keys, data_dir / "broker.key")
        self.keys = RedisKeyRegistry(r, keys, key_limits)
        self.rooms = RedisRoomRegistry(r, keys)
        self.pake_slots = RedisPakeSlots(r, keys)  # the two devices of a link may reach different brokers
        self._queues = RedisMessageStore(self.link, queue_limits) if durable else None
        self.store = self._queues or NoStore()
        self.description = f"cluster {url} as broker {broker_id.hex()} pid {os.getpid()}"

    def start(self) -> None:
        """Start reading from other brokers and the presence stream."""
        self.link.start()

    def commit(self) -> None:
        """The batch's queue writes and forwards, in one round trip; ``StoreUnavailable`` if Redis refused."""
        self.link.flush()

    def rollback(self) -> None:
        self.link.discard()
        if self._queues is not None:
            self._queues.forget_sizes()

    def close(self) -> None:
        self.keys.close()
        self.rooms.close()
        self.link.close()
