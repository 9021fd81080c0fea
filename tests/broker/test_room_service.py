"""The broker core's rooms (docs/PROTOCOL.md §5.7-5.8), hostile input first: only rooms-aware sessions see any of
it, an outsider learns nothing, a stale epoch or a spoofed sender queues nothing, and a room message is numbered
by the broker and queued once per device of every joined member. The core runs on a real SQLite queue and a real
SQLite room registry."""

from __future__ import annotations

import pytest

from p2pchat.broker.backends.sqlite_rooms import SqliteRoomRegistry
from p2pchat.broker.backends.sqlite_store import SqliteMessageStore
from p2pchat.broker.core.ports import QueueLimits
from p2pchat.common.errors import ErrorCode
from p2pchat.broker.core.actions import Send
from p2pchat.common.protocol import CAPS_DEVICES, Ack, AckStatus, Error, Registered, decode
from p2pchat.common.protocol_rooms import (
    CAPS_ROOMS,
    RoomCreate,
    RoomEvent,
    RoomEventKind,
    RoomInfo,
    RoomInvite,
    RoomJoin,
    RoomKey,
    RoomLeave,
    RoomListing,
    RoomListRequest,
    RoomMark,
    RoomMessage,
    RoomReceipts,
    RoomReceiptsRequest,
    RoomRemove,
    RoomRequest,
)
from tests.broker.test_fan_out import step, to
from tests.broker.test_routing import make_core, register, replies

CAPS = CAPS_DEVICES | CAPS_ROOMS
A, B, C, M, OLD = b"alice", b"bob", b"carol", b"mallory", b"old-client"
OTHER_RID = b"r" * 16


@pytest.fixture
def core(tmp_path):
    limits = QueueLimits(max_per_user=3)
    core = make_core(store=SqliteMessageStore(tmp_path / "queue.sqlite", limits), queue_limits=limits,
                     rooms=SqliteRoomRegistry(tmp_path / "rooms.sqlite"))
    for conn in (A, B, C, M):
        register(core, conn, conn.decode(), caps=CAPS)
    return core


def ask(core, conn: bytes, message, msg_id: bytes = b"q" * 16):
    """The one answer ``conn`` gets to ``message`` (and every action, for events to others)."""
    actions = step(core, conn, message, msg_id=msg_id)
    [answer] = [m for m in to(actions, conn) if not isinstance(m, RoomEvent)]
    return answer, actions


@pytest.fixture
def team(core):
    """alice's room "team" with bob and carol joined; its id."""
    info, _ = ask(core, A, RoomCreate("team"))
    ask(core, A, RoomInvite(info.room, ("bob", "carol")))
    ask(core, B, RoomJoin(info.room))
    info, _ = ask(core, C, RoomJoin(info.room))
    assert [m[0] for m in info.members] == ["alice", "bob", "carol"] and info.epoch == 3
    return info.room


def test_rooms_are_granted_only_to_a_register_that_asks_for_them(core):
    [registered] = replies(register(core, OLD, "dave", caps=CAPS_DEVICES), OLD)
    assert registered == Registered("dave", registered.epoch, registered.heartbeat_ms, CAPS_DEVICES, 1, 1)
    answer, _ = ask(core, OLD, RoomCreate("team"))
    assert type(answer) is Error and answer.code is ErrorCode.BAD_FRAME


def test_an_older_session_in_a_room_gets_no_room_frame(core, team):
    register(core, OLD, "dave", caps=CAPS_DEVICES)  # dave's client knows devices, not rooms
    actions = step(core, A, RoomInvite(team, ("dave",)))
    assert to(actions, OLD) == []


@pytest.mark.parametrize("request_of", [RoomJoin, RoomLeave, RoomRequest, lambda rid: RoomInvite(rid, ("mallory",)),
                                        lambda rid: RoomRemove(rid, "bob")], ids=["join", "leave", "req", "invite",
                                                                                  "remove"])
def test_an_outsider_gets_unknown_room_for_a_real_room_as_for_a_made_up_one(core, team, request_of):
    real, _ = ask(core, M, request_of(team))
    made_up, _ = ask(core, M, request_of(OTHER_RID))
    assert (real.code, real.message) == (made_up.code, made_up.message) == (ErrorCode.UNKNOWN_ROOM, "no such room")


def test_room_names_are_unique_whatever_their_case(core, team):
    answer, _ = ask(core, M, RoomCreate("TEAM"))
    assert answer.code is ErrorCode.ROOM_EXISTS


def test_a_member_may_not_remove_and_an_invitee_may_not_send(core, team):
    answer, _ = ask(core, B, RoomRemove(team, "carol"))
    assert answer.code is ErrorCode.NOT_ALLOWED
    ask(core, A, RoomInvite(team, ("mallory",)))
    answer, _ = ask(core, M, RoomMessage("mallory", team, 4, b"x"))
    assert answer.code is ErrorCode.NOT_MEMBER


def test_the_room_list_shows_rooms_and_invitations_with_roles(core, team):
    ask(core, A, RoomInvite(team, ("mallory",)))
    listing, _ = ask(core, M, RoomListRequest())
    assert listing == RoomListing(((team, "team", 3, 1),), b"q" * 16)  # invited, role member
    listing, _ = ask(core, A, RoomListRequest())
    assert listing == RoomListing(((team, "team", 3, 2 << 1),), b"q" * 16)  # owner


