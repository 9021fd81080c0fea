"""The broker core's fan-out to several devices per user (docs/PROTOCOL.md §5.6, §8): a message from a client
that seals per device carries a copy for each device of its recipient and an echo for each other device of its
sender; the broker refuses a set of copies that is not the recipient's devices (``devices_changed``), queues
each copy for its device, answers once, sends receipts to every device but the sending one, and routes
transfer frames by ``dev``. The core runs on a real SQLite queue; the devices are added through the
registry (``KeyBook.add_device``)."""

from __future__ import annotations

import pytest

from p2pchat.broker.backends.sqlite_store import SqliteMessageStore
from p2pchat.broker.core.actions import Relay, Send
from p2pchat.broker.core.ports import QueueLimits
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import CAPS_DEVICES, Ack, AckStatus, ChatMessage, Consume, Error, FileCancel, FileChunk, FileCredit, FileOffer, Receipt, ReceiptStatus, Register, Unregister, decode, pack
from tests.broker.test_ports import cluster_runs, received, redis_server, redis_url, until  # noqa: F401 (fixtures)
from tests.broker.test_routing import key_of, make_core, register

A1, A2, B1, B2 = b"alice-1", b"alice-2", b"bob-1", b"bob-2"
ALICE_PHONE, BOB_LAPTOP = key_of("alice-phone"), key_of("bob-laptop")
XFER = b"x" * 16


def make_durable(tmp_path, limits: QueueLimits = QueueLimits(), **options):
    return make_core(store=SqliteMessageStore(tmp_path / "queue.sqlite", limits), queue_limits=limits, **options)


def step(core, conn: bytes, message, now: float = 1.0, msg_id: bytes | None = None) -> list:
    """``message`` from ``conn``, then the shell's commit and the core's answers to it."""
    actions = core.on_frames(conn, pack(message, 0, msg_id), now)
    if core.delivery.durable:
        core.delivery.store.commit()
        actions += core.on_commit()
    return actions


def to(actions, conn: bytes) -> list:
    """What ``conn`` got: replies, queued and relayed frames."""
    return [decode(a.frames).message for a in actions if type(a) in (Send, Relay) and a.conn == conn]


def online(core, alice_caps: bool = True, alice_phone_caps: bool | None = True, bob_laptop_caps: bool = True) -> None:
    """alice (device 1, and device 2 unless ``alice_phone_caps`` is None) and bob's two devices, all online."""
    register(core, A1, "alice", caps=CAPS_DEVICES if alice_caps else None)
    register(core, B1, "bob", caps=CAPS_DEVICES)
    assert core.keys.add_device("bob", BOB_LAPTOP) == 2
    register(core, B2, "bob", key=BOB_LAPTOP, caps=CAPS_DEVICES if bob_laptop_caps else None)
    if alice_phone_caps is not None:
        assert core.keys.add_device("alice", ALICE_PHONE) == 2
        register(core, A2, "alice", key=ALICE_PHONE, caps=CAPS_DEVICES if alice_phone_caps else None)


@pytest.fixture
def core(tmp_path):
    core = make_durable(tmp_path)
    online(core)
    return core


def chat(copies, echo=None, body=b"") -> ChatMessage:
    return ChatMessage("alice", "bob", body, copies, echo)


# --- copies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("copies", [None, ((1, b"c1"),), ((1, b"c1"), (2, b"c2"), (3, b"c3")), ((2, b"c2"), (5, b"c5"))],
                         ids=["plain", "missing", "extra", "other"])
def test_copies_that_are_not_the_recipients_devices_are_refused_with_devices_changed_and_nothing_is_queued(
        core, copies):
    actions = step(core, A1, chat(copies, ((2, b"e2"),), b"plain" if copies is None else b""), msg_id=b"m" * 16)
    assert [(type(m), getattr(m, "code", None), getattr(m, "ref", None)) for m in to(actions, A1)] == [
        (Error, ErrorCode.DEVICES_CHANGED, b"m" * 16)]
    assert to(actions, B1) == to(actions, B2) == to(actions, A2) == []
    assert [core.delivery.store.pending(q, 0, 0, 10) for q in ("bob", "bob/2", "alice/2")] == [[], [], []]


def test_each_device_of_the_recipient_gets_its_own_copy_and_the_sender_one_ack(core):
    actions = step(core, A1, chat(((1, b"for laptop 1"), (2, b"for laptop 2")), ((2, b"echo"),)), msg_id=b"m" * 16)
    assert to(actions, B1) == [ChatMessage("alice", "bob", b"for laptop 1")]
    assert to(actions, B2) == [ChatMessage("alice", "bob", b"for laptop 2")]
    assert to(actions, A1) == [Ack(b"m" * 16, AckStatus.STORED)]


