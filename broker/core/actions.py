"""What the routing core asks its shell to do, and the broker's own frames.

Actions are frozen slotted dataclasses; the shell carries them out in order. Frames the broker
writes itself (answers, acknowledgements, presence) are packed here, with ids from the shell's id
source and timestamps from the shell's wall clock: the core draws no randomness and reads no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from p2pchat.broker.core.ports import Frames
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Error, Message, pack

MAX_ERROR_TEXT = 1024  # characters of an error's human message


@dataclass(frozen=True, slots=True)
class Send:
    conn: bytes
    frames: Frames
    queued_for: str | None = None  # a store-and-forward delivery, its queue: report a failed send (on_delivery_failed)


@dataclass(frozen=True, slots=True)
class Relay:
    """Forward ``frames`` to ``conn``; then send ``on_success`` or ``on_failure()`` to ``sender``."""

    conn: bytes
    frames: Frames
    sender: bytes
    on_success: Frames | None
    on_failure: Callable[[], Frames]  # built only when needed: the common case never pays for it


@dataclass(frozen=True, slots=True)
class Publish:
    frames: Frames


Action = Send | Relay | Publish


class FrameMaker:
    """Packs the broker's own messages: a fresh id from ``new_id``, the time from ``wall_ms``."""

    __slots__ = ("_new_id", "_wall_ms")

    def __init__(self, new_id: Callable[[], bytes], wall_ms: Callable[[], int]) -> None:
        self._new_id, self._wall_ms = new_id, wall_ms

    def make(self, message: Message) -> list[bytes]:
        return pack(message, self._wall_ms(), self._new_id())

    def error(self, code: ErrorCode, text: str, ref: bytes | None) -> list[bytes]:
        return self.make(Error(code, text[:MAX_ERROR_TEXT], ref))
