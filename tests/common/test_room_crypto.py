"""Room bodies under sender keys and the room_key payload (common/room_crypto.py; docs/ROOMS-DESIGN.md §4.2-4.3)."""

from __future__ import annotations

import hashlib
import hmac

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.common.crypto import IntegrityError
from p2pchat.common.room_crypto import (
    MIN_BODY_BYTES,
    SenderKeyPayload,
    chain_step,
    open_room,
    pack_sender_key,
    parse_room_body,
    seal_room,
    unpack_sender_key,
)

RID, MSG_ID, TS = b"r" * 16, b"i" * 16, 1_700_000_000_000
DEV, GEN, I = 3, 2, 7
SIGNING = Ed25519PrivateKey.from_private_bytes(b"s" * 32)
SIGN_PUB = SIGNING.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
MESSAGE_KEY = b"m" * 32


def seal(plaintext: bytes = b"hello room", sender: str = "alice", key: Ed25519PrivateKey = SIGNING) -> bytes:
    return seal_room(sender, RID, MSG_ID, TS, DEV, GEN, I, MESSAGE_KEY, key, plaintext)


def open_(body: bytes, sender: str = "alice", rid: bytes = RID, msg_id: bytes = MSG_ID, ts: int = TS,
          message_key: bytes = MESSAGE_KEY, verify: bytes = SIGN_PUB) -> bytes:
    return open_room(sender, rid, msg_id, ts, body, message_key, verify)


def test_chain_step_is_hmac_sha256_with_seeds_1_and_2():
    chain = bytes(range(32))
    assert chain_step(chain) == (hmac.new(chain, b"\x01", hashlib.sha256).digest(),
                                 hmac.new(chain, b"\x02", hashlib.sha256).digest())


def test_a_sealed_body_opens_and_reads_back_its_header():
    body = seal()
    assert open_(body) == b"hello room"
    assert parse_room_body(body) == (DEV, GEN, I)


def test_the_body_is_exactly_the_format_of_the_design():
    """Opened by hand from §4.2, with nothing of room_crypto: the lead and other clients can rely on the layout."""
    body = seal(b"x" * 10)
    hdr = b"\x02" + DEV.to_bytes(4, "big") + GEN.to_bytes(4, "big") + I.to_bytes(4, "big")
    assert body[:13] == hdr and len(body) == 13 + 10 + 16 + 64
    aad = b"p2pchat v1 room\0alice\0" + RID + MSG_ID + TS.to_bytes(8, "big") + hdr
    SIGNING.public_key().verify(body[-64:], aad + body[13:-64])
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=MSG_ID, info=b"p2pchat v1 room message").derive(MESSAGE_KEY)
    assert AESGCM(k).decrypt(bytes(12), body[13:-64], aad) == b"x" * 10


def test_an_empty_message_is_the_smallest_body():
    body = seal(b"")
    assert len(body) == MIN_BODY_BYTES and open_(body) == b""


@pytest.mark.parametrize("field, value", [
    ("sender", "mallory"), ("rid", b"R" * 16), ("msg_id", b"I" * 16), ("ts", TS + 1),
])
def test_every_frame_field_in_the_aad_is_checked(field, value):
    with pytest.raises(IntegrityError, match="signature"):
        open_(seal(), **{field: value})


@pytest.mark.parametrize("offset", [1, 5, 9, 12], ids=["dev", "gen", "i", "i-low-byte"])
def test_every_header_field_is_checked(offset):
    body = bytearray(seal())
    body[offset] ^= 1
    with pytest.raises(IntegrityError):
        open_(bytes(body))


@pytest.mark.parametrize("where", [13, -65, -1], ids=["ciphertext", "tag", "signature"])
def test_a_flipped_bit_anywhere_is_refused(where):
    body = bytearray(seal())
    body[where] ^= 0x80
    with pytest.raises(IntegrityError):
        open_(bytes(body))


def test_a_member_holding_the_chain_but_not_the_signing_key_cannot_forge():
    """Mallory has the message key (she is a member) and seals a valid ciphertext in alice's name."""
    forged = seal(b"pay mallory", key=Ed25519PrivateKey.from_private_bytes(b"M" * 32))
    with pytest.raises(IntegrityError, match="signature"):
        open_(forged)


