"""Sender keys of rooms: sealing, opening, distribution, rotation and persistence (client/sender_keys.py;
docs/ROOMS-DESIGN.md §4). All in memory: the SQLite store has its own tests (test_sender_key_store.py)."""

from __future__ import annotations

import hashlib
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.client.sender_keys import (
    MAX_GENERATIONS,
    MAX_JUMP,
    MAX_SKIPPED,
    MemorySenderKeys,
    NoSenderKey,
    SenderKeys,
)
from p2pchat.common.crypto import IntegrityError
from p2pchat.common.errors import P2PChatError, StorageError
from p2pchat.common.room_crypto import (
    chain_step, pack_sender_key, parse_room_body, seal_room, unpack_sender_key,
)

RID, OTHER_RID, TS = b"r" * 16, b"o" * 16, 1_700_000_000_000
BOB, BOB_PHONE, CAROL = ("bob", 1), ("bob", 2), ("carol", 1)


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def seeded(seed: str):
    """A ``random_bytes`` that gives the same bytes for the same seed: runs are reproducible byte for byte."""
    counter = 0

    def random_bytes(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.sha256(f"{seed}/{counter}".encode()).digest()[:n]
    return random_bytes


def device(user: str = "alice", dev: int = 1, store: MemorySenderKeys | None = None, **kw) -> SenderKeys:
    return SenderKeys(user, dev, store if store is not None else MemorySenderKeys(), **kw)


def send(sender: SenderKeys, n: int, rid: bytes = RID, start: int = 0) -> list[tuple[bytes, bytes]]:
    """``n`` room messages of ``sender``: (msg_id, body) each, ids ``start``, ``start+1``..."""
    return [(mid(k), sender.seal(rid, mid(k), TS, f"message {k}".encode())) for k in range(start, start + n)]


def read(receiver: SenderKeys, sender: str, msg_id: bytes, body: bytes, rid: bytes = RID) -> bytes:
    return receiver.open(rid, sender, msg_id, TS, body)


class FlakyStore(MemorySenderKeys):
    """A store whose writes fail while ``failing`` is set, as a full disk would."""

    failing = False

    def put(self, key: str, value: bytes) -> None:
        if self.failing:
            raise StorageError("disk full")
        super().put(key, value)


@pytest.fixture
def alice() -> SenderKeys:
    return device("alice", 1)


@pytest.fixture
def bob(alice) -> SenderKeys:
    """Bob, who has been sent alice's generation."""
    bob = device("bob", 1)
    bob.accept("alice", alice.distribution(RID))
    return bob


# --- sealing and opening -------------------------------------------------------------------------------------
def test_room_messages_open_in_order(alice, bob):
    for msg_id, body in send(alice, 3):
        assert read(bob, "alice", msg_id, body) == f"message {int.from_bytes(msg_id, 'big')}".encode()


def test_each_message_takes_the_next_iteration_and_one_seal(alice):
    bodies = [body for _, body in send(alice, 3)]
    assert [parse_room_body(b) for b in bodies] == [(1, 1, 0), (1, 1, 1), (1, 1, 2)]
    assert alice.seals == 3


def test_the_first_seal_makes_generation_1_and_distribution_carries_it_at_its_iteration(alice):
    send(alice, 2)
    current = alice.current(RID)
    payload = unpack_sender_key(alice.distribution(RID))
    assert (current.gen, current.iteration) == (1, 2)
    assert (payload.rid, payload.dev, payload.gen, payload.iteration, payload.chain, payload.sign_pub) == \
        (RID, 1, 1, 2, current.chain, current.sign_pub)


def test_rooms_have_generations_of_their_own(alice, bob):
    (msg_id, body), = send(alice, 1, rid=OTHER_RID)
    assert alice.current(OTHER_RID).chain != alice.current(RID).chain
    with pytest.raises(NoSenderKey):
        read(bob, "alice", msg_id, body, rid=OTHER_RID)


def test_the_same_randomness_gives_the_same_bodies():
    """Sans I/O: with fixed bytes in, a run can be recorded once and replayed byte for byte."""
    one, two = device(random_bytes=seeded("a")), device(random_bytes=seeded("a"))
    assert send(one, 3) == send(two, 3)
    assert send(device(random_bytes=seeded("b")), 1) != send(device(random_bytes=seeded("a")), 1)


def test_no_key_yet_raises_no_sender_key_and_the_message_opens_once_it_arrives(alice):
    bob = device("bob")
    (msg_id, body), = send(alice, 1)
    with pytest.raises(NoSenderKey) as caught:
        read(bob, "alice", msg_id, body)
    assert (caught.value.rid, caught.value.sender, caught.value.dev, caught.value.gen) == (RID, "alice", 1, 1)
    assert isinstance(caught.value, P2PChatError) and not isinstance(caught.value, IntegrityError)
    bob.accept("alice", alice.distribution(RID))  # sent at iteration 1: message 0 is not covered ...
    with pytest.raises(IntegrityError, match="replay"):
        read(bob, "alice", msg_id, body)  # ... so the key must go out before the message (§4.3)


def test_a_message_opens_only_as_the_sender_it_was_sealed_by(alice, bob):
    """Another member's key for the same (dev, gen) does not open alice's body under carol's name, and vice versa."""
    carol = device("carol", 1)
    bob.accept("carol", carol.distribution(RID))
    (msg_id, body), = send(alice, 1)
    with pytest.raises(IntegrityError):
        read(bob, "carol", msg_id, body)


def test_out_of_order_messages_open_from_skipped_keys(alice, bob):
    sent = send(alice, 5)
    for k in (4, 0, 2, 1, 3):
        assert read(bob, "alice", *sent[k]) == f"message {k}".encode()


def test_a_replay_is_refused_in_order_and_out_of_order(alice, bob):
    sent = send(alice, 3)
    read(bob, "alice", *sent[2])
    read(bob, "alice", *sent[0])  # a skipped key, used once ...
    for k in (0, 2):  # ... and gone, like the chain position it came from
        with pytest.raises(IntegrityError, match="replay"):
            read(bob, "alice", *sent[k])
    assert read(bob, "alice", *sent[1]) == b"message 1"


def test_a_jump_of_max_jump_opens_and_one_more_is_refused():
    """A generation made by hand, so a body can claim any iteration without sealing 25,000 messages."""
    signing, chain = Ed25519PrivateKey.from_private_bytes(b"s" * 32), b"c" * 32
    bob = device("bob")
    bob.accept("alice", pack_sender_key(RID, 1, 1, 0, chain, signing.public_key().public_bytes_raw()))
    far = chain
    for _ in range(MAX_JUMP):
        far = chain_step(far)[1]

    def at(i: int, key: bytes) -> bytes:
        return seal_room("alice", RID, mid(i), TS, 1, 1, i, key, signing, b"far")

    with pytest.raises(IntegrityError, match="ahead"):
        bob.open(RID, "alice", mid(MAX_JUMP + 1), TS, at(MAX_JUMP + 1, chain_step(chain_step(far)[1])[0]))
    assert bob.open(RID, "alice", mid(MAX_JUMP), TS, at(MAX_JUMP, chain_step(far)[0])) == b"far"


def test_only_the_newest_max_skipped_keys_are_kept(alice, bob):
    sent = send(alice, MAX_SKIPPED + 3)
    read(bob, "alice", *sent[-1])  # skips MAX_SKIPPED + 2 iterations: the two oldest keys are dropped
    for k in (0, 1):
        with pytest.raises(IntegrityError, match="replay"):
            read(bob, "alice", *sent[k])
    assert read(bob, "alice", *sent[2]) == b"message 2"


def test_skipped_keys_are_bounded_across_several_jumps(alice, bob):
    half = MAX_SKIPPED // 2 + 1
    sent = send(alice, 2 * half + 1)
    read(bob, "alice", *sent[half])  # skips 0 .. half-1: MAX_SKIPPED/2 + 1 keys
    read(bob, "alice", *sent[2 * half])  # skips half+1 .. 2*half-1: MAX_SKIPPED/2 more, the oldest (0) goes
    with pytest.raises(IntegrityError, match="replay"):
        read(bob, "alice", *sent[0])
    assert read(bob, "alice", *sent[1]) == b"message 1"


# --- forgeries move nothing ----------------------------------------------------------------------------------
def test_a_member_with_the_chain_but_not_the_signing_key_cannot_forge_and_moves_nothing(alice):
    """Mallory was sent alice's chain (she is a member): she seals iteration 0 in alice's name."""
    store = MemorySenderKeys()
    bob = device("bob", store=store)
    mallory_view = bob.accept("alice", alice.distribution(RID))
    records = dict(store.records)  # nothing may be written for a refused body
    forged = seal_room("alice", RID, mid(0), TS, 1, 1, 0, chain_step(mallory_view.chain)[0],
                       Ed25519PrivateKey.from_private_bytes(b"M" * 32), b"pay mallory")
    with pytest.raises(IntegrityError, match="signature"):
        read(bob, "alice", mid(0), forged)
    assert store.records == records
    (msg_id, body), = send(alice, 1)
    assert read(bob, "alice", msg_id, body) == b"message 0"  # iteration 0 was not used up by the forgery


def test_a_signed_body_that_does_not_decrypt_moves_nothing():
    """The signer itself (a buggy device) signs a ciphertext under the wrong key: refused, and the position stays."""
    signing, chain = Ed25519PrivateKey.from_private_bytes(b"s" * 32), b"c" * 32
    bob = device("bob")
    bob.accept("alice", pack_sender_key(RID, 1, 1, 0, chain, signing.public_key().public_bytes_raw()))
    bad = seal_room("alice", RID, mid(3), TS, 1, 1, 3, b"w" * 32, signing, b"x")
    with pytest.raises(IntegrityError, match="message key"):
        bob.open(RID, "alice", mid(3), TS, bad)
    good = seal_room("alice", RID, mid(0), TS, 1, 1, 0, chain_step(chain)[0], signing, b"first")
    assert bob.open(RID, "alice", mid(0), TS, good) == b"first"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_body_raise_integrity_error_or_wait_for_a_key(data):
    alice = device(random_bytes=seeded("h"))
    bob = device("bob")
    bob.accept("alice", alice.distribution(RID))
    with pytest.raises((IntegrityError, NoSenderKey)):
        bob.open(RID, "alice", mid(0), TS, data)


@settings(max_examples=200, deadline=None)
@given(i=st.integers(0, 2**32 - 1), tail=st.binary(min_size=80, max_size=200))
def test_garbage_under_a_known_generation_raises_integrity_error_and_moves_nothing(i, tail):
    store = MemorySenderKeys()
    bob = device("bob", store=store)
    bob.accept("alice", device(random_bytes=seeded("h")).distribution(RID))
    records = dict(store.records)
    with pytest.raises(IntegrityError):
        bob.open(RID, "alice", mid(0), TS, b"\x02" + (1).to_bytes(4, "big") * 2 + i.to_bytes(4, "big") + tail)
    assert store.records == records


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_payload_bytes_raise_integrity_error(data):
    store = MemorySenderKeys()
    try:
        device("bob", store=store).accept("alice", data)
    except IntegrityError:
        assert store.records == {}


# --- generations: distribution, rotation, the removed member ---------------------------------------------------
def test_after_a_rotation_the_holder_of_only_the_old_generation_reads_nothing_new(alice, bob):
    carol = device("carol")
    carol.accept("alice", alice.distribution(RID))
    send(alice, 2)
    alice.rotate(RID)  # carol was removed
    bob.accept("alice", alice.distribution(RID))
    (msg_id, body), = send(alice, 1, start=2)
    assert parse_room_body(body) == (1, 2, 0)
    assert read(bob, "alice", msg_id, body) == b"message 2"
    with pytest.raises(NoSenderKey) as caught:
        read(carol, "alice", msg_id, body)
    assert caught.value.gen == 2


def test_a_new_generation_shares_nothing_with_the_old(alice):
    old = alice.current(RID)
    new = alice.rotate(RID)
    assert (new.gen, new.iteration) == (old.gen + 1, 0)
    assert new.chain != old.chain and new.sign_pub != old.sign_pub
    assert alice.current(RID) == new


def test_messages_sealed_before_a_rotation_still_open_after_it(alice, bob):
    (old_id, old_body), = send(alice, 1)
    alice.rotate(RID)
    bob.accept("alice", alice.distribution(RID))
    (new_id, new_body), = send(alice, 1, start=1)
    assert read(bob, "alice", new_id, new_body) == b"message 1"
    assert read(bob, "alice", old_id, old_body) == b"message 0"


def test_at_most_max_generations_are_kept_per_sending_device(alice):
    store = MemorySenderKeys()
    bob = device("bob", store=store)
    bob.accept("alice", alice.distribution(RID))
    (first_id, first_body), = send(alice, 1)
    kept = []
    for k in range(MAX_GENERATIONS):
        alice.rotate(RID)
        bob.accept("alice", alice.distribution(RID))
        kept.append(send(alice, 1, start=k + 1)[0])
    with pytest.raises(NoSenderKey):
        read(bob, "alice", first_id, first_body)  # generation 1 was the oldest of six
    assert [read(bob, "alice", *m) for m in kept] == [f"message {k + 1}".encode() for k in range(MAX_GENERATIONS)]
    assert sum(key.startswith("recv:") for key in store.records) == MAX_GENERATIONS  # dropped from the store too


def test_a_generation_older_than_those_kept_is_not_taken(alice):
    first = alice.distribution(RID)
    old = send(alice, 1)[0]
    bob = device("bob")
    for _ in range(MAX_GENERATIONS):
        alice.rotate(RID)
        bob.accept("alice", alice.distribution(RID))
    bob.accept("alice", first)  # late: generation 1 after 2..6
    with pytest.raises(NoSenderKey):
        read(bob, "alice", *old)
    (msg_id, body), = send(alice, 1, start=1)
    assert read(bob, "alice", msg_id, body) == b"message 1"  # generation 6 is still there


def test_a_generation_held_is_never_moved_by_a_payload_again(alice, bob):
    """Re-sent at a later iteration (after an undecryptable) or replayed at an earlier one: ours stays."""
    first_payload = alice.distribution(RID)
    sent = send(alice, 4)
    read(bob, "alice", *sent[0])
    bob.accept("alice", alice.distribution(RID))  # iteration 4: would drop messages 1..3
    bob.accept("alice", first_payload)  # iteration 0: would let message 0 open twice
    with pytest.raises(IntegrityError, match="replay"):
        read(bob, "alice", *sent[0])
    assert [read(bob, "alice", *m) for m in sent[1:]] == [b"message 1", b"message 2", b"message 3"]


def test_a_generation_sent_later_opens_what_is_sealed_from_then_on(alice):
    """The undecryptable path (§4.5): bob missed the key; alice sends her current generation again."""
    lost = send(alice, 2)
    bob = device("bob")
    bob.accept("alice", alice.distribution(RID))
    (msg_id, body), = send(alice, 1, start=2)
    assert read(bob, "alice", msg_id, body) == b"message 2"
    with pytest.raises(IntegrityError):
        read(bob, "alice", *lost[0])  # its key is gone: forward secrecy


# --- who has been sent the generation ------------------------------------------------------------------------
def test_unsent_lists_the_devices_not_yet_sent_the_current_generation(alice):
    assert alice.unsent(RID, {BOB, CAROL}) == {BOB, CAROL}
    alice.mark_sent(RID, {BOB, CAROL})
    assert alice.unsent(RID, {BOB, CAROL, BOB_PHONE}) == {BOB_PHONE}  # bob linked a phone: only it is sent


def test_a_device_that_holds_the_generation_and_is_gone_forces_a_rotation(alice):
    alice.mark_sent(RID, {BOB, CAROL})
    assert not alice.must_rotate(RID, {BOB, CAROL, BOB_PHONE})  # a new device needs the key, not a rotation
    assert alice.must_rotate(RID, {BOB})  # carol left, was removed or unlinked
    alice.rotate(RID)
    assert not alice.must_rotate(RID, {BOB})
    assert alice.unsent(RID, {BOB}) == {BOB}  # the sent-set went with the old generation


def test_no_generation_nothing_to_rotate(alice):
    assert not alice.must_rotate(RID, set())


def test_a_generation_rotates_after_rotate_after_messages():
    alice = device(rotate_after=3)
    send(alice, 2)
    assert not alice.must_rotate(RID, set())
    send(alice, 1, start=2)
    assert alice.must_rotate(RID, set())


def test_forgetting_a_room_drops_its_keys_and_a_rejoin_never_reuses_a_generation(alice, bob):
    (msg_id, body), = send(alice, 1)
    bob.forget_room(RID)
    with pytest.raises(NoSenderKey):
        read(bob, "alice", msg_id, body)
    before = alice.current(RID)
    alice.mark_sent(RID, {BOB})
    alice.forget_room(RID)
    after = alice.current(RID)
    assert after.gen == before.gen + 1 and after.chain != before.chain
    assert alice.unsent(RID, {BOB}) == {BOB}
    carol = device("carol")  # kept alice's generation 1 while alice was away
    carol.accept("alice", pack_sender_key(RID, 1, before.gen, before.iteration, before.chain, before.sign_pub))
    carol.accept("alice", alice.distribution(RID))
    (msg_id, body), = send(alice, 1, start=1)
    assert read(carol, "alice", msg_id, body) == b"message 1"


# --- persistence -----------------------------------------------------------------------------------------------
def test_a_restarted_device_continues_its_generation_without_reusing_an_iteration():
    store = MemorySenderKeys()
    alice = device(store=store)
    bob = device("bob")
    bob.accept("alice", alice.distribution(RID))
    sent = send(alice, 2)
    lost = send(alice, 1, start=2)  # sealed and saved, then the process was killed before it went out
    alice = device(store=store)  # restarted
    (msg_id, body), = send(alice, 1, start=3)
    assert parse_room_body(body) == (1, 1, 3) != parse_room_body(lost[0][1])
    assert [read(bob, "alice", *m) for m in (*sent, (msg_id, body))] == [b"message 0", b"message 1", b"message 3"]


def test_a_restarted_device_keeps_who_was_sent_its_generation():
    store = MemorySenderKeys()
    device(store=store).mark_sent(RID, {BOB})
    alice = device(store=store)
    assert alice.unsent(RID, {BOB, CAROL}) == {CAROL}
    assert alice.must_rotate(RID, {CAROL})


def test_a_sent_set_of_an_older_generation_is_ignored_after_a_crash_in_rotate():
    store = MemorySenderKeys()
    alice = device(store=store)
    alice.mark_sent(RID, {BOB})
    stale = store.records["sent:" + RID.hex()]
    alice.rotate(RID)
    store.records["sent:" + RID.hex()] = stale  # killed after saving the new generation, before dropping it
    assert device(store=store).unsent(RID, {BOB}) == {BOB}


def test_a_restarted_receiver_refuses_replays_and_keeps_its_skipped_keys(alice):
    store = MemorySenderKeys()
    bob = device("bob", store=store)
    bob.accept("alice", alice.distribution(RID))
    sent = send(alice, 3)
    read(bob, "alice", *sent[2])
    bob = device("bob", store=store)
    with pytest.raises(IntegrityError, match="replay"):
        read(bob, "alice", *sent[2])
    assert [read(bob, "alice", *sent[k]) for k in (1, 0)] == [b"message 1", b"message 0"]


def test_a_failed_save_while_sealing_returns_no_body_and_skips_the_iteration():
    store = FlakyStore()
    alice = device(store=store)
    alice.current(RID)
    store.failing = True
    with pytest.raises(StorageError):
        alice.seal(RID, mid(0), TS, b"lost")
    store.failing = False
    assert parse_room_body(alice.seal(RID, mid(1), TS, b"next"))[2] == 1
    assert alice.seals == 1


def test_a_rotation_whose_save_fails_is_still_sent_to_everybody():
    store = FlakyStore()
    alice = device(store=store)
    alice.mark_sent(RID, {BOB})
    store.failing = True
    with pytest.raises(StorageError):
        alice.rotate(RID)
    store.failing = False
    assert alice.unsent(RID, {BOB}) == {BOB}


def test_a_failed_save_while_opening_leaves_the_message_to_be_opened_again(alice):
    store = FlakyStore()
    bob = device("bob", store=store)
    bob.accept("alice", alice.distribution(RID))
    (msg_id, body), = send(alice, 1)
    store.failing = True
    with pytest.raises(StorageError):
        read(bob, "alice", msg_id, body)
    store.failing = False
    assert read(bob, "alice", msg_id, body) == b"message 0"


def test_unreadable_records_are_skipped_with_one_log_line(alice, caplog):
    store = MemorySenderKeys()
    bob = device("bob", store=store)
    bob.accept("alice", alice.distribution(RID))
    store.put("recv:garbage", b"\xc1")
    store.put("what:" + RID.hex(), b"\x80")
    with caplog.at_level(logging.WARNING, logger="p2pchat.client.sender_keys"):
        bob = device("bob", store=store)
    assert [r.getMessage() for r in caplog.records] == ["sender keys of bob (device 1): 2 unreadable records skipped"]
    (msg_id, body), = send(alice, 1)
    assert read(bob, "alice", msg_id, body) == b"message 0"
