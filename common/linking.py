"""Linking a device by a short code (docs/PROTOCOL.md §10.2.1): the code, the PAKE, and the channel it keys.

The existing device E (it holds the ID's account key) opens a link slot at the key service and shows the code
``<slot>-<ddd>-<ddd>``; the new device N types it. SPAKE2 (the ``spake2`` package; this is the one module that
imports it) turns the code into a key that only two parties who know the code agree on: anyone else, the
broker included, gets one guess per run. HKDF-SHA256 derives one AES-256-GCM key per direction from it, and
each side seals one message with its key: N its device key and name, E its verdict (the account public key and
the broker's key, or why it failed). Opening the other side's message is the key confirmation: with a wrong
code it fails. Every primitive but SPAKE2 comes from ``cryptography``; the classes here are sans-I/O (bytes in,
bytes out), client/linking.py carries their messages through the slot.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError
from spake2.ed25519_basic import NotOnCurve

from p2pchat.common.crypto import KEY_BYTES
from p2pchat.common.errors import ErrorCode, P2PChatError
from p2pchat.common.protocol import DEVICE_NAME_CHARS

SECRET_DIGITS = 6
PAKE_MESSAGE_BYTES = 33  # what SPAKE2 (Ed25519 group) sends each way
_CODE = re.compile(r"([1-9][0-9]{0,4})-([0-9]{3})-([0-9]{3})")
_LABEL = b"p2pchat link v1"
_NONCE = bytes(12)  # each direction's key seals exactly one message
_ACCEPTED, _REFUSED = b"\x01", b"\x00"
MAX_REFUSAL_BYTES = 160


class WrongCode(P2PChatError):
    """The other side did not use the same code (or is not the other side of this link at all)."""

    default_code = ErrorCode.LINK_FAILED


class LinkRefused(P2PChatError):
    """The existing device opened the channel but could not link the new one (its reason is the message)."""

    default_code = ErrorCode.LINK_FAILED


@dataclass(frozen=True, slots=True)
class LinkCode:
    slot: int
    secret: str  # SECRET_DIGITS decimal digits

    def __str__(self) -> str:
        return f"{self.slot}-{self.secret[:3]}-{self.secret[3:]}"

    @classmethod
    def new(cls, slot: int, random_bytes: Callable[[int], bytes] = os.urandom) -> LinkCode:
        # 64 random bits modulo 10^6: the bias (< 10^-13) is far below one guess's chance.
        return cls(slot, f"{int.from_bytes(random_bytes(8), 'big') % 10 ** SECRET_DIGITS:0{SECRET_DIGITS}d}")

    @classmethod
    def parse(cls, text: str) -> LinkCode:
        match = _CODE.fullmatch(text.strip())
        if match is None:
            raise WrongCode(f"{text.strip()[:20]!r} is not a link code: it looks like 7-493-027")
        return cls(int(match[1]), match[2] + match[3])


@dataclass(frozen=True, slots=True)
class NewDevice:
    """What N tells E in the channel."""

    key: bytes
    name: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """What E tells N once N is linked: the account key to pin, and the broker key E's proof names."""

    account: bytes
    broker_key: bytes


def device_name(text: str) -> str:
    """A device name as linking carries it: printable, at most DEVICE_NAME_CHARS characters (cut)."""
    return "".join(c for c in text if c.isprintable())[:DEVICE_NAME_CHARS]


class _Channel:
    """One side of the PAKE and, once it finished, of the channel."""

    def __init__(self, spake: SPAKE2_A | SPAKE2_B, mine: bytes, theirs: bytes) -> None:
        self._spake, self._mine, self._theirs = spake, mine, theirs
        self.first = spake.start()  # this side's PAKE message
        self._keys: tuple[AESGCM, AESGCM] | None = None

    def _finish(self, their_first: bytes) -> None:
        if len(their_first) != PAKE_MESSAGE_BYTES:
            raise WrongCode("the other side's PAKE message is malformed")
        try:
            shared = self._spake.finish(their_first)
        except (SPAKEError, ValueError, NotOnCurve):
            raise WrongCode("the other side's PAKE message is malformed") from None
        self._keys = (self._key(shared, self._mine), self._key(shared, self._theirs))

    @staticmethod
    def _key(shared: bytes, direction: bytes) -> AESGCM:
        return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                           info=_LABEL + b" " + direction).derive(shared))

    def _seal(self, plain: bytes) -> bytes:
        assert self._keys is not None, "the PAKE has not finished"
        return self._keys[0].encrypt(_NONCE, plain, _LABEL)

    def _open(self, sealed: bytes) -> bytes:
        assert self._keys is not None, "the PAKE has not finished"
        try:
            return self._keys[1].decrypt(_NONCE, sealed, _LABEL)
        except InvalidTag:
            raise WrongCode("the other side used another code") from None


def _ids(user: str) -> dict[str, bytes]:
    prefix = _LABEL + b" " + user.encode("ascii")
    return {"idA": prefix + b" existing", "idB": prefix + b" new"}


class ExistingDevice(_Channel):
    """E: sends ``first``, opens N's device key and name, seals its verdict."""

    def __init__(self, user: str, code: LinkCode) -> None:
        super().__init__(SPAKE2_A(str(code).encode(), **_ids(user)), b"existing to new", b"new to existing")

    def open_new_device(self, their_first: bytes, sealed: bytes) -> NewDevice:
        """N's key and name; WrongCode if N used another code."""
        self._finish(their_first)
        plain = self._open(sealed)
        try:
            name = plain[KEY_BYTES:].decode("utf-8")
        except UnicodeDecodeError:
            raise WrongCode("the new device's name is not UTF-8") from None
        if len(plain) < KEY_BYTES or name != device_name(name):
            raise WrongCode("the new device's message is malformed")
        return NewDevice(plain[:KEY_BYTES], name)

    def welcome(self, account: bytes, broker_key: bytes) -> bytes:
        return self._seal(_ACCEPTED + account + broker_key)

    def refuse(self, why: str) -> bytes:
        return self._seal(_REFUSED + why.encode("utf-8")[:MAX_REFUSAL_BYTES])


class JoiningDevice(_Channel):
    """N: answers E's first message with its own and its sealed key and name, then opens E's verdict."""

    def __init__(self, user: str, code: LinkCode) -> None:
        super().__init__(SPAKE2_B(str(code).encode(), **_ids(user)), b"new to existing", b"existing to new")

    def join(self, their_first: bytes, key: bytes, name: str) -> bytes:
        """The sealed key and name (send after ``first``)."""
        self._finish(their_first)
        return self._seal(key + device_name(name).encode("utf-8"))

    def open_verdict(self, sealed: bytes) -> Welcome:
        """E's welcome; WrongCode if E used another code, LinkRefused if E could not link this device."""
        plain = self._open(sealed)
        if plain[:1] == _REFUSED:
            raise LinkRefused(plain[1:].decode("utf-8", "replace"))
        if plain[:1] != _ACCEPTED or len(plain) != 1 + 2 * KEY_BYTES:
            raise WrongCode("the existing device's answer is malformed")
        return Welcome(plain[1:1 + KEY_BYTES], plain[1 + KEY_BYTES:])
