"""The receiving side of a file transfer: wait for a slot, grant credit, write, verify, publish.

    QUEUED --slot free--> RECEIVING --last chunk verified--> DONE      (FAILED from every live phase)
                            |    ^      |                         ^
              peer unreachable   |      a folder's stream         its files made and checked
                            v    |      verified                  |
                           WAITING      +-------------------> EXTRACTING (a step per tick)
              (back to RECEIVING: the peer back, a chunk, an offer, a stall)

The receiver grants credit (``FileCredit``) a window at a time. Chunks are written in order to a
``.part`` file beside the target, through the shell's ``TransferFiles`` port; its length *is* the
resume point, so a restarted receiver asks again from the last whole chunk and at most one window
is sent twice. Unencrypted chunks carry a CRC and the last one the whole file's SHA-256; sealed ones
are authenticated one by one (the last under a "final" nonce). Only a verified file gets its name.
A folder (§8.3) is received as its stream, then extracted a bounded step per tick (``extract_step``), so that
the client's loop goes on meanwhile; a restart while extracting extracts again from the ``.part``.
The transfer's link (``transfer_links``) makes the frames: for a room file the broker is the sender, each
credit a ``room_fetch``, and nothing is sent when the file is in.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit
from p2pchat.client.core.ports import Extracted, Extraction, PartWriter
from p2pchat.client.core.transfer_machine import IGNORE, Input, Phase, Progress, Table
from p2pchat.client.core.transfer_machine import TransferMachine
from p2pchat.client.e2e import Sealing
from p2pchat.common.crypto import TAG_BYTES, FileCipher
from p2pchat.common.errors import ErrorCode, P2PChatError, ProtocolError, TransferError
from p2pchat.common.protocol import MAX_TEXT_CHARS, Envelope, FileChunk, FileOffer

if TYPE_CHECKING:
    from p2pchat.common.protocol_rooms import RoomChunk

log = logging.getLogger(__name__)

OPEN_RETRIES = 3  # a sealed chunk that fails to open is asked for again this often before it counts as tampering

_QUEUED, _RECEIVING, _WAITING, _EXTRACTING = Phase.QUEUED, Phase.RECEIVING, Phase.WAITING, Phase.EXTRACTING
RECEIVER: Table = {
    (_QUEUED, Input.START): _RECEIVING,
    # the sender: a repeated offer, chunks (a queued transfer granted none: strays from before a restart)
    (_QUEUED, Input.OFFER): _QUEUED, (_RECEIVING, Input.OFFER): _RECEIVING, (_WAITING, Input.OFFER): _RECEIVING,
    (_QUEUED, Input.CHUNK): IGNORE, (_RECEIVING, Input.CHUNK): _RECEIVING, (_WAITING, Input.CHUNK): _RECEIVING,
    (_RECEIVING, Input.VERIFIED): Phase.DONE,
    # asked again (a restart credit) after a stall, a reconnect, or when the sender is back
    (_QUEUED, Input.STALLED): IGNORE, (_RECEIVING, Input.STALLED): _RECEIVING, (_WAITING, Input.STALLED): _RECEIVING,
    (_QUEUED, Input.RECONNECTED): IGNORE, (_RECEIVING, Input.RECONNECTED): _RECEIVING,
    (_WAITING, Input.RECONNECTED): _RECEIVING,
    (_QUEUED, Input.PEER_BACK): IGNORE, (_RECEIVING, Input.PEER_BACK): IGNORE, (_WAITING, Input.PEER_BACK): _RECEIVING,
    (_QUEUED, Input.UNREACHABLE): IGNORE, (_RECEIVING, Input.UNREACHABLE): _WAITING,
    (_WAITING, Input.UNREACHABLE): _WAITING,
    (_QUEUED, Input.CANCEL): Phase.FAILED, (_RECEIVING, Input.CANCEL): Phase.FAILED,
    (_WAITING, Input.CANCEL): Phase.FAILED,
    (_QUEUED, Input.ABORT): Phase.FAILED, (_RECEIVING, Input.ABORT): Phase.FAILED, (_WAITING, Input.ABORT): Phase.FAILED,
    # a folder: its stream is whole; its files are made while the sender waits (its offers answered with a credit)
    (_RECEIVING, Input.EXTRACT): _EXTRACTING, (_EXTRACTING, Input.VERIFIED): Phase.DONE,
    (_EXTRACTING, Input.OFFER): _EXTRACTING, (_EXTRACTING, Input.CHUNK): IGNORE, (_EXTRACTING, Input.STALLED): IGNORE,
    (_EXTRACTING, Input.RECONNECTED): IGNORE, (_EXTRACTING, Input.PEER_BACK): IGNORE,
    (_EXTRACTING, Input.UNREACHABLE): IGNORE, (_EXTRACTING, Input.CANCEL): Phase.FAILED,
    (_EXTRACTING, Input.ABORT): Phase.FAILED,
}  # not here, so a failure: CREDIT and DONE (the sender's own frames), NO_KEY, KEY_ARRIVED, START once started


@dataclass(frozen=True, slots=True)
class OfferMeta:
    """What an offer's sealed body says (§8, §8.1, §8.2, §8.3)."""

    name: str
    key: bytes | None  # the file key; None unsealed
    session: int  # the sender's sending session (0: not said)
    folder: bool = False  # a folder's stream, to extract once verified


