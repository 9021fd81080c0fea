"""What the chat window shows, as plain data: conversations, file transfers, presence, unread counts, keys.

No Tk here; files are file_model.py's. The window feeds client events, history and user actions in and
renders what this model says, so the rules (who is unread, what a delivery or
transfer state means, how history merges with what arrived meanwhile, when to
notify, whose key is in doubt) are tested without a display.
"""

from __future__ import annotations

import enum
import heapq
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from p2pchat.client.gui.delivery import FROM_HISTORY, RECEIPTS, SEND_STATES, UNSENT, Delivery, can_move
from p2pchat.client.gui.file_model import FileLine, FileTimeline
from p2pchat.client.gui.found import Search
from p2pchat.client.gui.room_model import NoticeLine, RoomBook
from p2pchat.client.storage.history import HistoryEntry
from p2pchat.common.errors import ErrorCode, P2PChatError

LOG_LINES = 500  # the connection log is a view, not an archive


class Link(enum.Enum):
    """The window's view of the connection (the session's states plus "never started")."""

    OFFLINE = "offline"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"


HISTORY_LIMIT = 200  # messages per conversation loaded at connect; search reaches the older ones
Key = str | bytes  # a conversation's: the peer's name, or the room's id (as History's unread counts)


@dataclass(slots=True)
class ChatLine:
    msg_id: bytes
    peer: str  # the other side of the conversation; in a room, the author (ourselves for ours)
    outgoing: bool
    text: str
    ts_ms: int
    delivery: Delivery
    failure: str = ""
    resealed: bool = False  # sealed again after the recipient could not open it: a second refusal fails it
    room: bytes | None = None

    @property
    def key(self) -> Key:
        return self.peer if self.room is None else self.room


