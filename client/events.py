"""What the client library tells its user (GUI, CLI, load tool), as small frozen types."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2pchat.common.errors import P2PChatError


@dataclass(frozen=True, slots=True)
class Registered:
    user: str
    reconnect: bool  # True when this re-established a lost session


@dataclass(frozen=True, slots=True)
class Reconnecting:
    reason: str


@dataclass(frozen=True, slots=True)
class RegisterFailed:
    error: P2PChatError


@dataclass(frozen=True, slots=True)
class PeersChanged:
    peers: frozenset[str]
    joined: frozenset[str]
    left: frozenset[str]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    msg_id: bytes
    sender: str
    text: str
    ts: int  # sender's wall clock, ms
    room: bytes | None = None  # the room it was sent to (its id); None: to us alone
    room_name: str | None = None  # that room's name as we last heard it


@dataclass(frozen=True, slots=True)
class MessageEchoed:
    """Another device of ours sent ``text`` to ``peer`` (its transcript, docs/PROTOCOL.md §5.6), or to ``room``."""

    msg_id: bytes
    peer: str
    text: str
    ts: int
    room: bytes | None = None


@dataclass(frozen=True, slots=True)
class ReadElsewhere:
    """Another device of ours showed ``peer``'s message ``msg_id``: it counts as read here too."""

    msg_id: bytes
    peer: str


@dataclass(frozen=True, slots=True)
class Acked:
    msg_id: bytes
    status: str
    seq: int | None = None  # a room message: its number in the room (for its receipts, ``RoomReceipts``)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The recipient's client says message ``msg_id`` was delivered to it, or read."""

    msg_id: bytes
    peer: str
    status: str  # "delivered" or "read"


@dataclass(frozen=True, slots=True)
class SendFailed:
    msg_id: bytes
    error: P2PChatError


@dataclass(frozen=True, slots=True)
class ErrorReported:
    """An ERROR from the broker that answers nothing we are waiting for."""

    error: P2PChatError


@dataclass(frozen=True, slots=True)
class FileIncoming:
    """A file is coming in. Every file event has ``room``: None for a file between two users, else the room the
    file was sent to, and then the user field (``sender``, ``peer``, ``recipient``) names the user who sent it to
    the room, ourselves for an upload (which the broker keeps for the room's members to fetch)."""

    xfer: bytes
    sender: str
    name: str
    size: int
    room: bytes | None = None
    folder: bool = False  # a folder as one stream (docs/PROTOCOL.md §8.3): ``size`` is the stream's


@dataclass(frozen=True, slots=True)
class FileQueued:
    """An offer accepted but waiting for a free slot (too many transfers at once); FileIncoming follows."""

    xfer: bytes
    sender: str
    name: str
    size: int
    waiting: int  # transfers waiting, this one included
    room: bytes | None = None  # see FileIncoming


@dataclass(frozen=True, slots=True)
class FileProgress:
    xfer: bytes
    peer: str
    name: str
    direction: str  # "in" or "out"
    done: int  # bytes verified by the receiver
    size: int
    rate: float  # bytes per second since the transfer (re)started
    eta: float | None  # seconds
    room: bytes | None = None  # see FileIncoming


@dataclass(frozen=True, slots=True)
class FileReceived:
    xfer: bytes
    sender: str
    name: str  # as the sender named it
    path: Path  # where it was saved, verified (a folder: the new folder)
    size: int
    room: bytes | None = None  # see FileIncoming
    files: int | None = None  # a folder: the files in it (``size`` is its stream's: the manifest besides)
    content_bytes: int | None = None  # a folder: the bytes of its files together


@dataclass(frozen=True, slots=True)
class FileSent:
    """The receiver verified the whole file and saved it."""

    xfer: bytes
    recipient: str
    name: str
    size: int
    bytes_sent: int  # by this run of the sender, resends included; size minus any resumed prefix
    room: bytes | None = None  # see FileIncoming
    files: int | None = None  # a folder: the files sent (``size`` is its stream's)
    skipped: tuple[str, ...] = ()  # a folder: what it held that is not sent (symlinks, devices, FIFOs, sockets)


