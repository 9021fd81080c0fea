"""Where a transfer's frames go: to the peer (one-to-one, docs/PROTOCOL.md §8) or to a room's file store at
the broker (§8.1).

Both machines (``sending.Outgoing``, ``receiving.Incoming``) run the same credit flow whoever is at the other
end; their link makes the frames and says what the other end is. One-to-one (``PEER_LINK``): the offer sealed
to the peer, ``file_credit``, ``file_chunk``, ``file_done`` and ``file_cancel``, each to the peer's device in
the transfer. A room (``RoomLink``): the broker is the other end. It plays the receiver of an upload
(``room_upload`` is the offer, ``room_credit`` the credit, a credit that holds every chunk the done) and the
sender of each member's fetch (``room_fetch`` is the credit, ``room_chunk`` the chunks). No done and no
cancel travel in a room: the broker keeps the file for every member, whatever one of them does. A file held for
someone offline (``InboxLink``, §8.2) is a room file of the recipient's inbox: uploaded with ``file_upload``,
fetched by the recipient, who then tells the sender with ``file_done``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import msgpack

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit, Transmit
from p2pchat.client.core.transfer_machine import PEER_GONE, Input
from p2pchat.client.e2e import PeerKeyChanged
from p2pchat.common.errors import ErrorCode, P2PChatError
from p2pchat.common.protocol import (
    MAX_TEXT_CHARS,
    FileCancel,
    FileChunk,
    FileCredit,
    FileDone,
    FileOffer,
    Message,
    pack,
)
from p2pchat.common.protocol_rooms import FileUpload, RoomChunk, RoomCredit, RoomFetch, RoomUpload

if TYPE_CHECKING:
    from p2pchat.client.core.receiving import Incoming
    from p2pchat.client.core.sending import Outgoing
    from p2pchat.client.core.transfer_machine import TransferMachine

PEER_FRAMES = (FileOffer, FileCredit, FileChunk, FileDone, FileCancel)
ROOM_FRAMES = (RoomCredit, RoomChunk)  # what the broker sends about a room transfer
# Broker errors about a room transfer that mean "not now": the file store (in a cluster, the broker holding
# the file) is out of reach, a chunk ran ahead of its credit, or the upload is not complete yet. Asked again
# on the stall timer; anything else (unknown_transfer, not_member, unknown_room, room_quota, ...) fails it.
ROOM_PAUSES = frozenset({ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.CREDIT_EXCEEDED, ErrorCode.NOT_UPLOADED})


@dataclass(frozen=True, slots=True)
class RoomUploaded:
    """A room file the broker holds whole: what the session seals into the ``room_offer`` (name and key) and
    announces (``xfer``, ``size``, ``chunk_size``); ``bytes_sent`` by this run, for the user's ``FileSent``."""

    xfer: bytes
    room: bytes
    name: str
    size: int
    chunk_size: int
    key: bytes
    bytes_sent: int
    to: str | None = None  # a held file (§8.2): offered to this user with file_offer.held; None: a room's
    folder: bool = False  # a folder's stream (§8.3)

    def offer_body(self) -> bytes:
        """The body of the ``room_offer`` (§8.1), or of a held file's ``file_offer`` (§8.2), before sealing."""
        return msgpack.packb(offer_map(self.name, self.folder) | {"key": self.key}, use_bin_type=True)


def offer_map(name: str, folder: bool) -> dict:
    """What every offer's body says of what is offered (§8, §8.3): a folder says so; a file is as it always was."""
    return {"name": name[:MAX_TEXT_CHARS], "kind": "folder"} if folder else {"name": name[:MAX_TEXT_CHARS]}


