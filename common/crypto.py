"""End-to-end encryption, every primitive from the ``cryptography`` package.

* Identity: one X25519 keypair per user. It is also the user's CurveZMQ key
  (CurveZMQ is X25519 too), so the broker's CURVE handshake proves the holder of
  the key that the user ID is bound to.
* Messages: the static X25519 secret of sender and recipient, expanded with
  HKDF-SHA256 salted by the message id into a one-message AES-256-GCM key; the
  associated data binds sender, recipient, message id and timestamp.
  Body = ``0x01 || sender public key (32) || ciphertext+tag``.
* Files: a fresh random AES-256-GCM key per file, sent inside the sealed offer.
  Chunk ``i`` uses nonce ``i (11 bytes, big-endian) || final (1 byte)`` and the
  associated data ``xfer``: a reordered chunk, a chunk moved between files, or a
  file cut short before its authenticated final chunk all fail to open.

There is no forward secrecy: a leaked identity key opens past messages between
that pair. (A ratchet is the known fix; out of scope for a LAN chat.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from p2pchat.common.errors import ErrorCode, ProtocolError

KEY_BYTES = 32
TAG_BYTES = 16
SEALED_V1 = 0x01
_ZERO_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw


class IntegrityError(ProtocolError):
    default_code = ErrorCode.INTEGRITY


@dataclass(frozen=True)
class Identity:
    """A user's long-term keypair."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_private_bytes(os.urandom(KEY_BYTES))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        private = X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """The secret lives in ``path`` with mode 0600, made on first use."""
        try:
            raw = path.read_bytes()
            if len(raw) == KEY_BYTES:
                return cls.from_private_bytes(raw)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: Path) -> None:
        """Write the secret to ``path`` (mode 0600), atomically; several processes may do it at once
        (cluster workers keep the shared key beside them), so each writes its own temporary file."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_bytes())
        os.replace(tmp, path)

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())

    def shared_secret(self, peer_public: bytes) -> bytes:
        return self.private.exchange(X25519PublicKey.from_public_bytes(peer_public))

    @property
    def curve_public(self) -> bytes:
        return z85.encode(self.public)

    @property
    def curve_secret(self) -> bytes:
        return z85.encode(self.private_bytes())


def fingerprint(public: bytes) -> str:
    """A short, readable key fingerprint: 20 hex digits of SHA-256 in groups of four."""
    digest = hashlib.sha256(public).hexdigest()[:20]
    return " ".join(digest[i:i + 4] for i in range(0, 20, 4))


def safety_number(a: bytes, b: bytes) -> str:
    """The same 30 digits on both sides of a conversation: compare them out of band."""
    return _thirty_digits(b"p2pchat safety number", a, b)


def account_safety_number(a: bytes, b: bytes) -> str:
    """``safety_number`` over two account keys: the same while either side links or unlinks devices; its own
    label, so it never equals a per-device number."""
    return _thirty_digits(b"p2pchat safety number v2", a, b)


def _thirty_digits(label: bytes, a: bytes, b: bytes) -> str:
    digest = hashlib.sha256(label + min(a, b) + max(a, b)).digest()
    number = int.from_bytes(digest[:16], "big") % 10**30
    text = f"{number:030d}"
    return " ".join(text[i:i + 5] for i in range(0, 30, 5))


def _message_key(shared: bytes, msg_id: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=msg_id, info=b"p2pchat v1 message")
    return AESGCM(hkdf.derive(shared))


def _message_aad(sender: str, recipient: str, msg_id: bytes, ts: int) -> bytes:
    return b"\0".join((sender.encode(), recipient.encode(), msg_id, ts.to_bytes(8, "big")))


def seal_message(identity: Identity, shared: bytes, sender: str, recipient: str, msg_id: bytes, ts: int,
                 plaintext: bytes) -> bytes:
    ciphertext = _message_key(shared, msg_id).encrypt(_ZERO_NONCE, plaintext,
                                                      _message_aad(sender, recipient, msg_id, ts))
    return bytes([SEALED_V1]) + identity.public + ciphertext


def sealed_sender_key(body: bytes) -> bytes:
    """The sender's public key a sealed body claims (authenticated only by opening it)."""
    if len(body) < 1 + KEY_BYTES + TAG_BYTES or body[0] != SEALED_V1:
        raise IntegrityError("message is not end-to-end encrypted (or not in a known format)")
    return body[1:1 + KEY_BYTES]


def open_message(shared: bytes, sender: str, recipient: str, msg_id: bytes, ts: int, body: bytes) -> bytes:
    sealed_sender_key(body)
    try:
        return _message_key(shared, msg_id).decrypt(_ZERO_NONCE, body[1 + KEY_BYTES:],
                                                    _message_aad(sender, recipient, msg_id, ts))
    except InvalidTag:
        raise IntegrityError(f"message from {sender!r} failed authentication: tampered, replayed or "
                             "encrypted for someone else") from None


class FileCipher:
    """AES-256-GCM over one file's chunks (see the module docstring for the nonce rule)."""

    def __init__(self, key: bytes, xfer: bytes) -> None:
        self.key = key
        self._aead = AESGCM(key)
        self._aad = b"p2pchat v1 file" + xfer

    @staticmethod
    def nonce(index: int, final: bool) -> bytes:
        return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")

    def seal(self, index: int, final: bool, data: bytes) -> bytes:
        return self._aead.encrypt(self.nonce(index, final), data, self._aad)

    def open_into(self, index: int, final: bool, data, out: memoryview) -> None:
        """Authenticate chunk ``index`` and decrypt it into ``out`` (exactly ``len(data) - TAG_BYTES`` long)."""
        try:
            self._aead.decrypt_into(self.nonce(index, final), data, self._aad, out)
        except InvalidTag:
            raise IntegrityError(f"chunk {index} failed authentication") from None