def test_a_room_message_is_numbered_and_queued_once_for_every_other_member_with_one_ack(core, team):
    actions = step(core, A, RoomMessage("alice", team, 3, b"sealed once"), msg_id=b"m" * 16)
    assert to(actions, A) == [Ack(b"m" * 16, AckStatus.STORED, None, 1)]
    assert to(actions, B) == to(actions, C) == [RoomMessage("alice", team, 3, b"sealed once", 1)]
    actions = step(core, B, RoomMessage("bob", team, 3, b"again"), msg_id=b"n" * 16)
    assert to(actions, A) == [RoomMessage("bob", team, 3, b"again", 2)]


@pytest.mark.parametrize("message,code", [
    (RoomMessage("alice", OTHER_RID, 3, b"x"), ErrorCode.UNKNOWN_ROOM),
    (RoomMessage("bob", None, 3, b"x"), ErrorCode.SPOOFED_SENDER),
    (RoomMessage("alice", None, 2, b"x"), ErrorCode.ROOM_CHANGED),
    (RoomMessage("alice", None, 3, b"x", 99), ErrorCode.BAD_FRAME),
], ids=["other room", "spoofed", "stale epoch", "seq set"])
def test_a_bad_room_message_is_refused_and_nothing_is_queued(core, team, message, code):
    if message.room is None:
        message = RoomMessage(message.sender, team, message.epoch, message.body, message.seq)
    actions = step(core, A, message, msg_id=b"m" * 16)
    assert [(type(m), m.code, m.ref) for m in to(actions, A)] == [(Error, code, b"m" * 16)]
    assert to(actions, B) == to(actions, C) == []
    assert core.delivery.store.pending("bob", 0, 0, 10) == []


def test_a_member_whose_queue_is_full_misses_the_copy_and_the_ack_says_so(core, team):
    for i in range(3):  # bob and carol consume nothing: their queues reach the bound (3)
        step(core, A, RoomMessage("alice", team, 3, b"x"), msg_id=bytes([i]) * 16)
    step(core, A, RoomLeave(team))  # (alice leaves and comes back: the room's epoch moves on, nothing else)
    actions = step(core, B, RoomMessage("bob", team, 4, b"one too many for carol"), msg_id=b"z" * 16)
    assert to(actions, B) == [Ack(b"z" * 16, AckStatus.STORED, 1, 4)]  # carol missed it; nobody else to send to


def test_a_change_of_membership_is_told_to_the_members_online(core, team):
    actions = step(core, A, RoomRemove(team, "carol"))
    assert to(actions, B) == [RoomEvent(team, 4, RoomEventKind.REMOVED, "carol", "alice", "team")]
    assert to(actions, C) == [RoomEvent(team, 4, RoomEventKind.REMOVED, "carol", "alice", "team")]
    answer, _ = ask(core, C, RoomRequest(team))
    assert answer.code is ErrorCode.UNKNOWN_ROOM


def test_a_sender_key_goes_only_between_joined_members(core, team):
    ask(core, A, RoomInvite(team, ("mallory",)))
    for sender, recipient, conn in (("alice", "mallory", A), ("mallory", "alice", M)):
        answer, _ = ask(core, conn, RoomKey(sender, recipient, team, b"key"))
        assert answer.code is ErrorCode.NOT_MEMBER
    actions = step(core, A, RoomKey("alice", "bob", team, b"key"), msg_id=b"k" * 16)
    assert to(actions, B) == [RoomKey("alice", "bob", team, b"key")]


def test_the_leaver_gets_the_room_without_members_and_the_last_one_out_deletes_it(core, team):
    for conn in (B, C):
        answer, _ = ask(core, conn, RoomLeave(team))
        assert type(answer) is RoomInfo and answer.members == ()
    answer, _ = ask(core, A, RoomLeave(team))
    assert type(answer) is RoomInfo and answer.members == ()
    assert core.rooms.get(team) is None


def test_marks_give_delivered_and_read_per_member_and_a_watcher_one_push_per_second(core, team):
    for i in range(3):
        step(core, A, RoomMessage("alice", team, 3, b"x"), msg_id=bytes([i]) * 16)
    answer, _ = ask(core, A, RoomReceiptsRequest(team, True))
    assert answer == RoomReceipts(team, 3, (("alice", 0, 0), ("bob", 0, 0), ("carol", 0, 0)), b"q" * 16)
    for i in range(1, 4):  # bob keeps them one by one, then reads them: many marks
        step(core, B, RoomMark(team, i))
    step(core, B, RoomMark(team, 3, 3))
    step(core, C, RoomMark(team, 2))
    step(core, C, RoomMark(team, 1))  # marks only go up
    pushed = [decode(a.frames).message for a in core.on_tick(1.5) if type(a) is Send and a.conn == A]
    assert pushed == [RoomReceipts(team, 3, (("alice", 0, 0), ("bob", 3, 3), ("carol", 2, 0)))]
    step(core, C, RoomMark(team, 3))
    assert [a for a in core.on_tick(2.0) if type(a) is Send and a.conn == A] == []  # within the second: held
    pushed = [decode(a.frames).message for a in core.on_tick(2.6) if type(a) is Send and a.conn == A]
    assert pushed == [RoomReceipts(team, 3, (("alice", 0, 0), ("bob", 3, 3), ("carol", 3, 0)))]


def test_an_outsider_marks_nothing_and_sees_no_receipts(core, team):
    step(core, M, RoomMark(team, 99, 99))
    answer, _ = ask(core, M, RoomReceiptsRequest(team))
    assert answer.code is ErrorCode.UNKNOWN_ROOM
    answer, _ = ask(core, A, RoomReceiptsRequest(team))
    assert "mallory" not in [row[0] for row in answer.marks]
