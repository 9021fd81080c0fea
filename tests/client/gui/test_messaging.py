"""Messages between windows: sending, the outbox while the broker is away, delivery and read states, history."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_COMPOSER,
    K_CONNECT,
    K_DISCONNECT,
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_RECEIPTS,
    K_SETTINGS_NOTE,
)
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import act, click, line_of, meet, select_peer, shows, state, type_and_press  # noqa: E402


def test_two_windows_meet_exchange_messages_and_see_the_peer_leave(make_window, broker):
    alice, bob = make_window("alice"), make_window("bob")
    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to list the other online")

    select_peer(alice, "bob", both)
    type_and_press(alice, "hello bob")
    pump(both, lambda: "delivered ✓✓" in alice.conversation_text(), "bob's delivery receipt in alice's window")
    assert "hello bob" in alice.conversation_text()
    assert alice.window[K_COMPOSER].Widget.get("1.0", "end-1c") == ""

    pump(both, lambda: "●  alice  1" in bob.roster_text(), "an unread count on bob's side")
    select_peer(bob, "alice", both)
    assert "hello bob" in bob.conversation_text()
    assert "●  alice" in bob.roster_text()  # opening the conversation cleared the count

    type_and_press(bob, "line one", "<Shift-Return>")
    pump(both, lambda: bob.window[K_COMPOSER].Widget.get("1.0", "end-1c") == "line one\n", "Shift+Enter's newline")
    type_and_press(bob, "line two")
    pump(both, lambda: "line one\nline two" in alice.conversation_text(), "bob's two-line message at alice")

    click(bob, K_DISCONNECT)
    pump(both, lambda: shows(alice, "bob", "○"), "bob to show as offline at alice")
    assert "bob went offline" in alice.log_text()
    assert "offline" in alice.window[K_PEER_PRESENCE].get()
    assert bob.status_text() == f"Offline disconnected from 127.0.0.1:{broker.port}"


def test_people_with_digits_only_ids_can_be_picked(make_window):
    alice, agent = make_window("alice"), make_window("007")
    pump([alice, agent], lambda: shows(alice, "007", "●"), "007 online at alice")
    select_peer(alice, "007", [alice, agent])
    assert alice.window[K_PEER_NAME].get() == "007"


def test_message_sent_while_the_broker_is_down_waits_in_the_outbox_then_goes(make_window, broker):
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    select_peer(alice, "bob", [alice, bob])
    pump([alice, bob], lambda: shows(bob, "alice", "●"), "alice online at bob")
    select_peer(bob, "alice", [alice, bob])
    broker.kill()
    pump([alice], lambda: alice.status_text().startswith("Reconnecting"), "alice to notice")
    type_and_press(alice, "anyone there?")
    pump([alice], lambda: "anyone there?   sending…" in alice.conversation_text(), "the sending state")
    broker.start()
    pump([alice, bob], lambda: "anyone there?" in bob.conversation_text(), "bob to get it after the restart")
    pump([alice, bob], lambda: "sending…" not in alice.conversation_text(), "alice to see it acknowledged")


def test_a_message_too_large_to_send_is_marked_failed(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    select_peer(alice, "bob", [alice, bob])
    type_and_press(alice, "x" * 70_000)
    pump([alice], lambda: "failed — message too large" in alice.conversation_text(), "the refusal")


def test_the_sender_sees_delivered_then_read_when_the_recipient_opens_the_conversation(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to see the other")
    select_peer(alice, "bob", both)
    type_and_press(alice, "did the deploy finish?")
    pump(both, lambda: state(alice, "bob", "did the deploy finish?") == ("delivered ✓✓", "meta"),
         "delivered at alice")
    pump(both, lambda: "●  alice  1" in bob.roster_text(), "the message as unread at bob")
    assert state(alice, "bob", "did the deploy finish?")[0] == "delivered ✓✓"  # bob has not looked yet

    select_peer(bob, "alice", both)
    pump(both, lambda: state(alice, "bob", "did the deploy finish?") == ("read ✓✓", "meta-read"), "read at alice")


def test_with_read_receipts_off_the_sender_never_sees_read(make_window, home):
    alice, bob = make_window("alice"), make_window("bob")
    act(bob, bob.window[K_RECEIPTS].Widget.invoke)  # untick "Send read receipts"
    pump([bob], lambda: bob.settings.read_receipts is False, "the setting")
    assert json.loads((home / "gui.json").read_text())["read_receipts"] is False
    assert bob.window[K_SETTINGS_NOTE].get() == "applies when you reconnect"
    click(bob, K_DISCONNECT)
    click(bob, K_CONNECT)
    pump([bob], lambda: bob.status_text().startswith("Connected"), "bob to connect again")
    assert bob.window[K_SETTINGS_NOTE].get() == "" and not bob.window[K_RECEIPTS].get()

    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to see the other")
    select_peer(alice, "bob", both)
    type_and_press(alice, "first")
    pump(both, lambda: state(alice, "bob", "first")[0] == "delivered ✓✓", "first delivered")
    select_peer(bob, "alice", both)  # bob reads it: recorded on his side only
    pump(both, lambda: [e.state for e in bob.history.conversation("alice")] == ["read"], "bob's history")
    type_and_press(alice, "second")
    # A read receipt for "first" would have left bob before the delivery receipt for "second".
    pump(both, lambda: state(alice, "bob", "second")[0] == "delivered ✓✓", "second delivered")
    assert state(alice, "bob", "first") == ("delivered ✓✓", "meta")


def test_history_from_an_earlier_run_shows_after_signing_in_again(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    type_and_press(alice, "restarting the broker now")
    pump([alice, bob], lambda: "restarting the broker now" in bob.conversation_text(), "alice's message at bob")
    type_and_press(bob, "ok, ping me after")  # replying is reading: alice's message becomes read
    pump([alice, bob], lambda: "ok, ping me after" in alice.conversation_text()
         and state(alice, "bob", "restarting the broker now")[0] == "read ✓✓", "the reply and the read receipt")
    sent_at = line_of(alice, "bob", "restarting the broker now").ts_ms
    alice.close()
    bob.close()

    again = make_window("alice")  # same user, same home: a new run
    assert "○  bob  1" in again.roster_text()  # offline, with the reply alice never looked at
    select_peer(again, "bob", [])
    text = again.conversation_text()
    assert text.index("restarting the broker now") < text.index("ok, ping me after")
    assert time.strftime("%H:%M", time.localtime(sent_at / 1000)) in text
    assert state(again, "bob", "restarting the broker now") == ("read ✓✓", "meta-read")
    assert again.roster_text() == ["○  bob"]
