"""The broker core's group rooms (docs/PROTOCOL.md §5.7-5.8), apart from its main loop.

Management requests go to the ``RoomRegistry`` port (its rule table is broker/core/rooms.py) and are answered
with ``room_info`` or ``room_list``; every change is told to the members online as a ``room_event`` (a hint:
nothing depends on it). A ``room_msg`` is checked (a joined member, the current membership epoch), numbered and
queued once per device of every joined member; one ``ack``. A ``room_key`` is a pairwise message between two
joined members. Only sessions registered with ``CAPS_ROOMS`` see any of it, and a user who is neither member
nor invitee of a room gets ``unknown_room`` for it, as for a room that does not exist.

``RoomService`` is a mixin of ``BrokerCore``: it uses the core's ``rooms``, ``keys``, ``directory``, ``link``,
``delivery``, ``broker_id``, ``_sessions``, ``_frames``, ``_wall_ms`` and ``_relay_now``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from p2pchat.broker.core.actions import Action, Send
from p2pchat.broker.core.delivery import queue_name
from p2pchat.broker.core.ports import DEVICE_ROOMS, Room, RoomRefusal, StoreUnavailable
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Envelope, FileOffer, Message, pack
from p2pchat.common.protocol_rooms import (
    MAX_WATCHED_ROOMS,
    RoomChunk,
    RoomCreate,
    RoomEvent,
    RoomEventKind,
    RoomFetch,
    RoomInfo,
    RoomInvite,
    RoomJoin,
    RoomKey,
    RoomLeave,
    RoomListing,
    RoomListRequest,
    RoomMark,
    RoomMessage,
    RoomOffer,
    RoomReceipts,
    RoomReceiptsRequest,
    RoomRemove,
    RoomRequest,
    RoomRole,
    RoomSet,
    RoomUpload,
    FileUpload,
    inbox_id,
)

if TYPE_CHECKING:
    from p2pchat.broker.core.routing import _Session

log = logging.getLogger(__name__)

_REFUSED = {  # RoomRefusal -> the error code and its words
    RoomRefusal.UNKNOWN_ROOM: (ErrorCode.UNKNOWN_ROOM, "no such room"),
    RoomRefusal.ROOM_EXISTS: (ErrorCode.ROOM_EXISTS, "a room of that name exists"),
    RoomRefusal.NOT_MEMBER: (ErrorCode.NOT_MEMBER, "not a member of the room"),
    RoomRefusal.NOT_ALLOWED: (ErrorCode.NOT_ALLOWED, "your role in the room does not allow it"),
    RoomRefusal.BAD_NAME: (ErrorCode.BAD_FRAME, "not a valid room name or topic"),
    RoomRefusal.TOO_MANY_ROOMS: (ErrorCode.TOO_MANY_ROOMS, "too many rooms"),
    RoomRefusal.TOO_MANY_MEMBERS: (ErrorCode.TOO_MANY_MEMBERS, "the room is full"),
    RoomRefusal.TOO_MANY_INVITATIONS: (ErrorCode.TOO_MANY_INVITATIONS, "too many pending invitations"),
    RoomRefusal.TOO_MANY_ADMINS: (ErrorCode.TOO_MANY_ADMINS, "the room has the most admins it may have"),
}
ROOM_REQUESTS = (RoomCreate, RoomInvite, RoomJoin, RoomLeave, RoomRequest, RoomRemove, RoomSet, RoomRole,
                 RoomListRequest, RoomMessage, RoomMark, RoomReceiptsRequest)
ROOM_FILE_FRAMES = (RoomUpload, RoomChunk, RoomFetch, RoomOffer, FileUpload)  # with a file store only
RECEIPTS_EVERY = 1.0  # seconds: a watched room's marks are pushed at most this often, however many come in


class RoomService:
    def _room_handlers(self) -> dict[type[Message], object]:
        self._watches: dict[bytes, set[bytes]] = {}  # room -> sessions watching its receipts
        self._watched: dict[bytes, set[bytes]] = {}  # session -> rooms it watches (at most MAX_WATCHED_ROOMS)
        self._marked: set[bytes] = set()  # watched rooms whose marks moved since the last push
        self._next_receipts = 0.0
        kinds = ROOM_REQUESTS + (ROOM_FILE_FRAMES if self.room_files is not None else ())
        return {kind: self._on_room_request for kind in kinds}

    def _rooms_tick(self, now: float) -> list[Action]:
        """About once a second: the registry's upkeep (invitations expire, marks are written) and the receipts of
        watched rooms whose marks moved, one push per room and watcher."""
        if self.rooms is None or now < self._next_receipts:
            return []
        self._next_receipts = now + RECEIPTS_EVERY
        actions: list[Action] = []
        try:
            if self.room_files is not None:
                self.room_files.on_tick(self._wall_ms())
            self.rooms.expire_invitations(self._wall_ms())
            marked, self._marked = self._marked, set()
            for rid in marked:
                room = self.rooms.get(rid)
                frames = self._frames.make(self._receipts(room, None)) if room is not None else None
                actions += [Send(conn, frames) for conn in self._watches.get(rid, ()) if frames is not None]
        except StoreUnavailable:  # the shared store is down: the next second tries again
            log.debug("room upkeep skipped: the shared store is unavailable")
        return actions

    def _rooms_session_ended(self, conn: bytes) -> None:
        for rid in self._watched.pop(conn, ()):
            watchers = self._watches.get(rid)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self._watches[rid]

    def _on_room_request(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        session = self._sessions.get(conn)
        if session is None:
            return [self._not_registered(conn, env)]
        if not session.rooms:
            return [self._error(conn, ErrorCode.BAD_FRAME, "register with caps CAPS_ROOMS to use rooms", env)]
        msg = env.message
        kind = type(msg)
        if kind is RoomMessage or kind is RoomOffer:
            return self._on_room_message(conn, session, env)
        if kind is RoomUpload or kind is RoomChunk or kind is RoomFetch or kind is FileUpload:
            return self._on_room_file(conn, session, env)
        if kind is RoomMark:  # never answered: a bad one changes nothing and says nothing
            self.rooms.mark(msg.room, session.user, msg.delivered, msg.read)
            if msg.room in self._watches:
                self._marked.add(msg.room)
            return []
        if kind is RoomReceiptsRequest:
            return self._on_receipts_request(conn, session, env)
        if kind is RoomListRequest:
            entries = self.rooms.of_user(session.user)
            rows = tuple((e.rid, e.name, e.epoch, int(e.invited) | int(e.role) << 1) for e in entries)
            return [Send(conn, self._frames.make(RoomListing(rows, env.msg_id)))]
        if kind is RoomRequest:
            room = self.rooms.get(msg.room)
            if room is None or room.member(session.user) is None:
                return [self._refused(conn, RoomRefusal.UNKNOWN_ROOM, env)]
            return [self._info(conn, room, env)]
        return self._on_room_change(conn, session, env)

    def _on_room_change(self, conn: bytes, session: _Session, env: Envelope) -> list[Action]:
        msg, user, now_ms = env.message, session.user, self._wall_ms()
        kind = type(msg)
        before = None if kind is RoomCreate else self.rooms.get(msg.room)
        if kind is RoomCreate:
            result = self.rooms.create(msg.name, user, msg.topic or "", now_ms)
        elif kind is RoomInvite:
            result = self.rooms.invite(msg.room, user, msg.users, now_ms)
        elif kind is RoomJoin:
            result = self.rooms.join(msg.room, user, now_ms)
        elif kind is RoomLeave:
            result = self.rooms.leave(msg.room, user)
        elif kind is RoomRemove:
            result = self.rooms.remove(msg.room, user, msg.user)
        elif kind is RoomSet:
            result = self.rooms.set(msg.room, user, msg.name, msg.topic)
        else:
            result = self.rooms.role(msg.room, user, msg.user, msg.admin)
        if isinstance(result, RoomRefusal):
            return [self._refused(conn, result, env)]
        if result is None:  # the last member left: the room is gone (its files with it)
            log.info("user=%s room=%s left; the room is gone", user, msg.room.hex())
            self._room_gone(msg.room)
            return [self._info(conn, replace(before, members=()), env)]
        log.info("user=%s room=%s %s", user, result.rid.hex(), msg.TYPE.value)
        reply = [self._info(conn, result if kind is not RoomLeave else replace(result, members=()), env)]
        return reply + self._tell(before, result, msg, user, conn)

    def _tell(self, before: Room | None, after: Room, msg: Message, by: str, conn: bytes) -> list[Action]:
        """``room_event``s for a change: to every member and invitee online (but the session that asked)."""
        kind = type(msg)
        events: list[tuple[RoomEventKind, str]] = []
        if kind is RoomInvite:
            events = [(RoomEventKind.INVITED, m.user) for m in after.members if before.member(m.user) is None]
        elif kind is RoomJoin and after.epoch != before.epoch:
            events = [(RoomEventKind.JOINED, by)]
        elif kind is RoomLeave:
            events = [(RoomEventKind.LEFT, by)]
        elif kind is RoomRemove:
            events = [(RoomEventKind.REMOVED, msg.user)]
        elif kind is RoomSet:
            if msg.name is not None and msg.name != before.name:
                events.append((RoomEventKind.RENAMED, by))
            if msg.topic is not None and msg.topic != before.topic:
                events.append((RoomEventKind.TOPIC, by))
        elif kind is RoomRole and after != before:
            events = [(RoomEventKind.ROLE, msg.user)]
        told = {m.user for m in after.members}
        if kind is RoomRemove:
            told.add(msg.user)  # the removed hear it once, then unknown_room
        actions: list[Action] = []
        for event, user in events:
            frames = self._frames.make(RoomEvent(after.rid, after.epoch, event, user,
                                                 by if event is not RoomEventKind.LEFT else None, after.name))
            actions += self._to_members(told, frames, conn)
        return actions

    def _to_members(self, users: Iterable[str], frames: list[bytes], skip: bytes | None = None) -> list[Action]:
        """Not durable: to the rooms-aware sessions of ``users`` here, and once to each other broker that has one."""
        actions: list[Action] = []
        for user in users:
            for where in self.directory.locate(user):
                if where.broker != self.broker_id:
                    self.link.forward(where.broker, user, frames)
                    continue
                session = self._sessions.get(where.conn)
                if session is not None and session.rooms and where.conn != skip:
                    actions.append(Send(where.conn, frames))
        return actions

    def _rooms_of_changed_devices(self, user: str) -> list[Action]:
        """``user``'s device list changed: the rooms it has joined move to a new epoch (their keys must follow)."""
        if self.rooms is None:
            return []
        actions: list[Action] = []
        try:
            bumped = self.rooms.bump_user(user)
        except StoreUnavailable:  # the epoch stays: keys go on until the next change; logged, not fatal
            log.warning("user=%s device list changed but the rooms' epochs could not be raised: store down", user)
            return []
        for rid in bumped:
            room = self.rooms.get(rid)
            if room is not None:
                frames = self._frames.make(RoomEvent(rid, room.epoch, RoomEventKind.DEVICES, user, None, room.name))
                actions += self._to_members((m.user for m in room.members if m.joined), frames)
        return actions

    # --- files (§8.1): kept sealed by the broker, uploaded once, fetched by each member's device ------------------
    def _on_room_file(self, conn: bytes, session: _Session, env: Envelope) -> list[Action]:
        """The store serves a room's joined members, and a user's inbox (§8.2): uploads into it by anyone for
        that user (``file_upload``), their chunks by the uploader's connection, fetches by that user only."""
        msg = env.message
        kind = type(msg)
        user, now_ms = session.user, self._wall_ms()
        if kind is FileUpload:
            if self.keys.lookup(msg.recipient) is None:
                return [self._error(conn, ErrorCode.UNKNOWN_RECIPIENT, f"recipient {msg.recipient!r} is unknown", env)]
            return self.room_files.upload(conn, user, inbox_id(msg.recipient), msg, env.msg_id, now_ms)
        rid = msg.room
        room = self.rooms.get(rid)
        if room is not None or kind is RoomUpload or (kind is RoomFetch and rid != inbox_id(user)):
            joined = self._joined_room(conn, session, rid, env)  # (an inbox's chunks: the upload's state decides)
            if isinstance(joined, Send):
                return [joined]
        if kind is RoomChunk:
            return self.room_files.chunk(conn, user, rid, msg, env.payload, env.msg_id, now_ms)
        if kind is RoomUpload:
            return self.room_files.upload(conn, user, rid, msg, env.msg_id, now_ms)
        return self.room_files.fetch(conn, user, rid, msg, env.msg_id, now_ms)

    def _joined_room(self, conn: bytes, session: _Session, rid: bytes, env: Envelope) -> Room | Send:
        """The room ``rid`` if the session's user has joined it; else the error to answer."""
        room = self.rooms.get(rid)
        member = room.member(session.user) if room is not None else None
        if member is None:
            return self._refused(conn, RoomRefusal.UNKNOWN_ROOM, env)
        if not member.joined:
            return self._refused(conn, RoomRefusal.NOT_MEMBER, env)
        return room

    def _not_held(self, rid: bytes, msg: RoomOffer | FileOffer, session: _Session) -> ErrorCode | None:
        """Why an offer of a file kept by the broker (a room's, or one in an inbox) may not go yet."""
        if self.room_files is None or not session.rooms:
            return ErrorCode.BAD_FRAME
        return self.room_files.offer_ready(rid, msg.xfer, session.user, msg.size, msg.chunk_size)

    # --- messages ------------------------------------------------------------------------------------------
    def _on_room_message(self, conn: bytes, session: _Session, env: Envelope) -> list[Action]:
        """A ``room_msg``, or a ``room_offer`` announcing a file the room's store holds whole."""
        msg: RoomMessage | RoomOffer = env.message  # type: ignore[assignment]
        if msg.sender != session.user:
            return [self._error(conn, ErrorCode.SPOOFED_SENDER, f"sender must be {session.user!r}", env)]
        if msg.seq is not None:
            return [self._error(conn, ErrorCode.BAD_FRAME, f"{msg.TYPE.value}.seq is the broker's to set", env)]
        room = self._joined_room(conn, session, msg.room, env)
        if isinstance(room, Send):
            return [room]
        if type(msg) is RoomOffer:
            refused = self._not_held(room.rid, msg, session)
            if refused is not None:
                return [self._error(conn, refused, "announce a room file once the broker holds all of it, as "
                                    "uploaded", env)]
        if msg.epoch != room.epoch:
            return [self._error(conn, ErrorCode.ROOM_CHANGED, f"the room is at epoch {room.epoch}: fetch it and "
                                f"send again", env)]
        seq = self.rooms.next_seq(room.rid)
        frames = pack(replace(msg, seq=seq), env.ts, env.msg_id)
        targets = [(queue, frames) for queue in self._room_queues(room, session)]
        if self.delivery.durable:
            try:
                return self.delivery.queue(conn, env, targets, (), skip_full=True, seq=seq)
            except StoreUnavailable:
                if not any(where.broker == self.broker_id for user, _ in targets
                           for where in self.directory.locate(user.partition("/")[0])):
                    raise
        return self._relay_now(conn, env, frames, targets)

    def _room_queues(self, room: Room, session: _Session) -> list[str]:
        """The queue of every rooms-aware device of every joined member, but the sending device."""
        queues = []
        for member in room.members:
            if not member.joined:
                continue
            devices = self.keys.devices(member.user)
            if devices is None:
                continue
            primary = devices.primary.id
            queues += [queue_name(member.user, d.id, primary) for d in devices.devices
                       if d.flags & DEVICE_ROOMS and not (member.user == session.user and d.id == session.dev)]
        return queues

    def _room_key_refused(self, session: _Session, msg: RoomKey) -> ErrorCode | None:
        """A sender key goes only from one joined member to another (or to the sender's own devices)."""
        if not session.rooms:
            return ErrorCode.BAD_FRAME
        room = self.rooms.get(msg.room)
        sender = room.member(session.user) if room is not None else None
        if sender is None:
            return ErrorCode.UNKNOWN_ROOM
        recipient = room.member(msg.recipient)
        if not sender.joined or recipient is None or not recipient.joined:
            return ErrorCode.NOT_MEMBER
        return None

    # --- receipts: marks instead of one receipt per message and member ---------------------------------------
    def _on_receipts_request(self, conn: bytes, session: _Session, env: Envelope) -> list[Action]:
        msg: RoomReceiptsRequest = env.message  # type: ignore[assignment]
        room = self.rooms.get(msg.room)
        if room is None or room.member(session.user) is None:
            return [self._refused(conn, RoomRefusal.UNKNOWN_ROOM, env)]
        watched = self._watched.setdefault(conn, set())
        if msg.watch and msg.room not in watched and len(watched) >= MAX_WATCHED_ROOMS:
            return [self._error(conn, ErrorCode.RATE_LIMITED, f"at most {MAX_WATCHED_ROOMS} rooms watched per "
                                "session: unwatch one first", env)]
        if msg.watch:
            watched.add(msg.room)
            self._watches.setdefault(msg.room, set()).add(conn)
        elif msg.watch is False:
            watched.discard(msg.room)
            self._watches.get(msg.room, set()).discard(conn)
        return [Send(conn, self._frames.make(self._receipts(room, env.msg_id)))]

    def _receipts(self, room: Room, ref: bytes | None) -> RoomReceipts:
        marks = self.rooms.marks(room.rid)
        rows = tuple((user, *marks.get(user, (0, 0))) for user in (m.user for m in room.members if m.joined))
        return RoomReceipts(room.rid, room.seq, rows, ref)

    # --- helpers -------------------------------------------------------------------------------------------
    def _info(self, conn: bytes, room: Room, env: Envelope) -> Send:
        members = tuple((m.user, int(m.role), int(not m.joined)) for m in room.members)
        info = RoomInfo(room.rid, room.name, room.owner, room.epoch, room.seq, members, room.topic or None,
                        env.msg_id)
        return Send(conn, self._frames.make(info))

    def _refused(self, conn: bytes, refusal: RoomRefusal, env: Envelope) -> Send:
        code, text = _REFUSED[refusal]
        return self._error(conn, code, text, env)

    def _error(self, conn: bytes, code: ErrorCode, text: str, env: Envelope) -> Send:
        return Send(conn, self._frames.error(code, text, env.msg_id))

    def _room_gone(self, rid: bytes) -> None:
        """The room was deleted: its files go with it."""
        if self.room_files is not None:
            self.room_files.room_gone(rid)
