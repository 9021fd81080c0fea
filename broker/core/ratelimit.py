"""Per-connection abuse limits: token buckets for frames and bytes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RateLimits:
    frames_per_s: float = 10_000.0
    frame_burst: float = 20_000.0
    bytes_per_s: float = 1024 * 1024 * 1024.0  # file chunks: a fast LAN transfer must fit
    byte_burst: float = 64 * 1024 * 1024.0


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, amount: float, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class ConnectionLimiter:
    """A frame bucket and a byte bucket per connection."""

    __slots__ = ("frames", "bytes", "refused")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.frames = TokenBucket(limits.frames_per_s, limits.frame_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_s, limits.byte_burst, now)
        self.refused = 0  # frames refused since the last one let through (to throttle our replies)

    def allow(self, size: int, now: float) -> bool:
        ok = self.frames.take(1, now) and self.bytes.take(size, now)
        self.refused = 0 if ok else self.refused + 1
        return ok


class AggregatedLog:
    """Per-connection incidents (``what``: bad frames, dropped frames), logged aggregated: a connection's
    first one at once, then one line per interval with a count.

    A flood must not become a flood of log lines. At most ``max_conns`` connections are tracked; past
    that the rest are only counted, in one line per interval.
    """

    def __init__(self, what: str, interval: float = 10.0, max_conns: int = 10_000) -> None:
        self.what, self.interval, self.max_conns = what, interval, max_conns
        self._seen: dict[bytes, list] = {}  # conn -> [logged at, frames since, user, last reason]
        self._untracked = 0
        self._next_flush = 0.0

    def record(self, conn: bytes, user: str | None, reason: str, now: float) -> None:
        entry = self._seen.get(conn)
        if entry is not None:
            entry[1] += 1
            entry[3] = reason
        elif len(self._seen) < self.max_conns:
            self._seen[conn] = [now, 0, user, reason]
            log.warning("conn=%s user=%s %s: %s (more are counted, logged every %.0fs)",
                        conn.hex(), user, self.what, reason, self.interval)
        else:
            self._untracked += 1

    def flush(self, now: float) -> None:
        if now < self._next_flush:
            return
        self._next_flush = now + 1.0
        done = []
        for conn, entry in self._seen.items():
            if now - entry[0] < self.interval:
                continue
            if entry[1]:
                log.warning("conn=%s user=%s %d more (%s) in %.0fs, the last: %s", conn.hex(), entry[2],
                            entry[1], self.what, now - entry[0], entry[3])
                entry[0], entry[1] = now, 0
            else:
                done.append(conn)
        for conn in done:
            del self._seen[conn]
        if self._untracked:
            log.warning("%d more (%s) on connections past the %d tracked", self._untracked, self.what, self.max_conns)
            self._untracked = 0