def open_offer(e2e: Sealing, env: Envelope, refetched: bool = False) -> OfferMeta:
    """An offer's sealed metadata. Raises ProtocolError if unacceptable, UnknownDevice from a device not in the
    sender's list (``refetched``: fetched since the offer came)."""
    offer: FileOffer = env.message  # type: ignore[assignment]
    return offer_meta(e2e.open(offer.sender, env.msg_id, env.ts, offer.body, refetched=refetched), e2e.enabled)


def offer_meta(plain: bytes, sealed: bool) -> OfferMeta:
    """An opened offer body (one-to-one, or a room's), strictly."""
    try:
        meta = msgpack.unpackb(plain, raw=False, max_str_len=4 * MAX_TEXT_CHARS, max_bin_len=64,
                               max_map_len=5, max_array_len=0)
    except Exception:  # msgpack raises a zoo; see common.protocol.decode
        raise ProtocolError("undecodable file offer") from None
    if (type(meta) is not dict or type(meta.get("name")) is not str
            or set(meta) - {"name", "key", "session", "kind"} or meta.get("kind", "folder") != "folder"
            or type(meta.get("session", 0)) is not int or not 0 <= meta.get("session", 0) < 2**32):
        raise ProtocolError("malformed file offer")
    key = meta.get("key")
    if sealed and (type(key) is not bytes or len(key) != 32):
        raise ProtocolError("file offer without an end-to-end key refused")
    return OfferMeta(meta["name"], key if sealed else None, meta.get("session", 0), "kind" in meta)


def write_error(name: str, exc: OSError) -> TransferError:
    code = ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.UNWRITABLE
    return TransferError(f"cannot write {name}: {exc.strerror}", code)


