"""Frames a connection's pipe could not take yet: held in order, bounded in frames and bytes.

The ROUTER's send high-water mark is kept low (it counts messages, not bytes), so one batch of
answers to a busy client can overflow it before libzmq's I/O thread has drained the pipe. Dropping
those answers would cost a reading client its acks; holding them without limit would let a client
that never reads pin broker memory. So they wait here, per connection, up to a budget; past the
budget (a client that does not read) they are dropped and the shell says so, aggregated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Frames = Sequence[Any]  # bytes or zmq.Frame


@dataclass(frozen=True, slots=True)
class BacklogLimits:
    frames_per_conn: int = 4_000
    bytes_per_conn: int = 8 * 1024 * 1024
    bytes_total: int = 256 * 1024 * 1024


class SendBacklog:
    def __init__(self, limits: BacklogLimits = BacklogLimits()) -> None:
        self.limits = limits
        self._held: dict[bytes, deque[Frames]] = {}
        self._bytes: dict[bytes, int] = {}
        self.total = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def holds(self, conn: bytes) -> bool:
        return conn in self._held

    def hold(self, conn: bytes, frames: Frames) -> bool:
        """Keep ``frames`` for ``conn`` behind what it holds already; False if over budget (dropped)."""
        size = sum(len(f) for f in frames)
        held = self._bytes.get(conn, 0)
        queue = self._held.get(conn)
        lim = self.limits
        if ((queue is not None and len(queue) >= lim.frames_per_conn) or held + size > lim.bytes_per_conn
                or self.total + size > lim.bytes_total):
            return False
        if queue is None:
            queue = self._held[conn] = deque()
        queue.append(frames)
        self._bytes[conn] = held + size
        self.total += size
        return True

    def flush(self, send: Callable[[bytes, Frames], bool | None]) -> None:
        """Send held frames in order while each connection takes them. ``send`` returns True (sent),
        False (the pipe is full: try later) or None (the connection is gone: forget its frames)."""
        for conn in list(self._held):
            queue = self._held[conn]
            while queue:
                sent = send(conn, queue[0])
                if sent is False:
                    break
                frames = queue.popleft()
                size = sum(len(f) for f in frames)
                self._bytes[conn] -= size
                self.total -= size
                if sent is None:
                    self.forget(conn)
                    break
            if not queue:
                self.forget(conn)

    def forget(self, conn: bytes) -> None:
        self._held.pop(conn, None)
        self.total -= self._bytes.pop(conn, 0)
