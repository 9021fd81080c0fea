"""The ports the routing core talks to, and the plain data that crosses them.

The core never opens a database, a socket or a thread: it calls these narrow interfaces, which the
shell wires to one of two sets of implementations (docs/SCALING.md):

| port (broker/backends/) | single broker | cluster |
|---|---|---|
| ``PeerDirectory`` | ``in_process.LocalDirectory`` | ``redis_directory.RedisDirectory`` |
| ``QueueStore`` | ``sqlite_store.SqliteMessageStore`` (durability off: ``in_process.NoStore``) | ``redis_store.RedisMessageStore`` |
| ``KeyRegistry`` | ``sqlite_keys.SqliteKeyRegistry`` | ``redis_keys.RedisKeyRegistry`` |
| ``RoomRegistry`` (not wired yet) | ``sqlite_rooms.SqliteRoomRegistry`` | ``redis_rooms.RedisRoomRegistry`` |
| ``BrokerLink`` | ``in_process.LocalLink`` (there are no other brokers) | ``redis_link.RedisLink`` |

Cluster mode differs from single mode only there: the core has the same code paths for both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from p2pchat.common.errors import ErrorCode

Frames = Sequence[Any]  # bytes, or zmq.Frame for zero-copy payloads
MIB = 1024 * 1024
CHANGES_POLL = 0.1  # seconds between looks for bindings changed outside the broker loop


# --- who is online where ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Location:
    broker: bytes  # which broker holds the connection
    conn: bytes  # that broker's ROUTER routing id for it


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """One numbered change of the peer list, for the core to publish as a PEER_UPDATE."""

    seq: int
    user: str
    online: bool


class PeerDirectory(Protocol):
    """Sessions by (user, device): each device of an ID holds at most one session, and the ID is online
    (one ``PresenceChange``) from its first device's claim to its last device's release."""

    epoch: bytes  # changes whenever sequence numbers restart

    def claim(self, user: str, dev: int, where: Location, token: bytes) -> bool:
        """Mark ``user``'s device ``dev`` online at ``where``; False if that device is online elsewhere already."""

    def take_over(self, user: str, dev: int, where: Location, token: bytes) -> Location | None:
        """Move ``user``'s device ``dev`` to ``where`` from another broker's session with the same ``token``, or
        from a broker that stopped refreshing its entries; the previous location (``broker`` empty if nobody
        held it any more), or None if refused."""

    def hand_over(self, user: str, dev: int, old: Location, new: Location, token: bytes) -> None:
        """Move ``user``'s device ``dev`` from ``old`` to ``new`` on this broker (the same installation
        reconnected before its old session expired): no presence change."""

    def release(self, user: str, dev: int, where: Location) -> None:
        """Mark ``user``'s device ``dev`` offline if it is still at ``where``."""

    def changes(self) -> list[PresenceChange]:
        """The peer-list changes since the last call, in sequence order (the core publishes them)."""

    def recheck(self, now: float) -> list[str]:
        """Users claimed here whose queue another broker may have written without seeing the claim
        (its replica lagged), now that every replica has caught up: the core pages them once more."""

    def locate(self, user: str) -> tuple[Location, ...]:
        """``user``'s sessions, its lowest-numbered device's first; empty if it is offline."""

    def locate_device(self, user: str, dev: int) -> Location | None:
        """The session of ``user``'s device ``dev``; None if that device is offline."""

    def is_known(self, user: str) -> bool:
        """Has ``user`` ever registered (so it is offline, not unknown)?"""

    def online(self) -> list[str]:
        """The users online, each once however many of its devices are."""

    def seq(self) -> int:
        """The sequence number of the last change published."""


