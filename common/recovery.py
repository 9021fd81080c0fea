"""Recovery phrases: twelve words that move a user ID to a new key without an operator (docs/PROTOCOL.md §10.2).

A phrase is 128 random bits written as 12 BIP39 words (the ``mnemonic`` package's English list; the last
word carries a 4-bit checksum, so a misspelt, missing or swapped word is caught before anything is sent).
HKDF-SHA256 turns those bits into the seed of an Ed25519 *recovery key*, one per user ID; the broker keeps
its public half beside the ID's binding. A recovery is that key's signature over a statement naming the
broker, the ID, the binding's generation and the new key: it is good at one broker, for one ID, for one
key, once (every change of a binding raises its generation). Every primitive comes from ``cryptography``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from mnemonic import Mnemonic

from p2pchat.common.crypto import KEY_BYTES
from p2pchat.common.errors import ErrorCode, P2PChatError

PHRASE_WORDS = 12
ENTROPY_BYTES = 16  # 12 words: 128 bits and a 4-bit checksum
SIGNATURE_BYTES = 64
STATEMENT_LABEL = b"p2pchat recover v1"
LINK_LABEL = b"p2pchat link v1"  # adds a device to the ID (docs/PROTOCOL.md §5.6)
UNLINK_LABEL = b"p2pchat unlink v1"  # removes one
_SEED_INFO = b"p2pchat v1 recovery key"


class PhraseError(P2PChatError):
    """Text that is not a recovery phrase (caught locally, before the broker sees anything)."""

    default_code = ErrorCode.RECOVERY_REFUSED


@functools.cache
def _bip39() -> Mnemonic:
    return Mnemonic("english")  # reads its word list from a file: once per process


def new_phrase(random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    return _bip39().to_mnemonic(random_bytes(ENTROPY_BYTES))


def normalise_phrase(text: str) -> str:
    """The phrase as 12 lowercase words separated by single spaces; PhraseError if it is not one."""
    words = text.lower().split()
    if len(words) != PHRASE_WORDS:
        raise PhraseError(f"a recovery phrase is {PHRASE_WORDS} words; this has {len(words)}")
    known = set(_bip39().wordlist)
    unknown = [w for w in words if w not in known]
    if unknown:
        raise PhraseError(f"not a word of any recovery phrase: {unknown[0][:20]!r}")
    try:
        _bip39().to_entropy(words)
    except ValueError:
        raise PhraseError("these words are not a recovery phrase: one is wrong or out of place") from None
    return " ".join(words)


def recovery_statement(broker_key: bytes, user: str, generation: int, new_key: bytes,
                       label: bytes = STATEMENT_LABEL) -> bytes:
    """What a recovery signs: ``label 0x00 broker key (32) user 0x00 generation (8, big-endian) new key (32)``.
    A link signs the same with ``LINK_LABEL`` and the new device's key; an unlink with ``UNLINK_LABEL`` and the
    removed device's key."""
    return b"".join((label, b"\0", broker_key, user.encode("ascii"), b"\0", generation.to_bytes(8, "big"),
                     new_key))


@dataclass(frozen=True)
class RecoveryKey:
    """The Ed25519 key a phrase gives for one user ID."""

    private: Ed25519PrivateKey
    public: bytes

    @classmethod
    def from_phrase(cls, phrase: str, user: str) -> RecoveryKey:
        entropy = bytes(_bip39().to_entropy(normalise_phrase(phrase).split()))
        seed = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                    info=_SEED_INFO + b"\0" + user.encode("ascii")).derive(entropy)
        private = Ed25519PrivateKey.from_private_bytes(seed)
        return cls(private, private.public_key().public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw))

    def prove(self, broker_key: bytes, user: str, generation: int, new_key: bytes,
              label: bytes = STATEMENT_LABEL) -> bytes:
        return self.private.sign(recovery_statement(broker_key, user, generation, new_key, label))


def verify_recovery(recovery_key: bytes, signature: bytes, broker_key: bytes, user: str, generation: int,
                    new_key: bytes, label: bytes = STATEMENT_LABEL) -> bool:
    """Whether ``signature`` is the recovery key's over this move, link or unlink (never raises on hostile
    bytes)."""
    try:
        Ed25519PublicKey.from_public_bytes(recovery_key).verify(
            signature, recovery_statement(broker_key, user, generation, new_key, label))
    except (InvalidSignature, ValueError):
        return False
    return True
