"""File transfer: credit-based flow (the ZeroMQ Guide's fileio3), verified and resumable.

Two small state machines, driven by ``TransferManager``:

    outgoing: OFFERING -> SENDING -> DONE          (FAILED from any state)
                 ^  \\        |
                 |   WAITING (peer offline; re-offered when it is back)
    incoming: [QUEUED ->] RECEIVING -> DONE        (FAILED from any state)

Incoming transfers are bounded per peer and in total; offers beyond the bound
wait, QUEUED (no file, no descriptor), and start when a slot frees. A
transfer whose peer is online but silent for ``give_up_after`` fails with
``timeout``; unfinished transfers older than ``max_age`` are dropped at start.

The receiver grants credit (``FileCredit``); the sender never has more than
``window`` chunks beyond the receiver's last verified chunk in flight, so the
broker, which only relays, holds at most a window per transfer. Chunks are
written in order to a ``.part`` file beside the target; its length *is* the
resume point, so a restarted receiver re-requests from the last whole chunk
and at most one window is sent twice. The whole-file SHA-256 travels on the
final chunk; only a verified file is linked to its final name.

No sockets and no clock reads: frames and ``now`` in, actions out. Files are
real files (the cores' one kind of I/O), under directories the shell passes in.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import logging
import os
import shutil
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit, Transmit
from p2pchat.client.storage.filenames import part_name, publish_atomically, received_name
from p2pchat.client.storage.partfile import PartFile, WriterPool
from p2pchat.client.e2e import EndToEnd, PeerKeyChanged
from p2pchat.common.crypto import TAG_BYTES, FileCipher
from p2pchat.common.errors import ErrorCode, P2PChatError, ProtocolError, RemoteError, TransferError
from p2pchat.common.protocol import (
    MAX_PAYLOAD_BYTES,
    MAX_TEXT_CHARS,
    FileCancel,
    FileChunk,
    FileCredit,
    FileDone,
    FileOffer,
    Envelope,
    Message,
    new_msg_id,
    pack,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 512 * 1024  # chosen with bench/bench_files.py (see docs/PROTOCOL.md §8)
MAX_CHUNK_BYTES = MAX_PAYLOAD_BYTES - TAG_BYTES
WINDOW = 32  # chunks in flight per transfer (see docs/PROTOCOL.md, bench/bench_files.py)
PROGRESS_EVERY = 0.2  # seconds between progress events per transfer
REF_PREFIX = 10  # file frames' message ids start with the transfer id's first bytes
OPEN_RETRIES = 3  # a sealed chunk that fails to open is asked for again this often before it counts as tampering
# Incoming transfers (docs/PROTOCOL.md §8): each holds a file, a descriptor and 2 MiB of buffers.
MAX_INCOMING = 16
MAX_INCOMING_PER_PEER = 4
MAX_QUEUED = 256  # offers waiting for a slot (a few hundred bytes each); more are refused as recipient_busy
MAX_QUEUED_PER_PEER = 64
GIVE_UP_AFTER = 600.0  # seconds an online peer may stay silent before its transfer fails with timeout
MAX_AGE = 7 * 24 * 3600.0  # seconds an unfinished transfer is kept on disk (its .part, its record)
REFUSED_SENDERS = 1000  # senders whose refused offers are counted apart (for aggregated logging)
REMEMBER_FAILED = 4096  # refused or failed incoming transfer ids kept to refuse their stale offers again
REFUSAL_PERIOD = 60.0  # seconds after which those counts start again
MIN_REWIND_INTERVAL = 0.5  # seconds: a sender goes back for chunks already sent at most this often


def frame_id(xfer: bytes) -> bytes:
    """A message id for one of a transfer's frames: an ERROR about it names the transfer (§8)."""
    return xfer[:REF_PREFIX] + os.urandom(16 - REF_PREFIX)


class Phase(enum.Enum):
    QUEUED = "queued"
    OFFERING = "offering"
    SENDING = "sending"
    WAITING = "waiting"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class _Rate:
    """Progress bookkeeping shared by both directions."""

    started: float
    last_emit: float = 0.0
    last_activity: float = 0.0  # we or the peer did something: the stall timer's clock
    heard: float = 0.0  # the peer made progress (a chunk, a credit) or was offline: the give-up clock

    def progress(self, xfer: bytes, peer: str, name: str, direction: str, done: int, size: int,
                 now: float, force: bool = False) -> list[Action]:
        if not force and now - self.last_emit < PROGRESS_EVERY:
            return []
        self.last_emit = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = (size - done) / rate if rate > 0 else None
        return [Emit(ev.FileProgress(xfer, peer, name, direction, done, size, rate, eta))]


@dataclass(slots=True)
class Outgoing:
    xfer: bytes
    peer: str
    path: Path
    size: int
    mtime_ns: int
    inode: int
    chunk_size: int
    phase: Phase = Phase.OFFERING
    accepted: bool = False  # the receiver has granted credit at least once
    send_next: int = 0
    upto: int = 0
    confirmed: int = 0  # chunks the receiver has verified
    hashed: int = 0  # bytes fed to the hasher, always a prefix of the file
    bytes_sent: int = 0  # payload bytes transmitted, resends included
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    handle: object | None = None
    rate: _Rate | None = None
    cipher: FileCipher | None = None  # end-to-end: a fresh key for each sending session (never a nonce twice)
    session: int = 1  # sending sessions of this transfer so far, this one included (persisted)
    offer_id: bytes = b""  # the offer's id and ts, fixed for the session: a repeated offer is byte-identical
    offer_ts: int = 0
    rewound_at: float = float("-inf")  # when a credit last sent us back to chunks already sent

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        return {"xfer": self.xfer.hex(), "peer": self.peer, "path": str(self.path), "size": self.size,
                "mtime_ns": self.mtime_ns, "inode": self.inode, "chunk_size": self.chunk_size,
                "session": self.session}