# --- store-and-forward ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueueLimits:
    """Bounds of the store-and-forward queues (docs/PROTOCOL.md §11 lists them with their defaults)."""

    max_per_user: int = 20_000  # frames queued for one recipient
    max_bytes_per_user: int = 64 * MIB
    # One sender's share of one recipient's queue: after a flood from one user, others still have half.
    max_per_sender: int = 10_000
    max_bytes_per_sender: int = 32 * MIB
    max_total_bytes: int = 1024 * MIB  # the whole store
    max_recipients: int = 100_000
    ttl_seconds: float = 7 * 24 * 3600.0
    page: int = 256  # queued frames handed to a recipient at once
    expire_batch: int = 1_000  # expired frames deleted per sweep step


class Refusal(enum.Enum):
    """Why ``append`` did not queue a frame."""

    QUEUE_FULL = "queue_full"  # the recipient's queue is at its bound
    SHARE_FULL = "share_full"  # the sender's share of that queue is
    STORE_FULL = "store_full"  # the store as a whole, or its disk


class StoreUnavailable(Exception):
    """A backend could not serve or commit (Redis unreachable, disk full): nothing of the batch is
    durable. ``code`` is what the broker answers the frames it could not store."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.STORAGE_UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


class QueueStore(Protocol):
    """Durable per-recipient queues. Writes belong to the shell's open batch: it commits them before
    the core answers the frames (``BrokerCore.on_commit``)."""

    durable: bool

    def append(self, msg_id: bytes, sender: str, recipient: str, header: bytes, expires_ms: int) -> Refusal | None:
        """Queue ``header`` for ``recipient`` (None), or say why not. Idempotent by id."""

    def pending(self, recipient: str, now_ms: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` unexpired (seq, frame) queued for ``recipient`` after ``after``, oldest first."""

    def consume(self, recipient: str, msg_id: bytes) -> None: ...

    def expire(self, now_ms: int) -> int:
        """Delete at most one batch of expired frames; how many."""


# --- user ID -> device key bindings -----------------------------------------------------------------
REFUSALS = {  # why a key gets no ID (or no ticket), for the ERROR or ERR line
    ErrorCode.ID_TAKEN: "user ID {user!r} belongs to another key",
    ErrorCode.ID_ONLINE: "user ID {user!r} is already online on another connection",
    ErrorCode.TOO_MANY_IDS: "this key has claimed as many user IDs as the broker allows",
    ErrorCode.REGISTRY_FULL: "the broker binds no more user IDs",
    ErrorCode.ADMISSION_FULL: "too many admissions pending; retry later",
}


DEVICE_CAPS = 1  # Device.flags: the device has registered with caps CAPS_DEVICES (docs/PROTOCOL.md §5.5)
DEVICE_ROOMS = 2  # Device.flags: the device has registered with caps CAPS_ROOMS (§5.7): it gets room frames


@dataclass(frozen=True, slots=True)
class Device:
    """One of a user ID's devices: its own X25519 key (also its CURVE key) under a number never reused for
    that ID (the list version at which it was added)."""

    id: int
    key: bytes
    name: str = ""  # what its user calls it ("laptop"); empty until a client names it
    flags: int = 0  # DEVICE_CAPS
    added_ms: int = 0  # wall clock
    gen: int = 0  # a linked device: the binding's generation its link proof names...
    proof: bytes = b""  # ...and the account key's signature over it (common/recovery.py, LINK_LABEL); b"": device 1


@dataclass(frozen=True, slots=True)
class DeviceList:
    """A bound user ID's devices at list version ``ver`` (raised by every change of the list, never reused
    for that ID, even after a release). The primary, the lowest number, is the device a single-key client
    sees as the ID's key."""

    ver: int
    devices: tuple[Device, ...]  # by number, ascending

    @property
    def primary(self) -> Device:
        return self.devices[0]

    def find(self, key: bytes) -> Device | None:
        for device in self.devices:  # at most a few: a loop, no generator, on every register's path
            if device.key == key:
                return device
        return None