class TransferLink(Protocol):
    room: bytes | None  # the room of a room transfer (its events carry it); None one-to-one
    CONFIRMED_BY_CREDIT: ClassVar[bool]  # the receiver holding every chunk ends the upload (no done frame)
    # The other end sends again the very bytes it holds (the broker's store): a chunk that does not fit the
    # offer will not fit the next time either, so it counts toward the few retries a chunk gets.
    RESENDS_HELD: ClassVar[bool]

    def party(self, machine: TransferMachine) -> str | None:
        """The user whose presence and key the transfer depends on; None: only the broker's."""

    def owns(self, machine: TransferMachine, msg: Message) -> bool:
        """``msg`` comes from the transfer's other end (any other frame naming the transfer is ignored)."""

    def pauses(self, code: ErrorCode) -> bool:
        """A broker error with ``code`` about the transfer means wait, not fail."""

    def offer(self, out: Outgoing) -> list[Action]: ...

    def chunk(self, out: Outgoing, index: int, final: bool, payload: bytes, crc: int | None = None,
              sha256: bytes | None = None) -> Transmit: ...

    def sent(self, out: Outgoing) -> list[Action]:
        """The other end holds the whole file."""

    def credit(self, inc: Incoming, next_: int, upto: int, restart: bool) -> Transmit: ...

    def hold(self, inc: Incoming) -> list[Action]:
        """Accepted, but waiting for a slot."""

    def done(self, inc: Incoming) -> list[Action]: ...

    def cancel(self, machine: TransferMachine, error: P2PChatError) -> list[Action]: ...

    def record(self) -> dict:
        """What a transfer's record adds, to take the link up again after a restart (``link_of``)."""


class PeerLink:
    """One-to-one: every frame to the peer, addressed to its device in the transfer (``peer_dev``) if known."""

    __slots__ = ()
    room = None
    CONFIRMED_BY_CREDIT = False
    RESENDS_HELD = False

    def party(self, machine: TransferMachine) -> str | None:
        return machine.peer

    def owns(self, machine: TransferMachine, msg: Message) -> bool:
        return type(msg) in PEER_FRAMES and msg.sender == machine.peer  # type: ignore[attr-defined]

    def pauses(self, code: ErrorCode) -> bool:
        return code in PEER_GONE

    def offer(self, out: Outgoing) -> list[Action]:
        """The offer sealed to the peer with the file key; waits (NO_KEY) for their key or device list."""
        ctx = out.ctx
        try:
            if ctx.e2e.enabled and ctx.e2e.key_of(out.peer) is None:
                ctx.key_wants.add(out.peer)
                return out.enter(Input.NO_KEY) or []
        except PeerKeyChanged:  # waits for the user's decision, as messages do; offered again once accepted
            return out.enter(Input.NO_KEY) or []
        meta = offer_map(out.name, out.source.folder is not None)
        if out.cipher is not None:
            meta["key"] = out.cipher.key
            meta["session"] = out.session
        # One id per sending session: a store-and-forward broker keeps one copy however often we offer.
        msg_id, ts = out.offer_id, out.offer_ts
        sealed = ctx.e2e.seal_each(out.peer, msg_id, ts, msgpack.packb(meta, use_bin_type=True))
        if type(sealed) is str:  # their device list (or ours) first
            ctx.key_wants.add(sealed)
            return out.enter(Input.NO_KEY) or []
        offer = FileOffer(ctx.user, out.peer, out.xfer, out.size, out.chunk_size, *sealed)
        return [Transmit(pack(offer, ts, msg_id))]

    def chunk(self, out: Outgoing, index: int, final: bool, payload: bytes, crc: int | None = None,
              sha256: bytes | None = None) -> Transmit:
        chunk = FileChunk(out.ctx.user, out.peer, out.xfer, index, final, crc, sha256, out.peer_dev)
        return out.ctx.send(out.xfer, chunk, payload)

    def sent(self, out: Outgoing) -> list[Action]:
        folder = out.source.folder
        if folder is None:
            return [Emit(ev.FileSent(out.xfer, out.peer, out.name, out.size, out.bytes_sent))]
        return [Emit(ev.FileSent(out.xfer, out.peer, out.name, out.size, out.bytes_sent, files=folder.files,
                                 skipped=folder.skipped))]

    def credit(self, inc: Incoming, next_: int, upto: int, restart: bool) -> Transmit:
        credit = FileCredit(inc.ctx.user, inc.peer, inc.xfer, next_, upto, restart, inc.peer_dev, inc.src())
        return inc.ctx.send(inc.xfer, credit, urgent=True)

    def hold(self, inc: Incoming) -> list[Action]:
        """A credit of nothing: the sender keeps the transfer while we answer its offers."""
        return [inc.ctx.send(inc.xfer, FileCredit(inc.ctx.user, inc.peer, inc.xfer, 0, 0, False, inc.peer_dev,
                                                  inc.src()))]

    def done(self, inc: Incoming) -> list[Action]:
        return [inc.ctx.send(inc.xfer, FileDone(inc.ctx.user, inc.peer, inc.xfer, inc.peer_dev, inc.src()))]

    def cancel(self, machine: TransferMachine, error: P2PChatError) -> list[Action]:
        ctx = machine.ctx
        cancel = FileCancel(ctx.user, machine.peer, machine.xfer, error.code, error.message,
                            machine.peer_dev, machine.src())  # type: ignore[attr-defined]
        return [ctx.send(machine.xfer, cancel)]

    def record(self) -> dict:
        return {}