Line = ChatLine | FileLine | NoticeLine


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A peer presents a key other than the pinned one: fingerprints as the user compares them."""

    old: str
    new: str
    new_key: bytes = b""  # for the safety number the user checks before accepting
    how: str | None = None  # what the broker said happened ("recovered", "moved"), if it said


@dataclass(slots=True)
class Conversation:
    peer: Key
    lines: list[Line] = field(default_factory=list)
    unread: int = 0


@dataclass(frozen=True, slots=True)
class PeerRow:
    name: str
    online: bool
    unread: int
    key_changed: bool = False


def describe_failure(error: P2PChatError) -> str:
    """A delivery failure in the words a chat user expects."""
    friendly = {
        ErrorCode.RECIPIENT_OFFLINE: "recipient is offline",
        ErrorCode.UNKNOWN_RECIPIENT: "no such user on this broker",
        ErrorCode.TIMEOUT: "no answer from the broker",
        ErrorCode.CLOSED: "disconnected before delivery",
        ErrorCode.TOO_LARGE: "message too large",
        ErrorCode.RECIPIENT_BUSY: "recipient is busy, try again",
        ErrorCode.PEER_KEY_CHANGED: "their key changed; accept the new key first",
    }
    return friendly.get(error.code, error.message)


class ChatModel(FileTimeline):
    def __init__(self, user: str) -> None:
        self.user = user
        self.link = Link.OFFLINE
        self.online: frozenset[str] = frozenset()
        self.active: Key | None = None
        self.search: Search | None = None  # results shown instead of the open conversation
        self.log: deque[tuple[int, str]] = deque(maxlen=LOG_LINES)
        self.key_changed: dict[str, KeyChange] = {}  # peers whose new key awaits the user's decision
        self.key_notices: dict[str, KeyChange] = {}  # new keys accepted automatically, until the user has seen them
        self.rooms = RoomBook(user)  # their messages are conversations here, keyed by the room's id
        self._conversations: dict[str, Conversation] = {}
        self._by_id: dict[bytes, ChatLine] = {}
        self._files: dict[bytes, FileLine] = {}

    # --- presence -------------------------------------------------------------
    def set_online(self, peers: frozenset[str]) -> None:
        self.online = peers - {self.user}

    def roster(self) -> list[PeerRow]:
        """Online peers first, then people we have talked to (in this run or an earlier one); each group by name."""
        names = set(self.online) | {c.peer for c in self._conversations.values() if c.lines and type(c.peer) is str}
        names |= set(self.key_changed)
        rows = [PeerRow(n, n in self.online, self.conversation(n).unread, n in self.key_changed) for n in names]
        return sorted(rows, key=lambda r: (not r.online, r.name.lower()))

    # --- conversations --------------------------------------------------------
    def conversation(self, peer: Key) -> Conversation:
        if peer not in self._conversations:
            self._conversations[peer] = Conversation(peer)
        return self._conversations[peer]

    def open(self, peer: Key) -> Conversation:
        self.active = peer
        self.search = None
        conv = self.conversation(peer)
        conv.unread = 0
        return conv

    def load(self, peer: Key, entries: Iterable[HistoryEntry]) -> Conversation:
        """Merge ``peer``'s (or a room's) history (oldest first) into what this run already shows.

        Safe to repeat and to race with events: a message already shown keeps its
        line and only moves its delivery state forward; lines history does not keep
        (files, messages refused before sending) stay where their time puts them.
        """
        conv = self.conversation(peer)
        loaded: list[Line] = []
        for entry in entries:
            line = self._by_id.get(entry.msg_id)
            state = FROM_HISTORY.get(entry.state, Delivery.SENT if entry.outgoing else Delivery.RECEIVED)
            if line is None:
                line = ChatLine(entry.msg_id, entry.peer, entry.outgoing, entry.text, entry.ts, state,
                                resealed=state is Delivery.RESEALED, room=entry.room)
                self._by_id[entry.msg_id] = line
                if not entry.outgoing and state is Delivery.RECEIVED and peer != self.active:
                    conv.unread += 1
            else:
                _advance(line, state)
            loaded.append(line)
        ids = {id(line) for line in loaded}
        rest = [line for line in conv.lines if id(line) not in ids]
        conv.lines = list(heapq.merge(loaded, rest, key=lambda line: line.ts_ms))
        return conv

    def receive(self, msg_id: bytes, sender: str, text: str, ts_ms: int, room: bytes | None = None) -> ChatLine | None:
        """The new line (in ``room``'s conversation if sent there), or None if already shown (history loaded it)."""
        if msg_id in self._by_id:
            return None
        line = ChatLine(msg_id, sender, False, text, ts_ms, Delivery.RECEIVED, room=room)
        conv = self.conversation(line.key)
        conv.lines.append(line)
        if line.key != self.active:
            conv.unread += 1
        self._by_id[msg_id] = line
        return line

    def echoed(self, msg_id: bytes, peer: str, text: str, ts_ms: int, room: bytes | None = None) -> ChatLine | None:
        """What another device of ours sent ``peer``: our own outgoing line, with the broker already holding it
        (receipts move it on); None if already shown (history loaded it first)."""
        if msg_id in self._by_id:
            return None
        line = ChatLine(msg_id, peer, True, text, ts_ms, Delivery.SENT, room=room)
        conv = self.conversation(line.key)
        conv.lines.append(line)
        conv.lines.sort(key=lambda item: item.ts_ms)  # it may have been written before what we see last
        self._by_id[msg_id] = line
        return line

    def read_elsewhere(self, msg_id: bytes) -> Conversation | None:
        """Another device of ours showed message ``msg_id``: read here too. Its conversation if that changed its
        unread count (no longer counted once nothing in it is unread)."""
        line = self._by_id.get(msg_id)
        if line is None or line.outgoing or not _advance(line, Delivery.READ):
            return None
        conv = self.conversation(line.key)
        before = conv.unread
        conv.unread = max(0, conv.unread - 1) if self.has_unread(line.key) else 0
        return conv if conv.unread != before else None

    def mark_read(self, peer: Key) -> bool:
        """The user has seen ``peer``'s conversation; True if that is news (something was unread)."""
        news = False
        for line in self.conversation(peer).lines:
            if isinstance(line, ChatLine) and line.delivery is Delivery.RECEIVED:
                line.delivery, news = Delivery.READ, True
        return news

    def has_unread(self, peer: Key | None) -> bool:
        """Whether ``peer`` sent anything the user has not seen (read receipts to send)."""
        return peer is not None and any(isinstance(line, ChatLine) and line.delivery is Delivery.RECEIVED
                                        for line in self.conversation(peer).lines)

    def line(self, msg_id: bytes) -> ChatLine | None:
        return self._by_id.get(msg_id)

    def sending(self, msg_id: bytes, peer: str, text: str, ts_ms: int, room: bytes | None = None) -> ChatLine:
        line = ChatLine(msg_id, peer, True, text, ts_ms, Delivery.SENDING, room=room)
        self.conversation(line.key).lines.append(line)
        self._by_id[msg_id] = line
        return line

    def refused(self, peer: str, text: str, ts_ms: int, reason: str, room: bytes | None = None) -> ChatLine:
        """A message the client library refused before it reached the wire."""
        line = self.sending(os.urandom(8), peer, text, ts_ms, room)
        line.delivery, line.failure = Delivery.FAILED, reason
        return line

    def acked(self, msg_id: bytes) -> ChatLine | None:
        """The broker has the message; the line if that changed what it shows."""
        return self._advance(msg_id, Delivery.SENT)

    def receipt(self, msg_id: bytes, status: str) -> ChatLine | None:
        """The recipient's client reports ``status`` ("delivered" or "read"); the line if it changed."""
        state = RECEIPTS.get(status)
        return self._advance(msg_id, state) if state is not None else None

    def failed(self, msg_id: bytes, reason: str) -> ChatLine | None:
        """Sending failed (before the broker had it; after that, only the recipient can refuse it)."""
        line = self._by_id.get(msg_id)
        if line is None or line.delivery not in UNSENT:
            return None
        line.delivery, line.failure = Delivery.FAILED, reason
        return line

    def send_state(self, msg_id: bytes, state: str) -> ChatLine | None:
        """The library's ``SendState``: held for a key decision, refused by the recipient, resealed, or refused
        again (failed); the line if that changed what it shows."""
        line = self._advance(msg_id, SEND_STATES[state])
        if line is not None and line.delivery is Delivery.FAILED:
            line.failure = f"{line.peer} still couldn't open it"
        return line

    def waiting_to_send(self, peer: str) -> int:
        """Our messages to ``peer`` that go only once the user accepts their new key."""
        return sum(1 for line in self.conversation(peer).lines if isinstance(line, ChatLine) and line.outgoing
                   and line.delivery in (Delivery.HELD, Delivery.UNDECRYPTABLE))

    def _advance(self, msg_id: bytes, state: Delivery) -> ChatLine | None:
        line = self._by_id.get(msg_id)
        return line if line is not None and line.outgoing and _advance(line, state) else None

    # --- keys -------------------------------------------------------------------
    def peer_key_changed(self, peer: str, change: KeyChange) -> bool:
        """``peer``'s new key waits for the user; True if this is news (the library reports a change again on
        each message it holds)."""
        news = self.key_changed.get(peer) != change
        self.key_changed[peer] = change
        self.key_notices.pop(peer, None)
        return news

    def hold_unsent(self, peer: str) -> list[ChatLine]:
        """Our messages to ``peer`` not sent yet wait for their new key too (the outbox of an earlier run, or
        one written just before the change was known): the lines that now say so."""
        held = [line for line in self.conversation(peer).lines
                if isinstance(line, ChatLine) and line.outgoing and line.delivery is Delivery.SENDING]
        for line in held:
            line.delivery = Delivery.HELD
        return held

    def peer_key_accepted(self, peer: str) -> list[ChatLine]:
        """The user accepted ``peer``'s new key: what waited for it is being sent (the lines that changed)."""
        self.key_changed.pop(peer, None)
        sending = [line for line in self.conversation(peer).lines
                   if isinstance(line, ChatLine) and line.delivery is Delivery.HELD]
        for line in sending:
            line.delivery = Delivery.SENDING
        return sending

    def peer_key_auto_accepted(self, peer: str, change: KeyChange) -> bool:
        """The library accepted ``peer``'s new key by itself (the user's setting): a notice to show, no decision
        to wait for. True if this is news."""
        news = self.key_notices.get(peer) != change
        self.key_notices[peer] = change
        self.key_changed.pop(peer, None)
        return news

    def dismiss_key_notice(self, peer: str) -> None:
        self.key_notices.pop(peer, None)

    def add_log(self, ts_ms: int, text: str) -> None:
        self.log.append((ts_ms, text))


def _advance(line: ChatLine, state: Delivery) -> bool:
    """Move ``line`` to ``state`` if that is a move (events and history may report states late or twice)."""
    if not can_move(line.delivery, state, line.resealed):
        return False
    line.delivery = state
    line.resealed |= state is Delivery.RESEALED
    return True


def should_notify(enabled: bool, window_focused: bool, active_peer: Key | None, sender: Key) -> bool:
    """Pop a notification unless the user is already looking at this conversation."""
    return enabled and (not window_focused or active_peer != sender)