@dataclass(frozen=True, slots=True)
class BindingChange:
    """``user``'s ID moved to ``key`` (a recovery, or the operator), or was released (``key`` None)."""

    user: str
    key: bytes | None
    why: str  # for the log and the error the old key's sessions get: "recovered", "moved", "released"


class KeyRegistry(Protocol):
    def bind(self, user: str, key: bytes, recovery: bytes | None = None) -> ErrorCode | None:
        """Bind ``user`` to ``key`` as its first device if unbound; None if ``key`` is (now) one of ``user``'s
        devices, else why not. A ``recovery`` key is kept with the binding unless it has one already
        (docs/PROTOCOL.md §10.2)."""

    def lookup(self, user: str) -> bytes | None:
        """The key of ``user``'s primary device; None if unbound."""

    def devices(self, user: str, fresh: bool = False) -> DeviceList | None:
        """``user``'s devices; None if unbound. ``fresh``: as stored now, not as this broker cached them (in a
        cluster another broker may have described a device since)."""

    def recovery_state(self, user: str):
        """``user``'s recovery (account) key and binding generation (backends/audit.py ``RecoveryState``); None if
        unbound."""

    def describe_device(self, user: str, dev: int, flags: int, name: str | None) -> None:
        """Set ``flags`` on ``user``'s device ``dev``, and name it ``name`` unless it has a name already."""

    def changes(self, now: float) -> list[BindingChange]:
        """Bindings moved or released since the last call, here or elsewhere (another broker, the operator's
        ``p2pchat broker admin``); the registry looks at most every ``CHANGES_POLL`` seconds. An unlinked device
        is a change with ``why`` "unlinked" and ``key`` the removed device's key."""


# --- group rooms (docs/ROOMS-DESIGN.md §2; the rules are broker/core/rooms.py) ---------------------------
class Role(enum.IntEnum):
    MEMBER = 0
    ADMIN = 1
    OWNER = 2


class RoomRefusal(str, enum.Enum):
    """Why a room change was refused: the error codes step 2 puts on the wire (docs/ROOMS-DESIGN.md §7)."""

    UNKNOWN_ROOM = "unknown_room"  # no such room, or the user is neither a member nor invited: the same answer
    ROOM_EXISTS = "room_exists"
    NOT_MEMBER = "not_member"
    NOT_ALLOWED = "not_allowed"
    BAD_NAME = "bad_name"  # a name or topic the wire would refuse as bad_frame
    TOO_MANY_ROOMS = "too_many_rooms"
    TOO_MANY_MEMBERS = "too_many_members"
    TOO_MANY_INVITATIONS = "too_many_invitations"
    TOO_MANY_ADMINS = "too_many_admins"


@dataclass(frozen=True, slots=True)
class Member:
    """A room's member, or (``joined`` False) a pending invitation."""

    user: str
    role: Role
    joined: bool
    since_ms: int  # when invited (an invitation expires ``RoomLimits.invite_ttl_ms`` later), then when joined


@dataclass(frozen=True, slots=True)
class Room:
    """A room as stored: ``epoch`` goes up at every change of the joined members (or of their devices). Marks
    are kept apart (``RoomRegistry.marks``): they change far more often than the room, which each message reads."""

    rid: bytes  # 16 random bytes, never reused
    name: str  # unique among live rooms, compared case-insensitively
    topic: str
    owner: str
    epoch: int
    seq: int  # the last ``next_seq`` handed out (after a SQLite restart: the reservation numbering goes on above)
    members: tuple[Member, ...]  # in order of invitation or joining (a joining invitee moves last): oldest first

    def member(self, user: str) -> Member | None:
        for member in self.members:
            if member.user == user:
                return member
        return None


@dataclass(frozen=True, slots=True)
class RoomEntry:
    """One line of a user's room list."""

    rid: bytes
    name: str
    epoch: int
    role: Role
    invited: bool