def test_the_signature_is_checked_before_decryption():
    """A wrong message key with a good signature fails in decryption; a bad signature fails first, whatever the key."""
    body = seal()
    with pytest.raises(IntegrityError, match="message key"):
        open_(body, message_key=b"w" * 32)
    with pytest.raises(IntegrityError, match="signature"):
        open_(body, message_key=b"w" * 32, verify=b"\0" * 31 + b"\1")


def test_a_malformed_verify_key_is_an_integrity_error():
    with pytest.raises(IntegrityError):
        open_(seal(), verify=b"short")


@pytest.mark.parametrize("args", [
    dict(dev=2**32), dict(gen=-1), dict(i=2**32), dict(rid=b"short"), dict(msg_id=b"x" * 17), dict(ts=-1),
    dict(sender="a\0b"),
])
def test_sealing_refuses_fields_out_of_range(args):
    fields = dict(sender="alice", rid=RID, msg_id=MSG_ID, ts=TS, dev=DEV, gen=GEN, i=I, message_key=MESSAGE_KEY,
                  signing_key=SIGNING, plaintext=b"p") | args
    with pytest.raises(ValueError):
        seal_room(**fields)


@pytest.mark.parametrize("body", [b"", b"\x02" * (MIN_BODY_BYTES - 1), b"\x01" + seal()[1:]])
def test_a_body_too_short_or_of_another_format_is_refused(body):
    with pytest.raises(IntegrityError, match="not sealed with a sender key"):
        parse_room_body(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_body_only_ever_raise_integrity_error(data):
    with pytest.raises(IntegrityError):
        open_(data)


# --- the room_key payload ----------------------------------------------------------------------------------
PAYLOAD = dict(room=RID, dev=DEV, gen=GEN, iter=I, chain=b"c" * 32, sign=SIGN_PUB)


def test_a_sender_key_payload_round_trips():
    data = pack_sender_key(RID, DEV, GEN, I, b"c" * 32, SIGN_PUB)
    assert unpack_sender_key(data) == SenderKeyPayload(RID, DEV, GEN, I, b"c" * 32, SIGN_PUB)
    assert msgpack.unpackb(data) == PAYLOAD  # the map of §4.3


@pytest.mark.parametrize("change", [
    dict(extra=1), dict(room=b"r" * 15), dict(room="r" * 16), dict(dev=-1), dict(dev=2**32), dict(gen=0),
    dict(gen=True), dict(iter=1.0), dict(iter=2**32), dict(chain=b"c" * 31), dict(chain=b"c" * 33),
    dict(sign=None), dict(sign=b"s" * 31),
], ids=repr)
def test_a_payload_with_any_other_key_type_or_size_is_refused(change):
    with pytest.raises(IntegrityError, match="room key"):  # "undecodable" where the bounded unpacker stops it
        unpack_sender_key(msgpack.packb(PAYLOAD | change, use_bin_type=True))


@pytest.mark.parametrize("missing", sorted(PAYLOAD))
def test_a_payload_missing_a_key_is_refused(missing):
    with pytest.raises(IntegrityError, match="malformed room key"):
        unpack_sender_key(msgpack.packb({k: v for k, v in PAYLOAD.items() if k != missing}, use_bin_type=True))


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb(PAYLOAD) + b"\x00",
    msgpack.packb(PAYLOAD | {"chain": b"c" * 10_000}), msgpack.packb({str(k): 0 for k in range(10_000)}),
], ids=["empty", "reserved-byte", "array", "trailing", "big-bin", "big-map"])
def test_undecodable_or_oversized_payloads_are_refused(data):
    with pytest.raises(IntegrityError):
        unpack_sender_key(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(sorted(PAYLOAD) + ["x"]),
                    st.one_of(st.integers(-2**40, 2**40), st.binary(max_size=40), st.text(max_size=20), st.none()),
                    max_size=7).map(lambda d: msgpack.packb(d, use_bin_type=True)),
))
def test_arbitrary_payload_bytes_only_ever_raise_integrity_error(data):
    try:
        payload = unpack_sender_key(data)
    except IntegrityError:
        return
    assert pack_sender_key(payload.rid, payload.dev, payload.gen, payload.iteration, payload.chain,
                           payload.sign_pub) == data  # whatever is accepted is exactly a well-formed map
