"""The load tool's file traffic: scripted transfers through the broker's chunk relay (§8).

With ``--files SECONDS`` every sender offers a file of ``--file-size`` bytes to
one of its peers about that often, one transfer at a time; every client accepts
the files it is offered, grants credit as the real client does and answers
FILE_DONE once the file checks out. Transfers are unencrypted (a CRC-32 per
chunk, the SHA-256 of the whole file on the last one): like the load tool's
message bodies, they measure the broker, not client crypto, and nothing touches
a disk.

A file's bytes are one random block repeated, the same in every worker process
(seeded by the run), so a receiver checks each chunk against the CRC it must
have and the final SHA-256 against the file's without keeping anything. A
mismatch is an error (the run fails); a transfer that makes no progress for
``GIVE_UP_NS`` is counted as timed out. Lost frames are asked for again the way
the real client does: a receiver that hears nothing for ``STALL_NS`` re-credits
from its next chunk, a sender whose offer got no credit offers again.

No sockets, no clock reads: ``now`` in, frames out, for ``load/script``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack

from p2pchat.client.load.stats import ProcessStats, record_ns
from p2pchat.client.core.transfer import CHUNK_SIZE, REF_PREFIX, WINDOW, frame_id
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Consume, Envelope, Error, FileCancel, FileChunk, FileCredit, FileDone, FileOffer, pack

NS = 1_000_000_000
STALL_NS = 3 * NS  # the real client's stall timeout (3 heartbeats of 1 s)
GIVE_UP_NS = 30 * NS
NEVER = 1 << 62
FINISHED_KEPT = 64  # transfers a receiver remembers having finished, to answer a repeated offer
PEER_GONE = (ErrorCode.RECIPIENT_OFFLINE, ErrorCode.RECIPIENT_BUSY, ErrorCode.UNKNOWN_RECIPIENT)
CLIENT_LEVEL = (ErrorCode.NOT_REGISTERED, ErrorCode.RATE_LIMITED)  # about the connection, not the transfer


class FileContent:
    """The synthetic file every transfer of a run carries, with the checks a receiver needs."""

    def __init__(self, size: int, chunk_size: int, seed: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = max(1, -(-size // chunk_size))
        self.block = random.Random(seed).randbytes(min(size, chunk_size))
        self.last = self.block[: size - (self.chunks - 1) * chunk_size]
        self.block_crc, self.last_crc = zlib.crc32(self.block), zlib.crc32(self.last)
        digest = hashlib.sha256()
        for _ in range(self.chunks - 1):
            digest.update(self.block)
        digest.update(self.last)
        self.sha256 = digest.digest()

    def payload(self, index: int) -> bytes:
        return self.last if index == self.chunks - 1 else self.block

    def crc(self, index: int) -> int:
        return self.last_crc if index == self.chunks - 1 else self.block_crc


@functools.lru_cache(maxsize=4)
def file_content(size: int, seed: int) -> FileContent:
    """One per worker process and run: every client of the process shares it."""
    return FileContent(size, CHUNK_SIZE, seed)


@dataclass(slots=True)
class _Outgoing:
    xfer: bytes
    peer: str
    started: int
    progress: int  # last time the receiver moved the transfer on
    nudged: int = 0  # last time we offered again
    accepted: bool = False
    send_next: int = 0
    upto: int = 0


@dataclass(slots=True)
class _Incoming:
    xfer: bytes
    peer: str
    progress: int
    nudged: int = 0
    next: int = 0
    granted: int = 0


class FileTraffic:
    """One scripted client's file transfers, both directions."""

    __slots__ = ("user", "index", "names", "content", "every_ns", "stats", "_wall_ms", "_rng", "_peer_of",
                 "sending", "next_offer_at", "outgoing", "incoming", "_by_prefix", "_finished")

    def __init__(self, index: int, names: Sequence[str], content: FileContent, every_s: float, stats: ProcessStats,
                 rng: random.Random, peer_of: Callable[[], int], wall_ms: Callable[[], int]) -> None:
        self.user = names[index]
        self.index = index
        self.names = names
        self.content = content
        self.every_ns = int(every_s * NS)
        self.stats = stats
        self._wall_ms = wall_ms
        self._rng = rng
        self._peer_of = peer_of
        self.sending = False
        self.next_offer_at = NEVER
        self.outgoing: dict[bytes, _Outgoing] = {}
        self.incoming: dict[bytes, _Incoming] = {}
        self._by_prefix: dict[bytes, bytes] = {}
        self._finished: dict[bytes, None] = {}  # insertion-ordered: the oldest are forgotten first

    # --- commands ---------------------------------------------------------------------
    def start(self, now: int) -> None:
        self.sending = True
        self._schedule(now)

    def stop(self) -> None:
        """No new offers; transfers under way go on."""
        self.sending = False
        self.next_offer_at = NEVER

    def abandon(self) -> None:
        """The client went away (churn): its transfers are over, on this side."""
        counters = self.stats.counters
        counters["files_abandoned"] += len(self.outgoing) + len(self.incoming)
        counters["files_open"] -= len(self.outgoing)
        self.outgoing.clear()
        self.incoming.clear()
        self._by_prefix.clear()
        if self.sending:
            self.next_offer_at = 0  # offer again as soon as the client is back

    @property
    def busy(self) -> bool:
        return bool(self.outgoing or self.incoming)

    # --- time -----------------------------------------------------------------------
    def next_deadline(self) -> int:
        deadline = self.next_offer_at if not self.outgoing else NEVER
        for o in self.outgoing.values():  # an accepted transfer waits for credit: the receiver re-asks
            deadline = min(deadline, o.progress + GIVE_UP_NS)
            if not o.accepted:
                deadline = min(deadline, max(o.progress, o.nudged) + STALL_NS)
        for inc in self.incoming.values():
            deadline = min(deadline, max(inc.progress, inc.nudged) + STALL_NS, inc.progress + GIVE_UP_NS)
        return deadline

    def on_tick(self, now: int) -> list:
        out: list = []
        counters = self.stats.counters
        for inc in list(self.incoming.values()):
            if now - inc.progress >= GIVE_UP_NS:
                counters["files_timed_out"] += 1
                self._forget(self.incoming, inc.xfer)
            elif now - max(inc.progress, inc.nudged) >= STALL_NS:  # frames lost (a restart): ask again
                inc.nudged = now
                counters["file_recredits"] += 1
                out.append(self._credit(inc, restart=True))
        for o in list(self.outgoing.values()):
            if now - o.progress >= GIVE_UP_NS:
                counters["files_timed_out"] += 1
                self._forget(self.outgoing, o.xfer)
                self._schedule(now)
            elif not o.accepted and now - max(o.progress, o.nudged) >= STALL_NS:
                o.nudged = now
                out.append(self._offer_frames(o))
        if self.sending and not self.outgoing and now >= self.next_offer_at:
            out.append(self._offer(now))
        return out

    # --- frames ---------------------------------------------------------------------
    def on_message(self, env: Envelope, now: int) -> list | None:
        """The answer to a file frame; None if ``env`` is not one."""
        msg = env.message
        kind = type(msg)
        if kind is FileOffer:
            return self._on_offer(env, now)
        if kind not in (FileChunk, FileCredit, FileDone, FileCancel):
            return None
        # Frames about a transfer count only from its peer.
        t = self.incoming.get(msg.xfer) if kind is FileChunk else self.outgoing.get(msg.xfer)
        if kind is FileCancel and t is None:
            t = self.incoming.get(msg.xfer)
        if t is None or t.peer != msg.sender:
            return []
        if kind is FileChunk:
            return self._on_chunk(t, msg, env.payload, now)
        if kind is FileCredit:
            return self._on_credit(t, msg, now)
        if kind is FileDone:
            self.stats.counters["files_done"] += 1
            record_ns(self.stats.file_latency, now - t.started)
        else:
            self.stats.error("file_cancelled", f"{msg.sender} -> {self.user}: {msg.message}")
        self._forget(self.outgoing if type(t) is _Outgoing else self.incoming, msg.xfer)
        self._schedule(now)
        return []

    def on_ack(self, ref: bytes) -> bool:
        """True if ``ref`` is one of our offers (their ids are the transfer ids)."""
        return ref in self.outgoing

    def on_error(self, msg: Error, now: int) -> bool:
        """True if the error is about one of our transfers (then it is dealt with)."""
        xfer = self._by_prefix.get(msg.ref[:REF_PREFIX]) if msg.ref else None
        if xfer is None or msg.code in CLIENT_LEVEL:
            return False  # the client re-registers or backs off; a stalled transfer asks again after
        table = self.outgoing if xfer in self.outgoing else self.incoming
        if msg.code in PEER_GONE:  # churn or a restart took the peer away: nothing to resume in the load tool
            self.stats.counters["files_peer_gone"] += 1
        else:
            self.stats.error(msg.code.value, f"{self.user}: file transfer: {msg.message}")
        self._forget(table, xfer)
        self._schedule(now)
        return True

    # --- sender -----------------------------------------------------------------------
    def _offer(self, now: int) -> list:
        xfer = os.urandom(16)
        o = _Outgoing(xfer, self.names[self._peer_of()], started=now, progress=now)
        self.outgoing[xfer] = o
        self._by_prefix[xfer[:REF_PREFIX]] = xfer
        self.stats.counters["files_offered"] += 1
        self.stats.counters["files_open"] += 1  # until it ends one way or another: the drain waits for it
        return self._offer_frames(o)

    def _offer_frames(self, o: _Outgoing) -> list:
        body = msgpack.packb({"name": f"load-{self.index}-{o.xfer.hex()[:8]}.bin"})
        offer = FileOffer(self.user, o.peer, o.xfer, self.content.size, self.content.chunk_size, body)
        return pack(offer, self._wall_ms(), o.xfer)  # the offer's id is the transfer id, as in the real client

    def _on_credit(self, o: _Outgoing, credit: FileCredit, now: int) -> list:
        o.progress = now
        if credit.restart or not o.accepted:
            o.send_next = credit.next
            o.upto = credit.upto
            o.accepted = True
        else:
            o.upto = max(o.upto, credit.upto)
        out = []
        content = self.content
        while o.send_next < min(o.upto, content.chunks):
            i = o.send_next
            final = i == content.chunks - 1
            chunk = FileChunk(self.user, o.peer, o.xfer, i, final, content.crc(i), content.sha256 if final else None)
            out.append(pack(chunk, self._wall_ms(), frame_id(o.xfer), content.payload(i)))
            o.send_next += 1
        self.stats.counters["file_chunks_sent"] += len(out)
        return out

    # --- receiver ---------------------------------------------------------------------
    def _on_offer(self, env: Envelope, now: int) -> list:
        offer: FileOffer = env.message  # type: ignore[assignment]
        out = [pack(Consume(env.msg_id), self._wall_ms())]  # durable: the broker keeps it until consumed
        if offer.xfer in self._finished:  # our FILE_DONE was lost
            done = FileDone(self.user, offer.sender, offer.xfer)
            return out + [pack(done, self._wall_ms(), frame_id(offer.xfer))]
        inc = self.incoming.get(offer.xfer)
        if inc is None:
            if (offer.size, offer.chunk_size) != (self.content.size, self.content.chunk_size):
                self.stats.error("foreign_file", f"{offer.sender} offered {offer.size} bytes in chunks of "
                                                 f"{offer.chunk_size}, not this run's file")
                return out
            inc = self.incoming[offer.xfer] = _Incoming(offer.xfer, offer.sender, progress=now)
            self._by_prefix[offer.xfer[:REF_PREFIX]] = offer.xfer
        return out + [self._credit(inc, restart=True)]

    def _on_chunk(self, inc: _Incoming, chunk: FileChunk, payload, now: int) -> list:
        if chunk.index != inc.next:
            return []  # a duplicate or after a loss: the stall timer asks again
        content, counters = self.content, self.stats.counters
        final = chunk.index == content.chunks - 1
        data = memoryview(payload)
        expected = content.payload(chunk.index)
        if len(data) != len(expected) or chunk.final != final or chunk.crc != zlib.crc32(data):
            counters["file_chunks_damaged"] += 1  # damaged in transit: asked for again
            return [self._credit(inc, restart=True)]
        if chunk.crc != content.crc(chunk.index) or (final and chunk.sha256 != content.sha256):
            self.stats.error("file_corrupt", f"{inc.peer} -> {self.user}: chunk {chunk.index} is not this run's data")
            self._forget(self.incoming, inc.xfer)
            return [pack(FileCancel(self.user, inc.peer, inc.xfer, ErrorCode.INTEGRITY, "not the expected data"),
                         self._wall_ms(), frame_id(inc.xfer))]
        inc.next += 1
        inc.progress = now
        counters["file_bytes"] += len(data)
        if final:
            counters["files_received"] += 1
            self._forget(self.incoming, inc.xfer)
            self._finished[inc.xfer] = None
            if len(self._finished) > FINISHED_KEPT:
                del self._finished[next(iter(self._finished))]
            return [pack(FileDone(self.user, inc.peer, inc.xfer), self._wall_ms(), frame_id(inc.xfer))]
        if inc.granted - inc.next <= WINDOW // 2:
            return [self._credit(inc, restart=False)]
        return []

    def _credit(self, inc: _Incoming, restart: bool) -> list:
        inc.granted = inc.next + WINDOW
        credit = FileCredit(self.user, inc.peer, inc.xfer, inc.next, inc.granted, restart)
        return pack(credit, self._wall_ms(), frame_id(inc.xfer))

    # --- helpers ----------------------------------------------------------------------
    def _schedule(self, now: int) -> None:
        if self.sending and not self.outgoing:
            self.next_offer_at = now + int(self.every_ns * (0.5 + self._rng.random()))

    def _forget(self, table: dict, xfer: bytes) -> None:
        if table.pop(xfer, None) is not None and table is self.outgoing:
            self.stats.counters["files_open"] -= 1
        self._by_prefix.pop(xfer[:REF_PREFIX], None)
