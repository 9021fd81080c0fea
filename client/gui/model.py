"""What the chat window shows, as plain data: conversations, file transfers, presence, unread counts, keys.

No Tk here. The window feeds client events, history and user actions in and
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
from pathlib import Path

from p2pchat.client.gui.delivery import FROM_HISTORY, RECEIPTS, SEND_STATES, UNSENT, Delivery, can_move
from p2pchat.client.gui.found import Search
from p2pchat.client.gui.room_model import NoticeLine, RoomBook
from p2pchat.client.gui.units import human_eta, human_size
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


class Transfer(enum.Enum):
    """A file in the timeline. DONE, FAILED and CANCELLED are final: a late event changes nothing."""

    OFFERING = "offering"  # ours: waiting for the receiver to take it
    ACTIVE = "active"  # bytes moving, either way
    PAUSED = "paused"  # we disconnected: the library resumes it on the next connect
    DONE = "done"  # verified and saved by the receiver
    FAILED = "failed"
    CANCELLED = "cancelled"
    TAKEN = "taken"  # offered to all our devices; another of ours took it (no error: it is there)


FINAL = frozenset({Transfer.DONE, Transfer.FAILED, Transfer.CANCELLED, Transfer.TAKEN})


@dataclass(slots=True)
class FileLine:
    """A file message: one per transfer, in the conversation with the peer, whichever way it goes."""

    xfer: bytes
    peer: str
    outgoing: bool
    name: str
    size: int
    ts_ms: int
    state: Transfer
    done: int = 0  # bytes the receiver has verified
    rate: float = 0.0  # bytes/s
    eta: float | None = None  # seconds
    path: Path | None = None  # where a received file was saved
    failure: str = ""
    cancel_asked: bool = False  # we pressed Cancel: the CANCELLED that follows is ours, not the peer's

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @property
    def fraction(self) -> float:
        if self.state is Transfer.DONE:
            return 1.0
        return min(1.0, self.done / self.size) if self.size > 0 else 0.0


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


def describe_transfer_failure(error: P2PChatError, line: FileLine) -> str:
    """Why a transfer stopped, from this side's point of view."""
    if error.code is ErrorCode.CANCELLED:
        return "Cancelled" if line.cancel_asked else f"Cancelled by {line.peer}"
    friendly = {
        ErrorCode.RECIPIENT_OFFLINE: f"{line.peer} is offline",
        ErrorCode.UNKNOWN_RECIPIENT: f"{line.peer} is not on this broker",
        ErrorCode.PEER_KEY_CHANGED: f"{line.peer}'s key changed; accept the new key first",
        ErrorCode.CLOSED: "disconnected before it finished",
        ErrorCode.BROKER_UNREACHABLE: "the connection to the broker was lost",
        ErrorCode.SOURCE_CHANGED: error.message,
        ErrorCode.TAKEN: "taken by another of your devices",
    }
    return friendly.get(error.code, error.message)


def transfer_status(line: FileLine) -> str:
    """The one line under a file's name: direction, progress, rate and time left, or how it ended."""
    if line.state is Transfer.OFFERING:
        return f"Waiting for {line.peer} to accept…"
    if line.state is Transfer.ACTIVE:
        verb = "Sending" if line.outgoing else "Receiving"
        parts = [f"{verb} {round(line.fraction * 100)}%",
                 f"{human_size(line.done)} of {human_size(line.size)}"]
        if line.rate > 0:
            parts.append(f"{human_size(line.rate)}/s")
        if line.eta is not None and line.done < line.size:
            parts.append(human_eta(line.eta))
        return " · ".join(parts)
    if line.state is Transfer.PAUSED:
        return f"Paused at {round(line.fraction * 100)}% · resumes when you reconnect"
    if line.state is Transfer.DONE:
        if line.outgoing:
            return f"Sent ✓ · {line.peer} verified and saved it"
        return "Received ✓ · verified and saved"
    if line.state is Transfer.CANCELLED:
        return line.failure or "Cancelled"
    if line.state is Transfer.TAKEN:
        return "Taken by another of your devices"
    return f"Failed: {line.failure}" if line.failure else "Failed"


class ChatModel:
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

    # --- files ----------------------------------------------------------------
    def file_sending(self, xfer: bytes, peer: str, name: str, size: int, ts_ms: int) -> FileLine:
        line = FileLine(xfer, peer, True, name, size, ts_ms, Transfer.OFFERING)
        return self._add_file(line)

    def file_refused(self, peer: str, name: str, ts_ms: int, reason: str) -> FileLine:
        """A file the client library refused before offering it (unreadable, not a file, ...)."""
        line = FileLine(os.urandom(8), peer, True, name, 0, ts_ms, Transfer.FAILED, failure=reason)
        return self._add_file(line)

    def file_incoming(self, xfer: bytes, sender: str, name: str, size: int, ts_ms: int) -> tuple[FileLine, bool]:
        """(line, is_new): an offer repeated after a reconnect is the same file, not another unread one."""
        line = self._files.get(xfer)
        if line is not None:
            if line.state is Transfer.PAUSED:
                line.state = Transfer.ACTIVE
            return line, False
        line = self._add_file(FileLine(xfer, sender, False, name, size, ts_ms, Transfer.ACTIVE))
        if sender != self.active:
            self.conversation(sender).unread += 1
        return line, True

    def file_progress(self, xfer: bytes, peer: str, name: str, outgoing: bool, done: int, size: int,
                      rate: float, eta: float | None, ts_ms: int) -> tuple[FileLine, bool] | None:
        """(line, is_new), or None once final. A transfer resumed after a restart starts with progress."""
        line = self._files.get(xfer)
        is_new = line is None
        if line is None:
            line = self._add_file(FileLine(xfer, peer, outgoing, name, size, ts_ms, Transfer.ACTIVE))
        elif line.finished:
            return None
        line.state, line.done, line.size, line.rate, line.eta = Transfer.ACTIVE, done, size, rate, eta
        return line, is_new

    def file_received(self, xfer: bytes, sender: str, name: str, path: Path, size: int, ts_ms: int) -> FileLine:
        line = self._files.get(xfer) or self._add_file(FileLine(xfer, sender, False, name, size, ts_ms,
                                                                Transfer.ACTIVE))
        if not line.finished:
            line.state, line.done, line.path, line.eta = Transfer.DONE, size, path, None
        return line

    def file_sent(self, xfer: bytes) -> FileLine | None:
        line = self._files.get(xfer)
        if line is None or line.finished:
            return None
        line.state, line.done, line.eta = Transfer.DONE, line.size, None
        return line

    def file_failed(self, xfer: bytes, error: P2PChatError) -> FileLine | None:
        line = self._files.get(xfer)
        if line is None or line.finished:
            return None
        line.state = {ErrorCode.CANCELLED: Transfer.CANCELLED, ErrorCode.TAKEN: Transfer.TAKEN}.get(
            error.code, Transfer.FAILED)
        line.failure, line.eta = describe_transfer_failure(error, line), None
        return line

    def pause_transfers(self) -> list[FileLine]:
        paused = self.active_transfers()
        for line in paused:
            line.state, line.rate, line.eta = Transfer.PAUSED, 0.0, None
        return paused

    def file(self, xfer: bytes) -> FileLine | None:
        return self._files.get(xfer)

    def active_transfers(self) -> list[FileLine]:
        return [line for line in self._files.values() if not line.finished]

    def _add_file(self, line: FileLine) -> FileLine:
        self.conversation(line.peer).lines.append(line)
        self._files[line.xfer] = line
        return line

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
