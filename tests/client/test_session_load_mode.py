"""ClientSession's switches for the load tool, which runs thousands of sessions in one process: sealing off,
no presence tracking, no delivery receipts, the broker's heartbeat interval, and leaving for a while."""

from __future__ import annotations

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.session import ClientSession, State
from p2pchat.client.e2e import NO_SEALING
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Consume, Error, Heartbeat, PeerUpdate, Register, Registered, SnapshotRequest, Unregister, decode, pack
from tests.cores import id_source

KEY = bytes(range(32))


def load_session(**switches) -> ClientSession:
    options = dict(wall_ms=lambda: 0, e2e=NO_SEALING, key=KEY, presence=False, delivery_receipts=False,
                   heartbeat_ivl=None, token=b"t" * 32, new_id=id_source("me"))
    options.update(switches)
    return ClientSession("me", **options)


def sent(actions) -> list:
    return [decode(a.frames).message for a in actions if type(a) is Transmit]


def events(actions) -> list:
    return [a.event for a in actions if type(a) is Emit]


def registered(session: ClientSession, now: float = 0.0, heartbeat_ms: int = 5000) -> list:
    session.start(now)
    return session.on_frames(pack(Registered("me", b"epoch", heartbeat_ms), 0), now + 0.001)


def test_with_sealing_off_it_registers_with_its_key_and_sends_the_body_as_given():
    session = load_session()
    [register] = sent(session.start(0.0))
    assert type(register) is Register and register.key == KEY
    registered(session)
    body = b"\x00\xffnot utf-8"
    [message] = sent(session.send_text("bob", body, 1.0))
    assert type(message) is ChatMessage and message.body == body  # no key asked for, nothing sealed


def test_without_presence_it_never_asks_for_a_snapshot_and_ignores_the_pub():
    session = load_session()
    assert SnapshotRequest not in [type(m) for m in sent(registered(session))]
    assert session.presence is None
    assert session.on_publish(pack(PeerUpdate(b"epoch", 1, "bob", True), 0), 1.0) == []


def test_with_presence_it_asks_for_a_snapshot_once_registered():
    session = load_session(presence=True)
    assert SnapshotRequest in [type(m) for m in sent(registered(session))]


def test_without_delivery_receipts_a_message_is_only_consumed():
    session = load_session()
    registered(session)
    actions = session.on_frames(pack(ChatMessage("bob", "me", b"hi"), 0, bytes(16)), 1.0)
    assert [type(e) for e in events(actions)] == [ev.MessageReceived]
    assert [type(m) for m in sent(actions + session.end_batch(1.0))] == [Consume]


def test_the_consumes_of_a_batch_leave_as_one_frame_per_page_at_the_end_of_the_batch():
    session = load_session()
    registered(session)
    ids = [i.to_bytes(16, "big") for i in range(300)]
    for msg_id in ids:
        assert sent(session.on_frames(pack(ChatMessage("bob", "me", b"hi"), 0, msg_id), 1.0)) == []
    first, second = sent(session.end_batch(1.0))
    assert (first.ref, *first.refs) == tuple(ids[:256])  # MAX_CONSUME_REFS + 1 ids in a frame
    assert (second.ref, *second.refs) == tuple(ids[256:])
    assert session.end_batch(1.1) == []  # each id once


def test_a_lone_consume_has_no_refs_list_and_none_goes_out_while_unregistered():
    session = load_session()
    registered(session)
    session.on_frames(pack(ChatMessage("bob", "me", b"hi"), 0, bytes(16)), 1.0)
    [consume] = sent(session.end_batch(1.0))
    assert consume == Consume(bytes(16))  # the single form every broker knows
    session.on_frames(pack(ChatMessage("bob", "me", b"hi"), 0, b"\x01" * 16), 1.0)
    session.leave(1.0)
    assert session.end_batch(1.0) == []  # the broker pages it again after registering: consumed then


def test_following_the_broker_it_heartbeats_at_the_brokers_interval_and_expires_after_liveness_of_them():
    session = load_session()
    registered(session, heartbeat_ms=5000)
    assert session.next_deadline() == 5.0
    assert [type(m) for m in sent(session.on_tick(5.0))] == [Heartbeat]
    assert not events(session.on_tick(14.9))  # 3 x 5 s: still within the expiry
    assert ev.Reconnecting in [type(e) for e in events(session.on_tick(15.1))]


def test_with_a_fixed_interval_it_heartbeats_at_most_that_far_apart_whatever_the_broker_says():
    session = load_session(heartbeat_ivl=1.0)
    registered(session, heartbeat_ms=5000)
    assert session.next_deadline() == 1.0


def test_leaving_unregisters_and_starting_again_registers_and_resends_what_is_unacked():
    session = load_session()
    registered(session)
    [first] = session.send_text("bob", b"one", 1.0)
    acked_id = decode(first.frames).msg_id
    [pending] = session.send_text("bob", b"two", 1.0)
    session.on_frames(pack(Ack(acked_id, AckStatus.STORED), 0), 1.1)
    assert [type(m) for m in sent(session.leave(2.0))] == [Unregister]
    assert session.state is State.CONNECTING
    [register] = sent(session.start(2.5))
    assert type(register) is Register
    again = session.on_frames(pack(Registered("me", b"epoch2", 5000), 0), 2.6)
    assert [a.frames for a in again if type(a) is Transmit] == [pending.frames]  # the same frames, same id
    assert ev.Registered(user="me", reconnect=True) in events(again)


def test_leaving_like_a_crash_sends_nothing():
    session = load_session()
    registered(session)
    assert session.leave(1.0, unregister=False) == []
    assert session.state is State.CONNECTING


def test_on_envelope_handles_what_on_frames_would():
    session = load_session()
    registered(session)
    env = decode(pack(Error(ErrorCode.NOT_REGISTERED, "register first"), 0))
    actions = session.on_envelope(env, 1.0)
    assert [type(m) for m in sent(actions)] == [Register] and session.state is State.CONNECTING


def test_with_a_history_the_batch_is_consumed_only_after_its_commit(tmp_path):
    from p2pchat.client.storage.history import History

    history = History(tmp_path / "history.sqlite")
    try:
        session = load_session(history=history)
        registered(session)
        ids = [bytes([i]) * 16 for i in range(1, 4)]
        for msg_id in ids:
            session.on_frames(pack(ChatMessage("bob", "me", b"hi"), 0, msg_id), 1.0)
        assert session.end_batch(1.0) == []  # not committed yet: nothing may be consumed (§11)
        history.commit()
        assert session.history_saved() == []  # receipts are off
        [consume] = sent(session.end_batch(1.0))
        assert (consume.ref, *consume.refs) == tuple(ids)
    finally:
        history.close()


def test_a_broker_older_than_recovery_keys_gets_a_register_without_one():
    session = load_session(recovery=bytes(range(32)))
    [first] = [a.frames for a in session.start(0.0)]
    register = decode(first)
    assert register.message.recovery == bytes(range(32))
    refusal = Error(ErrorCode.BAD_FRAME, "register: unknown fields ['recovery']", register.msg_id)
    [again] = sent(session.on_frames(pack(refusal, 0), 0.1))
    assert type(again) is Register and again.recovery is None
    assert sent(session.on_frames(pack(Registered("me", b"epoch", 5000), 0), 0.2)) == []  # registered as usual
    assert session.state is State.READY
