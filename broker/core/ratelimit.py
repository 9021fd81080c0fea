"""Per-connection abuse limits: token buckets for frames and bytes."""

from __future__ import annotations

from dataclasses import dataclass


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

    __slots__ = ("frames", "bytes")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.frames = TokenBucket(limits.frames_per_s, limits.frame_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_s, limits.byte_burst, now)

    def allow(self, size: int, now: float) -> bool:
        return self.frames.take(1, now) and self.bytes.take(size, now)