@dataclass(slots=True, eq=False)
class Incoming(TransferMachine):
    TABLE = RECEIVER
    DIRECTION = "in"

    name: str
    size: int
    chunk_size: int
    part: Path
    target_dir: Path
    final_name: str
    phase: Phase = Phase.QUEUED  # accepted, no file yet: ``start`` opens it
    next: int = 0
    granted: int = 0
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    writer: PartWriter | None = None
    rate: Progress | None = None
    cipher: FileCipher | None = None
    open_failures: int = 0  # sealed chunks that failed to open since the last good one
    resumed: bool = False  # from a record of an earlier run: its .part exists
    session: int = 0  # the sender's sending session whose key ``cipher`` holds
    peer_dev: int | None = None  # the sender's device that offered it (the offer's ``src``)
    folder: bool = False  # a folder's stream (§8.3): extracted once verified
    extraction: Extraction | None = None  # EXTRACTING: the folder being made

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        return {"xfer": self.xfer.hex(), "peer": self.peer, "name": self.name, "size": self.size,
                "chunk_size": self.chunk_size, "part": str(self.part), "target_dir": str(self.target_dir),
                "final_name": self.final_name, "file_key": self.cipher.key.hex() if self.cipher else None,
                "session": self.session, "peer_dev": self.peer_dev} | (
                    {"folder": True} if self.folder else {}) | self.link.record()

    # --- inputs -------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """A slot is free: open the .part (new, or resumed from an earlier run) and grant the first credit."""
        refused = self.enter(Input.START)
        if refused is not None:
            return refused
        ctx = self.ctx
        try:
            if self.resumed:
                self.writer = ctx.files.resume_part(self.part, self.chunk_size)
                if self.cipher is None:  # the whole-file hash covers the chunks already held (cut to whole ones)
                    for block in ctx.files.read_part(self.part):
                        self.hasher.update(block)
                self.next = self.writer.size // self.chunk_size
            else:
                self.writer = ctx.files.create_part(self.part, self.chunk_size)
        except OSError as exc:
            verb = "resume" if self.resumed else "write its download folder"
            return self._failed(TransferError(f"receiver cannot {verb}: {exc.strerror}", ErrorCode.UNWRITABLE),
                                tell_peer=True)
        self.rate = Progress(started=now, last_activity=now, heard=now)
        ctx.records.save("incoming", self.xfer, self.record())
        if self.resumed and self.folder and self.next == self.chunks:  # stopped while extracting: again
            writer, self.writer = self.writer, None
            writer.close()
            log.info("user=%s peer=%s xfer=%s extracting %r again", ctx.user, self.peer, self.xfer.hex()[:8], self.name)
            return self._extract(now)
        if self.resumed:
            log.info("user=%s peer=%s xfer=%s resuming %r at chunk %d", ctx.user, self.peer, self.xfer.hex()[:8],
                     self.name, self.next)
            return self._credit(now, restart=True)
        log.info("user=%s peer=%s xfer=%s receiving %r (%d bytes)", ctx.user, self.peer, self.xfer.hex()[:8],
                 self.name, self.size)
        return [Emit(ev.FileIncoming(self.xfer, self.peer, self.name, self.size, self.link.room, self.folder))
                ] + self._credit(now, restart=True)

    def hold(self) -> list[Action]:
        """Accepted, wait for a slot (a one-to-one sender keeps the transfer while we answer its offers)."""
        return self.link.hold(self)

    def on_offer(self, env: Envelope, now: float) -> list[Action]:
        """The sender offers again (its stall timer, or a new sending session after its restart)."""
        was = self.phase
        refused = self.enter(Input.OFFER)
        if refused is not None:
            return refused
        self._rekey(env)
        if was is Phase.QUEUED:
            return self.hold()
        # A sender that offered starts at the next credit's ``next`` whatever its flag; not restarting
        # keeps one that already took our own restart credit from rewinding and sending chunks twice.
        return self._credit(now, restart=False)

    def on_signal(self, what: Input, now: float) -> list[Action]:
        """STALLED, RECONNECTED or PEER_BACK: ask again from what we hold, if the table says so."""
        refused = self.enter(what)
        if refused is not None:
            return refused
        if what is Input.RECONNECTED:
            self.rate.heard = now  # our own outage does not count against the peer
        return self._credit(now, restart=True)

    def on_error(self, error: P2PChatError, now: float) -> list[Action]:
        """An ERROR about one of our credits: wait for a sender that went away (a room's store out of reach, a
        file not uploaded yet), else fail."""
        if self.link.pauses(error.code):
            refused = self.enter(Input.UNREACHABLE)
            if refused is None:
                self.rate.last_activity = now  # asked again when the sender is back
            return refused or []
        return self.fail(error, tell_peer=False)

    def on_chunk(self, chunk: FileChunk | RoomChunk, payload, now: float) -> list[Action]:
        refused = self.enter(Input.CHUNK)
        if refused is not None:
            return refused
        if chunk.index != self.next:
            return []  # a duplicate or out of order: dropped; the stall timer asks again
        final = self.next == self.chunks - 1
        size = self.size - chunk.index * self.chunk_size if final else self.chunk_size
        data = memoryview(payload)
        sealed = self.cipher is not None
        if (len(data) != size + (TAG_BYTES if sealed else 0) or chunk.final != final
                or (not sealed and (chunk.crc is None or zlib.crc32(data) != chunk.crc))):
            if self.link.RESENDS_HELD:  # the same misfit again: a lie about the size, or the store is damaged
                return self._open_failed(chunk, f"chunk {chunk.index} does not fit the offer", now)
            return self._ask_again(chunk, now)
        try:
            out = self.writer.buffer(size)
            if sealed:
                self.cipher.open_into(chunk.index, final, data, out)
            else:
                out[:] = data
                self.hasher.update(data)
            self.writer.append(size)
        except ProtocolError as exc:
            return self._open_failed(chunk, exc.message, now)
        except OSError as exc:
            return self.fail(write_error(self.name, exc), tell_peer=True)
        self.open_failures = 0
        self.next += 1
        self.rate.last_activity = self.rate.heard = now
        if final:
            return self._finish(chunk, now)
        actions = self.progress(self.next * self.chunk_size, now)
        if self.granted - self.next <= self.ctx.config.window // 2:
            actions += self._credit(now, restart=False)
        return actions

    # --- reactions ----------------------------------------------------------------------------
    def _credit(self, now: float, restart: bool) -> list[Action]:
        self.rate.last_activity = now
        # The window counts from what is on disk: chunks still queued for the writer are lost with the
        # process, and a restart must cost at most a window sent again. Never less than half a window,
        # though: only arriving chunks trigger the next credit, so a grant of nothing would stall.
        window = self.ctx.config.window
        self.granted = self.next + max(window - (self.writer.pending if self.writer else 0), (window + 1) // 2)
        return [self.link.credit(self, self.next, self.granted, restart)]

    def _open_failed(self, chunk: FileChunk | RoomChunk, why: str, now: float) -> list[Action]:
        # Sealed chunks carry no CRC: damage in transit and tampering look alike, so ask a few times.
        self.open_failures += 1
        if self.open_failures < OPEN_RETRIES:
            return self._ask_again(chunk, now)
        return self.fail(TransferError(f"{self.name}: {why}", ErrorCode.INTEGRITY), tell_peer=True)

    def _ask_again(self, chunk: FileChunk | RoomChunk, now: float) -> list[Action]:
        log.warning("user=%s peer=%s xfer=%s chunk %d damaged; asking again", self.ctx.user, self.peer,
                    self.xfer.hex()[:8], chunk.index)
        return self._credit(now, restart=True)

    def _finish(self, chunk: FileChunk | RoomChunk, now: float) -> list[Action]:
        # Sealed: the final chunk opened under the "final" nonce, so every chunk was authentic and none is missing.
        if self.cipher is None and chunk.sha256 != self.hasher.digest():  # (room files are always sealed)
            return self.fail(TransferError(f"{self.name} failed its SHA-256 check", ErrorCode.INTEGRITY),
                             tell_peer=True)
        try:
            writer, self.writer = self.writer, None
            writer.finish()  # every chunk on disk and synced before the name appears
        except OSError as exc:
            return self.fail(write_error(self.name, exc), tell_peer=True)
        if self.folder:
            return self._extract(now)
        try:
            path = self.ctx.files.publish(self.part, self.target_dir, self.final_name)
        except OSError as exc:
            return self.fail(TransferError(f"cannot save {self.name}: {exc.strerror}", ErrorCode.UNWRITABLE),
                             tell_peer=True)
        return self._saved(path, None, now)

    def _extract(self, now: float) -> list[Action]:
        """The folder's stream is whole and verified: make its files, a first step now, the rest on ticks."""
        refused = self.enter(Input.EXTRACT)
        if refused is not None:
            return refused
        try:
            self.extraction = self.ctx.files.extract_folder(self.part, self.target_dir, self.final_name)
        except TransferError as exc:
            return self.fail(exc, tell_peer=True)
        except OSError as exc:
            return self.fail(write_error(self.name, exc), tell_peer=True)
        return self.extract_step(now)

    def extract_step(self, now: float) -> list[Action]:
        """One bounded step of making the folder (EXTRACTING, on the manager's tick); done once it is made."""
        try:
            made = self.extraction.step()
        except TransferError as exc:  # the manifest refused, or a file that fails its check
            return self.fail(exc, tell_peer=True)
        except OSError as exc:
            return self.fail(write_error(self.name, exc), tell_peer=True)
        self.rate.last_activity = self.rate.heard = now
        if made is None:
            return []
        self.extraction = None
        return self._saved(made.path, made, now)

    def _saved(self, path: Path, folder: Extracted | None, now: float) -> list[Action]:
        """The file (or the folder) is saved under its final name: done."""
        ctx = self.ctx
        ctx.records.mark_done(self.xfer)  # a lost FILE_DONE is answered again, a room offer seen again ignored
        self.enter(Input.VERIFIED)
        ctx.ended(self)
        log.info("user=%s peer=%s xfer=%s saved %s (%d bytes%s)", ctx.user, self.peer, self.xfer.hex()[:8], path,
                 self.size, f", {folder.files} files" if folder else "")
        files, content = (folder.files, folder.content_bytes) if folder else (None, None)
        return self.progress(self.size, now, force=True) + self.link.done(self) + [
            Emit(ev.FileReceived(self.xfer, self.peer, self.name, path, self.size, self.link.room, files, content))]

    def _rekey(self, env: Envelope) -> None:
        """A repeated offer from a newer sending session carries that session's key: use it from now on."""
        if self.cipher is None:
            return
        try:
            meta = open_offer(self.ctx.e2e, env)
        except P2PChatError:
            return  # a repeat we cannot open changes nothing
        key, session = meta.key, meta.session
        if session > self.session and key is not None:
            log.info("user=%s peer=%s xfer=%s sender's session %d: new file key", self.ctx.user, self.peer,
                     self.xfer.hex()[:8], session)
            self.cipher, self.session, self.open_failures = FileCipher(key, self.xfer), session, 0
            if self.phase is not Phase.QUEUED or self.resumed:  # it has a record
                self.ctx.records.save("incoming", self.xfer, self.record())

    def _let_go(self, failed: bool) -> None:
        if self.extraction is not None:  # what it made goes; the .part stays unless the transfer failed
            self.extraction.abort()
            self.extraction = None
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:
                log.warning("user=%s xfer=%s closing failed: %s", self.ctx.user, self.xfer.hex()[:8], exc)
            self.writer = None
        if failed:
            self.ctx.files.remove(self.part)
