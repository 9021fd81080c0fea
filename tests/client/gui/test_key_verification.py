"""Keys in the window: the broker's fingerprint, safety numbers, a changed key that blocks sending until accepted."""

from __future__ import annotations

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_ACCEPT_KEY,
    K_ATTACH,
    K_COMPARE_KEY,
    K_COMPOSER_NOTE,
    K_CONNECT,
    K_DISCONNECT,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_INFO,
    K_KEY_PANEL,
    K_OWN_FP,
    K_PEER_FP,
    K_PEER_KEY,
    K_SAFETY,
    K_SEND,
    K_USER,
)
from p2pchat.client.storage.trust import KeyStore  # noqa: E402
from p2pchat.common.crypto import Identity, fingerprint  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import click, meet, select_peer, type_and_press  # noqa: E402


def test_status_bar_shows_the_brokers_key_fingerprint(make_window, broker, home):
    alice = make_window("alice")
    pinned = KeyStore(home / "known_brokers.json").get(f"127.0.0.1:{broker.port}")
    assert pinned is not None
    assert alice.key_status_text().endswith(f"encrypted · broker key {fingerprint(pinned)}")
    click(alice, K_DISCONNECT)
    pump([alice], lambda: alice.status_text().startswith("Offline"), "the disconnect")
    assert alice.key_status_text() == ""


def test_both_sides_see_the_same_safety_number(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    assert alice.window[K_PEER_KEY].get() == "key not known yet"
    type_and_press(alice, "hi")
    pump([alice, bob], lambda: "hi" in bob.conversation_text(), "the message")
    bobs_key = fingerprint(bob.client.identity.public)
    pump([alice, bob], lambda: alice.window[K_PEER_KEY].get() == f"key {bobs_key}", "bob's key in alice's header")
    assert bob.window[K_PEER_KEY].get() == f"key {fingerprint(alice.client.identity.public)}"

    for window in (alice, bob):
        click(window, K_KEY_INFO)
        assert window.shown(K_KEY_PANEL)
    assert alice.window[K_PEER_FP].get() == bob.window[K_OWN_FP].get() == bobs_key
    number = alice.window[K_SAFETY].get()
    assert len(number.replace(" ", "")) == 30 and number == bob.window[K_SAFETY].get()
    click(alice, K_KEY_INFO)
    assert not alice.shown(K_KEY_PANEL)


def test_a_changed_peer_key_warns_and_blocks_sending_until_accepted(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    alice.client.e2e._pinned.put("bob", Identity.generate().public)  # as if bob's key were another before
    type_and_press(bob, "it's me, with a new laptop")
    pump([alice, bob], lambda: alice.shown(K_KEY_BANNER), "the warning at alice")
    assert "bob's key changed" in alice.log_text() and "●  bob  ⚠" in alice.roster_text()
    assert f"is now {fingerprint(bob.client.identity.public)}" in alice.window[K_KEY_BANNER_TEXT].get()
    assert "it's me" not in alice.conversation_text()  # sealed with a key alice does not trust yet

    # Sending is blocked, and says why.
    assert alice.shown(K_COMPOSER_NOTE) and "until you accept their new key" in alice.window[K_COMPOSER_NOTE].get()
    assert alice.window[K_SEND].Widget.cget("state") == "disabled"
    assert alice.window[K_ATTACH].Widget.cget("state") == "disabled"
    type_and_press(alice, "who is this?")  # a disabled composer takes no text, and Enter sends nothing
    assert alice.model.conversation("bob").lines == []

    # What to compare before accepting: the new key, and the safety number bob sees on his side.
    assert alice.window[K_PEER_KEY].get() == "key changed"
    click(alice, K_COMPARE_KEY)
    click(bob, K_KEY_INFO)
    assert alice.shown(K_KEY_PANEL) and alice.window[K_PEER_FP].get() == fingerprint(bob.client.identity.public)
    assert alice.window[K_SAFETY].get() == bob.window[K_SAFETY].get()

    click(alice, K_ACCEPT_KEY)
    assert not alice.shown(K_KEY_BANNER) and not alice.shown(K_COMPOSER_NOTE)
    assert alice.window[K_PEER_KEY].get() == f"key {fingerprint(bob.client.identity.public)}"
    assert "●  bob" in alice.roster_text() and "⚠" not in " ".join(alice.roster_text())
    type_and_press(alice, "welcome back")
    pump([alice, bob], lambda: "welcome back" in bob.conversation_text(), "alice's message after accepting")


def test_a_key_change_left_unaccepted_is_shown_again_after_a_restart(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    alice.client.e2e._pinned.put("bob", Identity.generate().public)
    type_and_press(bob, "hello again")
    pump([alice, bob], lambda: alice.shown(K_KEY_BANNER), "the warning")
    alice.close()  # the user quits without deciding

    again = make_window("alice")
    pump([again, bob], lambda: "●  bob  ⚠" in again.roster_text(), "the pending change in the people list")
    select_peer(again, "bob", [bob])
    assert again.shown(K_KEY_BANNER) and again.window[K_SEND].Widget.cget("state") == "disabled"


def test_a_changed_broker_key_is_refused_in_the_connect_panel(make_window, broker, home):
    home.mkdir(parents=True, exist_ok=True)
    known = KeyStore(home / "known_brokers.json")
    known.put(f"127.0.0.1:{broker.port}", Identity.generate().public)  # pinned earlier, now different
    window = make_window(connect=False)
    window.window[K_USER].update("alice")
    click(window, K_CONNECT)
    pump([window], lambda: "Security warning" in window.form_error(), "the refusal")
    assert "key CHANGED" in window.form_error() and window.status_text().startswith("Offline")
    assert window.client is None


def test_a_tampered_message_is_reported_in_the_log(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    seal = bob.client.e2e.seal
    bob.client.e2e.seal = lambda *args: (lambda body: body[:-1] + bytes([body[-1] ^ 1]))(seal(*args))
    type_and_press(bob, "this one is altered on the way")
    pump([alice, bob], lambda: "failed its integrity check" in alice.log_text(), "the refusal in alice's log")
    assert "altered" not in alice.conversation_text()