def test_an_echo_is_required_for_each_other_device_of_the_sender(core):
    for echo in (None, ((3, b"e"),), ((1, b"self"), (2, b"e"))):
        [error] = to(step(core, A1, chat(((1, b"c1"), (2, b"c2")), echo)), A1)
        assert error.code is ErrorCode.DEVICES_CHANGED


def test_the_echo_goes_to_the_senders_other_device_as_the_message_itself(core):
    actions = step(core, A1, chat(((1, b"c1"), (2, b"c2")), ((2, b"echo for the phone"),)))
    assert to(actions, A2) == [ChatMessage("alice", "bob", b"echo for the phone")]


def test_an_echo_beside_a_plain_body_goes_to_the_senders_device_and_never_to_the_recipient(core):
    register(core, b"carol", "carol")  # one device, an older client: its strict decoder would drop an echo field
    actions = step(core, A1, ChatMessage("alice", "carol", b"plain", echo=((2, b"echo"),)))
    assert to(actions, b"carol") == [ChatMessage("alice", "carol", b"plain")]
    assert to(actions, A2) == [ChatMessage("alice", "carol", b"echo")]


def test_an_echo_is_required_but_not_delivered_to_a_device_that_registered_without_caps(tmp_path):
    core = make_durable(tmp_path)
    online(core, alice_phone_caps=False)  # an older client on alice's phone would keep an echo queued, unread
    [error] = to(step(core, A1, chat(((1, b"c1"), (2, b"c2")))), A1)
    assert error.code is ErrorCode.DEVICES_CHANGED
    actions = step(core, A1, chat(((1, b"c1"), (2, b"c2")), ((2, b"echo"),)), msg_id=b"m" * 16)
    assert to(actions, A2) == [] and core.delivery.store.pending("alice/2", 0, 0, 10) == []
    assert to(actions, A1) == [Ack(b"m" * 16, AckStatus.STORED)]


def test_a_device_that_registered_without_caps_gets_its_copy_as_a_plain_message(tmp_path):
    core = make_durable(tmp_path)
    online(core, alice_phone_caps=None, bob_laptop_caps=False)
    actions = step(core, A1, chat(((1, b"c1"), (2, b"c2"))))
    assert to(actions, B2) == [ChatMessage("alice", "bob", b"c2")]


def test_a_plain_message_from_a_client_without_caps_goes_to_the_primary_device_only(tmp_path):
    core = make_durable(tmp_path)
    online(core, alice_caps=False, alice_phone_caps=None)
    actions = step(core, A1, ChatMessage("alice", "bob", b"plain"), msg_id=b"m" * 16)
    assert to(actions, B1) == [ChatMessage("alice", "bob", b"plain")] and to(actions, B2) == []
    assert to(actions, A1) == [Ack(b"m" * 16, AckStatus.STORED)]


def test_a_device_offline_gets_its_copy_when_it_registers_again(core):
    step(core, B2, Unregister())
    step(core, A1, chat(((1, b"c1"), (2, b"c2")), ((2, b"e"),)))
    actions = register(core, B2, "bob", key=BOB_LAPTOP, caps=CAPS_DEVICES, now=2.0)
    assert [m for m in to(actions, B2) if type(m) is ChatMessage] == [ChatMessage("alice", "bob", b"c2")]


def test_a_full_queue_in_the_middle_of_a_fan_out_is_answered_once_and_a_resend_is_idempotent(tmp_path):
    core = make_durable(tmp_path, QueueLimits(max_per_user=1))
    online(core, alice_phone_caps=None)
    step(core, A1, chat(((1, b"c1"), (2, b"c2"))), msg_id=b"1" * 16)  # one frame in each of bob's queues
    step(core, B1, Consume(b"1" * 16))  # bob's first device has room again, his laptop has not
    actions = step(core, A1, chat(((1, b"d1"), (2, b"d2"))), msg_id=b"2" * 16)
    assert [(type(m), getattr(m, "code", None)) for m in to(actions, A1)] == [(Error, ErrorCode.QUEUE_FULL)]  # no ack
    assert to(actions, B1) == [ChatMessage("alice", "bob", b"d1")] and to(actions, B2) == []  # the copy queued stays
    step(core, B1, Consume(b"2" * 16))
    step(core, B2, Consume(b"1" * 16))
    again = step(core, A1, chat(((1, b"d1"), (2, b"d2"))), msg_id=b"2" * 16)
    assert to(again, A1) == [Ack(b"2" * 16, AckStatus.STORED)]
    assert to(again, B2) == [ChatMessage("alice", "bob", b"d2")]  # (bob's first device drops its repeat by id)
    assert [len(core.delivery.store.pending(q, 0, 0, 10)) for q in ("bob", "bob/2")] == [1, 1]


