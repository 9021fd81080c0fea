"""The sending side of a file transfer: offer, send within the receiver's credit, finish or fail.

    OFFERING --credit--> SENDING --done--> DONE        (FAILED from every live phase)
      ^    \\              |
      |     no key (or a key change not yet accepted), the offer refused as
      |     undecryptable, or the peer unreachable once it accepted
      |          v         v
      +------- WAITING <---+    (re-offered when the key arrives or the peer is back)

An offer the receiver could not open (``file_cancel integrity`` before any credit: sealed to a key it no
longer has) makes the sender ask the broker for the receiver's key: a new key is a key change, and the
offer goes again, sealed to it, once the user accepts it; the same key gets one more offer, and a second
refusal fails the transfer.

The sender never has more than ``window`` chunks beyond the receiver's last verified chunk in
flight, so the broker, which only relays, holds at most a window per transfer. Each sending
session seals under a fresh file key, sent inside the offer; the offer's id and timestamp are fixed
for the session, so a repeated offer is the identical frame. The file is read through the shell's
``TransferFiles`` port, never opened here; a folder is one stream (§8.3: its manifest, then its files), read
the same way, and its offer says so. The transfer's link (``transfer_links``) makes the frames: for a
room file the broker is the receiver, ``room_upload`` the offer, and a credit holding every chunk the done.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from p2pchat.client.core.actions import Action, Transmit
from p2pchat.client.core.outbox import MAX_RESEALS
from p2pchat.client.core.ports import Folder, Source, SourceFile
from p2pchat.client.core.transfer_machine import IGNORE, Input, Phase, Progress, Table
from p2pchat.client.core.transfer_machine import TransferContext, TransferMachine, frame_id
from p2pchat.common.crypto import FileCipher
from p2pchat.common.errors import ErrorCode, P2PChatError, TransferError
from p2pchat.common.protocol import FileCancel, FileCredit

if TYPE_CHECKING:
    from p2pchat.client.core.transfer_links import TransferLink
    from p2pchat.common.protocol_rooms import RoomCredit

log = logging.getLogger(__name__)

MIN_REWIND_INTERVAL = 0.5  # seconds: a sender goes back for chunks already sent at most this often
HASH_BLOCK = 1 << 20

_OFFERING, _WAITING, _SENDING = Phase.OFFERING, Phase.WAITING, Phase.SENDING
SENDER: Table = {
    (_OFFERING, Input.START): _OFFERING,
    # the offer again: after a stall or a reconnect always, when the key or the peer is back if waiting for it
    (_OFFERING, Input.STALLED): _OFFERING, (_WAITING, Input.STALLED): _OFFERING, (_SENDING, Input.STALLED): _OFFERING,
    (_OFFERING, Input.RECONNECTED): _OFFERING, (_WAITING, Input.RECONNECTED): _OFFERING,
    (_SENDING, Input.RECONNECTED): _OFFERING,
    (_OFFERING, Input.KEY_ARRIVED): IGNORE, (_WAITING, Input.KEY_ARRIVED): _OFFERING,
    (_SENDING, Input.KEY_ARRIVED): IGNORE,
    (_OFFERING, Input.PEER_BACK): IGNORE, (_WAITING, Input.PEER_BACK): _OFFERING, (_SENDING, Input.PEER_BACK): IGNORE,
    (_OFFERING, Input.NO_KEY): _WAITING,  # decided while offering
    (_OFFERING, Input.UNDECRYPTABLE): _WAITING, (_WAITING, Input.UNDECRYPTABLE): _WAITING,  # not once it accepted
    # the receiver: a credit (from any live phase: it may answer an earlier offer), the end
    (_OFFERING, Input.CREDIT): _SENDING, (_WAITING, Input.CREDIT): _SENDING, (_SENDING, Input.CREDIT): _SENDING,
    (_OFFERING, Input.DONE): Phase.DONE, (_WAITING, Input.DONE): Phase.DONE, (_SENDING, Input.DONE): Phase.DONE,
    (_OFFERING, Input.UNREACHABLE): _WAITING, (_WAITING, Input.UNREACHABLE): _WAITING,
    (_SENDING, Input.UNREACHABLE): _WAITING,
    (_OFFERING, Input.CANCEL): Phase.FAILED, (_WAITING, Input.CANCEL): Phase.FAILED,
    (_SENDING, Input.CANCEL): Phase.FAILED,
    (_OFFERING, Input.ABORT): Phase.FAILED, (_WAITING, Input.ABORT): Phase.FAILED, (_SENDING, Input.ABORT): Phase.FAILED,
}  # not here, so a failure: OFFER and CHUNK (the receiver's frames), VERIFIED, and NO_KEY outside OFFERING


@dataclass(slots=True, eq=False)
class Outgoing(TransferMachine):
    TABLE = SENDER
    DIRECTION = "out"

    source: Source  # the file, or the folder whose stream is sent (§8.3), as it was when offered
    chunk_size: int
    phase: Phase = Phase.OFFERING
    accepted: bool = False  # the receiver has granted credit at least once
    send_next: int = 0
    upto: int = 0
    confirmed: int = 0  # chunks the receiver has verified
    hashed: int = 0  # bytes fed to the hasher, always a prefix of the file
    bytes_sent: int = 0  # payload bytes transmitted, resends included
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    reader: SourceFile | None = None  # opened by the shell's port at the first chunk
    rate: Progress | None = None
    cipher: FileCipher | None = None  # end-to-end: a fresh key for each sending session (never a nonce twice)
    session: int = 1  # sending sessions of this transfer so far, this one included (persisted)
    offer_id: bytes = b""  # the offer's id and ts, fixed for the session: a repeated offer is byte-identical
    offer_ts: int = 0
    rewound_at: float = float("-inf")  # when a credit last sent us back to chunks already sent
    refused_seals: int = 0  # offers the receiver could not open (one more is sent, then it fails)
    peer_dev: int | None = None  # the receiver's device that took it (its first credit's ``src``), if it said
    refusals: frozenset[int] = frozenset()  # the receiver's devices that refused it before any took it
    reseals: int = 0  # offers refused for a device list that changed (``MAX_RESEALS``, as messages)

    @classmethod
    def begin(cls, ctx: TransferContext, xfer: bytes, peer: str, link: TransferLink, source: Source, chunk_size: int,
              session: int, now: float, taker: int | None = None) -> Outgoing:
        """A new sending session of ``xfer`` (recorded for a resume after a restart); ``start`` offers it."""
        out = cls(ctx, xfer, peer, link, source, chunk_size, session=session, peer_dev=taker)
        # A fresh key per sending session: a file changed in place (same size, mtime and inode) and sent
        # again after a restart must not seal other bytes under a (key, nonce) pair already used.
        if ctx.e2e.enabled:
            out.cipher = FileCipher(ctx.e2e.new_file_key(), xfer)
        # The offer is sealed under a key derived from its id, with a fixed nonce: the same id with
        # other bytes (a new file key) or another ts would reuse that nonce. One id per session.
        out.offer_id, out.offer_ts = frame_id(xfer, ctx.new_id), ctx.wall_ms()
        out.rate = Progress(started=now, last_activity=now, heard=now)
        ctx.records.save("outgoing", xfer, out.record())
        return out

    @staticmethod
    def source_of(record: dict) -> Source:
        """The source a record (``record``) names, as it was when offered (a folder is walked again to read it)."""
        folder = record.get("folder")
        return Source(Path(record["path"]), record["size"], record["mtime_ns"], record["inode"],
                      None if folder is None else Folder(bytes.fromhex(folder["digest"]), folder["files"]))

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        src = self.source
        folder = {} if src.folder is None else {"folder": {"digest": src.folder.digest.hex(),
                                                           "files": src.folder.files}}
        return {"xfer": self.xfer.hex(), "peer": self.peer, "path": str(src.path), "size": src.size,
                "mtime_ns": src.mtime_ns, "inode": src.inode, "chunk_size": self.chunk_size,
                "session": self.session, "taker": self.peer_dev} | folder | self.link.record()

    # --- inputs -------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return self._offer(Input.START, now)

    def on_signal(self, what: Input, now: float) -> list[Action]:
        """STALLED, RECONNECTED, KEY_ARRIVED or PEER_BACK: offer again if the table says so."""
        if what is Input.RECONNECTED:
            self.rate.heard = now  # our own outage does not count against the peer
        return self._offer(what, now)

    def on_no_key(self, error: P2PChatError) -> list[Action]:
        """No usable key for the peer: a transfer it never accepted fails."""
        return [] if self.accepted else self.fail(error, tell_peer=False)

    def on_cancel(self, error: P2PChatError) -> list[Action]:
        """The receiver cancels. ``integrity`` before it accepted: it could not open our offer, so its key may
        have changed: ask the broker, and offer again when the key arrives (once)."""
        if error.code is not ErrorCode.INTEGRITY or self.accepted or self.refused_seals or not self.ctx.e2e.enabled:
            return TransferMachine.on_cancel(self, error)
        refused = self.enter(Input.UNDECRYPTABLE)
        if refused is not None:
            return refused
        self.refused_seals += 1
        self.ctx.key_wants.add(self.peer)
        log.info("user=%s peer=%s xfer=%s offer refused as undecryptable: asking for their key", self.ctx.user,
                 self.peer, self.xfer.hex()[:8])
        return []

    def on_error(self, error: P2PChatError, now: float) -> list[Action]:
        """An ERROR about one of our frames: wait for a peer that accepted and went away, or for their device
        list when the offer was sealed for an old one (a few times), else fail."""
        if error.code is ErrorCode.DEVICES_CHANGED and self.reseals < MAX_RESEALS:
            refused = self.enter(Input.NO_KEY)  # offered again when the list is in (KEY_ARRIVED)
            if refused is None:
                self.reseals += 1
                self.ctx.e2e.forget_devices(self.peer)
                self.ctx.key_wants.add(self.peer)
            return refused or []
        if self.link.pauses(error.code) and self.accepted:
            refused = self.enter(Input.UNREACHABLE)
            if refused is None:
                self.rate.last_activity = now  # re-offered when the peer is back
            return refused or []
        return self.fail(error, tell_peer=False)

    def on_credit(self, credit: FileCredit | RoomCredit, now: float) -> list[Action]:
        was = self.phase
        refused = self.enter(Input.CREDIT)
        if refused is not None:
            return refused
        self.rate.last_activity = self.rate.heard = now
        self.accepted = True
        if credit.next > self.chunks:
            return self.fail(TransferError("receiver asked past the end of the file"), tell_peer=True)
        # Never more than our own window past what the receiver holds, whatever it grants: a huge
        # credit must not make us read the whole file into memory at once.
        upto = min(credit.upto, credit.next + self.ctx.config.window)
        restart = credit.restart or was is not Phase.SENDING
        if restart and was is Phase.SENDING and credit.next < self.send_next:
            if now - self.rewound_at < MIN_REWIND_INTERVAL:
                restart = False  # a flood of restart credits must not make us send a window each
            else:
                self.rewound_at = now
        if restart:
            self.send_next = credit.next
            self.upto = upto
        else:
            self.upto = max(self.upto, upto)
        self.confirmed = max(self.confirmed, credit.next)
        if self.link.CONFIRMED_BY_CREDIT and self.confirmed == self.chunks:
            return self.on_done(now)  # the broker holds the whole file
        actions = self.progress(min(self.size, self.confirmed * self.chunk_size), now)
        try:
            while self.send_next < min(self.upto, self.chunks):
                actions.append(self._chunk(self.send_next))
                self.send_next += 1
        except TransferError as exc:
            return actions + self.fail(exc, tell_peer=True)
        return actions

    def on_done(self, now: float) -> list[Action]:
        refused = self.enter(Input.DONE)
        if refused is not None:
            return refused
        actions = self.progress(self.size, now, force=True)
        self._let_go(failed=False)
        self.ctx.ended(self)
        log.info("user=%s peer=%s xfer=%s sent %s (%d bytes), verified by the receiver",
                 self.ctx.user, self.peer, self.xfer.hex()[:8], self.name, self.size)
        return actions + self.link.sent(self)

    # --- reactions ----------------------------------------------------------------------------
    def _offer(self, why: Input, now: float) -> list[Action]:
        refused = self.enter(why)
        if refused is not None:
            return refused
        self.rate.last_activity = now
        return self.link.offer(self)

    def refused_by_all(self, dev: int) -> bool:
        """The receiver's device ``dev`` refused the offer: have all of its devices now (as far as we know)?"""
        self.refusals = self.refusals | {dev}
        devices = self.ctx.e2e.devices_of(self.peer)
        return devices is None or len(self.refusals) >= len(devices.devices)

    def taken_by(self, dev: int) -> Transmit | None:
        """A credit from the receiver's device ``dev``: the first makes it the taker (persisted); another device
        hears the file was taken (a Transmit), and its frames change nothing here."""
        if self.peer_dev is None:
            self.peer_dev = dev
            self.ctx.records.save("outgoing", self.xfer, self.record())
            return None
        if dev == self.peer_dev:
            return None
        cancel = FileCancel(self.ctx.user, self.peer, self.xfer, ErrorCode.TAKEN,
                            f"another device of {self.peer}'s took this file", dev, self.ctx.device)
        return self.ctx.send(self.xfer, cancel)

    def _chunk(self, index: int) -> Transmit:
        """Chunk ``index``, read through the port (TransferError if the file changed or cannot be read)."""
        if self.reader is None:
            self.reader = self.ctx.files.open_source(self.source)
        offset = index * self.chunk_size
        while self.cipher is None and self.hashed < offset:  # resuming: hash the prefix the receiver has
            block = self.reader.read(self.hashed, min(HASH_BLOCK, offset - self.hashed))
            if not block:
                raise TransferError(f"{self.name} shrank while being sent", ErrorCode.SOURCE_CHANGED)
            self.hasher.update(block)
            self.hashed += len(block)
        data = self.reader.read(offset, self.chunk_size)
        final = index == self.chunks - 1
        if len(data) != (self.size - offset if final else self.chunk_size):
            raise TransferError(f"{self.name} changed while being sent", ErrorCode.SOURCE_CHANGED)
        self.bytes_sent += len(data)
        if self.cipher is not None:  # sealed chunks are authenticated one by one: no whole-file hash
            return self.link.chunk(self, index, final, self.cipher.seal(index, final, data))
        if offset == self.hashed:
            self.hasher.update(data)
            self.hashed += len(data)
        digest = self.hasher.digest() if final else None
        return self.link.chunk(self, index, final, data, zlib.crc32(data), digest)

    def _let_go(self, failed: bool) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
