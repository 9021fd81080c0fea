"""Group rooms end to end (issue 16; docs/PROTOCOL.md §5.7-5.8, §10.6): a real broker process and real clients,
sealing on. A room message is sealed once by its sender and fanned out by the broker to every member's device,
online or not; a member who left or was removed cannot read what is sent after."""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Callable

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient
from p2pchat.client.sender_keys import MemorySenderKeys, NoSenderKey, SenderKeys
from p2pchat.client.storage.sender_keys import SqliteSenderKeys
from p2pchat.common.errors import ErrorCode, RemoteError
from p2pchat.common.protocol import decode
from p2pchat.common.protocol_rooms import RoomMessage
from tests.conftest import BrokerProcess, wait_for


def room_texts(client: ChatClient, count: int, timeout: float = 20) -> list[tuple[str, str]]:
    """The next ``count`` room messages ``client`` receives, as (sender, text)."""
    got = []
    for _ in range(count):
        event = wait_for(client, lambda e: isinstance(e, ev.MessageReceived) and e.room is not None, timeout)
        got.append((event.sender, event.text))
    return got


@pytest.fixture
def team(make_client: Callable[..., ChatClient]):
    """alice owns room "team"; bob and carol joined it."""
    alice, bob, carol = (make_client(user) for user in ("alice", "bob", "carol"))
    room = alice.room_create("team", "plans")
    assert room.owner == "alice" and room.joined == ("alice",)
    alice.room_invite("team", ["bob", "carol"])
    bob.room_join("team")
    joined = carol.room_join("team")
    assert set(joined.joined) == {"alice", "bob", "carol"}
    return alice, bob, carol


def test_a_message_to_a_room_reaches_every_member_once_sealed_once(team):
    alice, bob, carol = team
    alice.send_room("team", "hello team")
    assert room_texts(bob, 1) == [("alice", "hello team")]
    assert room_texts(carol, 1) == [("alice", "hello team")]
    bob.send_room("team", "hi alice")
    assert room_texts(alice, 1) == [("bob", "hi alice")]
    assert room_texts(carol, 1) == [("bob", "hi alice")]
    assert alice._session.sender_keys.seals == 1  # one encryption for the whole room


def test_offline_members_get_everything_once_in_order_per_sender(make_client, team):
    alice, bob, carol = team
    carol.close()
    for i in range(10):
        alice.send_room("team", f"a{i}")
        bob.send_room("team", f"b{i}")
    back = make_client("carol")
    got = room_texts(back, 20)
    assert len(set(got)) == 20
    by_sender = collections.defaultdict(list)
    for sender, text in got:
        by_sender[sender].append(text)
    assert by_sender == {"alice": [f"a{i}" for i in range(10)], "bob": [f"b{i}" for i in range(10)]}


def queued_room_frames(broker: BrokerProcess, recipient: str) -> list:
    """The room messages waiting in ``recipient``'s queue at the broker, decoded: the frames in hand."""
    db = sqlite3.connect(broker.home / "broker" / "queue.sqlite")
    try:
        rows = db.execute("SELECT header FROM queue WHERE recipient = ? ORDER BY seq", (recipient,)).fetchall()
    finally:
        db.close()
    envs = [decode([header]) for header, in rows]
    return [env for env in envs if isinstance(env.message, RoomMessage)]


def test_a_removed_member_gets_nothing_new_and_cannot_open_later_frames(make_client, team, broker):
    alice, bob, carol = team
    dave = make_client("dave")
    alice.room_invite("team", ["dave"])
    dave.room_join("team")
    dave.close()  # offline: what is sent to the room waits in his queue, where we take it from
    alice.send_room("team", "hello")
    assert room_texts(bob, 1) == [("alice", "hello")] and room_texts(carol, 1) == [("alice", "hello")]
    kept = MemorySenderKeys()  # every sender key carol holds as a member, kept past her removal
    for key, value in SqliteSenderKeys(carol.state_dir / "sender_keys.sqlite").load_all().items():
        kept.put(key, value)
    alice.send_room("team", "before")
    assert room_texts(bob, 1) == [("alice", "before")] and room_texts(carol, 1) == [("alice", "before")]
    rid = alice.room_id("team")

    alice.room_remove("team", "carol")
    wait_for(carol, lambda e: isinstance(e, ev.RoomGone) and e.why == "removed")
    alice.send_room("team", "after")
    assert room_texts(bob, 1) == [("alice", "after")]
    with pytest.raises(RemoteError) as refused:
        carol.send_room("team", "still here?")
    assert refused.value.code is ErrorCode.UNKNOWN_ROOM

    _, before, after = queued_room_frames(broker, "dave")
    old_keys = SenderKeys("carol", carol._session.device, kept)
    assert old_keys.open(rid, "alice", before.msg_id, before.ts, before.message.body) == b"before"
    with pytest.raises(NoSenderKey):  # alice rotated: carol never had the generation "after" is sealed with
        old_keys.open(rid, "alice", after.msg_id, after.ts, after.message.body)


def test_outsiders_learn_nothing(make_client, team):
    alice, _, _ = team
    mallory = make_client("mallory")
    with pytest.raises(RemoteError) as refused:
        mallory.room_join("team")
    assert refused.value.code is ErrorCode.UNKNOWN_ROOM
    with pytest.raises(RemoteError) as taken:
        mallory.room_create("TEAM")  # names are unique whatever their case
    assert taken.value.code is ErrorCode.ROOM_EXISTS


@pytest.mark.broker_args("--heartbeat", "0.2")
def test_membership_survives_a_broker_restart(tmp_path, team, broker: BrokerProcess):
    alice, bob, _ = team
    broker.stop()
    broker.start()
    wait_for(alice, lambda e: isinstance(e, ev.Registered) and e.reconnect, 20)
    wait_for(bob, lambda e: isinstance(e, ev.Registered) and e.reconnect, 20)
    assert set(alice.room_info("team").joined) == {"alice", "bob", "carol"}
    alice.send_room("team", "after the restart")
    assert room_texts(bob, 1) == [("alice", "after the restart")]
