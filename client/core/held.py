"""Messages that opened under a sender's new key, kept until the user accepts that key (or, with a larger
bound, bodies from a device not yet in its sender's list, kept until the list is fetched).

The broker keeps them queued too (they are not consumed), but it pages a queue only once per
session: without this, a message would show only after the next reconnect. Bounded: past the
bound the oldest are forgotten here and come back with the next session's pages.
"""

from __future__ import annotations

from collections import OrderedDict

from p2pchat.common.protocol import ChatMessage

MAX_HELD = 1000  # messages kept over every sender
MAX_HELD_PER_SENDER = 200


class HeldMessages:
    __slots__ = ("_messages", "_count", "_max", "_max_per_sender")

    def __init__(self, max_held: int = MAX_HELD, max_per_sender: int = MAX_HELD_PER_SENDER) -> None:
        self._messages: OrderedDict[bytes, tuple[ChatMessage, int]] = OrderedDict()  # id -> (message, ts)
        self._count: dict[str, int] = {}
        self._max, self._max_per_sender = max_held, max_per_sender

    def add(self, msg_id: bytes, msg: ChatMessage, ts: int) -> None:
        if msg_id in self._messages or self._count.get(msg.sender, 0) >= self._max_per_sender:
            return
        self._messages[msg_id] = (msg, ts)
        self._count[msg.sender] = self._count.get(msg.sender, 0) + 1
        if len(self._messages) > self._max:
            _, (oldest, _) = self._messages.popitem(last=False)
            self._uncount(oldest.sender)

    def count(self, sender: str) -> int:
        return self._count.get(sender, 0)

    def take(self, sender: str) -> list[tuple[bytes, ChatMessage, int]]:
        """``sender``'s held messages in the order they came, forgotten here."""
        taken = [(msg_id, msg, ts) for msg_id, (msg, ts) in self._messages.items() if msg.sender == sender]
        for msg_id, _, _ in taken:
            del self._messages[msg_id]
        self._count.pop(sender, None)
        return taken

    def pop(self, msg_id: bytes) -> tuple[ChatMessage, int] | None:
        """One held message, forgotten here; None if it is not held (taken, or pushed out by the bound)."""
        held = self._messages.pop(msg_id, None)
        if held is not None:
            self._uncount(held[0].sender)
        return held

    def _uncount(self, sender: str) -> None:
        left = self._count[sender] - 1
        if left:
            self._count[sender] = left
        else:
            del self._count[sender]