def test_a_copy_the_full_store_cannot_take_makes_the_message_an_error_never_also_an_ack(tmp_path):
    core = make_durable(tmp_path, QueueLimits(max_total_bytes=700))  # room for one copy, not two
    online(core, alice_phone_caps=None)
    step(core, B2, Unregister())  # bob's laptop is offline: its copy can only be stored
    actions = step(core, A1, chat(((1, b"1" * 400), (2, b"2" * 400))), msg_id=b"3" * 16)
    assert [(type(m), getattr(m, "code", None)) for m in to(actions, A1)] == [(Error, ErrorCode.STORAGE_FULL)]


def test_without_a_store_each_copy_goes_to_its_own_device_or_nowhere():
    core = make_core()  # durability off: a copy for a device that is offline is lost, never given to another
    online(core, alice_phone_caps=None)
    step(core, B1, Unregister())
    actions = step(core, A1, chat(((1, b"for the first device"), (2, b"for the laptop"))), msg_id=b"m" * 16)
    assert to(actions, B2) == [ChatMessage("alice", "bob", b"for the laptop")]
    [relay] = [a for a in actions if type(a) is Relay]
    assert decode(relay.on_success).message == Ack(b"m" * 16, AckStatus.RELAYED)
    step(core, B2, Unregister())
    [error] = to(step(core, A1, chat(((1, b"c1"), (2, b"c2"))), msg_id=b"n" * 16), A1)
    assert (error.code, error.ref) == (ErrorCode.RECIPIENT_OFFLINE, b"n" * 16)


# --- receipts --------------------------------------------------------------------------------------
def test_a_receipt_goes_to_every_device_of_its_recipient(core):
    actions = step(core, B2, Receipt("bob", "alice", b"r" * 16, ReceiptStatus.DELIVERED))
    assert to(actions, A1) == to(actions, A2) == [Receipt("bob", "alice", b"r" * 16, ReceiptStatus.DELIVERED)]


def test_a_receipt_to_ourselves_goes_to_every_device_but_the_sending_one(core):
    actions = step(core, B1, Receipt("bob", "bob", b"r" * 16, ReceiptStatus.READ))
    assert to(actions, B2) == [Receipt("bob", "bob", b"r" * 16, ReceiptStatus.READ)] and to(actions, B1) == []


# --- transfers -------------------------------------------------------------------------------------
def test_an_offer_goes_to_each_device_saying_which_device_offered_it(core):
    actions = step(core, A2, FileOffer("alice", "bob", XFER, 10, 10, b"", ((1, b"o1"), (2, b"o2"))))
    assert to(actions, B1) == [FileOffer("alice", "bob", XFER, 10, 10, b"o1", src=2)]
    assert to(actions, B2) == [FileOffer("alice", "bob", XFER, 10, 10, b"o2", src=2)]


def test_transfer_frames_go_to_the_device_they_name(core):
    for dev, conn in ((1, A1), (2, A2)):
        actions = step(core, B2, FileCredit("bob", "alice", XFER, 0, 4, True, dev, 2))
        assert to(actions, conn) == [FileCredit("bob", "alice", XFER, 0, 4, True, dev, 2)]
    chunk = pack(FileChunk("alice", "bob", XFER, 0, False, dev=2), 0, None, b"data")
    [relay] = core.on_frames(A2, chunk, 2.0)
    assert type(relay) is Relay and relay.conn == B2


def test_a_credit_from_another_device_opens_no_window_for_the_taker(core):
    step(core, B1, FileCredit("bob", "alice", XFER, 0, 4, True, 2, 1))  # bob's first device, not the taker
    [error] = to(core.on_frames(A2, pack(FileChunk("alice", "bob", XFER, 0, False, dev=2), 0, None, b"d"), 2.0), A2)
    assert error.code is ErrorCode.CREDIT_EXCEEDED


@pytest.mark.parametrize("frame", [
    FileCredit("bob", "alice", XFER, 0, 4, True, 1, src=1),
    FileCancel("bob", "alice", XFER, ErrorCode.TAKEN, "taken", 1, src=1),
    FileOffer("bob", "alice", XFER, 10, 10, b"", ((1, b"o1"), (2, b"o2")), src=1),
    FileOffer("bob", "carol", XFER, 10, 10, b"plain", src=1),  # carol has one device: the frame goes unchanged
], ids=["credit", "cancel", "offer", "plain offer"])
def test_a_src_that_is_not_the_sending_device_is_refused(core, frame):
    register(core, b"carol", "carol")
    actions = step(core, B2, frame)
    [error] = to(actions, B2)
    assert error.code is ErrorCode.SPOOFED_SENDER
    assert to(actions, A1) == to(actions, b"carol") == []