@dataclass(slots=True)
class Incoming:
    xfer: bytes
    peer: str
    name: str
    size: int
    chunk_size: int
    part: Path
    target_dir: Path
    final_name: str
    phase: Phase = Phase.RECEIVING
    next: int = 0
    granted: int = 0
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    handle: PartFile | None = None
    rate: _Rate | None = None
    cipher: FileCipher | None = None
    open_failures: int = 0  # sealed chunks that failed to open since the last good one
    resumed: bool = False  # from a record of an earlier run: its .part exists
    session: int = 0  # the sender's sending session whose key ``cipher`` holds

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        return {"xfer": self.xfer.hex(), "peer": self.peer, "name": self.name, "size": self.size,
                "chunk_size": self.chunk_size, "part": str(self.part), "target_dir": str(self.target_dir),
                "final_name": self.final_name, "file_key": self.cipher.key.hex() if self.cipher else None,
                "session": self.session}


@dataclass(frozen=True, slots=True)
class TransferConfig:
    state_dir: Path  # where unfinished transfers are remembered across restarts
    received_dir: Path
    max_file_size: int = 1 << 40
    chunk_size: int = CHUNK_SIZE
    window: int = WINDOW
    stall_timeout: float = 3.0
    max_incoming: int = MAX_INCOMING
    max_incoming_per_peer: int = MAX_INCOMING_PER_PEER
    max_queued: int = MAX_QUEUED
    max_queued_per_peer: int = MAX_QUEUED_PER_PEER
    give_up_after: float = GIVE_UP_AFTER
    max_age: float = MAX_AGE


