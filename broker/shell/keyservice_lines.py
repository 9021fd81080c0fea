"""The key service's lines (docs/PROTOCOL.md §10.1): one frozen type per request, the strict parser, the reply
formats and the limits. The service itself is keyservice.py."""

from __future__ import annotations

from dataclasses import dataclass

from p2pchat.broker.core.pake_slots import MAX_DATA, MAX_MESSAGES, MAX_SLOTS, SIDES
from p2pchat.broker.core.ports import DeviceList
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import DEVICE_NAME_CHARS, check_user_id
from p2pchat.common.recovery import LINK_LABEL, SIGNATURE_BYTES, STATEMENT_LABEL, UNLINK_LABEL

MAX_REQUEST = 1024  # bytes of one request line, newline included (a PAKE_PUT of MAX_DATA bytes fits)
MAX_REPLY = 4096  # bytes of one reply line (a DEVICES list of MAX_DEVICES devices fits)
MAX_ERROR = 256  # bytes of an ERR line: what clients older than linking read at most
KEY_HEX = 64


@dataclass(frozen=True, slots=True)
class KeyQuery:
    pass


@dataclass(frozen=True, slots=True)
class AdmitQuery:
    user: str
    key: bytes


@dataclass(frozen=True, slots=True)
class RecoveryQuery:
    user: str


@dataclass(frozen=True, slots=True)
class RecoverRequest:
    user: str
    key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class LinkRequest:
    user: str
    key: bytes
    signature: bytes
    name: str = ""


@dataclass(frozen=True, slots=True)
class UnlinkRequest:
    user: str
    key: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class DevicesQuery:
    user: str


@dataclass(frozen=True, slots=True)
class PakeOpen:
    pass


@dataclass(frozen=True, slots=True)
class PakePut:
    slot: int
    side: str
    n: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PakeGet:
    slot: int
    side: str
    n: int


@dataclass(frozen=True, slots=True)
class PakeClose:
    slot: int


Request = (KeyQuery | AdmitQuery | RecoveryQuery | RecoverRequest | LinkRequest | UnlinkRequest | DevicesQuery
           | PakeOpen | PakePut | PakeGet | PakeClose)
ProofRequest = RecoverRequest | LinkRequest | UnlinkRequest
LABELS = {RecoverRequest: STATEMENT_LABEL, LinkRequest: LINK_LABEL, UnlinkRequest: UNLINK_LABEL}
USAGE = ("expected 'KEY', 'ADMIT <user> <key hex>', 'RECOVERY <user>', 'RECOVER|LINK|UNLINK <user> <key hex> "
         "<signature hex>', 'DEVICES <user>' or a PAKE_ request (docs/PROTOCOL.md §10.1)")


def _hex(text: str, size: int, what: str, exact: bool = True) -> bytes:
    """``size`` bytes (at most, unless ``exact``; at least one) written as lowercase hex digits."""
    if (len(text) != 2 * size if exact else not 0 < len(text) <= 2 * size) or len(text) % 2 or text != text.lower():
        raise ProtocolError(f"{what} must be {'' if exact else 'at most '}{2 * size} lowercase hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"{what} must be lowercase hex digits") from None


def _number(text: str, low: int, high: int, what: str) -> int:
    """A decimal from ``low`` to ``high``, written without sign or leading zeros."""
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or not low <= int(text) <= high:
        raise ProtocolError(f"{what} must be a decimal from {low} to {high}")
    return int(text)


def _side(text: str) -> str:
    if text not in SIDES:
        raise ProtocolError("a side is A or B")
    return text


def _name(text: str) -> str:
    try:
        name = _hex(text, 4 * DEVICE_NAME_CHARS, "a device name", exact=False).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a device name is UTF-8") from None
    if len(name) > DEVICE_NAME_CHARS or not name.isprintable():
        raise ProtocolError(f"a device name is at most {DEVICE_NAME_CHARS} printable characters")
    return name


def _slot(text: str) -> int:
    return _number(text, 1, MAX_SLOTS, "a slot")


def _message(text: str) -> int:
    return _number(text, 0, MAX_MESSAGES - 1, "a message number")


def _proof(words: list[str]) -> tuple[str, bytes, bytes]:
    return (check_user_id(words[1]), _hex(words[2], KEY_HEX // 2, "the key"),
            _hex(words[3], SIGNATURE_BYTES, "the signature"))


def parse_request(line: bytes) -> Request:
    """One request line without its newline; ProtocolError(bad_frame) if it is not one."""
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProtocolError("a key service request is ASCII") from None
    verb, count = words[0], len(words)
    if words == ["KEY"]:
        return KeyQuery()
    if words == ["PAKE_OPEN"]:
        return PakeOpen()
    if count == 2 and verb in ("RECOVERY", "DEVICES"):
        return (RecoveryQuery if verb == "RECOVERY" else DevicesQuery)(check_user_id(words[1]))
    if count == 3 and verb == "ADMIT":
        return AdmitQuery(check_user_id(words[1]), _hex(words[2], KEY_HEX // 2, "the key"))
    if count == 4 and verb in ("RECOVER", "UNLINK"):
        return (RecoverRequest if verb == "RECOVER" else UnlinkRequest)(*_proof(words))
    if count in (4, 5) and verb == "LINK":
        return LinkRequest(*_proof(words), _name(words[4]) if count == 5 else "")
    if count == 5 and verb == "PAKE_PUT":
        return PakePut(_slot(words[1]), _side(words[2]), _message(words[3]), _hex(words[4], MAX_DATA, "the data",
                                                                                   exact=False))
    if count == 4 and verb == "PAKE_GET":
        return PakeGet(_slot(words[1]), _side(words[2]), _message(words[3]))
    if count == 2 and verb == "PAKE_CLOSE":
        return PakeClose(_slot(words[1]))
    raise ProtocolError(USAGE)


def error_line(code: ErrorCode, message: str) -> bytes:
    """``ERR <code> <message>``, cut to fit one reply line (a message may quote what was sent)."""
    return f"ERR {code.value} {message}".encode("ascii", "replace")[:MAX_ERROR - 1] + b"\n"


def devices_line(devices: DeviceList) -> bytes:
    """``DEVICES <ver>`` and each device as ``<id>:<key hex>:<flags>:<added_ms>:<name as UTF-8 hex>``."""
    return " ".join([f"DEVICES {devices.ver}", *(
        f"{d.id}:{d.key.hex()}:{d.flags}:{d.added_ms}:{d.name.encode().hex()}" for d in devices.devices)]
                    ).encode() + b"\n"
