"""The p2p-chat wire protocol: message types, limits and a strict, bounded codec.

A ZeroMQ message is one msgpack *header* frame, optionally followed by one
opaque *payload* frame (file chunks only). ``docs/PROTOCOL.md`` is the normative
text; this module is its executable form. Decoding never lets a msgpack or
type error escape: every failure is a ``ProtocolError`` with a stable code.

(Over 500 lines: the whole wire, every message type beside its codec and limits, as h11's _events.py.)
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgpack

from p2pchat.common.errors import ErrorCode, ProtocolError

# --- limits (named in docs/PROTOCOL.md, section "Limits") -------------------
PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_FRAME_BYTES = MAX_HEADER_BYTES  # per-frame cap given to ZMQ_MAXMSGSIZE
MAX_PARTS = 2
MAX_BODY_BYTES = 64 * 1024
MAX_TEXT_CHARS = 1024
MAX_PEERS = 20_000
MAX_CONSUME_REFS = 255  # ids in one consume's ``refs`` (with its ``ref``: a page of the queue, §11)
MAX_FIELDS = 16
MAX_INT = 2**63 - 1
MSG_ID_BYTES = 16
USER_ID_MAX = 32
MAX_DEVICES = 8  # devices of one user ID (§5.5)
DEVICE_NAME_CHARS = 32
CAPS_DEVICES = 1  # register.caps bit 0: the client knows several devices per ID (§5.5)
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def new_msg_id() -> bytes:
    """A fresh random message id: the shells' id source (cores take theirs as ``new_id``)."""
    return os.urandom(MSG_ID_BYTES)


# --- field checkers: each returns the value or raises ProtocolError ---------
Checker = Callable[[Any], Any]


def _fail(what: str) -> typing.NoReturn:
    raise ProtocolError(what)