@dataclass(frozen=True, slots=True)
class FileUploaded:
    """The broker holds the whole file for ``recipient``, who fetches it when next online (§8.2): the sender may
    go. ``FileSent`` follows if the sender is online when the recipient has it."""

    xfer: bytes
    recipient: str
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class FileFailed:
    xfer: bytes
    peer: str
    name: str
    direction: str
    error: P2PChatError
    room: bytes | None = None  # see FileIncoming


@dataclass(frozen=True, slots=True)
class Stopped:
    """The client stopped by itself, after an internal error or signed out by the broker (``session_replaced``: a
    newer connection took the session over, or the ID moved to another key); it must be recreated."""

    error: P2PChatError


@dataclass(frozen=True, slots=True)
class PeerKeyChanged:
    """``user`` now presents another key: messages to and from them wait until the user accepts it (``accepted``:
    the session was told to trust key changes and already has; the change is still worth showing)."""

    user: str
    old: bytes
    new: bytes
    error: P2PChatError
    accepted: bool = False
    how: str | None = None  # what the broker said happened: "recovered" (the recovery phrase), "moved" (the operator)


@dataclass(frozen=True, slots=True)
class SendState:
    """Our message ``msg_id`` to ``peer`` went off the usual sent-delivered line: ``"undecryptable"`` (their
    client could not open it; it is sealed again once their new key is accepted), ``"resealed"`` (sealed to
    their current key and sent again), or ``"failed"`` (they still could not open it)."""

    msg_id: bytes
    peer: str
    state: str


@dataclass(frozen=True, slots=True)
class RoomView:
    """A room as the broker last told us: ``members`` are ``(user, role, invited)``, role 0 member, 1 admin, 2
    owner; ``invited`` True for an invitation not yet accepted."""

    rid: bytes
    name: str
    topic: str
    owner: str
    epoch: int
    members: tuple[tuple[str, int, bool], ...]

    def member(self, user: str) -> tuple[str, int, bool] | None:
        return next((m for m in self.members if m[0] == user), None)

    @property
    def joined(self) -> tuple[str, ...]:
        return tuple(user for user, _, invited in self.members if not invited)


@dataclass(frozen=True, slots=True)
class RoomUpdated:
    """A room we are in or invited to, as it is now (``ref``: the request this answers, if one did)."""

    room: RoomView
    ref: bytes | None = None


@dataclass(frozen=True, slots=True)
class RoomGone:
    """We are no longer in ``room`` (we left, were removed, or it was deleted); ``by`` removed us."""

    rid: bytes
    name: str
    why: str  # "left", "removed", "declined"
    by: str | None = None
    ref: bytes | None = None


@dataclass(frozen=True, slots=True)
class RoomsListed:
    rooms: tuple[RoomView, ...]  # members not filled in: ask for a room to have them
    ref: bytes | None = None


@dataclass(frozen=True, slots=True)
class RoomReceipts:
    """Per joined member of ``rid``, the last room message number its devices kept and showed: a message numbered
    ``n`` (``Acked.seq``) is delivered to all when every ``delivered`` ≥ n, and read by those whose ``read`` ≥ n."""

    rid: bytes
    seq: int  # the room's last message number
    marks: dict[str, tuple[int, int]]  # user -> (delivered, read)
    ref: bytes | None = None


@dataclass(frozen=True, slots=True)
class RoomEvent:
    """The broker says something happened in a room: ``kind`` is one of docs/PROTOCOL.md §5.7's (``invited``,
    ``joined``, ``left``, ``removed``, ``renamed``, ``topic``, ``role``, ``devices``)."""

    rid: bytes
    name: str
    kind: str
    user: str
    by: str | None = None


Event = (
    Registered | Reconnecting | RegisterFailed | PeersChanged | MessageReceived | MessageEchoed | ReadElsewhere
    | Acked | Receipt | SendFailed | ErrorReported
    | FileIncoming | FileQueued | FileProgress | FileReceived | FileSent | FileUploaded | FileFailed | PeerKeyChanged | SendState
    | Stopped | RoomUpdated | RoomGone | RoomsListed | RoomEvent | RoomReceipts
)
