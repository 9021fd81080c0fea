"""What the chat window shows, as plain data: conversations, presence, unread counts, link state.

No Tk here. The window feeds client events and user actions in and renders what
this model says, so the rules (who is unread, what a delivery state means, when
to notify) are tested without a display.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from dataclasses import dataclass, field

from common.errors import ErrorCode, P2PChatError

LOG_LINES = 500  # the connection log is a view, not an archive


class Link(enum.Enum):
    """The window's view of the connection (the session's states plus "never started")."""

    OFFLINE = "offline"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"


class Delivery(enum.Enum):
    SENDING = "sending"
    SENT = "sent"  # acknowledged by the broker
    FAILED = "failed"
    RECEIVED = "received"


@dataclass(slots=True)
class ChatLine:
    msg_id: bytes
    peer: str  # the other side of the conversation
    outgoing: bool
    text: str
    ts_ms: int
    delivery: Delivery
    failure: str = ""


@dataclass(slots=True)
class Conversation:
    peer: str
    lines: list[ChatLine] = field(default_factory=list)
    unread: int = 0


@dataclass(frozen=True, slots=True)
class PeerRow:
    name: str
    online: bool
    unread: int


def describe_failure(error: P2PChatError) -> str:
    """A delivery failure in the words a chat user expects."""
    friendly = {
        ErrorCode.RECIPIENT_OFFLINE: "recipient is offline",
        ErrorCode.UNKNOWN_RECIPIENT: "no such user on this broker",
        ErrorCode.TIMEOUT: "no answer from the broker",
        ErrorCode.CLOSED: "disconnected before delivery",
        ErrorCode.TOO_LARGE: "message too large",
        ErrorCode.RECIPIENT_BUSY: "recipient is busy, try again",
    }
    return friendly.get(error.code, error.message)


class ChatModel:
    def __init__(self, user: str) -> None:
        self.user = user
        self.link = Link.OFFLINE
        self.online: frozenset[str] = frozenset()
        self.active: str | None = None
        self.log: deque[tuple[int, str]] = deque(maxlen=LOG_LINES)
        self._conversations: dict[str, Conversation] = {}
        self._by_id: dict[bytes, ChatLine] = {}

    # --- presence -------------------------------------------------------------
    def set_online(self, peers: frozenset[str]) -> None:
        self.online = peers - {self.user}

    def roster(self) -> list[PeerRow]:
        """Online peers first, then people we talked to who have left; each group by name."""
        names = set(self.online) | {c.peer for c in self._conversations.values() if c.lines}
        rows = [PeerRow(n, n in self.online, self.conversation(n).unread) for n in names]
        return sorted(rows, key=lambda r: (not r.online, r.name.lower()))

    # --- conversations --------------------------------------------------------
    def conversation(self, peer: str) -> Conversation:
        if peer not in self._conversations:
            self._conversations[peer] = Conversation(peer)
        return self._conversations[peer]

    def open(self, peer: str) -> Conversation:
        self.active = peer
        conv = self.conversation(peer)
        conv.unread = 0
        return conv

    def receive(self, msg_id: bytes, sender: str, text: str, ts_ms: int) -> ChatLine:
        line = ChatLine(msg_id, sender, False, text, ts_ms, Delivery.RECEIVED)
        conv = self.conversation(sender)
        conv.lines.append(line)
        if sender != self.active:
            conv.unread += 1
        self._by_id[msg_id] = line
        return line

    def sending(self, msg_id: bytes, peer: str, text: str, ts_ms: int) -> ChatLine:
        line = ChatLine(msg_id, peer, True, text, ts_ms, Delivery.SENDING)
        self.conversation(peer).lines.append(line)
        self._by_id[msg_id] = line
        return line

    def refused(self, peer: str, text: str, ts_ms: int, reason: str) -> ChatLine:
        """A message the client library refused before it reached the wire."""
        line = self.sending(os.urandom(8), peer, text, ts_ms)
        line.delivery, line.failure = Delivery.FAILED, reason
        return line

    def acked(self, msg_id: bytes) -> ChatLine | None:
        line = self._by_id.get(msg_id)
        if line is None or line.delivery is not Delivery.SENDING:
            return None
        line.delivery = Delivery.SENT
        return line

    def failed(self, msg_id: bytes, reason: str) -> ChatLine | None:
        line = self._by_id.get(msg_id)
        if line is None or line.delivery is not Delivery.SENDING:
            return None
        line.delivery, line.failure = Delivery.FAILED, reason
        return line

    def pending(self) -> list[ChatLine]:
        return [line for line in self._by_id.values() if line.delivery is Delivery.SENDING]

    def add_log(self, ts_ms: int, text: str) -> None:
        self.log.append((ts_ms, text))


def should_notify(enabled: bool, window_focused: bool, active_peer: str | None, sender: str) -> bool:
    """Pop a notification unless the user is already looking at this conversation."""
    return enabled and (not window_focused or active_peer != sender)