class RoomRegistry(Protocol):
    """Durable rooms. Each change checks the rule table and the bounds (broker/core/rooms.py) and stores the
    result atomically: it returns the new ``Room``, or the ``RoomRefusal`` that says why not."""

    def create(self, name: str, owner: str, topic: str, now_ms: int) -> Room | RoomRefusal: ...
    def invite(self, rid: bytes, by: str, users: Sequence[str], now_ms: int) -> Room | RoomRefusal: ...
    def join(self, rid: bytes, user: str, now_ms: int) -> Room | RoomRefusal: ...

    def leave(self, rid: bytes, user: str) -> Room | None | RoomRefusal:
        """None: the last joined member left, and the room is gone."""

    def remove(self, rid: bytes, by: str, user: str) -> Room | RoomRefusal: ...
    def set(self, rid: bytes, by: str, name: str | None, topic: str | None) -> Room | RoomRefusal: ...
    def role(self, rid: bytes, by: str, user: str, admin: bool) -> Room | RoomRefusal: ...

    def get(self, rid: bytes) -> Room | None: ...

    def of_user(self, user: str) -> list[RoomEntry]:
        """The rooms ``user`` has joined or is invited to (an expired invitation until the sweep removes it)."""

    def bump_user(self, user: str) -> list[bytes]:
        """Raise the epoch of every room ``user`` has joined (its device list changed); their ids."""

    def next_seq(self, rid: bytes) -> int | None:
        """The room's next message number: strictly increasing, never handed out twice, also across a restart
        or a crash (there may be gaps). None: no such room."""

    def mark(self, rid: bytes, user: str, delivered: int, read: int | None) -> None:
        """``user``'s devices kept (``delivered``) and showed (``read``, None: unchanged) the room's messages up to
        these numbers. Each mark only goes up, and never above the last ``next_seq``; a room that does not exist
        or a user who has not joined it is ignored. Advisory: a crash may lose the marks of the last second."""

    def marks(self, rid: bytes) -> dict[str, tuple[int, int]]:
        """``user -> (delivered, read)`` for every joined member (0 before its first mark; a member who leaves
        starts again from 0); empty for a room that does not exist."""

    def expire_invitations(self, now_ms: int) -> list[tuple[bytes, str]]:
        """Remove invitations older than ``RoomLimits.invite_ttl_ms``, a bounded step (``expire_batch`` rooms);
        the ``(rid, user)`` removed. Expired invitations already count for nothing before they are removed. The
        broker calls it about once a second: it is cheap when nothing is due, and the SQLite registry writes its
        marks then."""

    def close(self) -> None: ...


# --- other brokers ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Forwarded:
    """Frames another broker routed to ``user``, whose connection it believed to be here."""

    user: str
    frames: Frames


@dataclass(frozen=True, slots=True)
class Kicked:
    """``user``'s session ``conn`` here was taken over by a session on another broker."""

    conn: bytes
    user: str


@dataclass(frozen=True, slots=True)
class Rejoined:
    """The shared state is whole again (after an outage, or after others took this broker for dead)
    and agrees with this broker's sessions: queues that could not be read meanwhile are paged again."""


LinkEvent = Forwarded | Kicked | Rejoined


class BrokerLink(Protocol):
    """Broker-to-broker traffic: what leaves goes with the shell's batch commit."""

    def forward(self, broker: bytes, user: str, frames: Frames) -> None:
        """Hand ``frames`` (as the core built or received them) to ``user`` on ``broker``."""

    def kick(self, broker: bytes, conn: bytes, user: str) -> None:
        """Tell ``broker`` that its session ``conn`` of ``user`` was taken over here."""

    def receive(self, now: float) -> list[LinkEvent]:
        """What other brokers sent, and what the link's own upkeep found, since the last call."""


# --- files sent to a room (docs/ROOMS-DESIGN.md §5; the rules are broker/core/room_files.py) -------------
SEAL_TAG = 16  # every room chunk is sealed (AES-256-GCM, common/crypto.py TAG_BYTES): plaintext + this tag


