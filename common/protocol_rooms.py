"""Group rooms on the wire (docs/PROTOCOL.md §5.7-5.9, §8.1): kinds, limits and message types.

The base codec (common/protocol.py) decodes these like any other type: it imports this module once its own
types are registered. Nothing here reaches a client that did not register with ``CAPS_ROOMS``.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated, Any

from p2pchat.common.protocol import (
    Body,
    Copies,
    Count,
    Flag,
    Message,
    MsgId,
    Text,
    UserId,
    _bytes,
    _enum,
    _fail,
    _message,
    _uint,
    _user_list,
    check_user_id,
    register_message_type,
)

CAPS_ROOMS = 2  # register.caps bit 1: the client knows rooms
RID_BYTES = 16
MAX_ROOM_MEMBERS = 256  # joined + invited
MAX_ROOMS_PER_USER = 64  # joined
MAX_PENDING_INVITES = 32  # per user
MAX_INVITE_BATCH = 32  # users per room_invite
MAX_ROOM_ADMINS = 16
ROOM_TOPIC_CHARS = 256
MAX_WATCHED_ROOMS = 4  # rooms one session watches the receipts of


class RoomMsgType(str, enum.Enum):
    ROOM_CREATE = "room_create"
    ROOM_INVITE = "room_invite"
    ROOM_JOIN = "room_join"
    ROOM_LEAVE = "room_leave"
    ROOM_REQ = "room_req"
    ROOM_REMOVE = "room_remove"
    ROOM_SET = "room_set"
    ROOM_ROLE = "room_role"
    ROOM_LIST_REQ = "room_list_req"
    ROOM_INFO = "room_info"
    ROOM_LIST = "room_list"
    ROOM_EVENT = "room_event"
    ROOM_MSG = "room_msg"
    ROOM_KEY = "room_key"
    ROOM_MARK = "room_mark"
    ROOM_RECEIPTS_REQ = "room_receipts_req"
    ROOM_RECEIPTS = "room_receipts"
    ROOM_UPLOAD = "room_upload"
    ROOM_CREDIT = "room_credit"
    ROOM_CHUNK = "room_chunk"
    ROOM_OFFER = "room_offer"
    ROOM_FETCH = "room_fetch"
    FILE_UPLOAD = "file_upload"


class RoomEventKind(str, enum.Enum):
    INVITED = "invited"
    JOINED = "joined"
    LEFT = "left"
    REMOVED = "removed"
    RENAMED = "renamed"
    TOPIC = "topic"
    ROLE = "role"
    DEVICES = "devices"  # a joined member's device list changed: the epoch rose


def _topic(value: Any) -> str:
    if type(value) is not str or len(value) > ROOM_TOPIC_CHARS:
        _fail("expected a topic of at most %d characters" % ROOM_TOPIC_CHARS)
    return value


def _rows(max_len: int, what: str, *checks) -> Any:
    """An array of at most ``max_len`` arrays, each of ``len(checks)`` fields checked in order."""

    def check(value: Any) -> tuple:
        if type(value) is not tuple or len(value) > max_len:
            _fail(f"expected a list of at most {max_len} {what}")
        for row in value:
            if type(row) is not tuple or len(row) != len(checks):
                _fail(f"expected {what} of {len(checks)} fields")
            for field, field_check in zip(row, checks):
                field_check(field)
        return value

    return check


def _role(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 2:
        _fail(f"expected a role 0, 1 or 2, got {value!r}")
    return value


_rid = _bytes(RID_BYTES, exact=True)
RoomId = Annotated[bytes, _rid]
RoomName = Annotated[str, check_user_id]  # the user-ID pattern; unique among rooms case-insensitively (§5.7)
Topic = Annotated[str, _topic]
# [user, role (0 member, 1 admin, 2 owner), flags (bit 0: invited, not joined yet)]
RoomMembers = Annotated[tuple, _rows(MAX_ROOM_MEMBERS, "members", check_user_id, _role, _uint)]
# [room, name, epoch, flags (bit 0: invited; bits 1-2: role)]
RoomList = Annotated[tuple, _rows(MAX_ROOMS_PER_USER + MAX_PENDING_INVITES, "rooms", _rid, check_user_id, _uint,
                                  _uint)]
RoomMarks = Annotated[tuple, _rows(MAX_ROOM_MEMBERS, "marks", check_user_id, _uint, _uint)]  # [user, delivered, read]
RoomEventKindField = Annotated[RoomEventKind, _enum(RoomEventKind)]


def _invite_list(value: Any) -> tuple[str, ...]:
    users = _user_list(value)
    if not 0 < len(users) <= MAX_INVITE_BATCH:
        _fail("expected 1 to %d user IDs" % MAX_INVITE_BATCH)
    return users


InviteList = Annotated[tuple, _invite_list]


# --- management (§5.7): each request is answered with room_info (or room_list), or an error ---------------
@_message
class RoomCreate(Message):
    TYPE = RoomMsgType.ROOM_CREATE
    name: RoomName
    topic: Topic | None = None


@_message
class RoomInvite(Message):
    TYPE = RoomMsgType.ROOM_INVITE
    room: RoomId
    users: InviteList


@_message
class RoomJoin(Message):
    TYPE = RoomMsgType.ROOM_JOIN
    room: RoomId


@_message
class RoomLeave(Message):
    """Leave a room, or decline an invitation."""

    TYPE = RoomMsgType.ROOM_LEAVE
    room: RoomId


@_message
class RoomRequest(Message):
    TYPE = RoomMsgType.ROOM_REQ
    room: RoomId


@_message
class RoomRemove(Message):
    TYPE = RoomMsgType.ROOM_REMOVE
    room: RoomId
    user: UserId


@_message
class RoomSet(Message):
    TYPE = RoomMsgType.ROOM_SET
    room: RoomId
    name: RoomName | None = None
    topic: Topic | None = None


@_message
class RoomRole(Message):
    TYPE = RoomMsgType.ROOM_ROLE
    room: RoomId
    user: UserId
    admin: Flag


@_message
class RoomListRequest(Message):
    TYPE = RoomMsgType.ROOM_LIST_REQ


@_message
class RoomInfo(Message):
    """A room as the broker has it, to a member or invitee; ``ref`` is the request it answers."""

    TYPE = RoomMsgType.ROOM_INFO
    room: RoomId
    name: RoomName
    owner: UserId
    epoch: Count
    seq: Count
    members: RoomMembers
    topic: Topic | None = None
    ref: MsgId | None = None


@_message
class RoomListing(Message):
    TYPE = RoomMsgType.ROOM_LIST
    rooms: RoomList
    ref: MsgId | None = None  # the room_list_req it answers


@_message
class RoomEvent(Message):
    """Unasked, not durable: a change of a room, to the online members (and the invitee, for ``invited``)."""

    TYPE = RoomMsgType.ROOM_EVENT
    room: RoomId
    epoch: Count
    kind: RoomEventKindField
    user: UserId
    by: UserId | None = None
    name: RoomName | None = None


# --- messages, keys, marks (§5.8) ---------------------------------------------------------------------------
@_message
class RoomMessage(Message):
    """One body for the whole room (sealed with the sender's sender key, §10.6); the broker fans it out."""

    TYPE = RoomMsgType.ROOM_MSG
    ACKED = True
    DURABLE = True
    sender: UserId
    room: RoomId
    epoch: Count  # the membership epoch the sender sealed for: a stale one is refused (room_changed)
    body: Body
    seq: Count | None = None  # set by the broker: the room's message number


@_message
class RoomKey(Message):
    """A sender key for ``room``, sealed pairwise to ``to`` (as a message, §5.6, with ``copies``/``echo``)."""

    TYPE = RoomMsgType.ROOM_KEY
    RELAYED = True
    ACKED = True
    DURABLE = True
    sender: UserId
    recipient: UserId
    room: RoomId
    body: Body
    copies: Copies | None = None
    echo: Copies | None = None


@_message
class RoomMark(Message):
    """This device has kept (``delivered``) and shown (``read``) the room's messages up to these ``seq``."""

    TYPE = RoomMsgType.ROOM_MARK
    room: RoomId
    delivered: Count
    read: Count | None = None


@_message
class RoomReceiptsRequest(Message):
    TYPE = RoomMsgType.ROOM_RECEIPTS_REQ
    room: RoomId
    watch: Flag | None = None


@_message
class RoomReceipts(Message):
    """The marks of every joined member, and the room's last message number; ``ref``: the request it answers
    (none when pushed to a watcher)."""

    TYPE = RoomMsgType.ROOM_RECEIPTS
    room: RoomId
    seq: Count
    marks: RoomMarks
    ref: MsgId | None = None


# --- files kept by the broker (§8.1) -----------------------------------------------------------------------
@_message
class RoomUpload(Message):
    TYPE = RoomMsgType.ROOM_UPLOAD
    room: RoomId
    xfer: MsgId
    size: Count
    chunk_size: Count


@_message
class RoomCredit(Message):
    """Broker -> uploader: it holds every chunk below ``next``; send chunks below ``upto``."""

    TYPE = RoomMsgType.ROOM_CREDIT
    room: RoomId
    xfer: MsgId
    next: Count
    upto: Count
    restart: Flag


@_message
class RoomChunk(Message):
    TYPE = RoomMsgType.ROOM_CHUNK
    HAS_PAYLOAD = True
    room: RoomId
    xfer: MsgId
    index: Count
    final: Flag


@_message
class RoomOffer(Message):
    """An uploaded file, announced to the room: ``body`` is sealed like a room message around its name and key."""

    TYPE = RoomMsgType.ROOM_OFFER
    ACKED = True
    DURABLE = True
    sender: UserId
    room: RoomId
    epoch: Count
    xfer: MsgId
    size: Count
    chunk_size: Count
    body: Body
    seq: Count | None = None


@_message
class RoomFetch(Message):
    """Member -> broker: I hold every chunk below ``next``; send chunks below ``upto``."""

    TYPE = RoomMsgType.ROOM_FETCH
    room: RoomId
    xfer: MsgId
    next: Count
    upto: Count
    restart: Flag


@_message
class FileUpload(Message):
    """A file for ``to`` kept by the broker until ``to`` fetches it (it may be offline now): uploaded like a room
    file, into ``to``'s inbox (``inbox_id``), then offered with ``file_offer.held`` (§8.2)."""

    TYPE = RoomMsgType.FILE_UPLOAD
    recipient: UserId
    xfer: MsgId
    size: Count
    chunk_size: Count


def inbox_id(user: str) -> bytes:
    """Where the broker's file store keeps what waits for ``user`` (§8.2): the ``room`` of its chunks, credits and
    fetches. Derived, so both ends and every broker name it alike; only ``user`` may fetch from it."""
    return hashlib.sha256(b"p2pchat inbox\0" + user.encode()).digest()[:RID_BYTES]


ROOM_TYPES = (
    RoomCreate, RoomInvite, RoomJoin, RoomLeave, RoomRequest, RoomRemove, RoomSet, RoomRole, RoomListRequest,
    RoomInfo, RoomListing, RoomEvent, RoomMessage, RoomKey, RoomMark, RoomReceiptsRequest, RoomReceipts,
    RoomUpload, RoomCredit, RoomChunk, RoomOffer, RoomFetch, FileUpload,
)
for _cls in ROOM_TYPES:
    register_message_type(_cls)
