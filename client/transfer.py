"""File transfer: credit-based flow (the ZeroMQ Guide's fileio3), verified and resumable.

Two small state machines, driven by ``TransferManager``:

    outgoing: OFFERING -> SENDING -> DONE          (FAILED from any state)
                 ^  \\        |
                 |   WAITING (peer offline; re-offered when it is back)
    incoming: RECEIVING -> DONE                    (FAILED from any state)

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from client import events as ev
from client.actions import Action, Emit, Transmit
from client.filenames import publish_atomically, received_name
from client.partfile import PartFile
from client.e2e import EndToEnd, PeerKeyChanged
from common.crypto import TAG_BYTES, FileCipher
from common.errors import ErrorCode, P2PChatError, ProtocolError, RemoteError, TransferError
from common.protocol import (
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


def frame_id(xfer: bytes) -> bytes:
    """A message id for one of a transfer's frames: an ERROR about it names the transfer (§8)."""
    return xfer[:REF_PREFIX] + os.urandom(16 - REF_PREFIX)


class Phase(enum.Enum):
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
    last_activity: float = 0.0

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
    cipher: FileCipher | None = None  # end-to-end: every chunk sealed with the file's own key

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        return {"xfer": self.xfer.hex(), "peer": self.peer, "path": str(self.path), "size": self.size,
                "mtime_ns": self.mtime_ns, "inode": self.inode, "chunk_size": self.chunk_size,
                "file_key": self.cipher.key.hex() if self.cipher else None}


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

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def record(self) -> dict:
        return {"xfer": self.xfer.hex(), "peer": self.peer, "name": self.name, "size": self.size,
                "chunk_size": self.chunk_size, "part": str(self.part), "target_dir": str(self.target_dir),
                "final_name": self.final_name, "file_key": self.cipher.key.hex() if self.cipher else None}


@dataclass(frozen=True, slots=True)
class TransferConfig:
    state_dir: Path  # where unfinished transfers are remembered across restarts
    received_dir: Path
    max_file_size: int = 1 << 40
    chunk_size: int = CHUNK_SIZE
    window: int = WINDOW
    stall_timeout: float = 3.0
    write_behind: bool = False  # the shell's choice: received chunks written by a thread (see client.partfile)