def check_user_id(value: Any) -> str:
    if type(value) is not str or not USER_ID_RE.fullmatch(value):
        raise ProtocolError(
            f"invalid user ID {value!r}: 1-{USER_ID_MAX} of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


def _bytes(max_len: int, exact: bool = False) -> Checker:
    def check(value: Any) -> bytes:
        if type(value) is not bytes:
            _fail(f"expected bytes, got {type(value).__name__}")
        if len(value) > max_len or (exact and len(value) != max_len):
            _fail(f"bytes of length {len(value)} outside limit {max_len}")
        return value

    return check


def _text(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_TEXT_CHARS:
        _fail("expected a string of at most %d characters" % MAX_TEXT_CHARS)
    return value


def _uint(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        _fail(f"expected a non-negative integer, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        _fail(f"expected a boolean, got {value!r}")
    return value


def _user_list(value: Any) -> tuple[str, ...]:
    if type(value) is not tuple or len(value) > MAX_PEERS:
        _fail("expected a list of at most %d user IDs" % MAX_PEERS)
    return tuple(check_user_id(v) for v in value)


def _id_list(value: Any) -> tuple[bytes, ...]:
    if type(value) is not tuple or not 0 < len(value) <= MAX_CONSUME_REFS:
        _fail("expected a list of 1 to %d message ids" % MAX_CONSUME_REFS)
    for v in value:
        if type(v) is not bytes or len(v) != MSG_ID_BYTES:
            _fail("expected message ids of %d bytes" % MSG_ID_BYTES)
    return value


def _device_name(value: Any) -> str:
    if type(value) is not str or len(value) > DEVICE_NAME_CHARS:
        _fail("expected a device name of at most %d characters" % DEVICE_NAME_CHARS)
    return value


def _device_list(value: Any) -> tuple[tuple[int, bytes, str, int], ...]:
    if type(value) is not tuple or not 0 < len(value) <= MAX_DEVICES:
        _fail("expected a list of 1 to %d devices" % MAX_DEVICES)
    for entry in value:
        if type(entry) is not tuple or len(entry) != 4:
            _fail("expected devices as [id, key, name, flags]")
        _uint(entry[0]), _public_key(entry[1]), _device_name(entry[2]), _uint(entry[3])
    return value


def _copies(value: Any) -> tuple[tuple[int, bytes], ...]:
    if type(value) is not tuple or not 0 < len(value) <= MAX_DEVICES:
        _fail("expected a list of 1 to %d copies" % MAX_DEVICES)
    seen = set()
    for entry in value:
        if type(entry) is not tuple or len(entry) != 2:
            _fail("expected copies as [dev, body]")
        _uint(entry[0]), _bytes(MAX_BODY_BYTES)(entry[1])
        seen.add(entry[0])
    if len(seen) != len(value):
        _fail("a device appears twice among the copies")
    return value


def _proofs(value: Any) -> tuple[tuple[int, int, bytes], ...]:
    if type(value) is not tuple or len(value) > MAX_DEVICES:
        _fail("expected a list of at most %d proofs" % MAX_DEVICES)
    for entry in value:
        if type(entry) is not tuple or len(entry) != 3:
            _fail("expected proofs as [dev, generation, signature]")
        _uint(entry[0]), _uint(entry[1]), _bytes(64, exact=True)(entry[2])
    return value


def _enum(kind: type[enum.Enum]) -> Checker:
    values = {m.value: m for m in kind}

    def check(value: Any) -> Any:
        try:
            return values[value]
        except (KeyError, TypeError):
            _fail(f"{value!r} is not one of {sorted(values)}")

    return check


# Field kinds, as annotations the codec reads (h11-style: the types are the spec).
UserId = Annotated[str, check_user_id]
MsgId = Annotated[bytes, _bytes(MSG_ID_BYTES, exact=True)]
Body = Annotated[bytes, _bytes(MAX_BODY_BYTES)]
Token = Annotated[bytes, _bytes(64)]
Digest = Annotated[bytes, _bytes(32, exact=True)]
_public_key = _bytes(32, exact=True)
PublicKey = Annotated[bytes, _public_key]
SigningKey = Annotated[bytes, _bytes(32, exact=True)]  # a raw Ed25519 public key: a recovery key (§10.2)
Text = Annotated[str, _text]
Count = Annotated[int, _uint]
Flag = Annotated[bool, _bool]
UserList = Annotated[tuple, _user_list]
MsgIdList = Annotated[tuple, _id_list]
DeviceName = Annotated[str, _device_name]
DeviceList = Annotated[tuple, _device_list]
Copies = Annotated[tuple, _copies]  # [dev, body] per device of one user: a message sealed for each (§5.6)
Proofs = Annotated[tuple, _proofs]  # [dev, generation, signature]: the account key linked that device (§5.6)


class MsgType(str, enum.Enum):
    REGISTER = "register"
    REGISTERED = "registered"
    UNREGISTER = "unregister"
    HEARTBEAT = "heartbeat"
    MESSAGE = "message"
    ACK = "ack"
    ERROR = "error"
    SNAPSHOT_REQ = "snapshot_req"
    SNAPSHOT = "snapshot"
    PEER_UPDATE = "peer_update"
    PEER_SYNC = "peer_sync"
    CONSUME = "consume"
    RECEIPT = "receipt"
    KEY_REQ = "key_req"
    KEY_INFO = "key_info"
    KEY_CHANGED = "key_changed"
    DEVICES_REQ = "devices_req"
    DEVICES = "devices"
    FILE_OFFER = "file_offer"
    FILE_CREDIT = "file_credit"
    FILE_CHUNK = "file_chunk"
    FILE_DONE = "file_done"
    FILE_CANCEL = "file_cancel"


class AckStatus(str, enum.Enum):
    RELAYED = "relayed"  # handed to the online recipient's connection (durability off)
    STORED = "stored"  # committed to the broker's store; delivered when the recipient is online


class ReceiptStatus(str, enum.Enum):
    DELIVERED = "delivered"
    READ = "read"
    UNDECRYPTABLE = "undecryptable"  # the recipient could not open it; ``key`` is the one to seal to (§10.4)


class KeyChangeHow(str, enum.Enum):
    RECOVERED = "recovered"  # with the ID's recovery phrase
    MOVED = "moved"  # by the broker's operator


AckStatusField = Annotated[AckStatus, _enum(AckStatus)]
KeyChangeHowField = Annotated[KeyChangeHow, _enum(KeyChangeHow)]
ReceiptStatusField = Annotated[ReceiptStatus, _enum(ReceiptStatus)]
ErrorCodeField = Annotated[ErrorCode, _enum(ErrorCode)]


class Message:
    """Base of every message body. Subclasses are frozen, slotted dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[MsgType]
    RELAYED: ClassVar[bool] = False  # broker forwards it peer to peer unchanged
    ACKED: ClassVar[bool] = False  # broker answers a relayed one with ACK or ERROR
    DURABLE: ClassVar[bool] = False  # a store-and-forward broker queues it until the recipient consumes it
    HAS_PAYLOAD: ClassVar[bool] = False


def _message(cls: type) -> type:
    return dataclass(frozen=True, slots=True)(cls)


@_message
class Register(Message):
    TYPE = MsgType.REGISTER
    user: UserId
    token: Token  # proves a reconnect is the same installation: it may take over its stale session
    key: PublicKey  # the user's X25519 key; with CURVE it must be the key of this connection
    recovery: SigningKey | None = None  # the public key of the user's recovery phrase, kept with a new binding
    caps: Count | None = None  # what the client knows beyond version 1 (CAPS_DEVICES); None: nothing (§5.5)
    name: DeviceName | None = None  # this device's name, for the user's device list


@_message
class KeyRequest(Message):
    TYPE = MsgType.KEY_REQ
    user: UserId


@_message
class KeyInfo(Message):
    TYPE = MsgType.KEY_INFO
    user: UserId
    key: PublicKey


@_message
class KeyChanged(Message):
    """Broker -> client, unasked: ``user``'s ID was moved to ``key`` (a recovery, or the operator)."""

    TYPE = MsgType.KEY_CHANGED
    user: UserId
    key: PublicKey
    how: KeyChangeHowField | None = None  # what the broker says happened, for the user's warning


@_message
class Registered(Message):
    TYPE = MsgType.REGISTERED
    user: UserId
    epoch: Token
    heartbeat_ms: Count
    # Only to a register with caps: the caps granted, this device's number and the list version (§5.5).
    caps: Count | None = None
    dev: Count | None = None
    ver: Count | None = None


@_message
class DevicesRequest(Message):
    TYPE = MsgType.DEVICES_REQ
    user: UserId


@_message
class Devices(Message):
    """Broker -> client: ``user``'s devices at list version ``ver``, each ``(id, key, name, flags)``."""

    TYPE = MsgType.DEVICES
    user: UserId
    ver: Count
    devices: DeviceList
    account: SigningKey | None = None  # the ID's account key (its recovery key), which signs linked devices
    proofs: Proofs | None = None  # for each linked device: the generation and the account key's signature


@_message
class Unregister(Message):
    TYPE = MsgType.UNREGISTER


@_message
class Heartbeat(Message):
    TYPE = MsgType.HEARTBEAT


@_message
class ChatMessage(Message):
    TYPE = MsgType.MESSAGE
    RELAYED = True
    ACKED = True
    DURABLE = True
    sender: UserId
    recipient: UserId
    body: Body  # empty when ``copies`` carries the bodies
    copies: Copies | None = None  # one body per device of ``recipient``, each sealed to it (§5.6)
    echo: Copies | None = None  # one body per other device of ``sender``: the transcript of what it sent


@_message
class Ack(Message):
    TYPE = MsgType.ACK
    ref: MsgId
    status: AckStatusField
    missed: Count | None = None  # room_msg, room_offer: members whose queue refused their copy (§5.8)
    seq: Count | None = None  # room_msg, room_offer: the number the broker gave it (§5.8)


@_message
class Error(Message):
    TYPE = MsgType.ERROR
    code: ErrorCodeField
    message: Text
    ref: MsgId | None = None


@_message
class Consume(Message):
    """Recipient -> broker: I have durably kept the queued frame ``ref`` (and those of ``refs``); forget them."""

    TYPE = MsgType.CONSUME
    ref: MsgId
    refs: MsgIdList | None = None  # more of them: one frame per batch the client read, not one per message


@_message
class Receipt(Message):
    """Recipient -> sender: what became of message ``ref``."""

    TYPE = MsgType.RECEIPT
    RELAYED = True
    DURABLE = True
    sender: UserId
    recipient: UserId
    ref: MsgId
    status: ReceiptStatusField
    key: PublicKey | None = None  # with ``undecryptable``: the recipient's current public key


@_message
class SnapshotRequest(Message):
    TYPE = MsgType.SNAPSHOT_REQ


@_message
class Snapshot(Message):
    TYPE = MsgType.SNAPSHOT
    epoch: Token
    seq: Count
    peers: UserList


@_message
class PeerUpdate(Message):
    TYPE = MsgType.PEER_UPDATE
    epoch: Token
    seq: Count
    user: UserId
    online: Flag


@_message
class PeerSync(Message):
    """Published every heartbeat interval so a subscriber notices missed updates."""

    TYPE = MsgType.PEER_SYNC
    epoch: Token
    seq: Count


# --- file transfer (credit-based flow, the Guide's fileio3, relayed peer to peer) ---
@_message
class FileOffer(Message):
    TYPE = MsgType.FILE_OFFER
    RELAYED = True
    ACKED = True
    DURABLE = True
    sender: UserId
    recipient: UserId
    xfer: MsgId
    size: Count
    chunk_size: Count
    body: Body  # sealed like a message: msgpack {"name": str, "key": 32-byte file key}
    copies: Copies | None = None  # one body per device of ``recipient`` (§5.6)
    src: Count | None = None  # set by the broker: the offering device, to send transfer frames back to (§8)
    held: Flag | None = None  # the broker holds the file: fetch it from your inbox (§8.2), the sender may be gone


@_message
class FileCredit(Message):
    """Receiver -> sender: I hold every chunk below ``next``; send chunks below ``upto``."""

    TYPE = MsgType.FILE_CREDIT
    RELAYED = True
    sender: UserId
    recipient: UserId
    xfer: MsgId
    next: Count
    upto: Count
    restart: Flag  # True: (re)start sending at ``next`` (resume, or after a loss)
    dev: Count | None = None  # the device of ``recipient`` it is for (§8: several devices)
    src: Count | None = None  # the sending device (the broker checks it)


@_message
class FileChunk(Message):
    TYPE = MsgType.FILE_CHUNK
    RELAYED = True
    HAS_PAYLOAD = True
    sender: UserId
    recipient: UserId
    xfer: MsgId
    index: Count
    final: Flag
    # Unencrypted transfers only: CRC-32 of the payload (catches a damaged chunk early) and, on the
    # final chunk, the whole file's SHA-256. A sealed chunk's GCM tag does both jobs.
    crc: Count | None = None
    sha256: Digest | None = None
    dev: Count | None = None  # the device of ``recipient`` it is for (§8: several devices)


@_message
class FileDone(Message):
    """Receiver -> sender: the whole file verified and saved under its final name."""

    TYPE = MsgType.FILE_DONE
    RELAYED = True
    sender: UserId
    recipient: UserId
    xfer: MsgId
    dev: Count | None = None  # the device of ``recipient`` it is for (§8: several devices)
    src: Count | None = None  # the sending device (the broker checks it)


@_message
class FileCancel(Message):
    TYPE = MsgType.FILE_CANCEL
    RELAYED = True
    sender: UserId
    recipient: UserId
    xfer: MsgId
    code: ErrorCodeField
    message: Text
    dev: Count | None = None  # the device of ``recipient`` it is for (§8: several devices)
    src: Count | None = None  # the sending device (the broker checks it)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The header every frame carries, around one typed message."""

    msg_id: bytes
    ts: int  # sender's wall clock, milliseconds since the Unix epoch
    message: Message
    payload: Any = None  # bytes-like, or None


# --- codec tables, derived once from the annotations above ------------------
_WIRE_NAMES = {"sender": "from", "recipient": "to"}
_HEADER_KEYS = frozenset({"v", "t", "id", "ts"})


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    attr: str
    wire: str
    check: Checker
    required: bool


def _specs(cls: type[Message]) -> tuple[_FieldSpec, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        required = f.default is dataclasses.MISSING
        if not required:  # `X | None`: take the Annotated member
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        check = typing.get_args(hint)[1]
        specs.append(_FieldSpec(f.name, _WIRE_NAMES.get(f.name, f.name), check, required))
    return tuple(specs)


MESSAGE_TYPES: dict[str, type[Message]] = {}
_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}
_WIRE: dict[type[Message], tuple[str, tuple[tuple[str, str], ...]]] = {}  # encode's view: type name, (attr, key)s
_READ: dict[type[Message], tuple[tuple[str, str, Checker, bool], ...]] = {}  # decode's: (key, attr, check, required)s
_ABSENT = object()


def register_message_type(cls: type[Message]) -> type[Message]:
    """Add a message class to the codec (protocol extensions call this)."""
    MESSAGE_TYPES[cls.TYPE.value] = cls
    _SPECS[cls] = specs = _specs(cls)
    _WIRE[cls] = (cls.TYPE.value, tuple((spec.attr, spec.wire) for spec in specs))
    _READ[cls] = tuple((spec.wire, spec.attr, spec.check, spec.required) for spec in specs)
    return cls


for _cls in (
    Register, Registered, Unregister, Heartbeat, ChatMessage, Ack, Error, KeyRequest, KeyInfo, KeyChanged,
    DevicesRequest, Devices,
    SnapshotRequest, Snapshot, PeerUpdate, PeerSync, Consume, Receipt,
    FileOffer, FileCredit, FileChunk, FileDone, FileCancel,
):
    register_message_type(_cls)


def encode(env: Envelope) -> list[bytes]:
    """Envelope -> ZeroMQ frames (header, then the payload if any)."""
    return pack(env.message, env.ts, env.msg_id, env.payload)


def pack(message: Message, ts: int, msg_id: bytes | None = None, payload: bytes | None = None) -> list[bytes]:
    """``message`` as frames under the caller's id. The cores always pass one, from the ``new_id`` source their
    shell gave them, so a recorded session replays byte for byte; tools and tests may leave it to ``new_msg_id``."""
    kind, fields = _WIRE[type(message)]  # every frame on every path comes through here: no lookups it can skip
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": kind, "id": new_msg_id() if msg_id is None else msg_id,
                              "ts": ts}
    for attr, wire in fields:
        value = getattr(message, attr)
        if value is not None:
            header[wire] = value.value if isinstance(value, enum.Enum) else value
    if payload is None:
        return [msgpack.packb(header, use_bin_type=True)]
    return [msgpack.packb(header, use_bin_type=True), payload]


_UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,
    use_list=False,
    max_str_len=MAX_BODY_BYTES,
    max_bin_len=MAX_BODY_BYTES,
    max_array_len=MAX_PEERS,
    max_map_len=MAX_FIELDS,
    max_ext_len=0,
)


def decode(frames: Sequence[bytes]) -> Envelope:
    """ZeroMQ frames -> Envelope, or ProtocolError. Bounded on hostile input."""
    if not frames:
        raise ProtocolError("expected 1 or 2 frames, got 0")
    raw = frames[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}", ErrorCode.TOO_LARGE)
    try:
        header = msgpack.unpackb(raw, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises a zoo (ValueError subclasses, TypeError, ...)
        raise ProtocolError(f"undecodable header: {exc.__class__.__name__}") from None
    if type(header) is not dict:
        raise ProtocolError("header is not a map")
    msg_id = header.get("id")
    ref = msg_id if type(msg_id) is bytes and len(msg_id) == MSG_ID_BYTES else None
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}", ErrorCode.UNSUPPORTED_VERSION, ref=ref)
    if len(frames) > MAX_PARTS:  # after the header: its id is the ref of the answer (§3)
        raise ProtocolError(f"expected 1 or 2 frames, got {len(frames)}", ref=ref)
    kind = header.get("t")
    cls = MESSAGE_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}", ref=ref)
    if ref is None:
        raise ProtocolError("missing or malformed message id")
    ts = header.get("ts")
    if type(ts) is not int or not 0 <= ts <= MAX_INT:
        raise ProtocolError("missing or malformed timestamp", ref=msg_id)
    kwargs = {}
    for wire, attr, check, required in _READ[cls]:
        value = header.get(wire, _ABSENT)
        if value is not _ABSENT:
            try:
                kwargs[attr] = check(value)
            except ProtocolError as exc:
                raise ProtocolError(f"{cls.TYPE.value}.{wire}: {exc.message}", ref=msg_id) from None
        elif required:
            raise ProtocolError(f"{cls.TYPE.value}: missing field {wire!r}", ref=msg_id)
    if len(header) != len(_HEADER_KEYS) + len(kwargs):
        known = _HEADER_KEYS | {s.wire for s in _SPECS[cls]}
        extra = sorted(str(k) for k in header if k not in known)
        raise ProtocolError(f"{cls.TYPE.value}: unknown fields {extra}", ref=msg_id)
    payload = None
    if len(frames) == 2:
        if not cls.HAS_PAYLOAD:
            raise ProtocolError(f"{cls.TYPE.value} takes no payload frame", ref=msg_id)
        payload = frames[1]  # left as given (bytes or zmq.Frame): relays must not copy it
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError("payload too large", ErrorCode.TOO_LARGE, ref=msg_id)
    elif cls.HAS_PAYLOAD:
        raise ProtocolError(f"{cls.TYPE.value} needs a payload frame", ref=msg_id)
    return Envelope(msg_id, ts, cls(**kwargs), payload)


# Group rooms (§5.7-5.9) extend the codec: registered after the types above, which they build on.
from p2pchat.common import protocol_rooms as _rooms  # noqa: E402,F401
