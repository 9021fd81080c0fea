"""Cluster mode's broker-to-broker link: inboxes, liveness, and the upkeep that keeps Redis whole.

* Cross-broker delivery: each broker reads its own inbox stream (Streams keep what a briefly
  disconnected reader missed; Pub/Sub would not), bounded in entries and in bytes. The link carries
  the frames the core built or received, as they are; it packs nothing.
* The batch pipeline: forwards, and the store's appends and consumes (redis_store.py), reach Redis
  in one round trip at the shell's group commit.
* One reader thread (owned here, joined in ``close``) blocks on XREAD over this broker's inbox and
  the presence stream; inbox entries come back through ``receive``, presence entries go to the
  directory's feed (redis_directory.py), and the broker loop is woken.
* Upkeep, from ``receive``: each heartbeat this broker renews its liveness key and reaps brokers whose
  key expired. After a Redis outage (``RedisHealth`` probes with backoff), or when others reaped
  this broker, the directory reconciles Redis with the sessions here and the core hears of it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from p2pchat.broker.backends.redis_directory import RedisDirectory
from p2pchat.broker.backends.redis_health import (
    READ_BLOCK_MS,
    REDIS_ERRORS,
    RedisHealth,
    connect,
    unavailable_on_error,
)
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.core.ports import Forwarded, Frames, Kicked, LinkEvent, Rejoined, StoreUnavailable
from p2pchat.common.incidents import IncidentLog

log = logging.getLogger(__name__)

# A broker's unread inbox: further forwards to a full one are dropped (durable frames still wait in
# their recipient's queue; chunks are asked for again by the transfer's credit/stall logic).
INBOX_MAXLEN = 10_000  # entries
INBOX_MAX_BYTES = 128 * 1024 * 1024  # header + payload bytes

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


class RedisLink:
    """The ``BrokerLink`` of cluster mode (see the module docstring)."""

    def __init__(self, r: redis.Redis, url: str, directory: RedisDirectory, health: RedisHealth, *,
                 heartbeat_ivl: float, liveness: int, wake: Callable[[], None], keys: RedisKeys,
                 timeout: float) -> None:
        self.redis, self.url, self.keys, self.health = r, url, keys, health
        self.directory = directory
        self.me = directory.me
        self.ttl_ms = max(1, int(heartbeat_ivl * liveness * 1000))
        self._heartbeat_ivl, self._timeout = heartbeat_ivl, timeout
        self.pipe = r.pipeline(transaction=False)
        self._pipe_failed: Exception | None = None
        self._forwards: list[tuple[int, bytes]] = []  # (position in the pipeline, broker) of each forward
        self._dropped = IncidentLog("frames for another broker dropped", log)
        self.inbox = keys.inbox(self.me)
        self._forward = r.register_script(_FORWARD)
        self._wake = wake
        self._arrived: queue.SimpleQueue[dict[bytes, bytes] | None] = queue.SimpleQueue()  # None: Redis is back
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._was_down = False
        self._next_refresh = 0.0
        self._refreshed_once = False
        try:
            self._refresh()
        except StoreUnavailable:
            pass  # started degraded (RedisHealth said so); the upkeep probes with backoff

    # --- BrokerLink -------------------------------------------------------------------------------
    def forward(self, broker: bytes, user: str, frames: Frames) -> None:
        header, payload = bytes(frames[0]), bytes(frames[1]) if len(frames) > 1 else None
        fields = ["k", "f", "u", user, "h", header] + (["p", payload] if payload is not None else [])
        self._add_to_inbox(broker, _entry_bytes(header, payload), fields)

    def kick(self, broker: bytes, conn: bytes, user: str) -> None:
        self._add_to_inbox(broker, 0, ["k", "k", "u", user, "c", conn])

    def receive(self, now: float) -> list[LinkEvent]:
        events: list[LinkEvent] = []
        arrived = self._arrived
        while not arrived.empty():
            fields = arrived.get_nowait()
            if fields is None:
                self.health.retry_now()  # the reader got through: probe at once
                continue
            user = fields[b"u"].decode()
            if fields[b"k"] == b"k":
                events.append(Kicked(fields[b"c"], user))
            else:
                events.append(Forwarded(user, [fields[b"h"], fields[b"p"]] if b"p" in fields else [fields[b"h"]]))
        self._dropped.flush(now)
        return events + self._upkeep(now)

    # --- the batch pipeline ------------------------------------------------------------------------
    def _add_to_inbox(self, broker: bytes, size: int, fields: list) -> None:
        if not self.health.available:  # unreachable now: durable frames wait in their queue, transfers ask again
            self._dropped.record(broker, f"broker={broker.hex()}", "redis is down", time.monotonic())
            return
        inbox = self.keys.inbox(broker.hex())
        self._forwards.append((len(self.pipe), broker))
        self._forward(keys=[inbox, inbox + ":bytes"], args=[size, INBOX_MAXLEN, INBOX_MAX_BYTES, *fields],
                      client=self.pipe)

    def _execute(self) -> None:
        forwards, self._forwards = self._forwards, []
        try:
            results = self.pipe.execute()
        except REDIS_ERRORS:
            self.pipe.reset()
            raise
        now = time.monotonic()
        for position, broker in forwards:
            if results[position] == 0:
                self._dropped.record(broker, f"broker={broker.hex()}", "its inbox is full; durable frames wait in "
                                     "their queues, file chunks are asked for again", now)

    def flush_soon(self) -> None:
        """Run what is queued now; a failure surfaces at the next ``flush`` (so nothing gets acked)."""
        if len(self.pipe) and self._pipe_failed is None:
            try:
                self._execute()
            except REDIS_ERRORS as exc:
                self._pipe_failed = exc

    def flush(self) -> None:
        """Commit the batch: raises ``StoreUnavailable`` (with the batch discarded) if Redis refused it."""
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

    # --- upkeep: liveness, reaping, reconciling after an outage -----------------------------------
    def _upkeep(self, now: float) -> list[LinkEvent]:
        health = self.health
        if health.available and now < self._next_refresh or not health.available and not health.due(now):
            return []
        self._next_refresh = now + self._heartbeat_ivl
        events: list[LinkEvent] = []
        kicks = []
        try:
            with health.probing():  # while down, only this probe gets through
                lapsed = self._refresh()
                if not health.available or lapsed and self._refreshed_once:  # Redis is back, or others reaped us
                    kicks, lost = self.directory.reconcile()
                    events = [Kicked(conn, user) for conn, user in lost] + [Rejoined()]
            if not health.available:
                log.info("redis is back after %.1fs: cluster mode whole again", health.recovered())
            self._refreshed_once = True
            for where, user in kicks:  # once Redis counts as available again, so they go out with the batch
                self.kick(where.broker, where.conn, user)
            self._drop_inboxes(self.directory.reap())
        except StoreUnavailable:
            pass  # RedisHealth logged it and schedules the next probe; local clients are still served
        except Exception:  # a bug must cost one round of upkeep, never the broker
            log.exception("cluster upkeep failed; retrying next beat")
        return events

    def _refresh(self) -> bool:
        """Renew this broker's liveness key; True if it had lapsed (others may have reaped us)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.alive(self.me), 1, px=self.ttl_ms, get=True)
        pipe.sadd(self.keys.brokers, self.me)
        with unavailable_on_error():
            previous, _ = pipe.execute()
        return previous is None

    def _drop_inboxes(self, brokers: list[str]) -> None:
        if brokers:
            with unavailable_on_error():
                self.redis.delete(*(self.keys.inbox(b) for b in brokers),
                                  *(self.keys.inbox(b) + ":bytes" for b in brokers))

    # --- the reader thread ------------------------------------------------------
    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="cluster-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        r = connect(self.url, self._timeout, reader=True)
        taken = r.register_script(_TAKEN)
        presence = self.keys.presence
        positions = {self.inbox: "$", presence: "$"}
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if positions[self.inbox] == "$":  # the end, as of the first contact: pin it down
                    positions[self.inbox] = self._last_id(r, self.inbox)
                if positions[presence] == "$":  # from the end of the replica's snapshot, once it has one
                    positions[presence] = self.directory.stream_pos
                reading = {name: pos for name, pos in positions.items() if pos != "$"}
                reply = r.xread(reading, count=1000, block=READ_BLOCK_MS)
                backoff = 0.05
            except REDIS_ERRORS as exc:
                if not self._was_down:
                    log.warning("redis unreachable (%s): retrying", exc)
                self._was_down = True
                self._wake()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            if self._was_down:
                self._was_down = False
                log.info("redis reachable again")
                self._arrived.put(None)
            for stream, items in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                to = self.directory.feed if name == presence else self._arrived
                for _, fields in items:
                    to.put(fields)
                positions[name] = items[-1][0]
                if name == self.inbox:  # taken: out of the inbox and its byte count
                    self._taken(taken, items)
            if reply:
                self._wake()
        r.close()

    def _taken(self, taken: Any, items: list) -> None:
        size = sum(_entry_bytes(f.get(b"h", b""), f.get(b"p")) for _, f in items if f[b"k"] == b"f")
        try:
            taken(keys=[self.inbox, self.inbox + ":bytes"], args=[_after(items[-1][0]), size])
        except REDIS_ERRORS:
            pass

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
