"""The client library's group rooms (docs/PROTOCOL.md §5.7-5.8): blocking calls by room name.

``RoomCommands`` is a mixin of ``ChatClient``: each call hands the session one request on the agent thread
(``_call``) and waits for its answer, which the agent resolves by the request's id (``_acks``). Rooms are named
on the wire by id; names (case-insensitive, like the broker's) are looked up in the rooms the session knows,
asking the broker for the list first when the name is not among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.client.core.session import validate_room_text
from p2pchat.common.errors import BrokenError, ErrorCode, RemoteError
from p2pchat.common.protocol import Message, new_msg_id
from p2pchat.common.protocol_rooms import (
    RoomCreate,
    RoomInvite,
    RoomJoin,
    RoomLeave,
    RoomListRequest,
    RoomRemove,
    RoomRequest,
    RoomRole,
    RoomSet,
)

ANSWER_TIMEOUT = 10.0  # seconds to wait for the broker's answer to a room request


class RoomCommands:
    def room_create(self, name: str, topic: str | None = None) -> ev.RoomView:
        """A new room with us as its owner; RemoteError ``room_exists`` if the name is taken."""
        return self._room_ask(RoomCreate(name, topic)).room

    def room_invite(self, name: str, users: Sequence[str]) -> ev.RoomView:
        return self._room_ask(RoomInvite(self.room_id(name), tuple(users))).room

    def room_join(self, name: str) -> ev.RoomView:
        return self._room_ask(RoomJoin(self.room_id(name))).room

    def room_leave(self, name: str) -> None:
        """Leave the room (or decline its invitation)."""
        self._room_ask(RoomLeave(self.room_id(name)))

    def room_remove(self, name: str, user: str) -> ev.RoomView:
        return self._room_ask(RoomRemove(self.room_id(name), user)).room

    def room_set(self, name: str, new_name: str | None = None, topic: str | None = None) -> ev.RoomView:
        return self._room_ask(RoomSet(self.room_id(name), new_name, topic)).room

    def room_admin(self, name: str, user: str, admin: bool = True) -> ev.RoomView:
        return self._room_ask(RoomRole(self.room_id(name), user, admin)).room

    def room_info(self, name: str) -> ev.RoomView:
        """The room as the broker has it now, members included."""
        return self._room_ask(RoomRequest(self.room_id(name))).room

    def room_list(self) -> tuple[ev.RoomView, ...]:
        """Our rooms and invitations (members are filled in as the session fetches each room)."""
        return self._room_ask(RoomListRequest()).rooms

    def rooms(self) -> dict[bytes, ev.RoomView]:
        """The rooms the session knows now (no round trip)."""
        return dict(self._session.rooms)

    def room_id(self, name: str) -> bytes:
        """The id of our room (or invitation) ``name``; RemoteError ``unknown_room`` if we have none of that name."""
        for attempt in range(2):
            folded = name.lower()
            for rid, room in dict(self._session.rooms).items():  # a copy: the agent may add one meanwhile
                if room.name.lower() == folded:
                    return rid
            if attempt == 0:
                listed = {room.name.lower(): room.rid for room in self.room_list()}
                if folded in listed:
                    return listed[folded]
        raise RemoteError(f"no room {name!r} among yours or your invitations", ErrorCode.UNKNOWN_ROOM)

    def send_room(self, name: str, text: str, timeout: float | None = None) -> bytes:
        """Send ``text`` to room ``name`` and wait for the broker's acknowledgement; the message id."""
        msg_id, acked = self.send_room_async(self.room_id(name), text)
        try:
            acked.result(timeout if timeout is not None else self.config.send_timeout + 1)
        except FutureTimeout:
            raise BrokenError("no acknowledgement from the broker", ErrorCode.TIMEOUT) from None
        return msg_id

    def send_room_async(self, rid: bytes, text: str) -> tuple[bytes, Future]:
        body = validate_room_text(text)
        msg_id, acked = new_msg_id(), Future()

        def command(now: float) -> None:
            self._acks[msg_id] = acked
            self._execute(self._session.send_room_text(rid, body, now, msg_id))

        self._call(command).result(ANSWER_TIMEOUT)
        return msg_id, acked

    def send_room_file(self, name: str, path: str | Path) -> tuple[bytes, Future]:
        """Upload a file for room ``name``; the future resolves once the broker holds it and the room was told."""
        rid = self.room_id(name)
        done: Future = Future()
        source = self._files.inspect(Path(path))  # a folder is walked and hashed here, off the agent's loop

        def command(now: float) -> bytes:
            xfer, actions = self._session.send_room_file(rid, source, now)
            self._transfers[xfer] = done
            self._execute(actions)
            return xfer

        return self._call(command).result(ANSWER_TIMEOUT), done

    def mark_room_read(self, rid: bytes) -> None:
        """The user has seen room ``rid``: read here, and the room's read mark says so."""
        self._call(lambda now: self._execute(self._session.mark_room_read(rid, now)))

    def room_receipts(self, name: str, watch: bool | None = None) -> ev.RoomReceipts:
        """Per member, how far its devices have kept and shown the room (``watch``: then pushed as
        ``RoomReceipts`` events as they move, at most once a second; False stops that)."""
        rid = self.room_id(name)
        return self._room_ask_with(lambda now: self._session.room_receipts(rid, watch, now))

    def _room_ask(self, message: Message):
        """Send one room request and wait for its answer event (``RoomUpdated``, ``RoomGone``, ``RoomsListed``)."""
        return self._room_ask_with(lambda now: self._session.room_request(message, now))

    def _room_ask_with(self, request):
        answer: Future = Future()

        def command(now: float) -> None:
            msg_id, actions = request(now)
            self._acks[msg_id] = answer
            self._execute(actions)

        self._call(command).result(ANSWER_TIMEOUT)
        try:
            return answer.result(ANSWER_TIMEOUT)
        except FutureTimeout:
            raise BrokenError("no answer from the broker", ErrorCode.TIMEOUT) from None
