"""Core chat over a real broker process and real loopback sockets."""

from __future__ import annotations

import pytest

from p2pchat.client import events as ev
from p2pchat.common.errors import ErrorCode, RemoteError
from tests.conftest import wait_for, wait_peers, wait_until


def test_alice_and_bob_exchange_messages_both_ways_in_order(make_client):
    alice, bob = make_client("alice"), make_client("bob")
    for i in range(50):
        alice.send("bob", f"a{i}")
        bob.send("alice", f"b{i}")
    got_bob = [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(50)]
    got_alice = [wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(50)]
    assert got_bob == [f"a{i}" for i in range(50)]
    assert got_alice == [f"b{i}" for i in range(50)]


def test_received_message_names_sender(make_client):
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "héllo ✓")
    event = wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert (event.sender, event.text) == ("alice", "héllo ✓")


def test_peers_see_each_other_join_and_leave(make_client):
    alice = make_client("alice")
    wait_peers(alice, {"alice"})
    bob = make_client("bob")
    wait_peers(alice, {"alice", "bob"})
    wait_peers(bob, {"alice", "bob"})
    bob.close()
    wait_peers(alice, {"alice"})


def test_unknown_recipient_is_refused(make_client):
    alice = make_client("alice")
    with pytest.raises(RemoteError) as err:
        alice.send("nobody", "hello?")
    assert err.value.code is ErrorCode.UNKNOWN_RECIPIENT


@pytest.mark.broker_args("--no-store")
def test_offline_recipient_is_reported_as_offline_without_a_store(make_client):
    alice, bob = make_client("alice"), make_client("bob")
    bob.close()
    wait_peers(alice, {"alice"})
    with pytest.raises(RemoteError) as err:
        alice.send("bob", "still there?")
    assert err.value.code is ErrorCode.RECIPIENT_OFFLINE


def test_duplicate_id_is_refused_while_online(make_client):
    make_client("alice")
    impostor = make_client("alice", connect=False)
    with pytest.raises(RemoteError) as err:
        impostor.connect(timeout=10)
    assert err.value.code is ErrorCode.ID_ONLINE  # the same key, a second process: online elsewhere, not taken
    assert "alice is already signed in on another connection" in err.value.message


def test_late_subscriber_gets_complete_peer_list(make_client):
    names = [f"user{i}" for i in range(20)]
    for name in names:
        make_client(name)
    late = make_client("late")
    wait_peers(late, set(names) | {"late"})


def test_silent_client_is_expired_and_announced_offline(make_client, broker):
    alice = make_client("alice")
    bob = make_client("bob")
    wait_peers(alice, {"alice", "bob"})
    # Freeze bob's agent without an UNREGISTER: the broker must notice the silence.
    bob._session.on_tick = lambda now: []  # type: ignore[method-assign]
    bob._session.next_deadline = lambda: float("inf")  # type: ignore[method-assign]
    wait_peers(alice, {"alice"})
    wait_until(lambda: any("expired" in line and "user=bob" in line for line in broker.lines),
               what="the broker to log the expiry")


def test_clients_recover_by_themselves_after_broker_restart(make_client, broker):
    alice, bob = make_client("alice"), make_client("bob")
    wait_peers(alice, {"alice", "bob"})
    broker.kill()
    wait_for(alice, lambda e: isinstance(e, ev.Reconnecting))
    broker.start()
    wait_for(alice, lambda e: isinstance(e, ev.Registered) and e.reconnect)
    wait_for(bob, lambda e: isinstance(e, ev.Registered) and e.reconnect)
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "after restart")
    event = wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert event.text == "after restart"


def test_close_is_prompt_and_idempotent(make_client):
    alice = make_client("alice")
    alice.close()
    alice.close()
    assert not alice._thread.is_alive()


def test_with_sealing_off_messages_and_files_travel_as_sent(make_client, tmp_path):
    alice = make_client("alice", encrypt=False)
    bob = make_client("bob", encrypt=False, received_dir=tmp_path / "got")
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "plain hello")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "plain hello"
    source = tmp_path / "notes.txt"
    source.write_bytes(b"unsealed file\n" * 1000)
    alice.send_file("bob", source)
    received = wait_for(bob, lambda e: isinstance(e, ev.FileReceived))
    assert received.path.read_bytes() == source.read_bytes()
    assert alice.e2e.pinned_key("bob") is None  # no keys asked for or pinned with sealing off
