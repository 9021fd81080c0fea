"""Keys in the window: the broker's fingerprint, safety numbers, a changed key that holds messages until seen."""

from __future__ import annotations

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_ACCEPT_KEY,
    K_ATTACH,
    K_COMPARE_KEY,
    K_COMPOSER_NOTE,
    K_CONNECT,
    K_DEVICE_SAFETY,
    K_DISCONNECT,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_INFO,
    K_KEY_PANEL,
    K_KEY_PANEL_TITLE,
    K_MARK_VERIFIED,
    K_OWN_FP,
    K_PEER_DEVICES,
    K_PEER_FP,
    K_PEER_KEY,
    K_SAFETY,
    K_USER,
    K_VERIFIED_STATE,
)
from p2pchat.client.storage.trust import VERIFIED_KEYS, KeyStore, VerifiedKeys  # noqa: E402
from p2pchat.common.crypto import Identity, account_safety_number, fingerprint  # noqa: E402
from p2pchat.common.paths import user_dir  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import click, meet, select_peer, state, type_and_press  # noqa: E402


def bob_writes_with_another_key(make_window, text: str):
    """alice and bob meet, alice with another key pinned for bob (as if he had reinstalled), and bob writes
    ``text``: alice's window warns of the change. Returns both windows."""
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    alice.client.e2e._pinned.put("bob", Identity.generate().public)
    alice.client.e2e.forget_devices()  # the list fetched before vouches for the real key
    type_and_press(bob, text)
    pump([alice, bob], lambda: alice.shown(K_KEY_BANNER), "the warning at alice")
    return alice, bob


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
    pump([alice, bob], lambda: alice.window[K_PEER_KEY].get() == f"not verified · key {bobs_key}",
         "bob's key in alice's header")
    assert bob.window[K_PEER_KEY].get() == f"not verified · key {fingerprint(alice.client.identity.public)}"

    for window in (alice, bob):
        click(window, K_KEY_INFO)
        assert window.shown(K_KEY_PANEL)
    # Both account keys are known (each side pinned the other's with their devices): one number per account.
    bobs_account = bob.client.account_of("bob")
    assert alice.window[K_PEER_FP].get() == bob.window[K_OWN_FP].get() == fingerprint(bobs_account)
    number = alice.window[K_SAFETY].get()
    assert number == bob.window[K_SAFETY].get() == account_safety_number(alice.client.account_of("alice"),
                                                                         bobs_account)
    assert alice.window[K_KEY_PANEL_TITLE].get() == "VERIFY BOB · ONE NUMBER FOR THEIR ACCOUNT"
    assert alice.window[K_PEER_DEVICES].get() == f"device 1 · {bobs_key}"  # the devices the number covers
    click(alice, K_KEY_INFO)
    assert not alice.shown(K_KEY_PANEL)


def test_a_changed_peer_key_is_explained_and_what_is_written_meanwhile_waits_for_continue(make_window):
    alice, bob = bob_writes_with_another_key(make_window, "it's me, with a new laptop")
    assert "Waiting: 1 received message to show." in alice.window[K_KEY_BANNER_TEXT].get()
    assert "bob's key changed" in alice.log_text() and "●  bob  ⚠" in alice.roster_text()
    banner = alice.window[K_KEY_BANNER_TEXT].get()
    assert "bob may have reinstalled p2p-chat, set up a new device or recovered their account" in banner
    assert "it's me" not in alice.conversation_text()  # sealed with a key alice has not accepted yet

    # Writing is not blocked: what alice sends waits, and says so; files do not wait, so Attach is off.
    assert alice.shown(K_COMPOSER_NOTE) and "waits until you press Continue" in alice.window[K_COMPOSER_NOTE].get()
    assert alice.window[K_ATTACH].Widget.cget("state") == "disabled"
    type_and_press(alice, "who is this?")
    pump([alice, bob], lambda: state(alice, "bob", "who is this?") == (
        "waiting — accept bob's new key to send", "meta-warn"), "alice's message waiting")
    assert "Waiting: 1 message to send, 1 received message to show." in \
        alice.window[K_KEY_BANNER_TEXT].get()
    assert alice.window[K_PEER_KEY].get() == "key changed"

    client = alice.client
    click(alice, K_ACCEPT_KEY)  # Continue: both go at once, on the same connection
    pump([alice, bob], lambda: "it's me" in alice.conversation_text() and "who is this?" in bob.conversation_text()
         and state(alice, "bob", "who is this?")[0] == "delivered ✓✓", "both messages after Continue")
    assert alice.client is client and not alice.shown(K_KEY_BANNER) and not alice.shown(K_COMPOSER_NOTE)
    assert alice.window[K_PEER_KEY].get() == f"not verified · key {fingerprint(bob.client.identity.public)}"
    assert "●  bob" in alice.roster_text() and "⚠" not in " ".join(alice.roster_text())


def test_verifying_from_the_banner_compares_the_new_key_accepts_it_and_marks_it_verified(make_window):
    alice, bob = bob_writes_with_another_key(make_window, "check my key")
    click(alice, K_COMPARE_KEY)  # Verify…
    click(bob, K_KEY_INFO)
    assert alice.shown(K_KEY_PANEL) and alice.window[K_PEER_FP].get() == fingerprint(bob.client.identity.public)
    # alice checks bob's new key before accepting it: the number of their two devices, which bob (no change to
    # decide) sees beside their accounts' number.
    assert alice.window[K_SAFETY].get() == bob.window[K_DEVICE_SAFETY].get()
    assert alice.window[K_KEY_PANEL_TITLE].get() == "VERIFY BOB · PER DEVICE"
    assert alice.window[K_MARK_VERIFIED].get_text() == "Mark as verified and continue"

    click(alice, K_MARK_VERIFIED)
    pump([alice, bob], lambda: "check my key" in alice.conversation_text(), "bob's message once accepted")
    assert not alice.shown(K_KEY_BANNER)
    assert alice.window[K_PEER_KEY].get() == f"✓ verified · key {fingerprint(bob.client.identity.public)}"
    assert alice.window[K_VERIFIED_STATE].get() == "✓ verified"
    assert VerifiedKeys(user_dir("alice") / VERIFIED_KEYS).is_verified("bob", bob.client.identity.public)


def test_a_key_change_left_unaccepted_is_shown_again_after_a_restart(make_window):
    alice, bob = bob_writes_with_another_key(make_window, "hello again")
    alice.close()  # the user quits without deciding

    again = make_window("alice")
    pump([again, bob], lambda: "●  bob  ⚠" in again.roster_text(), "the pending change in the people list")
    select_peer(again, "bob", [bob])
    assert again.shown(K_KEY_BANNER) and again.shown(K_COMPOSER_NOTE)


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
