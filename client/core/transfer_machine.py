"""What the two transfer machines share: phases, inputs, the transition-table gate, progress, context.

Each machine (``sending.Outgoing``, ``receiving.Incoming``) declares its table, (phase, input) ->
next phase or ``IGNORE``, as h2's ``H2ConnectionStateMachine`` does. Every handler passes its input
through ``enter`` before it acts: an input the table lacks fails the transfer cleanly (its file
closed, its record forgotten, the peer and the user told) and never raises. DONE and FAILED take
every input silently: a finished transfer stays quiet.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit, Transmit
from p2pchat.client.core.ports import TransferFiles, TransferRecords
from p2pchat.client.e2e import PeerKeyChanged, Sealing
from p2pchat.common.errors import ErrorCode, P2PChatError, TransferError
from p2pchat.common.protocol import Envelope, FileChunk, FileCredit, Message, new_msg_id, pack

if TYPE_CHECKING:
    from p2pchat.client.core.transfer_links import RoomUploaded, TransferLink

log = logging.getLogger(__name__)

CHUNK_SIZE = 512 * 1024  # chosen with bench/bench_files.py (see docs/PROTOCOL.md §8)
WINDOW = 32  # chunks in flight per transfer (see docs/PROTOCOL.md, bench/bench_files.py)
PROGRESS_EVERY = 0.2  # seconds between progress events per transfer
REF_PREFIX = 10  # file frames' message ids start with the transfer id's first bytes
# Incoming transfers (docs/PROTOCOL.md §8): each holds a file, a descriptor and 2 MiB of buffers.
MAX_INCOMING = 16
MAX_INCOMING_PER_PEER = 4
MAX_QUEUED = 256  # offers waiting for a slot (a few hundred bytes each); more are refused as recipient_busy
MAX_QUEUED_PER_PEER = 64
GIVE_UP_AFTER = 600.0  # seconds an online peer may stay silent before its transfer fails with timeout
MAX_AGE = 7 * 24 * 3600.0  # seconds an unfinished transfer is kept on disk (its .part, its record)
# Broker errors that mean "the peer is not reachable now", not "this transfer is wrong".
PEER_GONE = frozenset({ErrorCode.RECIPIENT_OFFLINE, ErrorCode.RECIPIENT_BUSY, ErrorCode.UNKNOWN_RECIPIENT,
                       ErrorCode.CREDIT_EXCEEDED})


def frame_id(xfer: bytes, new_id: Callable[[], bytes] = new_msg_id) -> bytes:
    """A message id for one of a transfer's frames: an ERROR about it names the transfer (§8)."""
    return xfer[:REF_PREFIX] + new_id()[REF_PREFIX:]


class Phase(enum.Enum):
    QUEUED = "queued"
    OFFERING = "offering"
    SENDING = "sending"
    WAITING = "waiting"
    RECEIVING = "receiving"
    EXTRACTING = "extracting"  # receiver: a folder's stream is in and verified; its files are being made
    DONE = "done"
    FAILED = "failed"


ENDED = frozenset({Phase.DONE, Phase.FAILED})


class Input(enum.Enum):
    """Everything that can happen to a transfer."""

    # frames from the transfer's peer
    OFFER = "file_offer"
    CREDIT = "file_credit"
    CHUNK = "file_chunk"
    DONE = "file_done"
    CANCEL = "file_cancel"
    # the session, the broker and the clock
    START = "start"  # sender: the first offer; receiver: a slot is free, open the .part
    NO_KEY = "no key"  # an offer is due but the peer's key is not known yet
    KEY_ARRIVED = "key arrived"
    PEER_BACK = "peer back"  # presence: the peer came online
    UNREACHABLE = "unreachable"  # the broker could not deliver to the peer (offline, busy, out of credit)
    STALLED = "stalled"  # nothing happened for the stall timeout: ask again
    RECONNECTED = "reconnected"  # we registered again: what was in flight may be lost
    VERIFIED = "verified"  # receiver: the last chunk is in and the file checks out (a folder: made and checked)
    EXTRACT = "extract"  # receiver: a folder's stream is in and verified: make its files, a step at a time
    UNDECRYPTABLE = "undecryptable"  # sender: the receiver could not open our offer (sealed to a key it lost)
    ABORT = "abort"  # a local failure, an ERROR about the transfer, the user's cancel, a timeout


class Ignore(enum.Enum):
    IGNORE = "ignore"


IGNORE = Ignore.IGNORE
Table = dict[tuple[Phase, Input], Phase | Ignore]


@dataclass(slots=True)
class Progress:
    """Progress and liveness bookkeeping shared by both directions."""

    started: float
    last_emit: float = 0.0
    last_activity: float = 0.0  # we or the peer did something: the stall timer's clock
    heard: float = 0.0  # the peer made progress (a chunk, a credit) or was offline: the give-up clock

    def report(self, xfer: bytes, peer: str, name: str, direction: str, done: int, size: int,
               now: float, force: bool = False, room: bytes | None = None) -> list[Action]:
        if not force and now - self.last_emit < PROGRESS_EVERY:
            return []
        self.last_emit = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = (size - done) / rate if rate > 0 else None
        return [Emit(ev.FileProgress(xfer, peer, name, direction, done, size, rate, eta, room))]


