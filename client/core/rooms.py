"""What the session does for group rooms (docs/PROTOCOL.md §5.7-5.8, §10.6), apart from its main loop.

Rooms live at the broker; the session keeps each room as the broker last described it (``RoomView``) and
asks again whenever an event or a refusal says it moved. A room message is sealed once, with this device's
sender key for the room (client/sender_keys.py), and the broker fans it out; before the first message of a
generation, the key goes to every device of every joined member over the pairwise channel, as a ``room_key``
(a message of §5.6, so pinning, held messages and device lists apply as to any message). A member who left,
was removed or unlinked a device makes the next message rotate the key: what follows is sealed with a key
they never get. The broker refuses a message sealed for an old membership (``room_changed``): the room is
fetched again, the key distributed or rotated, and the message sealed again (same id and time), in order.

``RoomSync`` is a mixin of ``ClientSession``: it uses the session's ``e2e``, ``history``, ``user``, ``device``,
``state``, ``_seen``, ``_new_id``, ``_wall_ms``, ``_pack``, ``_transmit``, ``_ask_keys``, ``_after_history``,
``_consumes``, ``_refusals`` and ``_blocked``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit
from p2pchat.client.core.held import HeldMessages
from p2pchat.client.e2e import PeerKeyChanged
from p2pchat.client.sender_keys import NoSenderKey, SenderKeys
from p2pchat.client.core.receiving import offer_meta
from p2pchat.client.core.transfer_links import RoomUploaded
from p2pchat.common.errors import BrokenError, ErrorCode, P2PChatError, ProtocolError, RemoteError
from p2pchat.common.crypto import sealed_sender_key
from p2pchat.common.protocol import Ack, Envelope, FileDone, FileOffer, Message, pack
from p2pchat.common.room_crypto import unpack_sender_key
from p2pchat.common.protocol_rooms import (
    RoomEvent,
    RoomEventKind,
    RoomInfo,
    RoomKey,
    RoomListing,
    RoomListRequest,
    RoomChunk,
    RoomCredit,
    RoomMark,
    RoomMessage,
    RoomOffer,
    RoomReceipts,
    RoomReceiptsRequest,
    RoomRequest,
)

log = logging.getLogger(__name__)

MAX_RESEALS = 3  # a room message refused this often for a changed membership fails (no loop with a liar)
# Room messages kept while their sender key is on its way (it was queued before them, so it is rarely long).
NO_KEY_PER_SENDER = 100
NO_KEY_MAX = 1_000
RESEND_AFTER = 5.0  # seconds without an acknowledgement before room frames are sent again (as the outbox's)
NO_KEY_WAIT = 30.0  # seconds a room message waits for its sender key before it counts as undecryptable


@dataclass(slots=True)
class _Pending:
    rid: bytes
    text: bytes  # a message's text, or a file offer's plaintext (its name and key)
    ts: int
    frames: list[bytes] | None = None  # sealed for the room's epoch as last known
    reseals: int = 0
    upload: RoomUploaded | None = None  # a room file the broker holds: this announces it (§8.1)


class RoomSync:
    rooms_enabled = False  # the broker granted CAPS_ROOMS
    sender_keys: SenderKeys | None = None  # None: sealing is off (room bodies travel as given)

    _room_pending = _Pending

    def _init_rooms(self) -> None:
        self.rooms: dict[bytes, ev.RoomView] = {}
        self._room_asks: dict[bytes, bytes | None] = {}  # request id -> its room (None: create, list)
        self._room_out: OrderedDict[bytes, _Pending] = OrderedDict()
        self._room_keys_out: dict[bytes, tuple[bytes, list[bytes]]] = {}  # room_key id -> (room, frames)
        self._room_fetching: set[bytes] = set()  # rooms asked for (room_req) and not answered yet
        self._no_key = HeldMessages(NO_KEY_MAX, NO_KEY_PER_SENDER)
        self._no_key_since: OrderedDict[bytes, float] = OrderedDict()  # held id -> when (oldest first)
        self._room_resend_at: float | None = None
        self._room_unusable: set[str] = set()  # members whose device list we refused this run: no room key to them
        self._held_out: dict[bytes, RoomUploaded] = {}  # held files offered this run: FileSent on their file_done
        self._room_kept: dict[bytes, int] = {}  # room -> the highest message number kept (history committed)
        self._room_marked: dict[bytes, int] = {}  # room -> the delivered mark last sent

    # --- commands --------------------------------------------------------------------------------------------
    def room_request(self, message: Message, now: float) -> tuple[bytes, list[Action]]:
        """A management request (docs/PROTOCOL.md §5.7); its answer comes as ``RoomUpdated``/``RoomGone``/
        ``RoomsListed`` with ``ref`` = the id returned, or ``SendFailed`` with it."""
        msg_id = self._new_id()
        self._room_asks[msg_id] = getattr(message, "room", None)
        if not self.rooms_enabled:
            error = RemoteError("the broker does not support rooms" if self.state.value == "ready"
                                else "not connected", ErrorCode.BAD_FRAME)
            return msg_id, [Emit(ev.SendFailed(msg_id, error))]
        return msg_id, [self._transmit(pack(message, self._wall_ms(), msg_id), now)]

    def send_room_text(self, rid: bytes, body: bytes, now: float, msg_id: bytes | None = None) -> list[Action]:
        """Queue ``body`` for room ``rid``: sealed once the room and its members' devices are known."""
        msg_id, ts = msg_id or self._new_id(), self._wall_ms()
        if self.history is not None:
            self.history.add_outgoing(msg_id, self.user, body.decode("utf-8"), ts, rid)
        self._room_out[msg_id] = _Pending(rid, body, ts)
        return self._flush_rooms(now)

    def room_name(self, rid: bytes) -> str:
        """The room's name as last heard (this run, else the history's), else its id in hex."""
        room = self.rooms.get(rid)
        if room is not None:
            return room.name
        named = self.history.room_names().get(rid) if self.history is not None else None
        return named or rid.hex()

    def mark_room_read(self, rid: bytes, now: float) -> list[Action]:
        """The user has seen the room: its messages read here, and the room's read mark says so (§5.9)."""
        if self.history is not None:
            self.history.mark_room_read(rid)
        kept = self._room_kept.get(rid)
        if kept is None or not self.rooms_enabled or self.state.value != "ready":
            return []
        self._room_marked[rid] = kept
        return [self._transmit(self._pack(RoomMark(rid, kept, kept)), now)]

    def room_receipts(self, rid: bytes, watch: bool | None, now: float) -> tuple[bytes, list[Action]]:
        """Ask for the room's marks (``watch``: and have them pushed as they move, at most once a second)."""
        return self.room_request(RoomReceiptsRequest(rid, watch), now)

    def _room_marks(self, now: float) -> list[Action]:
        """After a batch is committed: one delivered mark per room whose kept messages moved (not one per message)."""
        if not self._room_kept or self.state.value != "ready":
            return []
        due = [(rid, kept) for rid, kept in self._room_kept.items() if self._room_marked.get(rid, 0) < kept]
        for rid, kept in due:
            self._room_marked[rid] = kept
        return [self._transmit(self._pack(RoomMark(rid, kept)), now) for rid, kept in due]

    # --- sending ----------------------------------------------------------------------------------------------
    def _flush_rooms(self, now: float) -> list[Action]:
        """Seal and send the room messages that can go now, in order per room; ask for what they wait for."""
        if self.state.value != "ready" or not self.rooms_enabled:
            return []
        actions: list[Action] = []
        blocked: set[bytes] = set()
        wanted: set[str] = set()
        for msg_id, pending in self._room_out.items():
            if pending.upload is not None and pending.upload.to is not None:
                if pending.frames is None:
                    actions += self._offer_held(msg_id, pending, wanted, now)
                continue
            if pending.frames is not None or pending.rid in blocked:
                continue
            room = self.rooms.get(pending.rid)
            if room is None or pending.rid in self._room_fetching:
                blocked.add(pending.rid)
                actions += self._fetch_room(pending.rid, now)
                continue
            if self.sender_keys is not None:
                missing = {user for user in room.joined if self.e2e.devices_of(user) is None and
                           user not in self._blocked and user not in self._room_unusable}
                if missing:
                    blocked.add(pending.rid)
                    wanted |= missing
                    continue
                actions += self._distribute(room, now)
                body = self.sender_keys.seal(room.rid, msg_id, pending.ts, pending.text)
            else:
                body = pending.text
            up = pending.upload
            frame = (RoomMessage(self.user, room.rid, room.epoch, body) if up is None else
                     RoomOffer(self.user, room.rid, room.epoch, up.xfer, up.size, up.chunk_size, body))
            pending.frames = pack(frame, pending.ts, msg_id)
            actions.append(self._transmit(pending.frames, now))
        return actions + (self._ask_keys(wanted, now) if wanted else [])

    def _distribute(self, room: ev.RoomView, now: float) -> list[Action]:
        """This device's sender key for ``room`` to every device of every joined member that lacks it; a new key
        first if a device that had it is no longer a member's (left, removed, unlinked)."""
        keys = self.sender_keys
        # A member whose key change waits for the user, or whose list we refused, gets no key meanwhile: the
        # devices it had leave the set, so the generation rotates past them (one member never blocks a room).
        devices = {(user, dev) for user in room.joined if user not in self._blocked
                   for dev, _ in getattr(self.e2e.devices_of(user), "devices", ())
                   if (user, dev) != (self.user, self.device)}
        if keys.must_rotate(room.rid, devices):
            log.info("user=%s room=%s a device left the room: new sender key", self.user, room.rid.hex())
            keys.rotate(room.rid)
        unsent = keys.unsent(room.rid, devices)
        if not unsent:
            return []
        payload = keys.distribution(room.rid)
        actions: list[Action] = []
        sent: set[tuple[str, int]] = set()
        for user in sorted({user for user, _ in unsent}):
            if user in self._blocked:
                continue  # their new key waits for the user: no room key to it until accepted (§10.3)
            msg_id, ts = self._new_id(), self._wall_ms()
            try:
                sealed = self.e2e.seal_copies(user, msg_id, ts, payload)
            except PeerKeyChanged:
                continue
            if type(sealed) is str:
                continue  # its list went missing meanwhile: fetched, and sent with the next message
            body, copies, _ = sealed
            frames = pack(RoomKey(self.user, user, room.rid, body, copies), ts, msg_id)
            self._room_keys_out[msg_id] = (room.rid, frames)
            actions.append(self._transmit(frames, now))
            sent |= {device for device in unsent if device[0] == user}
        keys.mark_sent(room.rid, sent)
        return actions

    def _fetch_room(self, rid: bytes, now: float) -> list[Action]:
        if rid in self._room_fetching:
            return []
        self._room_fetching.add(rid)
        msg_id = self._new_id()
        self._room_asks[msg_id] = rid
        return [self._transmit(pack(RoomRequest(rid), self._wall_ms(), msg_id), now)]

    def _room_acked(self, msg: Ack) -> list[Action] | None:
        """The broker took a room message or a sender key; None if ``msg`` is about neither."""
        if self._room_keys_out.pop(msg.ref, None) is not None:
            return []
        pending = self._room_out.pop(msg.ref, None)
        if pending is None:
            return None
        up = pending.upload
        if up is not None and up.to is not None:  # the broker holds it and queued the offer: the sender may go
            self._held_out[up.xfer] = up
            actions: list[Action] = [Emit(ev.FileUploaded(up.xfer, up.to, up.name, up.size))]
        elif up is not None:  # the room was told: for the sender, the file is sent (members fetch it from the store)
            actions = [Emit(ev.FileSent(up.xfer, self.user, up.name, up.size, up.bytes_sent, up.room))]
        else:
            if self.history is not None:
                self.history.advance(msg.ref, "stored")
            actions = [Emit(ev.Acked(msg.ref, msg.status.value, msg.seq))]
        if msg.missed:
            actions.append(Emit(ev.ErrorReported(RemoteError(
                f"{msg.missed} member device(s) of the room had a full queue and missed this message",
                ErrorCode.QUEUE_FULL, msg.ref))))
        return actions

    def _room_error(self, code: ErrorCode, error: RemoteError, ref: bytes | None, now: float) -> list[Action] | None:
        """An error about one of our room frames; None if it is about none."""
        if ref in self._room_keys_out:  # the member's devices changed, or it left: fetched again, key again
            rid, _ = self._room_keys_out.pop(ref)
            log.info("user=%s room=%s a sender key was refused: %s", self.user, rid.hex(), error.message)
            self.e2e.forget_devices()
            if self.sender_keys is not None:
                self.sender_keys.rotate(rid)  # whoever missed it gets the next one with the next message
            return self._refetch(rid, now)
        pending = self._room_out.get(ref)
        if pending is not None:
            held_to = pending.upload.to if pending.upload is not None else None
            if code is ErrorCode.DEVICES_CHANGED and held_to is not None and pending.reseals < MAX_RESEALS:
                pending.reseals += 1  # their devices changed: sealed again for the list as it is now
                pending.frames = None
                self.e2e.forget_devices(held_to)
                return self._flush_rooms(now)
            if code is ErrorCode.ROOM_CHANGED and pending.reseals < MAX_RESEALS:
                pending.reseals += 1
                for later in self._room_out.values():  # everything after it to that room goes again, in order
                    if later.rid == pending.rid:
                        later.frames = None
                return self._refetch(pending.rid, now)
            del self._room_out[ref]
            return self._failed(ref, pending, error)
        if ref in self._room_asks:
            rid = self._room_asks.pop(ref)
            self._room_fetching.discard(rid)
            if code is ErrorCode.UNKNOWN_ROOM and rid in self.rooms:  # gone while we were away
                return self._room_gone(rid, "removed", None, None) + [Emit(ev.SendFailed(ref, error))]
            return [Emit(ev.SendFailed(ref, error))]
        return None

    def _refetch(self, rid: bytes, now: float) -> list[Action]:
        """The room moved on: its members and their devices again, then what waits is sealed for it."""
        room = self.rooms.get(rid)
        if room is not None:
            for user in room.joined:
                self.e2e.forget_devices(user)
        self._room_fetching.discard(rid)
        return self._fetch_room(rid, now)

    # --- the broker's answers -----------------------------------------------------------------------------------
    def _on_room_frame(self, env: Envelope, now: float) -> list[Action]:
        """A room message, or the broker's word about rooms (``room_info``, ``room_list``, ``room_event``)."""
        msg = env.message
        kind = type(msg)
        if kind is RoomMessage or kind is RoomOffer:
            return self._on_room_message(env.msg_id, msg, env.ts, now)
        if kind is RoomCredit or kind is RoomChunk:
            return self._on_room_transfer(env, now)
        if kind is RoomInfo:
            return self._on_room_info(msg, now)
        if kind is RoomListing:
            return self._on_room_listing(env, now)
        if kind is RoomReceipts:
            self._room_asks.pop(msg.ref, None)
            marks = {user: (delivered, read) for user, delivered, read in msg.marks}
            return [Emit(ev.RoomReceipts(msg.room, msg.seq, marks, msg.ref))]
        return self._on_room_event(msg, now)

    def _on_room_info(self, msg: RoomInfo, now: float) -> list[Action]:
        self._room_asks.pop(msg.ref, None)
        self._room_fetching.discard(msg.room)
        members = tuple((user, role, bool(flags & 1)) for user, role, flags in msg.members)
        if not any(user == self.user for user, _, _ in members):  # we left (or declined)
            return self._room_gone(msg.room, "left", None, msg.ref, msg.name)
        view = ev.RoomView(msg.room, msg.name, msg.topic or "", msg.owner, msg.epoch, members)
        self.rooms[msg.room] = view
        if self.history is not None:
            self.history.save_room(msg.room, msg.name, msg.topic or "")
        return [Emit(ev.RoomUpdated(view, msg.ref))] + self._flush_rooms(now)

    def _on_room_listing(self, env: Envelope, now: float) -> list[Action]:
        msg: RoomListing = env.message  # type: ignore[assignment]
        ref = msg.ref if msg.ref in self._room_asks else None
        listed = {rid for rid, *_ in msg.rooms}
        actions: list[Action] = []
        for rid in [rid for rid in self.rooms if rid not in listed]:  # left or removed while we were away
            actions += self._room_gone(rid, "removed", None, None)
        views = []
        for rid, name, epoch, flags in msg.rooms:
            known = self.rooms.get(rid)
            if known is None or known.epoch != epoch or known.name != name:
                actions += self._fetch_room(rid, now)
            views.append(ev.RoomView(rid, name, known.topic if known else "", known.owner if known else "", epoch,
                                     known.members if known else ((self.user, flags >> 1 & 3, bool(flags & 1)),)))
        if ref is not None:
            del self._room_asks[ref]
        return actions + [Emit(ev.RoomsListed(tuple(views), ref))]

    def _on_room_event(self, msg: RoomEvent, now: float) -> list[Action]:
        room = self.rooms.get(msg.room)
        name = msg.name or (room.name if room else msg.room.hex()[:8])
        actions: list[Action] = [Emit(ev.RoomEvent(msg.room, name, msg.kind.value, msg.user, msg.by))]
        if msg.kind is RoomEventKind.REMOVED and msg.user == self.user:
            return actions + self._room_gone(msg.room, "removed", msg.by, None)
        # Every kind changes the room as we show it (a declined invitation, say, moves no epoch): fetched again,
        # with its members' device lists when who is in it (or their devices) changed.
        if msg.kind is RoomEventKind.DEVICES:
            self.e2e.forget_devices(msg.user)
        membership = room is not None and room.epoch != msg.epoch
        return actions + (self._refetch(msg.room, now) if membership else self._fetch_room(msg.room, now))

    def _room_gone(self, rid: bytes, why: str, by: str | None, ref: bytes | None, name: str | None = None
                   ) -> list[Action]:
        room = self.rooms.pop(rid, None)
        if self.sender_keys is not None:
            self.sender_keys.forget_room(rid)
        actions: list[Action] = []
        gone = RemoteError("you are no longer in the room", ErrorCode.NOT_MEMBER)
        for msg_id in [m for m, p in self._room_out.items() if p.rid == rid]:
            actions += self._failed(msg_id, self._room_out.pop(msg_id), gone)
        return actions + [Emit(ev.RoomGone(rid, name or (room.name if room else ""), why, by, ref))]

    def _failed(self, msg_id: bytes, pending: _Pending, error: P2PChatError) -> list[Action]:
        """A room message, or a file's announcement, that will not go."""
        up = pending.upload
        if up is not None:
            return [Emit(ev.FileFailed(up.xfer, self.user, up.name, "out", error, up.room))]
        if self.history is not None:
            self.history.fail(msg_id)
        return [Emit(ev.SendFailed(msg_id, error))]

    # --- receiving ----------------------------------------------------------------------------------------------
    def _on_room_message(self, msg_id: bytes, msg: RoomMessage | RoomOffer, ts: int, now: float) -> list[Action]:
        if msg_id in self._seen:
            return self._after_history(msg_id, None, now)
        try:
            if self.sender_keys is not None:
                plaintext = self.sender_keys.open(msg.room, msg.sender, msg_id, ts, msg.body)
            else:
                plaintext = msg.body
        except NoSenderKey:  # its key is queued before it, unless it went astray: kept, not consumed, a while
            if self._no_key.count(msg.sender) < NO_KEY_PER_SENDER and msg_id not in self._no_key_since:
                self._no_key.add(msg_id, msg, ts)
                self._no_key_since[msg_id] = now
                return []
            return self._room_unreadable(msg_id, msg, "no sender key arrived for it", now)
        except ProtocolError as exc:
            return self._room_unreadable(msg_id, msg, exc.message, now)
        if type(msg) is RoomOffer:
            return self._on_room_offer(msg_id, msg, plaintext, now)
        self._seen[msg_id] = None
        if msg.seq is not None and msg.seq > self._room_kept.get(msg.room, 0):
            self._room_kept[msg.room] = msg.seq  # marked once the batch is committed (``_room_marks``)
        text = plaintext.decode("utf-8", errors="replace")
        actions = self._after_history(msg_id, None, now)
        if msg.sender == self.user:  # what another device of ours sent to the room
            if self.history is not None and not self.history.add_echo(msg_id, self.user, text, ts, msg.room):
                return actions
            return [Emit(ev.MessageEchoed(msg_id, self.user, text, ts, msg.room))] + actions
        if self.history is not None and not self.history.add_incoming(msg_id, msg.sender, text, ts, msg.room):
            return actions
        return [Emit(ev.MessageReceived(msg_id, msg.sender, text, ts, msg.room, self.room_name(msg.room)))] + actions

    def _on_room_offer(self, msg_id: bytes, msg: RoomOffer, plaintext: bytes, now: float) -> list[Action]:
        """A file in the room's store at the broker: the transfer manager fetches it (or refuses it, and says so);
        ours from another device is only consumed."""
        try:
            meta = offer_meta(plaintext, True)
        except ProtocolError as exc:
            return self._room_unreadable(msg_id, msg, exc.message, now)
        self._seen[msg_id] = None
        self._consumes.append(msg_id)  # the transfer manager has taken it over (its record resumes it)
        if msg.sender == self.user or self.transfers is None:
            return []
        return self.transfers.on_room_offer(msg.room, msg.sender, msg.xfer, msg.size, msg.chunk_size, meta.name,
                                            meta.key, now, meta.folder)

    def _room_unreadable(self, msg_id: bytes, msg: RoomMessage | RoomOffer, why: str, now: float) -> list[Action]:
        """Consumed (it will never open) and reported, aggregated per sender."""
        self._consumes.append(msg_id)
        text = f"a message to a room from {msg.sender} could not be decrypted: {why}"
        if not self._refusals.record(msg.sender, f"user={self.user} peer={msg.sender}", text, now):
            return []
        return [Emit(ev.ErrorReported(ProtocolError(text, ErrorCode.INTEGRITY, msg_id)))]

    def _on_room_key_opened(self, msg_id: bytes, msg: RoomKey, plaintext: bytes, now: float) -> list[Action]:
        """A sender key, opened under its sender's pinned key: kept; the room messages that waited for it open."""
        actions = self._after_history(msg_id, None, now)
        if self.sender_keys is None:
            return actions
        try:
            payload = unpack_sender_key(plaintext)
            if payload.rid != msg.room or not self._sealed_by_device(msg, payload.dev):
                raise ProtocolError("it names another room than its frame's, or another device than the one "
                                    "that sealed it")
            self.sender_keys.accept(msg.sender, plaintext)
        except ProtocolError as exc:
            log.warning("user=%s peer=%s dropped a room key: %s", self.user, msg.sender, exc.message)
            return actions
        for held_id, held, ts in self._no_key.take(msg.sender):
            self._no_key_since.pop(held_id, None)
            actions += self._on_room_message(held_id, held, ts, now)
        return actions

    def _sealed_by_device(self, msg: RoomKey, dev: int) -> bool:
        """The device a sender key names is the one whose key sealed it (when the sender's list is known): no
        device speaks for another."""
        devices = self.e2e.devices_of(msg.sender)
        if devices is None:
            return True  # sealed by the pinned key: its number is the sender's first device's, not known here
        sealer = sealed_sender_key(msg.body)
        return any(number == dev and key == sealer for number, key in devices.devices)

    def _rooms_registered(self, now: float) -> list[Action]:
        """Registered with rooms: what the broker has of ours (rooms may have moved while we were away)."""
        if not self.rooms_enabled:
            return []
        for pending in self._room_out.values():
            pending.frames = None  # sealed again for the room as it is now
        msg_id = self._new_id()
        self._room_asks[msg_id] = None
        return [self._transmit(pack(RoomListRequest(), self._wall_ms(), msg_id), now)]

    def _room_tick(self, now: float) -> list[Action]:
        """Room messages whose sender key did not come in time are given up; unacknowledged sender keys and room
        messages go again a while after they went (their ids keep them once)."""
        return self._no_key_expired(now) + self._room_resend(now)

    def _no_key_expired(self, now: float) -> list[Action]:
        """A sender key is queued before the messages it opens; one that has not come ``NO_KEY_WAIT`` after its
        message went astray (refused, or sealed for a list without this device): the message is consumed and
        reported, never kept (and redelivered) forever."""
        actions: list[Action] = []
        while self._no_key_since and now - next(iter(self._no_key_since.values())) > NO_KEY_WAIT:
            msg_id, _ = self._no_key_since.popitem(last=False)
            held = self._no_key.pop(msg_id)
            if held is not None:
                actions += self._room_unreadable(msg_id, held[0], "its sender key never came", now)
        return actions

    def _room_resend(self, now: float) -> list[Action]:
        if not (self._room_keys_out or self._room_out) or self.state.value != "ready":
            self._room_resend_at = None
            return []
        if self._room_resend_at is None:
            self._room_resend_at = now + RESEND_AFTER
        if now < self._room_resend_at:
            return []
        self._room_resend_at = now + RESEND_AFTER
        return [self._transmit(frames, now) for frames in [f for _, f in self._room_keys_out.values()] + [
            p.frames for p in self._room_out.values() if p.frames is not None]]

    def _rooms_closed(self) -> list[Action]:
        error = BrokenError("client closed before the broker acknowledged", ErrorCode.CLOSED)
        actions: list[Action] = []
        for msg_id, pending in self._room_out.items():
            actions += self._failed(msg_id, pending, error)
        self._room_out.clear()
        return actions

    # --- files (§8.1): the broker keeps them; the transfer manager uploads and fetches ---------------------------
    def send_room_file(self, rid: bytes, path, now: float) -> tuple[bytes, list[Action]]:
        """Upload ``path`` to room ``rid``'s store at the broker; announced to the room once it is whole."""
        assert self.transfers is not None
        xfer, actions = self.transfers.send_room_file(rid, path, now)
        return xfer, actions + self._room_uploads(now)

    def _room_uploads(self, now: float) -> list[Action]:
        """Files the broker now holds whole: each announced with a ``room_offer`` sealed like a message."""
        uploads = self.transfers.take_room_uploads() if self.transfers is not None else []
        for up in uploads:
            self._room_out[self._new_id()] = _Pending(up.room, up.offer_body(), self._wall_ms(), upload=up)
        return self._flush_rooms(now) if uploads else []

    def _offer_held(self, msg_id: bytes, pending: _Pending, wanted: set[str], now: float) -> list[Action]:
        """The ``file_offer`` of a file the broker holds for its recipient (``held``), sealed to each of its devices
        like any offer; nothing yet if its key or list must be fetched first (``wanted``) or waits for the user."""
        up = pending.upload
        try:
            if self.e2e.key_of(up.to) is None:
                wanted.add(up.to)
                return []
            sealed = self.e2e.seal_each(up.to, msg_id, pending.ts, pending.text)
        except PeerKeyChanged:
            return []  # held like a message to them until the user accepts their new key
        if type(sealed) is str:
            wanted.add(sealed)
            return []
        body, copies = sealed
        pending.frames = pack(FileOffer(self.user, up.to, up.xfer, up.size, up.chunk_size, body, copies, held=True),
                              pending.ts, msg_id)
        return [self._transmit(pending.frames, now)]

    def _held_delivered(self, msg: FileDone) -> list[Action] | None:
        """The recipient of a file we left at the broker has it (its ``file_done``); None if not about one."""
        up = self._held_out.pop(msg.xfer, None) if msg.recipient == self.user else None
        if up is None or msg.sender != up.to:
            return None
        return [Emit(ev.FileSent(up.xfer, up.to, up.name, up.size, up.bytes_sent))]

    def _on_room_transfer(self, env: Envelope, now: float) -> list[Action]:
        """The broker's credit for an upload, or a chunk of a fetch."""
        if self.transfers is None:
            return []
        return self.transfers.on_message(env, now) + self._room_uploads(now)