@dataclass(frozen=True, slots=True)
class RoomFile:
    """One transfer kept for a room: its sealed chunks stored back to back, chunk ``i`` at ``offset(i)``."""

    rid: bytes
    xfer: bytes
    uploader: str
    size: int  # of the plaintext file (as in §8): the chunks on disk are SEAL_TAG bytes longer each
    chunk_size: int
    created_ms: int  # wall clock, as every time here: brokers sharing the directory compare them
    active_ms: int  # the last chunk written (its creation before that): an unfinished upload expires from it
    chunks: int = 0  # whole chunks on disk, from index 0
    completed_ms: int | None = None  # the final chunk is durable: members may fetch it

    @property
    def complete(self) -> bool:
        return self.completed_ms is not None

    @property
    def count(self) -> int:
        """Chunks in the file (§8: a 0-byte file is one empty final chunk)."""
        return max(1, -(-self.size // self.chunk_size))

    @property
    def stored(self) -> int:
        """Bytes the whole file takes on disk: what it reserves against the quotas."""
        return self.size + self.count * SEAL_TAG

    def payload_size(self, index: int) -> int:
        """The exact length of sealed chunk ``index``: the last one holds what is left of the file."""
        last = self.count - 1
        plain = self.chunk_size if index < last else self.size - last * self.chunk_size
        return plain + SEAL_TAG

    def offset(self, index: int) -> int:
        return index * (self.chunk_size + SEAL_TAG)


@dataclass(frozen=True, slots=True)
class RoomFileUsage:
    """What a new upload would join, counted atomically with its creation (every broker sharing the store)."""

    room_bytes: int  # reserved (``RoomFile.stored``) by the room's transfers, complete or not
    room_files: int
    room_unfinished: int
    user_unfinished: int  # the uploader's unfinished uploads, in every room
    total_bytes: int  # the whole store
    total_files: int


class UsageCheck(Protocol):
    def __call__(self, usage: RoomFileUsage) -> ErrorCode | None:
        """None to admit a new upload into ``usage``, else why not."""


class RoomFileStore(Protocol):
    """Where room files are kept: a directory every broker of a cluster reads and writes, so any broker serves
    any transfer, also after a restart. Disk errors raise ``StoreUnavailable`` (code ``storage_full`` for a full
    disk or quota, else ``storage_unavailable``); a transfer deleted meanwhile is None or False, never an error."""

    def get(self, rid: bytes, xfer: bytes) -> RoomFile | None: ...

    def create(self, file: RoomFile, admit: UsageCheck) -> RoomFile | ErrorCode:
        """Store a new, empty transfer if ``admit`` (the core's rules) accepts the usage it would join; the check
        and the creation are one step for every broker. A transfer that exists already is returned as it is."""

    def write_chunk(self, file: RoomFile, index: int, payload: Any, now_ms: int) -> bool:
        """Write sealed chunk ``index`` (``payload``: bytes-like) at its offset; False if the transfer is gone.
        A write the disk refused leaves no partial chunk behind."""

    def complete(self, file: RoomFile, now_ms: int) -> RoomFile | None:
        """Every chunk is written: make them durable, then mark the transfer complete. None if it is gone."""

    def read_chunk(self, file: RoomFile, index: int) -> bytes | None:
        """Sealed chunk ``index`` of a complete transfer; None if the transfer is gone (or cut short)."""

    def delete(self, rid: bytes, xfer: bytes) -> bool:
        """Delete one transfer; False if there was none."""

    def delete_room(self, rid: bytes) -> int:
        """Delete every transfer of a room; how many."""

    def sweep(self, limit: int) -> list[RoomFile]:
        """The next ``limit`` transfers of a walk over the whole store that starts again once it is through (for
        expiry in bounded steps); fewer when the walk is through."""

    def close(self) -> None: ...
