"""Room messages under sender keys (docs/ROOMS-DESIGN.md §4.2, §4.3): the wire-level primitives, no state.

A sending device keeps, per room, a *generation*: a 32-byte chain key and an Ed25519 signing key. Each message
takes one step of the chain (``chain_step``), so each message key is used once; its AES-256-GCM key comes from
HKDF salted by the message id, which makes the fixed zero nonce safe (as in ``crypto.seal_message``). The chain
only shows that the author is *a* member; the signature shows *which* device of which member wrote it, so a
member cannot forge another's message. Body format ``0x02``::

    hdr  = 0x02 || dev (u32 BE) || gen (u32 BE) || i (u32 BE)
    aad  = "p2pchat v1 room" 0x00 || from || 0x00 || rid (16) || id (16) || ts (u64 BE) || hdr
    body = hdr || AES-256-GCM(k, zero nonce, plaintext, aad) || Ed25519(aad || ct)

A generation reaches the other devices inside a pairwise-sealed ``room_key`` body: ``pack_sender_key`` /
``unpack_sender_key``, a strict msgpack map. Every primitive is from ``cryptography``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pchat.common.crypto import KEY_BYTES, TAG_BYTES, IntegrityError
from p2pchat.common.protocol import MSG_ID_BYTES

ROOM_SEALED = 0x02
RID_BYTES = 16
SIGNATURE_BYTES = 64
MAX_U32 = 2**32 - 1
_HEADER = struct.Struct(">BIII")
HEADER_BYTES = _HEADER.size  # 13
MIN_BODY_BYTES = HEADER_BYTES + TAG_BYTES + SIGNATURE_BYTES  # 93: an empty plaintext
_MESSAGE_SEED = b"\x01"  # libsignal's SenderChainKey seeds
_CHAIN_SEED = b"\x02"
_INFO = b"p2pchat v1 room message"
_AAD_LABEL = b"p2pchat v1 room\0"
_ZERO_NONCE = bytes(12)
_PAYLOAD_KEYS = frozenset({"room", "dev", "gen", "iter", "chain", "sign"})
# Exactly one map of six short fields: anything bigger is refused before it is built.
_PAYLOAD_LIMITS = dict(raw=False, strict_map_key=True, max_map_len=len(_PAYLOAD_KEYS), max_array_len=0,
                       max_str_len=8, max_bin_len=KEY_BYTES, max_ext_len=0)


def chain_step(chain: bytes) -> tuple[bytes, bytes]:
    """One step of a sender chain: (message key of this iteration, chain key of the next)."""
    return _hmac(chain, _MESSAGE_SEED), _hmac(chain, _CHAIN_SEED)


def _hmac(key: bytes, seed: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(seed)
    return mac.finalize()


def _aead(message_key: bytes, msg_id: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=msg_id, info=_INFO).derive(message_key))


def _aad(sender: str, rid: bytes, msg_id: bytes, ts: int, hdr: bytes) -> bytes:
    """ValueError on a field of the wrong size: they are fixed so that no two frames share an AAD."""
    if len(rid) != RID_BYTES or len(msg_id) != MSG_ID_BYTES or "\0" in sender or not 0 <= ts < 2**64:
        raise ValueError("room id and message id are 16 bytes, a user ID has no NUL, ts is a u64")
    return b"".join((_AAD_LABEL, sender.encode(), b"\0", rid, msg_id, ts.to_bytes(8, "big"), hdr))


def seal_room(sender: str, rid: bytes, msg_id: bytes, ts: int, dev: int, gen: int, i: int, message_key: bytes,
              signing_key: Ed25519PrivateKey, plaintext: bytes) -> bytes:
    """The ``0x02`` body of ``plaintext`` under iteration ``i``'s message key, signed by the generation's key."""
    try:
        hdr = _HEADER.pack(ROOM_SEALED, dev, gen, i)
    except struct.error:
        raise ValueError(f"dev, gen and i are u32: {dev}, {gen}, {i}") from None
    aad = _aad(sender, rid, msg_id, ts, hdr)
    ciphertext = _aead(message_key, msg_id).encrypt(_ZERO_NONCE, plaintext, aad)
    return hdr + ciphertext + signing_key.sign(aad + ciphertext)


def parse_room_body(body: bytes) -> tuple[int, int, int]:
    """(dev, gen, i) a body claims: which state opens it (authenticated only by opening it)."""
    if len(body) < MIN_BODY_BYTES or body[0] != ROOM_SEALED:
        raise IntegrityError("room message is not sealed with a sender key (or not in a known format)")
    _, dev, gen, i = _HEADER.unpack_from(body)
    return dev, gen, i


def verify_room(sender: str, rid: bytes, msg_id: bytes, ts: int, body: bytes, verify_key_bytes: bytes) -> None:
    """Check the body's signature against the generation's public key; IntegrityError if it does not hold.
    Cheap next to a long chain walk, so a receiver runs it before deriving anything."""
    parse_room_body(body)
    try:
        aad = _aad(sender, rid, msg_id, ts, body[:HEADER_BYTES])
        Ed25519PublicKey.from_public_bytes(verify_key_bytes).verify(body[-SIGNATURE_BYTES:],
                                                                    aad + body[HEADER_BYTES:-SIGNATURE_BYTES])
    except (InvalidSignature, ValueError):
        raise IntegrityError(f"room message from {sender!r} failed its signature check: forged, moved or "
                             "tampered with") from None


def decrypt_room(sender: str, rid: bytes, msg_id: bytes, ts: int, body: bytes, message_key: bytes) -> bytes:
    """The plaintext of a body whose signature ``verify_room`` accepted; IntegrityError if it does not open."""
    parse_room_body(body)
    try:
        aad = _aad(sender, rid, msg_id, ts, body[:HEADER_BYTES])
        return _aead(message_key, msg_id).decrypt(_ZERO_NONCE, body[HEADER_BYTES:-SIGNATURE_BYTES], aad)
    except (InvalidTag, ValueError):
        raise IntegrityError(f"room message from {sender!r} failed authentication under its message key") from None


def open_room(sender: str, rid: bytes, msg_id: bytes, ts: int, body: bytes, message_key: bytes,
              verify_key_bytes: bytes) -> bytes:
    """Signature first, then decryption: ``verify_room`` then ``decrypt_room``."""
    verify_room(sender, rid, msg_id, ts, body, verify_key_bytes)
    return decrypt_room(sender, rid, msg_id, ts, body, message_key)


@dataclass(frozen=True, slots=True)
class SenderKeyPayload:
    """One generation of a sending device, at ``iteration``: what a ``room_key`` body carries."""

    rid: bytes
    dev: int
    gen: int
    iteration: int
    chain: bytes  # the chain key at ``iteration``: opens that message and every later one, none before
    sign_pub: bytes


def pack_sender_key(rid: bytes, dev: int, gen: int, iteration: int, chain: bytes, sign_pub: bytes) -> bytes:
    return msgpack.packb({"room": rid, "dev": dev, "gen": gen, "iter": iteration, "chain": chain,
                          "sign": sign_pub}, use_bin_type=True)


def unpack_sender_key(data: bytes) -> SenderKeyPayload:
    """A ``room_key`` payload, strictly: exactly the six keys, each of its type and size; else IntegrityError."""
    try:
        fields = msgpack.unpackb(data, **_PAYLOAD_LIMITS)
    except Exception:  # msgpack raises a zoo; see common.protocol.decode
        raise IntegrityError("undecodable room key") from None
    if type(fields) is not dict or fields.keys() != _PAYLOAD_KEYS:
        raise IntegrityError("malformed room key: not exactly room, dev, gen, iter, chain, sign")
    rid, dev, gen, iteration, chain, sign = (fields[k] for k in ("room", "dev", "gen", "iter", "chain", "sign"))
    if not (_is_bytes(rid, RID_BYTES) and _is_bytes(chain, KEY_BYTES) and _is_bytes(sign, KEY_BYTES)
            and _is_u32(dev) and _is_u32(gen) and gen >= 1 and _is_u32(iteration)):
        raise IntegrityError("malformed room key: a field of the wrong type or size")
    return SenderKeyPayload(rid, dev, gen, iteration, chain, sign)


def _is_bytes(value: object, size: int) -> bool:
    return type(value) is bytes and len(value) == size


def _is_u32(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_U32
