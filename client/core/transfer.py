"""File transfer: credit-based flow (the ZeroMQ Guide's fileio3), verified and resumable.

``TransferManager`` wires one client's transfers: it routes each file frame to the machine of its
transfer (``sending.Outgoing``, ``receiving.Incoming``; their tables say what each input does), admits
new offers, and passes on what the session sees (presence, keys, reconnects, the clock).

Room files (docs/PROTOCOL.md §8.1) run through the same machines with the broker at the other end
(``transfer_links.RoomLink``): ``send_room_file`` uploads once to the room's store, ``take_room_uploads``
hands the session each finished upload to announce in a sealed ``room_offer``, and ``on_room_offer``
fetches an announced file, under the same bounds and naming rules as a file from a peer.

Incoming transfers are bounded per peer and in total; offers beyond the bound wait, QUEUED (no
file, no descriptor), and start when a slot frees. A transfer whose peer is online but silent for
``give_up_after`` fails with ``timeout``; unfinished transfers older than ``max_age`` are dropped
at start. Refused and failed incoming ids are remembered, so a stale offer is refused again.

No sockets, no clock reads, no file system: frames and ``now`` in, actions out; files and records
through the ports the shell passes in (``core.ports``), ids from its ``new_id``.
(Just over 500 lines: one manager holds both kinds of transfer, so that they share its bounds and clocks.)
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit
from p2pchat.client.core.ports import NO_RECORDS, Source, TransferFiles, TransferRecords
from p2pchat.client.core.receiving import Incoming, open_offer
from p2pchat.client.core.sending import Outgoing
from p2pchat.common.protocol_rooms import inbox_id
from p2pchat.client.core.transfer_links import PEER_LINK, InboxLink, RoomLink, RoomUploaded, TransferLink, link_of
from p2pchat.client.core.transfer_machine import (
    CHUNK_SIZE,
    MAX_AGE,
    REF_PREFIX,
    WINDOW,
    Input,
    Phase,
    TransferConfig,
    TransferContext,
    TransferMachine,
    frame_id,
)
from p2pchat.client.e2e import PeerKeyChanged, Sealing, UnknownDevice
from p2pchat.client.storage.filenames import part_name, received_name
from p2pchat.common.crypto import KEY_BYTES, TAG_BYTES, FileCipher
from p2pchat.common.errors import ErrorCode, P2PChatError, ProtocolError, RemoteError, TransferError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol import MAX_PAYLOAD_BYTES, Envelope, FileCancel, FileChunk, FileCredit, FileDone, FileOffer
from p2pchat.common.protocol_rooms import RoomChunk, RoomCredit

__all__ = ["CHUNK_SIZE", "MAX_AGE", "REF_PREFIX", "WINDOW", "Phase", "RoomUploaded", "TransferConfig",
           "TransferManager", "frame_id"]

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = MAX_PAYLOAD_BYTES - TAG_BYTES
REFUSED_SENDERS = 1000  # senders whose refused offers are counted apart (for aggregated logging)
REMEMBER_FAILED = 4096  # refused or failed incoming ids kept to refuse their stale offers again
REFUSAL_PERIOD = 60.0  # seconds over which refused offers are counted per sender, then logged as one line
MAX_UNLISTED_OFFERS = 64  # offers from devices not in their sender's list yet, kept while the list is fetched


class TransferManager:
    def __init__(self, user: str, config: TransferConfig, e2e: Sealing, *, wall_ms: Callable[[], int],
                 wall_time: Callable[[], float], new_id: Callable[[], bytes], files: TransferFiles,
                 records: TransferRecords = NO_RECORDS) -> None:
        """``files`` and ``records``: the shell's ports (``storage.transfers``); ``NO_RECORDS``: no resume."""
        self.user = user
        self.config = config
        self.e2e = e2e
        self.files = files
        self.records = records
        self._wall_time = wall_time
        self._ctx = TransferContext(user, config, e2e, wall_ms, new_id, files, records, self._ended)
        self.outgoing: dict[bytes, Outgoing] = {}
        self.incoming: dict[bytes, Incoming] = {}
        self.queued: dict[bytes, Incoming] = {}  # in arrival order; no file opened yet
        self._refusals = IncidentLog("file offers refused", log, interval=REFUSAL_PERIOD, max_keys=REFUSED_SENDERS)
        self._failed: OrderedDict[bytes, None] = OrderedDict.fromkeys(records.failed_ids()[-REMEMBER_FAILED:])
        self._unlisted: list[Envelope] = []  # beyond the bound: dropped, and the sender offers again after a stall
        self._by_prefix: dict[bytes, bytes] = {}
        self._online: frozenset[str] = frozenset()

    # --- commands -----------------------------------------------------------
    def send_file(self, peer: str, path: Path | Source, now: float, held: bool = False) -> tuple[bytes, list[Action]]:
        """Offer ``path`` to ``peer``, a file or a folder (one stream, §8.3); resumes an unfinished transfer of the
        same file, or of the same folder with the same contents. ``held``: upload it to the broker for ``peer`` to
        fetch when it will (§8.2); ``take_room_uploads`` has it once the broker holds it."""
        if held:
            return self._upload_sealed(InboxLink(inbox_id(peer), peer), path, now)
        source = self._source(path)
        running = self._running(None, peer, source)  # already resumed by resume_all
        if running is not None:
            return running.xfer, []
        xfer, session = self._ctx.new_id(), 1
        for record in self.records.records("outgoing"):
            if "room" not in record and record["peer"] == peer and Outgoing.source_of(record).same(source):
                xfer, session = bytes.fromhex(record["xfer"]), record.get("session", 0) + 1
                log.info("user=%s peer=%s xfer=%s resuming %s", self.user, peer, xfer.hex()[:8], source.path.name)
                break
        out = self._track(Outgoing.begin(self._ctx, xfer, peer, PEER_LINK, source, self.config.chunk_size, session,
                                         now))
        return xfer, out.start(now)

    def send_room_file(self, rid: bytes, path: Path | Source, now: float) -> tuple[bytes, list[Action]]:
        """Upload ``path`` once to the file store of room ``rid`` at the broker (§8.1), under its credit; once
        the broker holds every chunk, ``take_room_uploads`` has it for the ``room_offer``. The same file
        already uploading to the room: that upload. Each upload has a new ``xfer`` and file key."""
        return self._upload_sealed(RoomLink(rid), path, now)

    def _upload_sealed(self, link: RoomLink, path: Path | Source, now: float) -> tuple[bytes, list[Action]]:
        if not self.e2e.enabled:  # a room_chunk has no CRC: its seal is its only check
            raise TransferError("files kept by the broker are sealed end to end: not with sealing off")
        source = self._source(path)
        running = self._running(link.room, self.user, source)
        if running is not None and running.link == link:
            return running.xfer, []
        return self._upload(link, source, now)

    def take_room_uploads(self) -> list[RoomUploaded]:
        """Room files the broker now holds whole: the session seals each one's name and key into the
        ``room_offer`` (and tells the user once the offer is stored)."""
        uploaded, self._ctx.uploaded = self._ctx.uploaded, []
        return uploaded

    def on_room_offer(self, rid: bytes, sender: str, xfer: bytes, size: int, chunk_size: int, name: str, key: bytes,
                      now: float, folder: bool = False) -> list[Action]:
        """A room offer the session opened: fetch the file from the room's store, as a file from ``sender``
        (bounds, naming, resume). A refused offer is reported (``FileFailed`` with the room) and remembered; no
        frame answers it (the store keeps the file for the other members)."""
        if self._machine(xfer) is not None or self.records.is_done(xfer) or xfer in self._failed:
            return []  # seen before: a redelivery, or an id another transfer of ours has
        if not self.config.accept_files:
            log.info("user=%s room=%s xfer=%s not fetching %r from %s: this device takes no files", self.user,
                     rid.hex()[:8], xfer.hex()[:8], name, sender)
            return []
        if type(key) is not bytes or len(key) != KEY_BYTES:
            reject = TransferError("room file offer without a usable file key", ErrorCode.INTEGRITY)
        else:
            reject = self._unacceptable(size, chunk_size, folder)
        if reject is None and not self._may_queue(sender):
            reject = TransferError("too many transfers waiting", ErrorCode.RECIPIENT_BUSY)
        if reject is not None:
            return self._refused(xfer, sender, now, reject.message,
                                 ev.FileFailed(xfer, sender, name, "in", reject, rid))
        final_name = received_name(sender, name, self._wall_time())
        inc = Incoming(self._ctx, xfer, sender, RoomLink(rid), name, size, chunk_size,
                       self.config.received_dir / part_name(final_name, xfer), self.config.received_dir, final_name,
                       cipher=FileCipher(key, xfer), folder=folder)
        return self._admit(inc, now)

    def cancel(self, xfer: bytes, now: float) -> list[Action]:
        machine = self._machine(xfer)
        if machine is None:
            return []
        return machine.fail(TransferError("cancelled by you", ErrorCode.CANCELLED), tell_peer=True) + self._promote(now)

    def resume_all(self, now: float) -> list[Action]:
        """Take up every unfinished transfer remembered on disk (after a restart); drop those over ``max_age``.
        An unfinished room upload starts over, with a new ``xfer`` and file key: its key was never written to
        disk (so no key and nonce can meet other bytes), and without it what the broker holds is of no use."""
        self.records.prune(self._wall_time() - self.config.max_age)
        actions: list[Action] = []
        for record in self.records.records("outgoing"):
            xfer = bytes.fromhex(record["xfer"])
            if xfer in self.outgoing:
                continue
            source = Outgoing.source_of(record)
            if "room" in record or "inbox" in record:
                self.records.forget("outgoing", xfer)
                if self.e2e.enabled:
                    log.info("user=%s xfer=%s uploading %s again", self.user, xfer.hex()[:8], source.path.name)
                    actions += self._upload(link_of(record), source, now)[1]
                continue
            out = Outgoing.begin(self._ctx, xfer, record["peer"], PEER_LINK, source, record["chunk_size"],
                                 record.get("session", 0) + 1, now, record.get("taker"))
            actions += self._track(out).start(now)
        for record in self.records.records("incoming"):
            xfer = bytes.fromhex(record["xfer"])
            if xfer not in self.incoming and xfer not in self.queued:
                actions += self._resume_in(record, now)
        return actions

    def close(self) -> None:
        """The client stops: let go of every file; unfinished transfers stay on disk to resume."""
        for machine in (*self.incoming.values(), *self.outgoing.values()):
            machine.close()

    # --- inputs -------------------------------------------------------------
    def on_message(self, env: Envelope, now: float) -> list[Action]:
        try:
            actions = self._on_message(env, now)
        except OSError as exc:  # any file error fails the transfer concerned, never the client
            actions = self._fail_xfer(getattr(env.message, "xfer", b""), exc)
        return actions + self._promote(now)

    def _on_message(self, env: Envelope, now: float) -> list[Action]:
        msg = env.message
        machine = self._machine(msg.xfer)  # type: ignore[attr-defined]
        if machine is None:
            return self._on_new_offer(env, now) if type(msg) is FileOffer else []
        if not machine.link.owns(machine, msg):
            return []  # someone else's frame names this transfer: it cannot touch it
        kind = type(msg)
        src = getattr(msg, "src", None)
        if src is not None and type(machine) is Outgoing and kind is not FileOffer:  # one of the receiver's devices
            if kind is FileCancel and machine.peer_dev is None and not machine.refused_by_all(src):
                return []  # one device refused it before any took it: another may still take it
            taken = machine.taken_by(src) if kind is FileCredit else None
            if taken is not None or src != machine.peer_dev and machine.peer_dev is not None:
                return [taken] if taken is not None else []  # another device: told it was taken, else ignored
        if kind is FileChunk or kind is RoomChunk:
            return machine.on_chunk(msg, env.payload, now)
        if kind is FileCredit or kind is RoomCredit:
            return machine.on_credit(msg, now)
        if kind is FileOffer:
            return machine.on_offer(env, now)
        if kind is FileDone:
            return machine.on_done(now)
        if kind is FileCancel:
            return machine.on_cancel(RemoteError(f"{msg.sender}: {msg.message}", msg.code))
        return []

    def _fail_xfer(self, xfer: bytes, exc: OSError) -> list[Action]:
        code = ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.UNWRITABLE
        log.warning("user=%s xfer=%s file error: %s", self.user, xfer.hex()[:8], exc)
        machine = self._machine(xfer)
        if machine is None:
            return []
        return machine.fail(TransferError(f"file error: {exc.strerror or exc}", code), tell_peer=True)

    def on_error(self, ref: bytes, error: P2PChatError, now: float) -> list[Action] | None:
        """An ERROR whose ref is one of our file frames; None if it is not ours."""
        xfer = self._by_prefix.get(ref[:REF_PREFIX])
        machine = self._machine(xfer) if xfer is not None else None
        return None if machine is None else machine.on_error(error, now)

    @property
    def device(self) -> int | None:
        return self._ctx.device

    @device.setter
    def device(self, dev: int | None) -> None:
        """Our number in our ID's device list, from the broker's ``registered``."""
        self._ctx.device = dev

    def take_key_wants(self) -> set[str]:
        """Peers whose key an offer is waiting for (the session asks the broker)."""
        wants, self._ctx.key_wants = self._ctx.key_wants, set()
        return wants

    def take_key_changes(self) -> list[PeerKeyChanged]:
        """Key changes offers showed (the session reports them and holds what comes from those peers)."""
        changes, self._ctx.key_changes = self._ctx.key_changes, []
        return changes

    def on_key(self, user: str, now: float) -> list[Action]:
        """``user``'s key (or device list) arrived: offers to them go, offers from them open."""
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            if out.link.party(out) == user:
                actions += out.on_signal(Input.KEY_ARRIVED, now)
        waiting = [env for env in self._unlisted if env.message.sender == user]  # type: ignore[attr-defined]
        self._unlisted = [env for env in self._unlisted if env.message.sender != user]  # type: ignore[attr-defined]
        for env in waiting:
            if self._machine(env.message.xfer) is None:  # type: ignore[attr-defined]
                actions += self._on_new_offer(env, now, refetched=True)
        return actions

    def fail_peer(self, user: str, error: P2PChatError) -> list[Action]:
        """No usable key for ``user``: transfers not yet offered to them fail."""
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            if out.link.party(out) == user:
                actions += out.on_no_key(error)
        return actions

    def on_peers(self, online: frozenset[str], now: float) -> list[Action]:
        """Presence changed: transfers waiting for a peer that came back go on."""
        came_back = online - self._online
        self._online = online
        actions: list[Action] = []
        for machine in (*self.outgoing.values(), *self.incoming.values()):
            if machine.link.party(machine) in came_back:
                actions += machine.on_signal(Input.PEER_BACK, now)
        return actions + self._promote(now)

    def on_reconnected(self, now: float) -> list[Action]:
        """After re-registering (broker restart): whatever was in flight may be lost."""
        actions: list[Action] = []
        for machine in (*self.outgoing.values(), *self.incoming.values()):
            actions += machine.on_signal(Input.RECONNECTED, now)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        """A quiet transfer is asked again: frames may be lost to a restart, or a peer came back unseen."""
        self._refusals.flush(now)
        actions = self._give_up(now) + self._promote(now)
        stall = self.config.stall_timeout
        for machine in (*self.incoming.values(), *self.outgoing.values()):
            if machine.phase is Phase.EXTRACTING:  # a folder being made: a step per tick
                actions += machine.extract_step(now)  # type: ignore[attr-defined]
            elif now - machine.rate.last_activity > stall:
                actions += machine.on_signal(Input.STALLED, now)
        return actions

    def next_deadline(self) -> float:
        making = [i.rate.last_activity for i in self.incoming.values() if i.phase is Phase.EXTRACTING]
        if making:
            return min(making)  # a folder being made: its next step is due once the last one is done
        times = [i.rate.last_activity for i in self.incoming.values()]
        times += [o.rate.last_activity for o in self.outgoing.values()]
        return min(times, default=float("inf")) + self.config.stall_timeout

    def _give_up(self, now: float) -> list[Action]:
        """Fail transfers whose peer has been online but silent for ``give_up_after``."""
        actions: list[Action] = []
        limit = self.config.give_up_after
        for machine in (*self.incoming.values(), *self.outgoing.values()):
            if not self._reachable(machine) or machine.phase is Phase.WAITING:
                machine.rate.heard = now  # time offline does not count
            elif now - machine.rate.heard > limit:
                who = machine.link.party(machine) or "the broker's file store"
                error = TransferError(f"{who} silent for {limit:g}s: transfer given up", ErrorCode.TIMEOUT)
                actions += machine.fail(error, tell_peer=True)
        return actions

    # --- new offers and admission: bounded incoming transfers, the rest queued ------------------------
    def _on_new_offer(self, env: Envelope, now: float, refetched: bool = False) -> list[Action]:
        offer: FileOffer = env.message  # type: ignore[assignment]
        src = self._ctx.device if offer.src is not None else None  # answered to the offering device
        if self.records.is_done(offer.xfer):  # our FILE_DONE was lost: say it again
            return [self._ctx.send(offer.xfer, FileDone(self.user, offer.sender, offer.xfer, offer.src, src))]
        if offer.xfer in self._failed:  # a stale offer crossed our FILE_CANCEL
            return [self._ctx.send(offer.xfer, FileCancel(self.user, offer.sender, offer.xfer, ErrorCode.CANCELLED,
                                                          "this transfer was refused or cancelled earlier",
                                                          offer.src, src))]
        try:
            meta = open_offer(self.e2e, env, refetched)
        except UnknownDevice as exc:  # from a device of theirs we have not seen: opened again once their list is in
            if len(self._unlisted) < MAX_UNLISTED_OFFERS:
                self._unlisted.append(env)
            self.e2e.forget_devices(exc.user)
            self._ctx.key_wants.add(exc.user)
            return []
        except PeerKeyChanged as exc:  # the session decides (it holds what comes from them until accepted)
            self._ctx.key_changes.append(exc)
            return []
        except ProtocolError as exc:  # not remembered: the sender offers again, sealed to our current key
            return self._refuse(offer, now, exc.message, ErrorCode.INTEGRITY, ev.ErrorReported(exc), remember=False)
        cfg = self.config
        if not cfg.accept_files:  # with several devices the sender goes on with one that takes it
            reject = TransferError(f"{self.user} takes no files on this device", ErrorCode.CANCELLED)
        else:
            reject = self._unacceptable(offer.size, offer.chunk_size, meta.folder)
        if reject is None and not self._may_queue(offer.sender):
            return self._refuse(offer, now, "receiver busy: too many transfers waiting", ErrorCode.RECIPIENT_BUSY)
        if reject is not None:
            return self._refuse(offer, now, reject.message, reject.code,
                                ev.FileFailed(offer.xfer, offer.sender, meta.name, "in", reject))
        final_name = received_name(offer.sender, meta.name, self._wall_time())
        if offer.held and meta.key is not None:  # kept for us by the broker: fetched from our inbox (§8.2)
            link: TransferLink = InboxLink(inbox_id(self.user))
        else:
            link = PEER_LINK
        inc = Incoming(self._ctx, offer.xfer, offer.sender, link, meta.name, offer.size, offer.chunk_size,
                       cfg.received_dir / part_name(final_name, offer.xfer), cfg.received_dir, final_name,
                       cipher=FileCipher(meta.key, offer.xfer) if meta.key else None, session=meta.session,
                       peer_dev=offer.src, folder=meta.folder)
        return self._admit(inc, now)

    def _unacceptable(self, size: int, chunk_size: int, folder: bool) -> TransferError | None:
        """Why an offer of ``size`` bytes in chunks of ``chunk_size`` cannot be taken here, if it cannot. A folder's
        stream and the folder made from it are on the disk together for a moment: twice the room."""
        cfg = self.config
        if not 0 < chunk_size <= MAX_CHUNK_BYTES:
            return TransferError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK_BYTES}")
        if size > cfg.max_file_size:
            return TransferError(f"{size} bytes is over the receiver's limit of {cfg.max_file_size}",
                                 ErrorCode.TOO_LARGE)
        try:
            if self.files.free_space(cfg.received_dir) < (2 * size if folder else size):
                return TransferError("not enough free space on the receiver's disk", ErrorCode.NO_SPACE)
        except OSError as exc:
            return TransferError(f"receiver cannot write its download folder: {exc.strerror}", ErrorCode.UNWRITABLE)
        return None

    def _admit(self, inc: Incoming, now: float) -> list[Action]:
        """An accepted offer: started if a slot is free, else queued."""
        if self._has_slot(inc.peer):
            return self._start(inc, now)
        log.info("user=%s peer=%s xfer=%s queued %r (%d bytes): %d transfers waiting", self.user, inc.peer,
                 inc.xfer.hex()[:8], inc.name, inc.size, len(self.queued) + 1)
        self._queue(inc)
        return [Emit(ev.FileQueued(inc.xfer, inc.peer, inc.name, inc.size, len(self.queued), inc.link.room)),
                *inc.hold()]

    def _refuse(self, offer: FileOffer, now: float, message: str, code: ErrorCode, report: ev.Event | None = None,
                remember: bool = True) -> list[Action]:
        """Refuse an offer: the sender is told (``_refused``)."""
        src = self._ctx.device if offer.src is not None else None
        cancel = self._ctx.send(offer.xfer, FileCancel(self.user, offer.sender, offer.xfer, code, message, offer.src,
                                                       src))
        return [cancel, *self._refused(offer.xfer, offer.sender, now, message, report, remember)]

    def _refused(self, xfer: bytes, sender: str, now: float, message: str, report: ev.Event | None,
                 remember: bool = True) -> list[Action]:
        """An offer refused: remembered, so that it is refused again; logged and reported once per sender and
        period (a peer sending thousands must not flood the log or the user), the rest counted."""
        if remember:
            self._remember_failed(xfer)
        label = f"user={self.user} peer={sender} xfer={xfer.hex()[:8]}"
        if self._refusals.record(sender, label, message, now) and report is not None:
            return [Emit(report)]
        return []

    def _resume_in(self, record: dict, now: float) -> list[Action]:
        """Take up a .part after a restart: its whole chunks are the resume point (started when a slot is free)."""
        xfer = bytes.fromhex(record["xfer"])
        inc = Incoming(self._ctx, xfer, record["peer"], link_of(record), record["name"], record["size"],
                       record["chunk_size"], Path(record["part"]), Path(record["target_dir"]), record["final_name"],
                       cipher=FileCipher(bytes.fromhex(record["file_key"]), xfer) if record.get("file_key") else None,
                       resumed=True, session=record.get("session", 0), peer_dev=record.get("peer_dev"),
                       folder=record.get("folder", False))
        if self._has_slot(inc.peer):
            return self._start(inc, now)
        if not self._may_queue(inc.peer):  # more unfinished transfers than we would ever queue: drop the rest
            log.warning("user=%s peer=%s xfer=%s dropping unfinished %r: too many waiting", self.user, inc.peer,
                        xfer.hex()[:8], inc.name)
            self.files.remove(inc.part)
            self.records.forget("incoming", xfer)
            return []
        self._queue(inc)
        return inc.hold()

    def _has_slot(self, peer: str) -> bool:
        cfg = self.config
        return (len(self.incoming) < cfg.max_incoming
                and sum(i.peer == peer for i in self.incoming.values()) < cfg.max_incoming_per_peer)

    def _may_queue(self, peer: str) -> bool:
        cfg = self.config
        return (len(self.queued) < cfg.max_queued
                and sum(i.peer == peer for i in self.queued.values()) < cfg.max_queued_per_peer)

    def _queue(self, inc: Incoming) -> None:
        self.queued[inc.xfer] = inc
        self._by_prefix[inc.xfer[:REF_PREFIX]] = inc.xfer

    def _promote(self, now: float) -> list[Action]:
        """Start queued transfers while slots are free (oldest first, peers online only)."""
        actions: list[Action] = []
        if not self.queued or len(self.incoming) >= self.config.max_incoming:
            return actions
        for inc in list(self.queued.values()):
            if len(self.incoming) >= self.config.max_incoming:
                break
            if self._reachable(inc) and self._has_slot(inc.peer):
                del self.queued[inc.xfer]
                actions += self._start(inc, now)
        return actions

    def _start(self, inc: Incoming, now: float) -> list[Action]:
        self.incoming[inc.xfer] = inc
        self._by_prefix[inc.xfer[:REF_PREFIX]] = inc.xfer
        return inc.start(now)

    # --- bookkeeping ----------------------------------------------------------------------------------
    def _machine(self, xfer: bytes) -> TransferMachine | None:
        return self.incoming.get(xfer) or self.outgoing.get(xfer) or self.queued.get(xfer)

    def _reachable(self, machine: TransferMachine) -> bool:
        """The other end can answer: the peer is online, or it is the broker (a room transfer)."""
        party = machine.link.party(machine)
        return party is None or party in self._online

    def _source(self, path: Path | Source) -> Source:
        """A path inspected through the port; or a source the shell inspected already (a folder's walk hashes
        every file: a shell may do it off its loop, and send the ``Source`` that ``TransferFiles.inspect`` gave)."""
        if not 0 < self.config.chunk_size <= MAX_CHUNK_BYTES:
            raise TransferError(f"chunk size {self.config.chunk_size} outside 1..{MAX_CHUNK_BYTES} bytes")
        return path if type(path) is Source else self.files.inspect(Path(path))

    def _running(self, room: bytes | None, peer: str, source: Source) -> Outgoing | None:
        """The live transfer of this very file to ``peer`` (or to ``room``), if there is one."""
        for out in self.outgoing.values():
            if (out.link.room, out.peer) == (room, peer) and out.source.same(source):
                return out
        return None

    def _upload(self, link: RoomLink, source: Source, now: float) -> tuple[bytes, list[Action]]:
        out = self._track(Outgoing.begin(self._ctx, self._ctx.new_id(), self.user, link, source,
                                         self.config.chunk_size, 1, now))
        return out.xfer, out.start(now)

    def _track(self, out: Outgoing) -> Outgoing:
        self.outgoing[out.xfer] = out
        self._by_prefix[out.xfer[:REF_PREFIX]] = out.xfer
        return out

    def _ended(self, machine: TransferMachine) -> None:
        """A transfer finished or failed: forget it here and on disk; a failed incoming one stays refused."""
        xfer = machine.xfer
        if type(machine) is Outgoing:
            self.outgoing.pop(xfer, None)
            self.records.forget("outgoing", xfer)
        else:
            self.incoming.pop(xfer, None)
            self.queued.pop(xfer, None)
            self.records.forget("incoming", xfer)
            if machine.phase is Phase.FAILED:
                self._remember_failed(xfer)
        if self._by_prefix.get(xfer[:REF_PREFIX]) == xfer:
            del self._by_prefix[xfer[:REF_PREFIX]]

    def _remember_failed(self, xfer: bytes) -> None:
        """A failed transfer stays failed, across restarts too: its sender forgets the id once told, so a later
        offer of it is stale. The newest ``REMEMBER_FAILED`` ids are kept."""
        self._failed[xfer] = None
        if len(self._failed) > REMEMBER_FAILED:
            self._failed.popitem(last=False)
        self.records.add_failed(xfer, self._failed.keys())

