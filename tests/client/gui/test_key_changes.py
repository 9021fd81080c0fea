"""A contact reinstalls (issue 15, points 1 and 4), seen in the window: a message bob cannot open says so and is
delivered once alice has seen the change and pressed Continue; what waited both ways goes then, without a
reconnect; the key can be verified later; the setting to accept new keys automatically still tells."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_ACCEPT_FILES,
    K_ACCEPT_KEY,
    K_CONNECT,
    K_DEVICE_SAFETY,
    K_SAFETY,
    K_DISCONNECT,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_INFO,
    K_KEY_NOTICE,
    K_KEY_NOTICE_TITLE,
    K_MARK_VERIFIED,
    K_NOTICE_OK,
    K_PEER_KEY,
    K_SETTINGS_NOTE,
    K_TRUST_KEYS,
)
from p2pchat.client.gui.settings import SettingsStore  # noqa: E402
from p2pchat.common.crypto import fingerprint, safety_number  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import act, click, meet, select_peer, state, type_and_press  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

HELD = "waiting — accept bob's new key to send"


def banner(window) -> str:
    return window.window[K_KEY_BANNER_TEXT].get() if window.shown(K_KEY_BANNER) else ""


def test_a_message_to_a_reinstalled_bob_waits_and_is_delivered_after_continue(make_window, reinstalled_bob):
    """alice fetches bob's devices before sealing, so she sees his new key first: nothing is sealed to the old one
    (a message already in flight is refused by bob and shown so: test_model.py, and test_recovery.py end to end)."""
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(alice, "are you there?")
    pump([alice, bob], lambda: state(alice, "bob", "are you there?")[0] == HELD, "alice's message held")
    assert "Waiting: 1 message to send." in banner(alice)
    assert "bob may have reinstalled p2p-chat, set up a new device or recovered their account" in banner(alice)
    assert "are you there?" not in bob.conversation_text()

    client = alice.client
    click(alice, K_ACCEPT_KEY)  # Continue
    pump([alice, bob], lambda: state(alice, "bob", "are you there?")[0] == "delivered ✓✓",
         "delivered after Continue")
    assert bob.conversation_text().count("are you there?") == 1 and alice.client is client
    assert not alice.shown(K_KEY_BANNER)
    assert alice.window[K_PEER_KEY].get() == f"not verified · key {fingerprint(bob.client.identity.public)}"


def test_messages_held_both_ways_go_after_continue_without_reconnecting(make_window, reinstalled_bob):
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(bob, "it's me, on a new laptop")
    pump([alice, bob], lambda: "Waiting: 1 received message to show." in banner(alice), "bob's message held")
    type_and_press(alice, "who is this?")
    pump([alice, bob], lambda: state(alice, "bob", "who is this?")[0] == "waiting — accept bob's new key to send",
         "alice's message held")
    assert "Waiting: 1 message to send, 1 received message to show." in banner(alice)
    assert "new laptop" not in alice.conversation_text() and "who is this?" not in bob.conversation_text()

    client = alice.client
    click(alice, K_ACCEPT_KEY)
    pump([alice, bob], lambda: "new laptop" in alice.conversation_text() and "who is this?" in bob.conversation_text()
         and state(alice, "bob", "who is this?")[0] == "delivered ✓✓", "both messages after Continue")
    assert alice.client is client and "Reconnect" not in alice.log_text()


def test_a_held_message_waits_again_after_a_restart_and_goes_after_continue(make_window, reinstalled_bob):
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(alice, "are you there?")
    pump([alice, bob], lambda: state(alice, "bob", "are you there?")[0] == HELD, "alice's message held")
    alice.close()  # quits without deciding

    again = make_window("alice")
    select_peer(again, "bob", [bob])
    pump([again, bob], lambda: again.shown(K_KEY_BANNER), "the change again")
    assert state(again, "bob", "are you there?")[0] == HELD
    click(again, K_ACCEPT_KEY)
    pump([again, bob], lambda: state(again, "bob", "are you there?")[0] == "delivered ✓✓", "delivered")


def test_a_key_accepted_with_continue_can_be_verified_later(make_window, reinstalled_bob):
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(bob, "hello from my new install")
    pump([alice, bob], lambda: alice.shown(K_KEY_BANNER), "the change")
    click(alice, K_ACCEPT_KEY)
    pump([alice, bob], lambda: "new install" in alice.conversation_text(), "bob's message")
    bobs_key = fingerprint(bob.client.identity.public)
    assert alice.window[K_PEER_KEY].get() == f"not verified · key {bobs_key}"

    # bob's reinstall made him a new account key: accepting his key pins it afresh from his next device list
    pump([alice, bob], lambda: alice.client.account_of("bob") is not None, "bob's new account key at alice")
    for window in (alice, bob):  # later, on a call: both open Verify and read the safety number
        click(window, K_KEY_INFO)
    assert alice.window[K_SAFETY].get() == bob.window[K_SAFETY].get()  # one number for their two accounts
    assert alice.window[K_DEVICE_SAFETY].get() == bob.window[K_DEVICE_SAFETY].get() == safety_number(
        alice.client.identity.public, bob.client.identity.public)
    assert alice.window[K_MARK_VERIFIED].get_text() == "Mark as verified"
    click(alice, K_MARK_VERIFIED)
    assert alice.window[K_PEER_KEY].get() == f"✓ verified · key {bobs_key}" and "marked bob's key as verified" in \
        alice.log_text()
    click(alice, K_MARK_VERIFIED)  # "Clear verification"
    assert alice.window[K_PEER_KEY].get() == f"not verified · key {bobs_key}"


def test_the_setting_receive_files_on_this_device_applies_at_the_next_connect(make_window, home):
    alice = make_window("alice")
    assert alice.client.config.accept_files
    act(alice, alice.window[K_ACCEPT_FILES].Widget.invoke)  # untick "Receive files on this device"
    pump([alice], lambda: alice.window[K_SETTINGS_NOTE].get() == "applies when you reconnect", "the note")
    assert not SettingsStore(home / "gui.json").load().accept_files
    click(alice, K_DISCONNECT)
    click(alice, K_CONNECT)
    pump([alice], lambda: alice.status_text().startswith("Connected"), "alice to connect again")
    assert not alice.client.config.accept_files and alice.window[K_SETTINGS_NOTE].get() == ""


def test_the_setting_accepts_new_keys_at_once_and_still_tells(make_window, reinstalled_bob, home):
    alice = make_window("alice")
    act(alice, alice.window[K_TRUST_KEYS].Widget.invoke)  # tick "Accept new keys at once"
    pump([alice], lambda: alice.window[K_SETTINGS_NOTE].get() == "applies when you reconnect", "the note")
    assert SettingsStore(home / "gui.json").load().trust_key_changes
    click(alice, K_DISCONNECT)
    click(alice, K_CONNECT)
    pump([alice], lambda: alice.status_text().startswith("Connected"), "alice to connect again")
    assert alice.client.config.trust_key_changes and alice.window[K_SETTINGS_NOTE].get() == ""

    bob = make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(alice, "are you there?")
    pump([alice, bob], lambda: state(alice, "bob", "are you there?")[0] == "delivered ✓✓", "delivered, no Continue")
    assert alice.shown(K_KEY_NOTICE) and not alice.shown(K_KEY_BANNER)
    assert alice.window[K_KEY_NOTICE_TITLE].get() == "bob's key changed and was accepted automatically"
    assert "accepted automatically" in alice.log_text()
    click(alice, K_NOTICE_OK)
    assert not alice.shown(K_KEY_NOTICE)


def test_a_key_verified_in_another_process_lets_what_waited_go_and_shows_verified(make_window, reinstalled_bob):
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(bob, "verify me from your terminal")
    pump([alice, bob], lambda: alice.shown(K_KEY_BANNER), "the change")
    done = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "verify", "--user", "alice", "--peer", "bob",
                           "--yes"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pump([alice, bob], lambda: "from your terminal" in alice.conversation_text() and not alice.shown(K_KEY_BANNER),
         "the held message, and the banner gone")
    assert alice.window[K_PEER_KEY].get() == f"✓ verified · key {fingerprint(bob.client.identity.public)}"
    assert "accepted outside this window" in alice.log_text()


def test_the_banner_says_what_the_broker_says_happened_a_recovery(make_window, broker, tmp_path):
    import os

    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    type_and_press(alice, "hi bob")  # alice pins bob's key
    pump([alice, bob], lambda: "hi bob" in bob.conversation_text(), "bob to get it")
    phrase = bob.client.recovery_phrase
    recovered = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "recover", "--user", "bob", "--server",
                                f"127.0.0.1:{broker.port}"], cwd=ROOT, input=phrase + "\n", text=True,
                               capture_output=True, timeout=60,
                               env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "bobs-new-machine")))
    assert recovered.returncode == 0, recovered.stderr
    pump([alice, bob], lambda: "recovery phrase" in banner(alice), "the banner to name the recovery")
    assert banner(alice).startswith("The broker says bob moved their account to a new key with their recovery "
                                    "phrase — if bob did not, someone else has that phrase.")