@dataclass(frozen=True, slots=True)
class TransferConfig:
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
    accept_files: bool = True  # False: offers are refused here, so another device of ours takes them (§5.6)


@dataclass(slots=True, eq=False)
class TransferContext:
    """What every transfer of one client shares: who we are, the ports, the id source, the manager's hook."""

    user: str
    config: TransferConfig
    e2e: Sealing
    wall_ms: Callable[[], int]
    new_id: Callable[[], bytes]
    files: TransferFiles
    records: TransferRecords
    ended: Callable[[TransferMachine], None]  # the manager lets go of a finished or failed transfer
    key_wants: set[str] = field(default_factory=set)  # peers whose key an offer waits for
    key_changes: list[PeerKeyChanged] = field(default_factory=list)  # seen in offers: the session decides
    device: int | None = None  # our number in our ID's device list (a broker that knows devices said it)
    uploaded: list[RoomUploaded] = field(default_factory=list)  # room files the broker holds whole: offers due

    def send(self, xfer: bytes, msg: Message, payload=None, urgent: bool = False) -> Transmit:
        return Transmit(pack(msg, self.wall_ms(), frame_id(xfer, self.new_id), payload), urgent)


@dataclass(slots=True, eq=False)
class TransferMachine:
    """The gate and the frame handlers both machines have; each overrides the handlers its table accepts.
    Subclasses add ``phase`` (their initial one as its default), ``name``, ``rate`` and ``peer_dev`` (the peer's
    device in the transfer, when its broker and client know devices: the offering one, or the one that took it).
    ``link`` makes the frames (``transfer_links``): to ``peer``, or to a room's file store at the broker, when
    ``peer`` names the user who sent the file to the room (we, for an upload)."""

    TABLE: ClassVar[Table]
    DIRECTION: ClassVar[str]  # "out" or "in", as events name it
    ctx: TransferContext
    xfer: bytes
    peer: str
    link: TransferLink

    def enter(self, what: Input) -> list[Action] | None:
        """Take ``what`` through the table: None if it moved the machine (the caller acts), [] if it is
        ignored, else the actions of failing the transfer (an input the table does not know)."""
        if self.phase in ENDED:
            return []
        target = self.TABLE.get((self.phase, what))
        if target is None:
            error = TransferError(f"unexpected {what.value} while {self.phase.value}", ErrorCode.BAD_FRAME)
            return self._failed(error, tell_peer=True)
        if target is IGNORE:
            return []
        self.phase = target
        return None

    def src(self) -> int | None:
        """Our device number for the ``src`` of our frames, if the peer's device knows the field (``peer_dev``)."""
        return self.ctx.device if self.peer_dev is not None else None  # type: ignore[attr-defined]

    def progress(self, done: int, now: float, force: bool = False) -> list[Action]:
        """A progress event (at most one per ``PROGRESS_EVERY`` unless ``force``d): ``done`` bytes of the file."""
        return self.rate.report(self.xfer, self.peer, self.name, self.DIRECTION, done, self.size, now, force,
                                self.link.room)  # type: ignore[attr-defined]

    def fail(self, error: P2PChatError, tell_peer: bool) -> list[Action]:
        refused = self.enter(Input.ABORT)
        return self._failed(error, tell_peer) if refused is None else refused

    def on_cancel(self, error: P2PChatError) -> list[Action]:
        refused = self.enter(Input.CANCEL)
        return self._failed(error, tell_peer=False) if refused is None else refused

    # Frames the other direction's machine handles: here only the table speaks (a violation, as a rule).
    def on_offer(self, env: Envelope, now: float) -> list[Action]:
        return self.enter(Input.OFFER) or []

    def on_credit(self, credit: FileCredit, now: float) -> list[Action]:
        return self.enter(Input.CREDIT) or []

    def on_chunk(self, chunk: FileChunk, payload, now: float) -> list[Action]:
        return self.enter(Input.CHUNK) or []

    def on_done(self, now: float) -> list[Action]:
        return self.enter(Input.DONE) or []

    def close(self) -> None:
        """The client stops: let go of the file; an unfinished transfer stays on disk to resume."""
        self._let_go(failed=False)

    def _let_go(self, failed: bool) -> None:
        """Close the transfer's file (and, ``failed``, delete what it leaves behind)."""
        raise NotImplementedError

    def _failed(self, error: P2PChatError, tell_peer: bool) -> list[Action]:
        """The end of every failure: file closed, transfer FAILED and let go; the peer (maybe) and the user told."""
        ctx = self.ctx
        self._let_go(failed=True)
        self.phase = Phase.FAILED
        ctx.ended(self)
        log.warning("user=%s peer=%s xfer=%s %s failed: %s", ctx.user, self.peer, self.xfer.hex()[:8],
                    "sending" if self.DIRECTION == "out" else "receiving", error)
        actions = self.link.cancel(self, error) if tell_peer else []
        return actions + [Emit(ev.FileFailed(self.xfer, self.peer, self.name, self.DIRECTION, error,
                                             self.link.room))]  # type: ignore[attr-defined]