# --- two brokers of a cluster ----------------------------------------------------------------------
def cluster_with_bob_on(tmp_path, url: str, laptop_broker: int, first_broker: int = 1, brokers: int = 2):
    """``brokers`` cores on one Redis; alice (one device) on broker 1, bob's first device and laptop where told."""
    runs = cluster_runs(tmp_path, url, brokers)
    first, laptop = runs[first_broker - 1], runs[laptop_broker - 1]
    runs[0].send(A1, Register("alice", b"alice", key_of("alice"), caps=CAPS_DEVICES), 0.1)
    first.send(B1, Register("bob", b"bob-1", key_of("bob"), b"r" * 32, CAPS_DEVICES), 0.1)  # a recovery key: linkable
    generation = first.backend.keys.recovery_state("bob").generation
    assert first.backend.keys.link_device("bob", BOB_LAPTOP, generation, b"p" * 64, "test") is None
    laptop.send(B2, Register("bob", b"bob-2", BOB_LAPTOP, caps=CAPS_DEVICES), 0.1)
    for run in runs:
        until(run, lambda: len(run.core.directory.locate("bob")) == 2 and len(run.core.keys.devices("bob").devices) == 2,
              "every broker to see both of bob's devices")
    return runs


def test_bobs_devices_on_two_brokers_each_get_alices_messages_and_only_their_own_copies(tmp_path, redis_url):
    runs = one, two = cluster_with_bob_on(tmp_path, redis_url, laptop_broker=2)
    try:
        for n in range(3):
            one.send(A1, chat(((1, b"first %d" % n), (2, b"laptop %d" % n))), 0.2)
        assert received(one, Ack, A1) == [Ack(msg_id, AckStatus.STORED) for msg_id in one.sent[-3:]]
        until(two, lambda: len(received(two, ChatMessage, B2)) >= 3, "the laptop's copies to reach broker 2")
        one.tick(0.5)
        assert {m.body for m in received(one, ChatMessage, B1)} == {b"first 0", b"first 1", b"first 2"}
        assert {m.body for m in received(two, ChatMessage, B2)} == {b"laptop 0", b"laptop 1", b"laptop 2"}
    finally:
        for run in runs:
            run.backend.close()


def test_a_chunk_to_a_device_on_another_broker_reaches_that_device_not_its_users_first(tmp_path, redis_url):
    runs = one, two = cluster_with_bob_on(tmp_path, redis_url, laptop_broker=2, first_broker=2)
    try:
        two.send(B2, FileCredit("bob", "alice", XFER, 0, 4, True, 1, 2), 0.2)  # the laptop took alice's file
        until(one, lambda: received(one, FileCredit, A1), "the credit to reach alice through broker 1")
        chunk = pack(FileChunk("alice", "bob", XFER, 0, False, dev=2), 0, b"c" * 16, b"data")
        one._carry_out(one.core.on_frames(A1, chunk, 0.3))
        until(two, lambda: received(two, FileChunk, B2) or received(two, FileChunk, B1), "the chunk to reach bob")
        assert received(two, FileChunk, B2) == [FileChunk("alice", "bob", XFER, 0, False, dev=2)]
        assert received(two, FileChunk, B1) == []
    finally:
        for run in runs:
            run.backend.close()


def test_a_chunk_to_a_device_on_a_third_broker_reaches_it(tmp_path, redis_url):
    runs = one, two, three = cluster_with_bob_on(tmp_path, redis_url, laptop_broker=3, first_broker=2, brokers=3)
    try:
        three.send(B2, FileCredit("bob", "alice", XFER, 0, 4, True, 1, 2), 0.2)  # the laptop took alice's file
        until(one, lambda: received(one, FileCredit, A1), "the credit to reach alice")
        chunk = pack(FileChunk("alice", "bob", XFER, 0, False, dev=2), 0, b"c" * 16, b"data")
        one._carry_out(one.core.on_frames(A1, chunk, 0.3))  # bob's first device is on broker 2, his laptop on 3
        until(three, lambda: received(three, FileChunk, B2), "the chunk to reach the laptop on broker 3")
        assert received(two, FileChunk, B1) == []
    finally:
        for run in runs:
            run.backend.close()
