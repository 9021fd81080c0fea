"""Group rooms end to end (issue 16; docs/PROTOCOL.md §5.7-5.8, §10.6): a real broker process and real clients,
sealing on. A room message is sealed once by its sender and fanned out by the broker to every member's device,
online or not; a member who left or was removed cannot read what is sent after."""

from __future__ import annotations

import collections
import os
import sqlite3
from collections.abc import Callable

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient
from p2pchat.client.sender_keys import MemorySenderKeys, NoSenderKey, SenderKeys
from p2pchat.client.storage.sender_keys import SqliteSenderKeys
from p2pchat.common.errors import ErrorCode, ExitCode, RemoteError
from p2pchat.common.protocol import decode
from p2pchat.common.protocol_rooms import RoomMessage
from tests.broker.test_cluster import broker_of, connect, redis_server, start_cluster  # noqa: F401 - fixtures
from tests.client.test_recovery import cli, machine  # noqa: F401 - a fixture
from tests.conftest import BrokerProcess, wait_for, wait_until


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


def test_a_room_of_twenty_with_five_offline_gets_everything_once_in_order_per_sender(make_client, team):
    alice, bob, carol = team
    others = [make_client(f"user{i:02d}") for i in range(17)]
    alice.room_invite("team", [c.user for c in others])
    for client in others:
        client.room_join("team")
    members = [alice, bob, carol, *others]
    assert len(alice.room_info("team").joined) == 20
    offline = [c.user for c in others[:5]]
    for client in others[:5]:
        client.close()
    for i in range(10):
        alice.send_room("team", f"a{i}")
        bob.send_room("team", f"b{i}")
    expected = {"alice": [f"a{i}" for i in range(10)], "bob": [f"b{i}" for i in range(10)]}
    for client in [carol, *others[5:]]:  # the 15 online, then the 5 who come back
        assert by_sender(room_texts(client, 20)) == expected, client.user
    for user in offline:
        assert by_sender(room_texts(make_client(user), 20)) == expected, user
    assert alice._session.sender_keys.seals == 10  # one encryption per message, whatever the room's size
    assert [c.user for c in members if c._session.sender_keys.seals not in (0, 10)] == []