class TransferManager:
    def __init__(self, user: str, config: TransferConfig, e2e: EndToEnd, wall_ms: Callable[[], int],
                 wall_time: Callable[[], float]):
        self.user = user
        self.e2e = e2e
        self._key_wants: set[str] = set()
        self.config = config
        self._wall_ms = wall_ms
        self._wall_time = wall_time
        self.outgoing: dict[bytes, Outgoing] = {}
        self.incoming: dict[bytes, Incoming] = {}
        self._by_prefix: dict[bytes, bytes] = {}
        self._online: frozenset[str] = frozenset()
        self._out_dir = config.state_dir / "outgoing"
        self._in_dir = config.state_dir / "incoming"
        self._done_dir = config.state_dir / "received"
        for d in (self._out_dir, self._in_dir, self._done_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

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
        xfer = new_msg_id()
        for record in self._records(self._out_dir):
            if (record["peer"], record["path"], record["size"], record["mtime_ns"]) == key:
                xfer = bytes.fromhex(record["xfer"])
                log.info("user=%s peer=%s xfer=%s resuming %s", self.user, peer, xfer.hex()[:8], path.name)
                break
        out = Outgoing(xfer, peer, path, st.st_size, st.st_mtime_ns, st.st_ino, self.config.chunk_size)
        key = next((r["file_key"] for r in self._records(self._out_dir) if r["xfer"] == xfer.hex()), None)
        if self.e2e.enabled:
            out.cipher = FileCipher(bytes.fromhex(key) if key else FileCipher.new_key(), xfer)
        self._track_out(out, now)
        return xfer, self._offer(out, now)

    def cancel(self, xfer: bytes, now: float) -> list[Action]:
        error = TransferError("cancelled by you", ErrorCode.CANCELLED)
        if xfer in self.outgoing:
            return self._fail_out(self.outgoing[xfer], error, tell_peer=True)
        if xfer in self.incoming:
            return self._fail_in(self.incoming[xfer], error, tell_peer=True)
        return []

    def resume_all(self, now: float) -> list[Action]:
        """Take up every unfinished transfer remembered on disk (after a restart)."""
        actions: list[Action] = []
        for record in self._records(self._out_dir):
            xfer = bytes.fromhex(record["xfer"])
            if xfer in self.outgoing:
                continue
            out = Outgoing(xfer, record["peer"], Path(record["path"]), record["size"], record["mtime_ns"],
                           record["inode"], record["chunk_size"])
            if record.get("file_key"):
                out.cipher = FileCipher(bytes.fromhex(record["file_key"]), xfer)
            self._track_out(out, now)
            actions += self._offer(out, now)
        for record in self._records(self._in_dir):
            xfer = bytes.fromhex(record["xfer"])
            if xfer not in self.incoming:
                actions += self._resume_in(record, now)
        return actions

    def close(self) -> None:
        """The client stops: let go of every file; unfinished transfers stay on disk to resume."""
        for item in (*self.incoming.values(), *self.outgoing.values()):
            if item.handle is not None:
                item.handle.close()
                item.handle = None

    # --- inputs -------------------------------------------------------------
    def on_message(self, env: Envelope, now: float) -> list[Action]:
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
            if msg.xfer in self.incoming and self.incoming[msg.xfer].peer == msg.sender:
                return self._fail_in(self.incoming[msg.xfer], error, tell_peer=False)
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
        return actions

    def on_reconnected(self, now: float) -> list[Action]:
        """After re-registering (broker restart): whatever was in flight may be lost."""
        actions: list[Action] = []
        for out in list(self.outgoing.values()):
            actions += self._offer(out, now)
        for inc in list(self.incoming.values()):
            inc.phase = Phase.RECEIVING
            actions += self._credit(inc, now, restart=True)
        return actions

    def on_tick(self, now: float) -> list[Action]:
        """A quiet transfer is asked again: frames may be lost to a restart, or a peer came back unseen."""
        actions: list[Action] = []
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
        out.rate = _Rate(started=now, last_activity=now)
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
        # The offer's id is the transfer id: a store-and-forward broker keeps one copy however often we offer.
        msg_id, ts = out.xfer, self._wall_ms()
        body = self.e2e.seal(out.peer, msg_id, ts, msgpack.packb(meta, use_bin_type=True))
        offer = FileOffer(self.user, out.peer, out.xfer, out.size, out.chunk_size, body)
        return [Transmit(pack(offer, ts, msg_id))]

    def _on_credit(self, out: Outgoing, credit: FileCredit, now: float) -> list[Action]:
        out.rate.last_activity = now
        out.accepted = True
        if credit.next > out.chunks:
            return self._fail_out(out, TransferError("receiver asked past the end of the file"), tell_peer=True)
        if credit.restart or out.phase is not Phase.SENDING:
            out.send_next = credit.next
            out.upto = credit.upto
            out.phase = Phase.SENDING
        else:
            out.upto = max(out.upto, credit.upto)
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
            # A sender that offered starts at the next credit's ``next`` whatever its flag; not restarting
            # keeps one that already took our own restart credit from rewinding and sending chunks twice.
            return self._credit(inc, now, restart=False)
        if (self._done_dir / offer.xfer.hex()).exists():  # our FILE_DONE was lost: say it again
            return [self._send(offer.xfer, FileDone(self.user, offer.sender, offer.xfer))]
        try:
            name, file_key = self._open_offer(env)
        except PeerKeyChanged as exc:
            return [Emit(ev.PeerKeyChanged(exc.user, exc.old, exc.new, exc))]
        except ProtocolError as exc:
            log.warning("user=%s peer=%s xfer=%s offer refused: %s", self.user, offer.sender, offer.xfer.hex()[:8],
                        exc.message)
            cancel = FileCancel(self.user, offer.sender, offer.xfer, ErrorCode.INTEGRITY, exc.message)
            return [self._send(offer.xfer, cancel), Emit(ev.ErrorReported(exc))]
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
        final_name = received_name(offer.sender, name, self._wall_time())
        part = cfg.received_dir / f".{final_name[:180]}.{offer.xfer.hex()[:8]}.part"
        if reject is None:
            try:
                handle = PartFile.create(part, offer.chunk_size, write_behind=cfg.write_behind)
            except OSError as exc:
                reject = TransferError(f"receiver cannot write its download folder: {exc.strerror}",
                                       ErrorCode.UNWRITABLE)
        if reject is not None:
            log.warning("user=%s peer=%s xfer=%s refused %r: %s", self.user, offer.sender, offer.xfer.hex()[:8],
                        name, reject)
            cancel = FileCancel(self.user, offer.sender, offer.xfer, reject.code, reject.message)
            return [self._send(offer.xfer, cancel),
                    Emit(ev.FileFailed(offer.xfer, offer.sender, name, "in", reject))]
        inc = Incoming(offer.xfer, offer.sender, name, offer.size, offer.chunk_size, part,
                       cfg.received_dir, final_name, handle=handle,
                       cipher=FileCipher(file_key, offer.xfer) if file_key else None)
        self._track_in(inc, now)
        log.info("user=%s peer=%s xfer=%s receiving %r (%d bytes)", self.user, inc.peer, inc.xfer.hex()[:8],
                 inc.name, inc.size)
        return [Emit(ev.FileIncoming(inc.xfer, inc.peer, inc.name, inc.size))] + self._credit(inc, now, restart=True)

    def _open_offer(self, env: Envelope) -> tuple[str, bytes | None]:
        """The offer's sealed metadata: (name, file key). Raises ProtocolError if unacceptable."""
        offer: FileOffer = env.message  # type: ignore[assignment]
        plain = self.e2e.open(offer.sender, env.msg_id, env.ts, offer.body)
        try:
            meta = msgpack.unpackb(plain, raw=False, max_str_len=4 * MAX_TEXT_CHARS, max_bin_len=64,
                                   max_map_len=4, max_array_len=0)
        except Exception:  # msgpack raises a zoo; see common.protocol.decode
            raise ProtocolError("undecodable file offer") from None
        if type(meta) is not dict or type(meta.get("name")) is not str or set(meta) - {"name", "key"}:
            raise ProtocolError("malformed file offer")
        key = meta.get("key")
        if self.e2e.enabled and (type(key) is not bytes or len(key) != 32):
            raise ProtocolError("file offer without an end-to-end key refused")
        return meta["name"], key if self.e2e.enabled else None

    def _resume_in(self, record: dict, now: float) -> list[Action]:
        """Reopen a .part after a restart: its whole chunks are the resume point."""
        xfer = bytes.fromhex(record["xfer"])
        inc = Incoming(xfer, record["peer"], record["name"], record["size"],
                       record["chunk_size"], Path(record["part"]), Path(record["target_dir"]), record["final_name"],
                       cipher=FileCipher(bytes.fromhex(record["file_key"]), xfer) if record.get("file_key") else None)
        handle = None
        try:
            handle = PartFile.resume(inc.part, inc.chunk_size, write_behind=self.config.write_behind)
            if inc.cipher is None:  # the whole-file hash covers the chunks already held
                with open(inc.part, "rb") as held:  # already cut back to whole chunks
                    while block := held.read(1 << 20):
                        inc.hasher.update(block)
        except OSError as exc:
            if handle is not None:
                handle.close()
            self._forget(self._in_dir, inc.xfer)
            return [Emit(ev.FileFailed(inc.xfer, inc.peer, inc.name, "in",
                                       TransferError(f"cannot resume: {exc.strerror}", ErrorCode.UNWRITABLE)))]
        inc.handle, inc.next = handle, handle.size // inc.chunk_size
        self._track_in(inc, now)
        log.info("user=%s peer=%s xfer=%s resuming %r at chunk %d", self.user, inc.peer, inc.xfer.hex()[:8],
                 inc.name, inc.next)
        return self._credit(inc, now, restart=True)

    def _track_in(self, inc: Incoming, now: float) -> None:
        inc.rate = _Rate(started=now, last_activity=now)
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
        inc.rate.last_activity = now
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
            (self._done_dir / inc.xfer.hex()).touch()
        except OSError as exc:
            return self._fail_in(inc, TransferError(f"cannot save {inc.name}: {exc.strerror}",
                                                    ErrorCode.UNWRITABLE), tell_peer=True)
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
        log.warning("user=%s peer=%s xfer=%s receiving failed: %s", self.user, inc.peer, inc.xfer.hex()[:8], error)
        actions: list[Action] = []
        if tell_peer:
            actions.append(self._send(inc.xfer, FileCancel(self.user, inc.peer, inc.xfer, error.code, error.message)))
        return actions + [Emit(ev.FileFailed(inc.xfer, inc.peer, inc.name, "in", error))]

    def _close_in(self, inc: Incoming, keep_part: bool) -> None:
        if inc.handle is not None:
            inc.handle.close()
        if not keep_part:
            inc.part.unlink(missing_ok=True)
        del self.incoming[inc.xfer]
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

    @staticmethod
    def _save(directory: Path, xfer: bytes, record: dict) -> None:
        tmp = directory / f"{xfer.hex()}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, directory / f"{xfer.hex()}.json")

    @staticmethod
    def _forget(directory: Path, xfer: bytes) -> None:
        (directory / f"{xfer.hex()}.json").unlink(missing_ok=True)
