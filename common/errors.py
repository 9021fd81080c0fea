"""The one exception hierarchy of p2p-chat.

    P2PChatError
    ├── ProtocolError        a frame broke the wire spec (bad bytes, fields, sizes)
    ├── RemoteError          the broker or a peer answered with an ERROR frame
    ├── ClosedError          you closed the client; further calls are refused
    ├── BrokenError          the broker is unreachable or stopped answering
    ├── TransferError        a file transfer failed (I/O, integrity, limits)
    └── StorageError         a local store (the client's history) cannot write: kept in memory, retried

Every error carries an ``ErrorCode``: the stable string that crosses the wire in
an ERROR frame and that scripts can match on. The message is for humans. ``ExitCode`` is what
the command line makes of them.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The command line's exit statuses: part of its public contract."""

    OK = 0
    ERROR = 1  # anything else that went wrong (a local file, a failed transfer)
    USAGE = 2  # bad options
    UNREACHABLE = 3  # the broker is unreachable or stopped answering (BrokenError)
    REFUSED = 4  # the broker or a peer refused (RemoteError)


class ErrorCode(str, enum.Enum):
    BAD_FRAME = "bad_frame"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_REGISTERED = "not_registered"
    ALREADY_REGISTERED = "already_registered"
    ID_TAKEN = "id_taken"
    ID_ONLINE = "id_online"
    SESSION_REPLACED = "session_replaced"
    KEY_MISMATCH = "key_mismatch"
    PEER_KEY_CHANGED = "peer_key_changed"
    BROKER_KEY_CHANGED = "broker_key_changed"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_FULL = "storage_full"
    CREDIT_EXCEEDED = "credit_exceeded"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    RECIPIENT_OFFLINE = "recipient_offline"
    RECIPIENT_BUSY = "recipient_busy"
    SPOOFED_SENDER = "spoofed_sender"
    TIMEOUT = "timeout"
    CLOSED = "closed"
    BROKER_UNREACHABLE = "broker_unreachable"
    TRANSFER_FAILED = "transfer_failed"
    CANCELLED = "cancelled"
    INTEGRITY = "integrity"
    TOO_LARGE = "too_large"
    NO_SPACE = "no_space"
    UNWRITABLE = "unwritable"
    SOURCE_CHANGED = "source_changed"
    TOO_MANY_IDS = "too_many_ids"
    REGISTRY_FULL = "registry_full"
    ADMISSION_FULL = "admission_full"
    RECOVERY_REFUSED = "recovery_refused"
    DEVICES_CHANGED = "devices_changed"
    TAKEN = "taken"
    LINK_FAILED = "link_failed"
    TOO_MANY_DEVICES = "too_many_devices"
    # group rooms (docs/PROTOCOL.md §5.7-5.9, §8.1): only ever sent to a session registered with CAPS_ROOMS
    UNKNOWN_ROOM = "unknown_room"
    ROOM_EXISTS = "room_exists"
    NOT_MEMBER = "not_member"
    NOT_ALLOWED = "not_allowed"
    ROOM_CHANGED = "room_changed"
    TOO_MANY_ROOMS = "too_many_rooms"
    TOO_MANY_MEMBERS = "too_many_members"
    TOO_MANY_INVITATIONS = "too_many_invitations"
    TOO_MANY_ADMINS = "too_many_admins"
    ROOM_QUOTA = "room_quota"
    NOT_UPLOADED = "not_uploaded"
    UNKNOWN_TRANSFER = "unknown_transfer"


class P2PChatError(Exception):
    """Root of every error this project raises on purpose."""

    default_code = ErrorCode.BAD_FRAME

    def __init__(self, message: str, code: ErrorCode | None = None, ref: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.message = message
        self.ref = ref  # the id of the message this is about, when known

    def __str__(self) -> str:
        return f"{self.message} [{self.code.value}]"


class ProtocolError(P2PChatError):
    default_code = ErrorCode.BAD_FRAME


class RemoteError(P2PChatError):
    """An ERROR frame from the other side; ``code`` is what it said."""


class ClosedError(P2PChatError):
    default_code = ErrorCode.CLOSED


class BrokenError(P2PChatError):
    default_code = ErrorCode.BROKER_UNREACHABLE


class TransferError(P2PChatError):
    default_code = ErrorCode.TRANSFER_FAILED


class StorageError(P2PChatError):
    default_code = ErrorCode.NO_SPACE