def by_sender(got: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Texts per sender in the order they came; a text twice would show twice."""
    texts = collections.defaultdict(list)
    for sender, text in got:
        texts[sender].append(text)
    return dict(texts)


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


def test_a_room_across_two_cluster_workers(tmp_path, redis_server, connect):  # noqa: F811 - fixtures
    cluster = start_cluster(tmp_path / "broker-home", redis_server.url, 2)
    try:
        users = [f"user{i}" for i in range(8)]
        clients = {user: connect(user, cluster.address) for user in users}
        r = redis_server.client()
        homes = {user: broker_of(r, user) for user in users}
        assert len(set(homes.values())) == 2, f"the kernel put every client on one worker: {homes}"
        owner = clients["user0"]
        owner.room_create("team")
        owner.room_invite("team", users[1:])
        for user in users[1:]:
            clients[user].room_join("team")
        owner.send_room("team", "to both brokers")
        for user in users[1:]:
            assert room_texts(clients[user], 1) == [("user0", "to both brokers")]
        source = tmp_path / "shared.bin"  # uploaded to one worker, fetched from both: they share the store
        source.write_bytes(os.urandom(1024 * 1024 + 5))
        owner.send_room_file("team", source)[1].result(60)
        for user in users[1:]:
            assert file_event(clients[user]).path.read_bytes() == source.read_bytes()
        # a member on the other worker is removed: enforced there at once (the registry is Redis)
        other = next(u for u in users[1:] if homes[u] != homes["user0"])
        owner.room_remove("team", other)
        with pytest.raises(RemoteError) as refused:
            clients[other].send_room("team", "after my removal")
        assert refused.value.code in (ErrorCode.UNKNOWN_ROOM, ErrorCode.NOT_MEMBER)
        owner.send_room("team", "without them")
        for user in users[1:]:
            if user != other:
                assert room_texts(clients[user], 1) == [("user0", "without them")]
    finally:
        assert cluster.stop() == 0


def test_a_member_who_links_a_device_reads_the_room_on_both_and_an_unlinked_one_is_rotated_out(
        broker, machine, tmp_path):  # noqa: F811 - fixtures
    alice = machine("a", "alice", broker.address)
    desk = machine("desk", "bob", broker.address)
    alice.room_create("team")
    alice.room_invite("team", ["bob"])
    desk.room_join("team")
    alice.send_room("team", "one device")
    assert room_texts(desk, 1) == [("alice", "one device")]
    linked = cli(tmp_path / "laptop", "link", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                 "--recovery", "--name", "laptop", stdin=desk.recovery_phrase + "\n")
    assert linked.returncode == ExitCode.OK, linked.stderr
    laptop = machine("laptop", "bob", broker.address)
    alice.send_room("team", "two devices")  # the room's epoch moved with bob's list: sealed again, key to the laptop
    assert room_texts(desk, 1) == [("alice", "two devices")]
    assert room_texts(laptop, 1) == [("alice", "two devices")]
    generation = alice._session.sender_keys.current(alice.room_id("team")).gen
    desk.send_room("team", "from bob's desk")  # his key goes to alice and to his own laptop
    assert room_texts(alice, 1) == [("bob", "from bob's desk")]
    echoed = wait_for(laptop, lambda e: isinstance(e, ev.MessageEchoed) and e.room is not None)
    assert echoed.text == "from bob's desk"  # shown on the laptop as bob's own

    unlinked = cli(tmp_path / "desk", "unlink", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                   "--recovery", "laptop", stdin=desk.recovery_phrase + "\n")
    assert unlinked.returncode == ExitCode.OK, unlinked.stderr
    alice.send_room("team", "the laptop is gone")
    assert room_texts(desk, 1) == [("alice", "the laptop is gone")]
    assert alice._session.sender_keys.current(alice.room_id("team")).gen == generation + 1  # rotated it out


def test_a_members_key_change_holds_only_its_keys_and_the_room_goes_on(broker, machine, tmp_path):
    alice = machine("a", "alice", broker.address)
    bob = machine("b", "bob", broker.address)
    carol = machine("c", "carol", broker.address)
    alice.room_create("team")
    alice.room_invite("team", ["bob", "carol"])
    bob.room_join("team")
    carol.room_join("team")
    alice.send_room("team", "hello")
    assert room_texts(bob, 1) == room_texts(carol, 1) == [("alice", "hello")]
    bob.close()

    recovered = cli(tmp_path / "b2", "recover", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                    stdin=bob.recovery_phrase + "\n")
    assert recovered.returncode == ExitCode.OK, recovered.stderr
    new_bob = machine("b2", "bob", broker.address)
    wait_for(alice, lambda e: isinstance(e, ev.PeerKeyChanged) and e.user == "bob")
    alice.send_room("team", "while bob's key waits")  # carol has it at once: the room is not held for bob
    assert room_texts(carol, 1) == [("alice", "while bob's key waits")]
    assert alice._session.sender_keys.current(alice.room_id("team")).gen == 2  # bob's old key is rotated out

    assert alice.accept_peer_key("bob")
    alice.send_room("team", "welcome back")
    assert room_texts(new_bob, 1) == [("alice", "welcome back")]  # what followed the acceptance


def test_marks_say_who_has_and_who_read_a_message_without_a_receipt_each(team):
    alice, bob, carol = team
    alice.send_room("team", "one")
    acked = wait_for(alice, lambda e: isinstance(e, ev.Acked) and e.seq is not None)
    assert room_texts(bob, 1) == room_texts(carol, 1) == [("alice", "one")]
    bob.mark_room_read(bob.room_id("team"))
    wait_until(lambda: alice.room_receipts("team").marks == {"alice": (0, 0), "bob": (acked.seq, acked.seq),
                                                               "carol": (acked.seq, 0)}, what="bob read, carol has it")


def test_rename_topic_and_roles_as_the_table_allows(team):
    alice, bob, carol = team
    with pytest.raises(RemoteError) as refused:
        bob.room_set("team", topic="bob's now")  # a member may not
    assert refused.value.code is ErrorCode.NOT_ALLOWED
    alice.room_admin("team", "bob")
    assert bob.room_set("team", new_name="crew", topic="all hands").name == "crew"  # an admin may
    event = wait_for(carol, lambda e: isinstance(e, ev.RoomEvent) and e.kind == "renamed")
    assert (event.name, event.user) == ("crew", "bob")
    assert carol.room_info("crew").topic == "all hands"
    with pytest.raises(RemoteError) as refused:
        bob.room_remove("crew", "alice")  # an admin may not remove the owner
    assert refused.value.code is ErrorCode.NOT_ALLOWED
    alice.room_leave("crew")  # the owner leaves: the oldest admin owns the room
    assert carol.room_info("crew").owner == "bob"


def file_event(client: ChatClient, timeout: float = 60) -> ev.FileReceived:
    event = wait_for(client, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)) and e.room is not None,
                     timeout)
    assert isinstance(event, ev.FileReceived), event
    return event


def test_a_room_file_is_uploaded_once_and_reaches_every_member_identical(make_client, tmp_path):
    users = ["alice", "bob", "carol", "dave", "erin"]
    clients = {u: make_client(u, received_dir=tmp_path / "received" / u) for u in users}
    alice = clients["alice"]
    alice.room_create("team")
    alice.room_invite("team", users[1:])
    for user in users[1:]:
        clients[user].room_join("team")
    clients["erin"].close()  # offline when the file is sent: fetches it when back
    source = tmp_path / "plans.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    xfer, sent = alice.send_room_file("team", source)
    sent.result(60)  # the broker holds it whole and the room was told: alice may go
    alice.close()
    for user in ("bob", "carol", "dave"):
        got = file_event(clients[user])
        assert (got.sender, got.xfer, got.room) == ("alice", xfer, alice_room(clients[user]))
        assert got.path.read_bytes() == source.read_bytes()
    erin = make_client("erin", received_dir=tmp_path / "received" / "erin")
    assert file_event(erin).path.read_bytes() == source.read_bytes()
    on_disk = [p for p in (tmp_path / "broker-home" / "broker" / "room-files").rglob("*.chunks")]
    assert [p.stat().st_size for p in on_disk] == [source.stat().st_size + 16 * 7]  # once, sealed: 7 chunks


def alice_room(client: ChatClient) -> bytes:
    return client.room_id("team")


def test_a_member_stopped_mid_fetch_resumes_from_its_part_file(make_client, tmp_path):
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "bob", chunk_size=64 * 1024, window=2)
    alice.room_create("team")
    alice.room_invite("team", ["bob"])
    bob.room_join("team")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 * 1024 * 1024))
    _, sent = alice.send_room_file("team", source)
    sent.result(60)
    wait_for(bob, lambda e: isinstance(e, ev.FileProgress) and e.room is not None and 0 < e.done < e.size, 60)
    bob.close()
    back = make_client("bob", received_dir=tmp_path / "bob")
    assert file_event(back).path.read_bytes() == source.read_bytes()

