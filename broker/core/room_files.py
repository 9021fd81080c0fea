"""Files sent to a room, kept by the broker (docs/ROOMS-DESIGN.md §5): upload once, fetch by every member.

The sender uploads a transfer's sealed chunks once, under the broker's credit (the broker is the receiver of
docs/PROTOCOL.md §8: ``room_credit`` for ``room_chunk``s); each device of each member then fetches them under
its own credit (the broker is the sender of §8: ``room_chunk``s for ``room_fetch``). Sans I/O: the chunks are
kept by a ``RoomFileStore`` (broker/core/ports.py) that every broker of a cluster shares, so all that serves a
transfer is on its disk and this object only bounds what is in flight. The routing core has checked the frame,
the session and that its user is a joined member of ``room`` before calling in; ``now_ms`` is the wall clock,
because times are written to the shared store and compared by other brokers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from p2pchat.broker.core.actions import Action, FrameMaker, Send
from p2pchat.broker.core.credit import CreditLedger, CreditLimits
from p2pchat.broker.core.ports import SEAL_TAG, RoomFile, RoomFileStore, RoomFileUsage, StoreUnavailable
from p2pchat.common.errors import ErrorCode
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol import MAX_PAYLOAD_BYTES
from p2pchat.common.protocol_rooms import RoomChunk, RoomCredit, RoomFetch, RoomUpload

log = logging.getLogger(__name__)

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
MIN_CHUNK = KIB
MAX_CHUNK = MAX_PAYLOAD_BYTES - SEAL_TAG  # a sealed chunk must fit one frame's payload
HOUR_MS = 3600 * 1000


@dataclass(frozen=True, slots=True)
class RoomFileLimits:
    # ROOM_FILE_QUOTA: sealed bytes kept for one room or inbox (room_quota beyond). Sealed bytes are 16 per chunk
    # more than the file's: 2 GiB so that a file of 1 GiB (a round size people send) fits whatever its chunks.
    room_quota: int = 2 * GIB
    total_quota: int = 16 * GIB  # the whole store (--room-files-max; storage_full beyond)
    files_per_room: int = 1_000
    files_total: int = 100_000
    uploads_per_user: int = 4  # unfinished uploads (rate_limited beyond)
    uploads_per_room: int = 8
    window: int = 32  # chunks credited to an uploader, and sent to a fetcher, beyond its ``next``
    fetches_per_conn: int = 8
    inflight_per_conn: int = 64 * MIB  # fetched chunks sent and not yet credited back
    inflight_total: int = 512 * MIB
    rewind_ms: int = 500  # a fetcher's restart resends at most this often (§8's sender rule)
    fetch_idle_ms: int = 600_000  # a fetch without a credit for this long is forgotten
    complete_ttl_ms: int = 7 * 24 * HOUR_MS  # after completion
    unfinished_ttl_ms: int = HOUR_MS  # after the last chunk
    sweep_every_ms: int = 5_000
    sweep_batch: int = 256  # transfers looked at per sweep step


@dataclass(slots=True)
class _Upload:
    conn: bytes
    file: RoomFile
    next: int  # chunks on disk
    upto: int  # credited
    failed: bool = False  # the disk refused a chunk, the uploader was told: drop its chunks until it asks again


@dataclass(slots=True)
class _Fetch:
    file: RoomFile
    sent: int  # the next chunk to send
    upto: int
    active_ms: int
    rewound_ms: int


Key = tuple[bytes, bytes]  # (rid, xfer)


class RoomFiles:
    def __init__(self, store: RoomFileStore, limits: RoomFileLimits, frames: FrameMaker) -> None:
        self.store, self.limits = store, limits
        self._frames = frames
        self._uploads: dict[Key, _Upload] = {}
        self._uploads_of: dict[bytes, set[Key]] = {}  # conn -> its uploads
        self._fetches: OrderedDict[tuple[bytes, bytes, bytes], _Fetch] = OrderedDict()  # least recently active first
        self._fetches_of: dict[bytes, set[Key]] = {}
        # What a fetch has sent and its fetcher not yet credited, per connection and in all (§8's broker ledger).
        self._inflight = CreditLedger(CreditLimits(
            max_window=limits.window, inflight_per_recipient=limits.inflight_per_conn,
            inflight_total=limits.inflight_total, transfers_per_recipient=limits.fetches_per_conn,
            transfers_total=1 << 62, idle_seconds=limits.fetch_idle_ms / 1000))
        self.refused = IncidentLog("room chunks refused", log)
        self._refusing: set[bytes] = set()  # connections in a run of refused chunks: answered once per run
        self._next_sweep_ms = 0

    # --- upload: the broker is the receiver ------------------------------------------------------------------
    def upload(self, conn: bytes, user: str, rid: bytes, msg: RoomUpload, msg_id: bytes, now_ms: int) -> list[Action]:
        """Start or resume an upload; answered with a credit from the chunks already on disk."""
        if not MIN_CHUNK <= msg.chunk_size <= MAX_CHUNK:
            return self._error(conn, ErrorCode.BAD_FRAME, f"chunk_size must be {MIN_CHUNK} to {MAX_CHUNK}", msg_id)
        wanted = RoomFile(rid, msg.xfer, user, msg.size, msg.chunk_size, now_ms, now_ms)
        if wanted.stored > self.limits.room_quota:
            return self._error(conn, ErrorCode.ROOM_QUOTA, f"{msg.size} bytes exceed the {self.limits.room_quota} bytes "
                               "the broker keeps for one room (or one recipient)", msg_id)
        try:
            file = self.store.get(rid, msg.xfer) or self.store.create(wanted, lambda u: self._admit(wanted, u))
            if isinstance(file, ErrorCode):
                log.info("user=%s room=%s xfer=%s upload refused: %s", user, rid.hex(), msg.xfer.hex(),
                         file.value)
                return self._error(conn, file, _REFUSALS[file], msg_id)
            if file.uploader != user:
                return self._error(conn, ErrorCode.NOT_ALLOWED, "this transfer was uploaded by another user", msg_id)
            if (file.size, file.chunk_size) != (msg.size, msg.chunk_size):
                return self._error(conn, ErrorCode.BAD_FRAME, f"this transfer was started with size {file.size} and "
                                   f"chunk_size {file.chunk_size}", msg_id)
            if not file.complete and file.chunks == file.count:  # the broker stopped between the last write and this
                file = self.store.complete(file, now_ms) or file
        except StoreUnavailable as exc:
            return self._error(conn, exc.code, str(exc), msg_id)
        self._forget_upload((rid, msg.xfer))
        if file.complete:
            return [self._credit(conn, file, file.count, file.count, True)]
        up = self._uploads[(rid, msg.xfer)] = _Upload(conn, file, file.chunks,
                                                            min(file.chunks + self.limits.window, file.count))
        self._uploads_of.setdefault(conn, set()).add((rid, msg.xfer))
        log.info("user=%s room=%s xfer=%s upload from chunk %d of %d", user, rid.hex(), msg.xfer.hex(),
                 file.chunks, file.count)
        return [self._credit(conn, file, up.next, up.upto, True)]

    def chunk(self, conn: bytes, user: str, rid: bytes, msg: RoomChunk, payload, msg_id: bytes,
              now_ms: int) -> list[Action]:
        """A sealed chunk of an upload: written at once if it is the next one and exactly as long as it must be."""
        up = self._uploads.get((rid, msg.xfer))
        if up is None or up.conn != conn or up.file.uploader != user or msg.index >= up.upto:
            return self._refuse(conn, user, ErrorCode.CREDIT_EXCEEDED, f"chunk {msg.index} is outside the credit "
                                "the broker granted; wait for room_credit", msg_id, now_ms)
        if up.failed or msg.index < up.next:  # after a refusal the uploader asks again; below next: held already
            return []
        file = up.file
        if msg.index > up.next:  # one was lost on the way: start again from the first missing one (§8)
            if self._refused(conn, user, f"xfer={msg.xfer.hex()} chunk {msg.index} while {up.next} is missing",
                             now_ms):
                return [self._credit(conn, file, up.next, up.upto, True)]
            return []
        final = msg.index == file.count - 1
        size = len(payload)
        if bool(msg.final) != final or size != file.payload_size(msg.index):
            return self._refuse(conn, user, ErrorCode.BAD_FRAME, f"chunk {msg.index} must be "
                                f"{file.payload_size(msg.index)} bytes (sealed) with final={final}; got {size} bytes, "
                                f"final={msg.final}", msg_id, now_ms)
        try:
            if not self.store.write_chunk(file, msg.index, payload, now_ms):
                self._forget_upload((rid, msg.xfer))
                return self._error(conn, ErrorCode.UNKNOWN_TRANSFER, "this transfer was deleted", msg_id)
            up.next += 1
            self._refusing.discard(conn)
            if final:
                done = self.store.complete(file, now_ms)
                self._forget_upload((rid, msg.xfer))
                if done is None:
                    return self._error(conn, ErrorCode.UNKNOWN_TRANSFER, "this transfer was deleted", msg_id)
                log.info("user=%s room=%s xfer=%s uploaded: %d bytes", user, rid.hex(), msg.xfer.hex(), file.size)
                return [self._credit(conn, done, done.count, done.count, False)]
        except StoreUnavailable as exc:
            up.failed = True  # resumable: a new room_upload goes on from the chunks on disk
            log.warning("user=%s room=%s xfer=%s chunk %d not stored: %s", user, rid.hex(), msg.xfer.hex(),
                        msg.index, exc)
            return self._error(conn, exc.code, f"chunk {msg.index} could not be stored: {exc}", msg_id)
        if up.upto - up.next > self.limits.window // 2 or up.upto == file.count:
            return []
        up.upto = min(up.next + self.limits.window, file.count)  # credit again at half a window, as §8's receiver
        return [self._credit(conn, file, up.next, up.upto, False)]

    def offer_ready(self, rid: bytes, xfer: bytes, user: str, size: int | None = None,
                    chunk_size: int | None = None) -> ErrorCode | None:
        """May ``user`` offer ``xfer`` to room ``rid``? It must have uploaded it there, whole (with this size and
        chunk_size, if given: the offer must describe what members will fetch)."""
        try:
            file = self.store.get(rid, xfer)
        except StoreUnavailable as exc:
            return exc.code
        if file is None:
            return ErrorCode.UNKNOWN_TRANSFER
        if not file.complete or file.uploader != user or size not in (None, file.size) \
                or chunk_size not in (None, file.chunk_size):
            return ErrorCode.NOT_UPLOADED
        return None

    # --- fetch: the broker is the sender --------------------------------------------------------------------
    def fetch(self, conn: bytes, user: str, rid: bytes, msg: RoomFetch, msg_id: bytes, now_ms: int) -> list[Action]:
        """A member's credit for a transfer of ``room``: the chunks it covers, read from the store."""
        key = (conn, rid, msg.xfer)
        fetch = self._fetches.get(key)
        try:
            file = fetch.file if fetch is not None else self.store.get(rid, msg.xfer)
        except StoreUnavailable as exc:
            return self._error(conn, exc.code, str(exc), msg_id)
        if file is None:
            return self._error(conn, ErrorCode.UNKNOWN_TRANSFER, "no such transfer in this room", msg_id)
        if not file.complete:
            return self._error(conn, ErrorCode.NOT_UPLOADED, "this transfer is not uploaded yet", msg_id)
        if msg.next > file.count:
            return self._error(conn, ErrorCode.BAD_FRAME, f"next {msg.next} is beyond the {file.count} chunks",
                               msg_id)
        ledger = (rid.hex(), conn.hex(), msg.xfer)
        if msg.next == file.count:  # the fetcher holds it all
            self._forget_fetch(key)
            return []
        upto = min(msg.upto, file.count)  # the ledger clamps it to ``window`` beyond next
        if fetch is None:
            mine = self._fetches_of.setdefault(conn, set())
            if len(mine) >= self.limits.fetches_per_conn:
                return self._error(conn, ErrorCode.RATE_LIMITED, f"at most {self.limits.fetches_per_conn} fetches "
                                   "at once per connection", msg_id)
            mine.add((rid, msg.xfer))
            fetch = self._fetches[key] = _Fetch(file, msg.next, upto, now_ms, now_ms)
        elif msg.restart and now_ms - fetch.rewound_ms >= self.limits.rewind_ms:
            # What was in flight is lost (the fetcher stalled, or restarted): it is sent, and counted, again.
            self._inflight.forget(*ledger)
            fetch.sent, fetch.rewound_ms = msg.next, now_ms
        else:  # only raises the limit (a restart sooner than rewind_ms too: no resend storm)
            fetch.sent = max(fetch.sent, msg.next)
        fetch.upto, fetch.active_ms = upto, now_ms
        self._fetches.move_to_end(key)
        self._inflight.on_credit(*ledger, msg.next, upto, now_ms / 1000)
        return self._send_chunks(conn, key, fetch, msg_id, now_ms)

    def _send_chunks(self, conn: bytes, key: tuple[bytes, bytes, bytes], fetch: _Fetch, msg_id: bytes,
                     now_ms: int) -> list[Action]:
        _, rid, xfer = key
        file = fetch.file
        actions: list[Action] = []
        while fetch.sent < fetch.upto:
            index = fetch.sent
            size = file.payload_size(index)
            if not self._inflight.admit(rid.hex(), conn.hex(), xfer, index, size, now_ms / 1000):
                break  # the fetcher's credit after it has these frees room for more
            try:
                payload = self.store.read_chunk(file, index)
            except StoreUnavailable as exc:
                self._inflight.unadmit(rid.hex(), conn.hex(), xfer, index, size)
                return actions + self._error(conn, exc.code, f"chunk {index} could not be read: {exc}", msg_id)
            if payload is None:
                self._forget_fetch(key)
                return actions + self._error(conn, ErrorCode.UNKNOWN_TRANSFER, "this transfer was deleted", msg_id)
            chunk = RoomChunk(room=rid, xfer=xfer, index=index, final=index == file.count - 1)
            actions.append(Send(conn, [*self._frames.make(chunk), payload]))
            fetch.sent += 1
        return actions

    # --- lifetime -------------------------------------------------------------------------------------------
    def room_gone(self, rid: bytes) -> None:
        """The room was deleted: so are its files."""
        for key in [key for key in self._uploads if key[0] == rid]:
            self._forget_upload(key)
        for key in [key for key in self._fetches if key[1] == rid]:
            self._forget_fetch(key)
        try:
            deleted = self.store.delete_room(rid)
        except StoreUnavailable as exc:
            log.warning("room=%s files not deleted: %s (the expiry sweep will)", rid.hex(), exc)
            return
        log.info("room=%s deleted with its %d files", rid.hex(), deleted)

    def closed(self, conn: bytes) -> None:
        """``conn`` went away: its uploads stay on disk for a resume, its fetches are forgotten."""
        for key in list(self._uploads_of.get(conn, ())):
            self._forget_upload(key)
        for rid, xfer in list(self._fetches_of.get(conn, ())):
            self._forget_fetch((conn, rid, xfer))
        self._refusing.discard(conn)
        self.refused.forget(conn)

    def on_tick(self, now_ms: int) -> None:
        """Forget idle fetches; one bounded step of the expiry sweep over the store."""
        self.refused.flush(now_ms / 1000)
        while self._fetches:
            key, fetch = next(iter(self._fetches.items()))
            if now_ms - fetch.active_ms <= self.limits.fetch_idle_ms:
                break
            self._forget_fetch(key)
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + self.limits.sweep_every_ms
        try:
            for file in self.store.sweep(self.limits.sweep_batch):
                if self._expired(file, now_ms) and self.store.delete(file.rid, file.xfer):
                    log.info("room=%s xfer=%s expired (%s)", file.rid.hex(), file.xfer.hex(),
                             "complete" if file.complete else "unfinished")
                    self._forget_upload((file.rid, file.xfer))
        except StoreUnavailable as exc:
            log.warning("room files expiry sweep stopped: %s", exc)

    @property
    def fetch_count(self) -> int:
        return len(self._fetches)

    @property
    def inflight_total(self) -> int:
        return self._inflight.inflight_total

    # --- the rules -------------------------------------------------------------------------------------------
    def _admit(self, file: RoomFile, usage: RoomFileUsage) -> ErrorCode | None:
        """May a new upload join ``usage``? (Called by the store, atomically with the creation.)"""
        limits = self.limits
        if usage.user_unfinished >= limits.uploads_per_user or usage.room_unfinished >= limits.uploads_per_room:
            return ErrorCode.RATE_LIMITED
        if usage.room_files >= limits.files_per_room or usage.room_bytes + file.stored > limits.room_quota:
            return ErrorCode.ROOM_QUOTA
        if usage.total_files >= limits.files_total or usage.total_bytes + file.stored > limits.total_quota:
            return ErrorCode.STORAGE_FULL
        return None

    def _expired(self, file: RoomFile, now_ms: int) -> bool:
        if file.completed_ms is not None:
            return now_ms - file.completed_ms > self.limits.complete_ttl_ms
        return now_ms - file.active_ms > self.limits.unfinished_ttl_ms

    # --- helpers ----------------------------------------------------------------------------------------------
    def _credit(self, conn: bytes, file: RoomFile, next_: int, upto: int, restart: bool) -> Send:
        return Send(conn, self._frames.make(RoomCredit(room=file.rid, xfer=file.xfer, next=next_, upto=upto,
                                                       restart=restart)))

    def _error(self, conn: bytes, code: ErrorCode, text: str, msg_id: bytes) -> list[Action]:
        return [Send(conn, self._frames.error(code, text, msg_id))]

    def _refused(self, conn: bytes, user: str, detail: str, now_ms: int) -> bool:
        """Count a refused chunk; True for the first of the connection's run (§8: answered once per run)."""
        self.refused.record(conn, user, detail, now_ms / 1000)
        if conn in self._refusing:
            return False
        self._refusing.add(conn)
        return True

    def _refuse(self, conn: bytes, user: str, code: ErrorCode, text: str, msg_id: bytes,
                now_ms: int) -> list[Action]:
        return self._error(conn, code, text, msg_id) if self._refused(conn, user, text, now_ms) else []

    def _forget_upload(self, key: Key) -> None:
        up = self._uploads.pop(key, None)
        if up is not None:
            mine = self._uploads_of[up.conn]
            mine.discard(key)
            if not mine:
                del self._uploads_of[up.conn]

    def _forget_fetch(self, key: tuple[bytes, bytes, bytes]) -> None:
        conn, rid, xfer = key
        if self._fetches.pop(key, None) is None:
            return
        self._inflight.forget(rid.hex(), conn.hex(), xfer)
        mine = self._fetches_of[conn]
        mine.discard((rid, xfer))
        if not mine:
            del self._fetches_of[conn]


_REFUSALS = {
    ErrorCode.RATE_LIMITED: "too many unfinished uploads: finish one, or wait until one expires",
    ErrorCode.ROOM_QUOTA: "the broker keeps no more files for this room (or recipient): its quota is used",
    ErrorCode.STORAGE_FULL: "the broker keeps no more room files",
}