PEER_LINK = PeerLink()


@dataclass(frozen=True)
class RoomLink:
    """A room file: uploaded to, or fetched from, the broker's store of room ``store``. Its chunks are always
    sealed (``TransferManager.send_room_file`` refuses sealing off: a ``room_chunk`` has no CRC)."""

    store: bytes  # the room's id: where the broker's store keeps the file
    CONFIRMED_BY_CREDIT: ClassVar[bool] = True
    RESENDS_HELD: ClassVar[bool] = True

    @property
    def room(self) -> bytes | None:
        return self.store

    def party(self, machine: TransferMachine) -> str | None:
        return None  # the broker: reachable whenever the session runs (it ticks transfers only then)

    def owns(self, machine: TransferMachine, msg: Message) -> bool:
        return type(msg) in ROOM_FRAMES and msg.room == self.store  # type: ignore[attr-defined]

    def pauses(self, code: ErrorCode) -> bool:
        return code in ROOM_PAUSES

    def offer(self, out: Outgoing) -> list[Action]:
        """Ask the broker for credit; asked again it answers with ``next`` = the chunks it holds (a resume)."""
        return [out.ctx.send(out.xfer, RoomUpload(self.store, out.xfer, out.size, out.chunk_size))]

    def chunk(self, out: Outgoing, index: int, final: bool, payload: bytes, crc: int | None = None,
              sha256: bytes | None = None) -> Transmit:
        return out.ctx.send(out.xfer, RoomChunk(self.store, out.xfer, index, final), payload)

    def sent(self, out: Outgoing) -> list[Action]:
        """Nothing for the user yet: the session seals the offer (``take_room_uploads``) and reports it."""
        out.ctx.uploaded.append(RoomUploaded(out.xfer, self.store, out.name[:MAX_TEXT_CHARS], out.size,
                                             out.chunk_size, out.cipher.key, out.bytes_sent, self.to,
                                             out.source.folder is not None))
        return []

    def credit(self, inc: Incoming, next_: int, upto: int, restart: bool) -> Transmit:
        return inc.ctx.send(inc.xfer, RoomFetch(self.store, inc.xfer, next_, upto, restart), urgent=True)

    def hold(self, inc: Incoming) -> list[Action]:
        return []  # the broker keeps the file for as long as we take to ask

    def done(self, inc: Incoming) -> list[Action]:
        return []  # its last fetch (next = chunk count) told the broker already

    def cancel(self, machine: TransferMachine, error: P2PChatError) -> list[Action]:
        return []  # an unfinished upload expires at the broker; a fetch is just not asked for again

    @property
    def to(self) -> str | None:
        return None

    def record(self) -> dict:
        return {"room": self.store.hex()}


@dataclass(frozen=True)
class InboxLink(RoomLink):
    """A file the broker holds for ``recipient`` (§8.2), in the store of its inbox (``inbox_id``): uploaded by the
    sender with ``file_upload`` (``recipient`` set), fetched by the recipient (``recipient`` None) like a room
    file; the fetch ends with ``file_done`` to the sender, which learns (if online) that it was delivered."""

    recipient: str | None = None

    @property
    def room(self) -> bytes | None:
        return None  # one-to-one for the user: its events carry no room

    @property
    def to(self) -> str | None:
        return self.recipient

    def offer(self, out: Outgoing) -> list[Action]:
        return [out.ctx.send(out.xfer, FileUpload(self.recipient, out.xfer, out.size, out.chunk_size))]

    def done(self, inc: Incoming) -> list[Action]:
        return [inc.ctx.send(inc.xfer, FileDone(inc.ctx.user, inc.peer, inc.xfer))]

    def record(self) -> dict:
        return {"inbox": self.store.hex(), "to": self.recipient}


def link_of(record: dict) -> TransferLink:
    """The link of a transfer record (``TransferLink.record``)."""
    if record.get("inbox"):
        return InboxLink(bytes.fromhex(record["inbox"]), record.get("to"))
    room = record.get("room")
    return RoomLink(bytes.fromhex(room)) if room else PEER_LINK