class TransferManager:
    def __init__(self, user: str, config: TransferConfig, e2e: EndToEnd, wall_ms: Callable[[], int],
                 wall_time: Callable[[], float], writers: WriterPool | None = None):
        """``writers``: the shell's threads that write received chunks (none: written inline)."""
        self.user = user
        self._writers = writers
        self.e2e = e2e
        self._key_wants: set[str] = set()
        self.config = config
        self._wall_ms = wall_ms
        self._wall_time = wall_time
        self.outgoing: dict[bytes, Outgoing] = {}
        self.incoming: dict[bytes, Incoming] = {}
        self.queued: dict[bytes, Incoming] = {}  # in arrival order; no file opened yet
        self._refused: dict[str, int] = {}  # offers refused per sender in this period
        self._refused_since = 0.0
        self._failed: OrderedDict[bytes, None] = OrderedDict()  # refused or failed incoming ids, newest last
        self._by_prefix: dict[bytes, bytes] = {}
        self._online: frozenset[str] = frozenset()
        self._out_dir = config.state_dir / "outgoing"
        self._in_dir = config.state_dir / "incoming"
        self._done_dir = config.state_dir / "received"
        for d in (self._out_dir, self._in_dir, self._done_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._failed_log = config.state_dir / "failed.ids"
        try:
            held = self._failed_log.read_bytes()
        except OSError:
            held = b""
        ids = [held[i:i + 16] for i in range(0, len(held) - len(held) % 16, 16)]
        self._failed.update(dict.fromkeys(ids[-REMEMBER_FAILED:]))
        self._failed_logged = len(ids)

    # --- commands -----------------------------------------------------------
    def send_file(self, peer: str, path: Path, now: float) -> tuple[bytes, list[Action]]:
        """Offer ``path`` to ``peer``; resumes an unfinished transfer of the same file."""
        if not 0 < self.config.chunk_size <= MAX_CHUNK_BYTES:
            raise TransferError(f"chunk size {self.config.chunk_size} outside 1..{MAX_CHUNK_BYTES} bytes")
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
        if not path.is_file():
            raise TransferError(f"{path} is not a regular file")
        key = (peer, str(path), st.st_size, st.st_mtime_ns)
        for out in self.outgoing.values():  # already resumed by resume_all
            if (out.peer, str(out.path), out.size, out.mtime_ns) == key:
                return out.xfer, []
        xfer, session = new_msg_id(), 1
        for record in self._records(self._out_dir):
            if (record["peer"], record["path"], record["size"], record["mtime_ns"]) == key:
                xfer, session = bytes.fromhex(record["xfer"]), record.get("session", 0) + 1
                log.info("user=%s peer=%s xfer=%s resuming %s", self.user, peer, xfer.hex()[:8], path.name)
                break
        out = Outgoing(xfer, peer, path, st.st_size, st.st_mtime_ns, st.st_ino, self.config.chunk_size,
                       session=session)
        self._track_out(out, now)
        return xfer, self._offer(out, now)

    def cancel(self, xfer: bytes, now: float) -> list[Action]:
        error = TransferError("cancelled by you", ErrorCode.CANCELLED)
        if xfer in self.outgoing:
            return self._fail_out(self.outgoing[xfer], error, tell_peer=True)
        if xfer in self.incoming:
            return self._fail_in(self.incoming[xfer], error, tell_peer=True) + self._promote(now)
        if xfer in self.queued:
            return self._fail_in(self.queued[xfer], error, tell_peer=True)
        return []

    def resume_all(self, now: float) -> list[Action]:
        """Take up every unfinished transfer remembered on disk (after a restart); drop those over ``max_age``."""
        self._prune()
        actions: list[Action] = []
        for record in self._records(self._out_dir):
            xfer = bytes.fromhex(record["xfer"])
            if xfer in self.outgoing:
                continue
            out = Outgoing(xfer, record["peer"], Path(record["path"]), record["size"], record["mtime_ns"],
                           record["inode"], record["chunk_size"], session=record.get("session", 0) + 1)
            self._track_out(out, now)
            actions += self._offer(out, now)
        for record in self._records(self._in_dir):
            xfer = bytes.fromhex(record["xfer"])
            if xfer not in self.incoming and xfer not in self.queued:
                actions += self._resume_in(record, now)
        return actions

    def close(self) -> None:
        """The client stops: let go of every file; unfinished transfers stay on disk to resume."""
        for item in (*self.incoming.values(), *self.outgoing.values()):
            if item.handle is not None:
                try:
                    item.handle.close()
                except OSError as exc:
                    log.warning("user=%s xfer=%s closing failed: %s", self.user, item.xfer.hex()[:8], exc)
                item.handle = None

    # --- inputs -------------------------------------------------------------
    def on_message(self, env: Envelope, now: float) -> list[Action]:
        try:
            actions = self._on_message(env, now)
        except OSError as exc:  # any file error fails the transfer concerned, never the client
            actions = self._fail_xfer(getattr(env.message, "xfer", b""), exc)
        return actions + self._promote(now)

    def _fail_xfer(self, xfer: bytes, exc: OSError) -> list[Action]:
        code = ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.UNWRITABLE
        error = TransferError(f"file error: {exc.strerror or exc}", code)
        log.warning("user=%s xfer=%s file error: %s", self.user, xfer.hex()[:8], exc)
        if xfer in self.outgoing:
            return self._fail_out(self.outgoing[xfer], error, tell_peer=True)
        inc = self.incoming.get(xfer) or self.queued.get(xfer)
        return self._fail_in(inc, error, tell_peer=True) if inc is not None else []

    def _on_message(self, env: Envelope, now: float) -> list[Action]:
        msg, payload = env.message, env.payload
        kind = type(msg)
        if kind is FileChunk:
            inc = self.incoming.get(msg.xfer)
            return self._on_chunk(inc, msg, payload, now) if inc and inc.peer == msg.sender else []
        if kind is FileCredit:
            out = self.outgoing.get(msg.xfer)
            return self._on_credit(out, msg, now) if out and out.peer == msg.sender else []
        if kind is FileOffer:
            return self._on_offer(env, now)
        if kind is FileDone:
            out = self.outgoing.get(msg.xfer)
            return self._on_done(out, now) if out and out.peer == msg.sender else []
        if kind is FileCancel:
            error = RemoteError(f"{msg.sender}: {msg.message}", msg.code)
            if msg.xfer in self.outgoing and self.outgoing[msg.xfer].peer == msg.sender:
                return self._fail_out(self.outgoing[msg.xfer], error, tell_peer=False)
            inc = self.incoming.get(msg.xfer) or self.queued.get(msg.xfer)
            if inc is not None and inc.peer == msg.sender:
                return self._fail_in(inc, error, tell_peer=False)
        return []

    def on_error(self, ref: bytes, error: P2PChatError, now: float) -> list[Action] | None:
        """An ERROR whose ref is one of our file frames; None if it is not ours."""
        xfer = self._by_prefix.get(ref[:REF_PREFIX])
        if xfer is None:
            return None
        # After a broker restart a peer is "unknown" until it registers again (and the broker forgot its credit).
        peer_gone = error.code in (ErrorCode.RECIPIENT_OFFLINE, ErrorCode.RECIPIENT_BUSY, ErrorCode.UNKNOWN_RECIPIENT,
                                   ErrorCode.CREDIT_EXCEEDED)
        if xfer in self.outgoing:
            out = self.outgoing[xfer]
            if peer_gone and out.accepted:
                out.phase = Phase.WAITING  # re-offered when the peer is back
                out.rate.last_activity = now
                return []
            return self._fail_out(out, error, tell_peer=False)
        if xfer in self.incoming:
            inc = self.incoming[xfer]
            if peer_gone:
                inc.phase = Phase.WAITING  # asked again when the sender is back
                inc.rate.last_activity = now
                return []
            if error.code is ErrorCode.NOT_REGISTERED:
                return []  # we re-register; on_reconnected asks again
            return self._fail_in(inc, error, tell_peer=False)
        return []

    def take_key_wants(self) -> set[str]:
        """Peers whose key an offer is waiting for (the session asks the broker)."""
        wants, self._key_wants = self._key_wants, set()
        return wants

    def on_key(self, user: str, now: float) -> list[Action]:
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            if out.peer == user and out.phase is Phase.WAITING:
                actions += self._offer(out, now)
        return actions

    def fail_peer(self, user: str, error: P2PChatError) -> list[Action]:
        """No usable key for ``user``: transfers not yet offered to them fail."""
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            if out.peer == user and not out.accepted:
                actions += self._fail_out(out, error, tell_peer=False)
        return actions

    def on_peers(self, online: frozenset[str], now: float) -> list[Action]:
        """Presence changed: re-offer to peers that came back."""
        came_back = online - self._online
        self._online = online
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            if out.phase is Phase.WAITING and out.peer in came_back:
                actions += self._offer(out, now)
        for inc in list(self.incoming.values()):
            if inc.phase is Phase.WAITING and inc.peer in came_back:
                inc.phase = Phase.RECEIVING
                actions += self._credit(inc, now, restart=True)
        return actions + self._promote(now)

    def _give_up(self, now: float) -> list[Action]:
        """Fail transfers whose peer has been online but silent for ``give_up_after``."""
        actions: list[Action] = []
        limit = self.config.give_up_after
        for item in (*self.incoming.values(), *self.outgoing.values()):
            if item.peer not in self._online or item.phase is Phase.WAITING:
                item.rate.heard = now  # time offline does not count
            elif now - item.rate.heard > limit:
                error = TransferError(f"{item.peer} silent for {limit:g}s: transfer given up", ErrorCode.TIMEOUT)
                fail = self._fail_out if type(item) is Outgoing else self._fail_in
                actions += fail(item, error, tell_peer=True)  # type: ignore[arg-type]
        return actions

    def on_reconnected(self, now: float) -> list[Action]:
        """After re-registering (broker restart): whatever was in flight may be lost."""
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            out.rate.heard = now  # our own outage does not count against the peer
            actions += self._offer(out, now)
        for inc in list(self.incoming.values()):
            inc.rate.heard = now
            inc.phase = Phase.RECEIVING
            actions += self._credit(inc, now, restart=True)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        """A quiet transfer is asked again: frames may be lost to a restart, or a peer came back unseen."""
        actions = self._give_up(now) + self._promote(now)
        stall = self.config.stall_timeout
        for inc in list(self.incoming.values()):
            if now - inc.rate.last_activity > stall:
                inc.phase = Phase.RECEIVING
                actions += self._credit(inc, now, restart=True)
        for out in list(self.outgoing.values()):
            if now - out.rate.last_activity > stall:
                actions += self._offer(out, now)
        return actions

    def next_deadline(self) -> float:
        times = [i.rate.last_activity for i in self.incoming.values()]
        times += [o.rate.last_activity for o in self.outgoing.values()]
        return min(times, default=float("inf")) + self.config.stall_timeout

    # --- sender -------------------------------------------------------------
    def _track_out(self, out: Outgoing, now: float) -> None:
        # A fresh key per sending session: a file changed in place (same size, mtime and inode) and sent
        # again after a restart must not seal other bytes under a (key, nonce) pair already used.
        if self.e2e.enabled:
            out.cipher = FileCipher(FileCipher.new_key(), out.xfer)
        # The offer is sealed under a key derived from its id, with a fixed nonce: the same id with
        # other bytes (a new file key) or another ts would reuse that nonce. One id per session.
        out.offer_id, out.offer_ts = frame_id(out.xfer), self._wall_ms()
        out.rate = _Rate(started=now, last_activity=now, heard=now)
        self.outgoing[out.xfer] = out
        self._by_prefix[out.xfer[:REF_PREFIX]] = out.xfer
        self._save(self._out_dir, out.xfer, out.record())

    def _offer(self, out: Outgoing, now: float) -> list[Action]:
        out.rate.last_activity = now
        try:
            if self.e2e.enabled and self.e2e.key_of(out.peer) is None:
                out.phase = Phase.WAITING
                self._key_wants.add(out.peer)
                return []
        except PeerKeyChanged as exc:
            return self._fail_out(out, exc, tell_peer=False)
        out.phase = Phase.OFFERING
        meta = {"name": out.path.name[:MAX_TEXT_CHARS]}
        if out.cipher is not None:
            meta["key"] = out.cipher.key
            meta["session"] = out.session
        # One id per sending session: a store-and-forward broker keeps one copy however often we offer.
        msg_id, ts = out.offer_id, out.offer_ts
        body = self.e2e.seal(out.peer, msg_id, ts, msgpack.packb(meta, use_bin_type=True))
        offer = FileOffer(self.user, out.peer, out.xfer, out.size, out.chunk_size, body)
        return [Transmit(pack(offer, ts, msg_id))]

    def _on_credit(self, out: Outgoing, credit: FileCredit, now: float) -> list[Action]:
        out.rate.last_activity = out.rate.heard = now
        out.accepted = True
        if credit.next > out.chunks:
            return self._fail_out(out, TransferError("receiver asked past the end of the file"), tell_peer=True)
        # Never more than our own window past what the receiver holds, whatever it grants: a huge
        # credit must not make us read the whole file into memory at once.
        upto = min(credit.upto, credit.next + self.config.window)
        restart = credit.restart or out.phase is not Phase.SENDING
        if restart and out.phase is Phase.SENDING and credit.next < out.send_next:
            if now - out.rewound_at < MIN_REWIND_INTERVAL:
                restart = False  # a flood of restart credits must not make us send a window each
            else:
                out.rewound_at = now
        if restart:
            out.send_next = credit.next
            out.upto = upto
            out.phase = Phase.SENDING
        else:
            out.upto = max(out.upto, upto)
        out.confirmed = max(out.confirmed, credit.next)
        actions = out.rate.progress(out.xfer, out.peer, out.path.name, "out",
                                    min(out.size, out.confirmed * out.chunk_size), out.size, now)
        try:
            while out.send_next < min(out.upto, out.chunks):
                actions.append(self._chunk(out, out.send_next))
                out.send_next += 1
        except TransferError as exc:
            return actions + self._fail_out(out, exc, tell_peer=True)
        return actions

    def _chunk(self, out: Outgoing, index: int) -> Transmit:
        try:
            st = os.stat(out.path)
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (out.size, out.mtime_ns, out.inode):
                raise TransferError(f"{out.path.name} changed while being sent", ErrorCode.SOURCE_CHANGED)
            if out.handle is None:
                out.handle = open(out.path, "rb")  # noqa: SIM115 - kept open across chunks, closed in _close_out
            offset = index * out.chunk_size
            if out.cipher is None and out.hashed < offset:  # resuming: hash the prefix the receiver has
                out.handle.seek(out.hashed)
                while out.hashed < offset:
                    block = out.handle.read(min(1 << 20, offset - out.hashed))
                    if not block:
                        raise TransferError(f"{out.path.name} shrank while being sent", ErrorCode.SOURCE_CHANGED)
                    out.hasher.update(block)
                    out.hashed += len(block)
            out.handle.seek(offset)
            data = out.handle.read(out.chunk_size)
        except FileNotFoundError:
            raise TransferError(f"{out.path.name} was deleted while being sent", ErrorCode.SOURCE_CHANGED) from None
        except OSError as exc:
            raise TransferError(f"cannot read {out.path.name}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
        final = index == out.chunks - 1
        if len(data) != (out.size - offset if final else out.chunk_size):
            raise TransferError(f"{out.path.name} changed while being sent", ErrorCode.SOURCE_CHANGED)
        out.bytes_sent += len(data)
        if out.cipher is not None:  # sealed chunks are authenticated one by one: no whole-file hash
            chunk = FileChunk(self.user, out.peer, out.xfer, index, final)
            return self._send(out.xfer, chunk, out.cipher.seal(index, final, data))
        if offset == out.hashed:
            out.hasher.update(data)
            out.hashed += len(data)
        digest = out.hasher.digest() if final else None
        chunk = FileChunk(self.user, out.peer, out.xfer, index, final, zlib.crc32(data), digest)
        return self._send(out.xfer, chunk, data)

    def _on_done(self, out: Outgoing, now: float) -> list[Action]:
        actions = out.rate.progress(out.xfer, out.peer, out.path.name, "out", out.size, out.size, now, force=True)
        out.phase = Phase.DONE
        self._close_out(out)
        log.info("user=%s peer=%s xfer=%s sent %s (%d bytes), verified by the receiver",
                 self.user, out.peer, out.xfer.hex()[:8], out.path.name, out.size)
        return actions + [Emit(ev.FileSent(out.xfer, out.peer, out.path.name, out.size, out.bytes_sent))]

    def _fail_out(self, out: Outgoing, error: P2PChatError, tell_peer: bool) -> list[Action]:
        out.phase = Phase.FAILED
        self._close_out(out)
        log.warning("user=%s peer=%s xfer=%s sending failed: %s", self.user, out.peer, out.xfer.hex()[:8], error)
        actions: list[Action] = []
        if tell_peer:
            actions.append(self._send(out.xfer, FileCancel(self.user, out.peer, out.xfer, error.code, error.message)))
        return actions + [Emit(ev.FileFailed(out.xfer, out.peer, out.path.name, "out", error))]

    def _close_out(self, out: Outgoing) -> None:
        if out.handle is not None:
            out.handle.close()
        del self.outgoing[out.xfer]
        self._by_prefix.pop(out.xfer[:REF_PREFIX], None)
        self._forget(self._out_dir, out.xfer)

    # --- receiver -----------------------------------------------------------
    def _on_offer(self, env: Envelope, now: float) -> list[Action]:
        offer: FileOffer = env.message  # type: ignore[assignment]
        inc = self.incoming.get(offer.xfer)
        if inc is not None and inc.peer == offer.sender:
            self._rekey(inc, env)
            # A sender that offered starts at the next credit's ``next`` whatever its flag; not restarting
            # keeps one that already took our own restart credit from rewinding and sending chunks twice.
            return self._credit(inc, now, restart=False)
        queued = self.queued.get(offer.xfer)
        if queued is not None and queued.peer == offer.sender:
            self._rekey(queued, env)
            return [self._hold(queued)]
        if (self._done_dir / offer.xfer.hex()).exists():  # our FILE_DONE was lost: say it again
            return [self._send(offer.xfer, FileDone(self.user, offer.sender, offer.xfer))]
        if offer.xfer in self._failed:  # a stale offer crossed our FILE_CANCEL
            return [self._send(offer.xfer, FileCancel(self.user, offer.sender, offer.xfer, ErrorCode.CANCELLED,
                                                      "this transfer was refused or cancelled earlier"))]
        try:
            name, file_key, session = self._open_offer(env)
        except PeerKeyChanged as exc:
            return [Emit(ev.PeerKeyChanged(exc.user, exc.old, exc.new, exc))]
        except ProtocolError as exc:
            return self._refuse(offer, now, exc.message, ErrorCode.INTEGRITY, ev.ErrorReported(exc))
        cfg = self.config
        reject = None
        if not 0 < offer.chunk_size <= MAX_CHUNK_BYTES:
            reject = TransferError(f"chunk size {offer.chunk_size} outside 1..{MAX_CHUNK_BYTES}")
        elif offer.size > cfg.max_file_size:
            reject = TransferError(f"{offer.size} bytes is over the receiver's limit of {cfg.max_file_size}",
                                   ErrorCode.TOO_LARGE)
        else:
            try:
                cfg.received_dir.mkdir(parents=True, exist_ok=True)
                if shutil.disk_usage(cfg.received_dir).free < offer.size:
                    reject = TransferError("not enough free space on the receiver's disk", ErrorCode.NO_SPACE)
            except OSError as exc:
                reject = TransferError(f"receiver cannot write its download folder: {exc.strerror}",
                                       ErrorCode.UNWRITABLE)
        if reject is None and not self._may_queue(offer.sender):
            return self._refuse(offer, now, "receiver busy: too many transfers waiting", ErrorCode.RECIPIENT_BUSY)
        if reject is not None:
            return self._refuse(offer, now, reject.message, reject.code,
                                ev.FileFailed(offer.xfer, offer.sender, name, "in", reject))
        final_name = received_name(offer.sender, name, self._wall_time())
        inc = Incoming(offer.xfer, offer.sender, name, offer.size, offer.chunk_size,
                       cfg.received_dir / part_name(final_name, offer.xfer), cfg.received_dir, final_name,
                       cipher=FileCipher(file_key, offer.xfer) if file_key else None, session=session)
        if self._has_slot(inc.peer):
            return self._start(inc, now)
        return self._enqueue(inc)

    # --- admission: bounded incoming transfers, the rest queued -----------------------------
    def _has_slot(self, peer: str) -> bool:
        cfg = self.config
        return (len(self.incoming) < cfg.max_incoming
                and sum(i.peer == peer for i in self.incoming.values()) < cfg.max_incoming_per_peer)

    def _may_queue(self, peer: str) -> bool:
        cfg = self.config
        return (len(self.queued) < cfg.max_queued
                and sum(i.peer == peer for i in self.queued.values()) < cfg.max_queued_per_peer)

    def _enqueue(self, inc: Incoming) -> list[Action]:
        inc.phase = Phase.QUEUED
        self.queued[inc.xfer] = inc
        self._by_prefix[inc.xfer[:REF_PREFIX]] = inc.xfer
        log.info("user=%s peer=%s xfer=%s queued %r (%d bytes): %d transfers waiting", self.user, inc.peer,
                 inc.xfer.hex()[:8], inc.name, inc.size, len(self.queued))
        return [Emit(ev.FileQueued(inc.xfer, inc.peer, inc.name, inc.size, len(self.queued))), self._hold(inc)]

    def _refuse(self, offer: FileOffer, now: float, message: str, code: ErrorCode, report: ev.Event | None = None
                ) -> list[Action]:
        """Refuse an offer: the sender is told; logged and reported the 1st, 2nd, 4th, ... time per sender
        and period (a peer sending thousands must not flood the log or the user)."""
        if self._refused and (now - self._refused_since > REFUSAL_PERIOD or len(self._refused) >= REFUSED_SENDERS):
            self._refused.clear()  # counts restart each period, and rather than grow with the number of senders
        if not self._refused:
            self._refused_since = now
        count = self._refused[offer.sender] = self._refused.get(offer.sender, 0) + 1
        self._remember_failed(offer.xfer)
        actions: list[Action] = [self._send(offer.xfer, FileCancel(self.user, offer.sender, offer.xfer, code,
                                                                   message))]
        if count & (count - 1) == 0:
            log.warning("user=%s peer=%s xfer=%s offer refused (%d so far from this sender): %s", self.user,
                        offer.sender, offer.xfer.hex()[:8], count, message)
            if report is not None:
                actions.append(Emit(report))
        return actions

    def _hold(self, inc: Incoming) -> Transmit:
        """A credit of nothing: accepted, wait (the sender keeps the transfer while we answer its offers)."""
        return self._send(inc.xfer, FileCredit(self.user, inc.peer, inc.xfer, 0, 0, False))

    def _promote(self, now: float) -> list[Action]:
        """Start queued transfers while slots are free (oldest first, peers online only)."""
        actions: list[Action] = []
        if not self.queued or len(self.incoming) >= self.config.max_incoming:
            return actions
        for inc in list(self.queued.values()):
            if len(self.incoming) >= self.config.max_incoming:
                break
            if inc.peer in self._online and self._has_slot(inc.peer):
                del self.queued[inc.xfer]
                actions += self._start(inc, now)
        return actions

    def _start(self, inc: Incoming, now: float) -> list[Action]:
        """Open the .part (new, or resumed from an earlier run) and grant the first credit."""
        inc.phase = Phase.RECEIVING
        try:
            if inc.resumed:
                inc.handle = PartFile.resume(inc.part, inc.chunk_size, writers=self._writers)
                if inc.cipher is None:  # the whole-file hash covers the chunks already held
                    with open(inc.part, "rb") as held:  # already cut back to whole chunks
                        while block := held.read(1 << 20):
                            inc.hasher.update(block)
                inc.next = inc.handle.size // inc.chunk_size
            else:
                inc.handle = PartFile.create(inc.part, inc.chunk_size, writers=self._writers)
        except OSError as exc:
            if inc.handle is not None:
                inc.handle.close()
                inc.handle = None
            verb = "resume" if inc.resumed else "write its download folder"
            error = TransferError(f"receiver cannot {verb}: {exc.strerror}", ErrorCode.UNWRITABLE)
            log.warning("user=%s peer=%s xfer=%s refused %r: %s", self.user, inc.peer, inc.xfer.hex()[:8],
                        inc.name, error)
            self._forget(self._in_dir, inc.xfer)
            self._by_prefix.pop(inc.xfer[:REF_PREFIX], None)
            cancel = FileCancel(self.user, inc.peer, inc.xfer, error.code, error.message)
            return [self._send(inc.xfer, cancel), Emit(ev.FileFailed(inc.xfer, inc.peer, inc.name, "in", error))]
        self._track_in(inc, now)
        if inc.resumed:
            log.info("user=%s peer=%s xfer=%s resuming %r at chunk %d", self.user, inc.peer, inc.xfer.hex()[:8],
                     inc.name, inc.next)
            return self._credit(inc, now, restart=True)
        log.info("user=%s peer=%s xfer=%s receiving %r (%d bytes)", self.user, inc.peer, inc.xfer.hex()[:8],
                 inc.name, inc.size)
        return [Emit(ev.FileIncoming(inc.xfer, inc.peer, inc.name, inc.size))] + self._credit(inc, now, restart=True)

    def _rekey(self, inc: Incoming, env: Envelope) -> None:
        """A repeated offer from a newer sending session carries that session's key: use it from now on."""
        if inc.cipher is None:
            return
        try:
            _, key, session = self._open_offer(env)
        except P2PChatError:
            return  # a repeat we cannot open changes nothing
        if session > inc.session and key is not None:
            log.info("user=%s peer=%s xfer=%s sender's session %d: new file key", self.user, inc.peer,
                     inc.xfer.hex()[:8], session)
            inc.cipher, inc.session, inc.open_failures = FileCipher(key, inc.xfer), session, 0
            if inc.xfer in self.incoming or inc.resumed:
                self._save(self._in_dir, inc.xfer, inc.record())

    def _open_offer(self, env: Envelope) -> tuple[str, bytes | None, int]:
        """The offer's sealed metadata: (name, file key, sending session). Raises ProtocolError if unacceptable."""
        offer: FileOffer = env.message  # type: ignore[assignment]
        plain = self.e2e.open(offer.sender, env.msg_id, env.ts, offer.body)
        try:
            meta = msgpack.unpackb(plain, raw=False, max_str_len=4 * MAX_TEXT_CHARS, max_bin_len=64,
                                   max_map_len=4, max_array_len=0)
        except Exception:  # msgpack raises a zoo; see common.protocol.decode
            raise ProtocolError("undecodable file offer") from None
        if (type(meta) is not dict or type(meta.get("name")) is not str or set(meta) - {"name", "key", "session"}
                or type(meta.get("session", 0)) is not int or not 0 <= meta.get("session", 0) < 2**32):
            raise ProtocolError("malformed file offer")
        key = meta.get("key")
        if self.e2e.enabled and (type(key) is not bytes or len(key) != 32):
            raise ProtocolError("file offer without an end-to-end key refused")
        return meta["name"], key if self.e2e.enabled else None, meta.get("session", 0)

    def _resume_in(self, record: dict, now: float) -> list[Action]:
        """Take up a .part after a restart: its whole chunks are the resume point (started when a slot is free)."""
        xfer = bytes.fromhex(record["xfer"])
        inc = Incoming(xfer, record["peer"], record["name"], record["size"],
                       record["chunk_size"], Path(record["part"]), Path(record["target_dir"]), record["final_name"],
                       cipher=FileCipher(bytes.fromhex(record["file_key"]), xfer) if record.get("file_key") else None,
                       resumed=True, session=record.get("session", 0))
        if self._has_slot(inc.peer):
            return self._start(inc, now)
        if not self._may_queue(inc.peer):  # more unfinished transfers than we would ever queue: drop the rest
            log.warning("user=%s peer=%s xfer=%s dropping unfinished %r: too many waiting", self.user, inc.peer,
                        xfer.hex()[:8], inc.name)
            self._discard(inc)
            return []
        inc.phase = Phase.QUEUED
        self.queued[xfer] = inc
        self._by_prefix[xfer[:REF_PREFIX]] = xfer
        return [self._hold(inc)]

    def _prune(self) -> None:
        """Forget unfinished transfers untouched for ``max_age`` (their .part too), and old done marks."""
        cutoff = self._wall_time() - self.config.max_age
        for path in self._out_dir.glob("*.json"):
            if _mtime(path) < cutoff:
                log.info("user=%s dropping unfinished outgoing transfer %s: older than %gs", self.user, path.stem,
                         self.config.max_age)
                _unlink(path)
        for record in self._records(self._in_dir):
            record_path = self._in_dir / f"{record['xfer']}.json"
            if max(_mtime(record_path), _mtime(Path(record["part"]))) < cutoff:
                log.info("user=%s dropping unfinished incoming %r from %s: older than %gs", self.user,
                         record["name"], record["peer"], self.config.max_age)
                _unlink(Path(record["part"]))
                _unlink(record_path)
        for path in self._done_dir.iterdir():
            if _mtime(path) < cutoff:
                _unlink(path)

    def _discard(self, inc: Incoming) -> None:
        _unlink(inc.part)
        self._forget(self._in_dir, inc.xfer)

    def _track_in(self, inc: Incoming, now: float) -> None:
        inc.rate = _Rate(started=now, last_activity=now, heard=now)
        self.incoming[inc.xfer] = inc
        self._by_prefix[inc.xfer[:REF_PREFIX]] = inc.xfer
        self._save(self._in_dir, inc.xfer, inc.record())

    def _credit(self, inc: Incoming, now: float, restart: bool) -> list[Action]:
        inc.rate.last_activity = now
        # The window counts from what is on disk: chunks still queued for the writer are lost with the
        # process, and a restart must cost at most a window sent again. Never less than half a window,
        # though: only arriving chunks trigger the next credit, so a grant of nothing would stall.
        window = self.config.window
        inc.granted = inc.next + max(window - (inc.handle.pending if inc.handle else 0), (window + 1) // 2)
        credit = FileCredit(self.user, inc.peer, inc.xfer, inc.next, inc.granted, restart)
        return [self._send(inc.xfer, credit, urgent=True)]

    def _on_chunk(self, inc: Incoming, chunk: FileChunk, payload, now: float) -> list[Action]:
        if chunk.index != inc.next:
            return []  # a duplicate or out of order: dropped; the stall timer re-asks
        final = inc.next == inc.chunks - 1
        size = inc.size - chunk.index * inc.chunk_size if final else inc.chunk_size
        data = memoryview(payload)
        sealed = inc.cipher is not None
        if (len(data) != size + (TAG_BYTES if sealed else 0) or chunk.final != final
                or (not sealed and (chunk.crc is None or zlib.crc32(data) != chunk.crc))):
            return self._ask_again(inc, chunk, now)
        try:
            out = inc.handle.buffer(size)
            if sealed:
                inc.cipher.open_into(chunk.index, final, data, out)
            else:
                out[:] = data
                inc.hasher.update(data)
            inc.handle.append(size)
        except ProtocolError as exc:
            # Sealed chunks carry no CRC: damage in transit and tampering look alike, so ask a few times.
            inc.open_failures += 1
            if inc.open_failures < OPEN_RETRIES:
                return self._ask_again(inc, chunk, now)
            return self._fail_in(inc, TransferError(f"{inc.name}: {exc.message}", ErrorCode.INTEGRITY),
                                 tell_peer=True)
        except OSError as exc:
            return self._fail_in(inc, self._write_error(inc, exc), tell_peer=True)
        inc.open_failures = 0
        inc.next += 1
        inc.rate.last_activity = inc.rate.heard = now
        if final:
            return self._finish(inc, chunk, now)
        actions = inc.rate.progress(inc.xfer, inc.peer, inc.name, "in", inc.next * inc.chunk_size, inc.size, now)
        if inc.granted - inc.next <= self.config.window // 2:
            actions += self._credit(inc, now, restart=False)
        return actions

    def _ask_again(self, inc: Incoming, chunk: FileChunk, now: float) -> list[Action]:
        log.warning("user=%s peer=%s xfer=%s chunk %d damaged; asking again", self.user, inc.peer,
                    inc.xfer.hex()[:8], chunk.index)
        return self._credit(inc, now, restart=True)

    @staticmethod
    def _write_error(inc: Incoming, exc: OSError) -> TransferError:
        code = ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.UNWRITABLE
        return TransferError(f"cannot write {inc.name}: {exc.strerror}", code)

    def _finish(self, inc: Incoming, chunk: FileChunk, now: float) -> list[Action]:
        # Sealed: the final chunk opened under the "final" nonce, so every chunk was authentic and none is missing.
        if inc.cipher is None and chunk.sha256 != inc.hasher.digest():
            return self._fail_in(inc, TransferError(f"{inc.name} failed its SHA-256 check", ErrorCode.INTEGRITY),
                                 tell_peer=True)
        try:
            handle, inc.handle = inc.handle, None
            handle.finish()  # every chunk on disk and synced before the name appears
        except OSError as exc:
            return self._fail_in(inc, self._write_error(inc, exc), tell_peer=True)
        try:
            path = publish_atomically(inc.part, inc.target_dir, inc.final_name)
        except OSError as exc:
            return self._fail_in(inc, TransferError(f"cannot save {inc.name}: {exc.strerror}",
                                                    ErrorCode.UNWRITABLE), tell_peer=True)
        try:
            (self._done_dir / inc.xfer.hex()).touch()
        except OSError as exc:  # saved all the same; only a lost FILE_DONE could not be answered again
            log.warning("user=%s xfer=%s cannot mark the transfer done: %s", self.user, inc.xfer.hex()[:8], exc)
        inc.phase = Phase.DONE
        self._close_in(inc, keep_part=True)
        log.info("user=%s peer=%s xfer=%s saved %s (%d bytes)", self.user, inc.peer, inc.xfer.hex()[:8], path,
                 inc.size)
        progress = inc.rate.progress(inc.xfer, inc.peer, inc.name, "in", inc.size, inc.size, now, force=True)
        return progress + [self._send(inc.xfer, FileDone(self.user, inc.peer, inc.xfer)),
                           Emit(ev.FileReceived(inc.xfer, inc.peer, inc.name, path, inc.size))]

    def _fail_in(self, inc: Incoming, error: P2PChatError, tell_peer: bool) -> list[Action]:
        inc.phase = Phase.FAILED
        self._close_in(inc, keep_part=False)
        self._remember_failed(inc.xfer)
        log.warning("user=%s peer=%s xfer=%s receiving failed: %s", self.user, inc.peer, inc.xfer.hex()[:8], error)
        actions: list[Action] = []
        if tell_peer:
            actions.append(self._send(inc.xfer, FileCancel(self.user, inc.peer, inc.xfer, error.code, error.message)))
        return actions + [Emit(ev.FileFailed(inc.xfer, inc.peer, inc.name, "in", error))]

    def _remember_failed(self, xfer: bytes) -> None:
        """A failed transfer stays failed, across restarts too: its sender forgets the id once told, so a later
        offer of it is stale. The newest ``REMEMBER_FAILED`` ids are kept, in an append-only file compacted
        when it doubles (a peer sending thousands of offers must not leave thousands of files)."""
        self._failed[xfer] = None
        if len(self._failed) > REMEMBER_FAILED:
            self._failed.popitem(last=False)
        try:
            self._failed_logged += 1
            if self._failed_logged > 2 * REMEMBER_FAILED:
                tmp = self._failed_log.with_suffix(".tmp")
                tmp.write_bytes(b"".join(self._failed))
                os.replace(tmp, self._failed_log)
                self._failed_logged = len(self._failed)
            else:
                with open(self._failed_log, "ab") as log_file:
                    log_file.write(xfer)
        except OSError:  # a full disk: a stale offer after a restart may start the transfer again
            pass

    def _close_in(self, inc: Incoming, keep_part: bool) -> None:
        if inc.handle is not None:
            inc.handle.close()
            inc.handle = None
        if not keep_part:
            _unlink(inc.part)
        self.incoming.pop(inc.xfer, None)
        self.queued.pop(inc.xfer, None)
        self._by_prefix.pop(inc.xfer[:REF_PREFIX], None)
        self._forget(self._in_dir, inc.xfer)

    # --- helpers ------------------------------------------------------------
    def _send(self, xfer: bytes, msg: Message, payload=None, urgent: bool = False) -> Transmit:
        return Transmit(pack(msg, self._wall_ms(), frame_id(xfer), payload), urgent)

    @staticmethod
    def _records(directory: Path) -> list[dict]:
        records = []
        for path in sorted(directory.glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("ignoring unreadable transfer record %s", path)
        return records

    def _save(self, directory: Path, xfer: bytes, record: dict) -> None:
        tmp = directory / f"{xfer.hex()}.json.tmp"
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, directory / f"{xfer.hex()}.json")
        except OSError as exc:  # the transfer goes on; it just cannot resume after a restart
            log.warning("user=%s xfer=%s cannot remember the transfer for a restart: %s", self.user,
                        xfer.hex()[:8], exc)
            _unlink(tmp)

    @staticmethod
    def _forget(directory: Path, xfer: bytes) -> None:
        _unlink(directory / f"{xfer.hex()}.json")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)
