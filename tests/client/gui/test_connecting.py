"""Signing in from the connect panel, and out again; losing the broker and getting it back; the command line."""

from __future__ import annotations

import argparse
import json
import time

import pytest

sg = pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.chat_client import ClientConfig  # noqa: E402
from p2pchat.client.gui.app import open_window  # noqa: E402
from p2pchat.client.gui.layout import K_CONNECT, K_HOST, K_PEOPLE_COUNT, K_PORT, K_THEME, K_USER  # noqa: E402
from p2pchat.client.gui.settings import ConnectTarget, FormError, validate_connect  # noqa: E402
from p2pchat.client.gui.window import GuiOptions  # noqa: E402
from p2pchat.client.recovery import recover_user  # noqa: E402
from p2pchat.common.endpoints import ServerAddress  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import click, meet, shows, type_and_press  # noqa: E402
from tests.conftest import HEARTBEAT  # noqa: E402


def test_closing_a_window_signs_the_user_out(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    bob.window.write_event_value(sg.WINDOW_CLOSE_ATTEMPTED_EVENT, None)  # what the title bar's X sends
    pump([bob], lambda: bob.finished, "bob's window to close")
    assert bob.client is None and bob.step() is False
    pump([alice], lambda: "nobody else online" in alice.window[K_PEOPLE_COUNT].get(), "bob to leave")


def test_the_empty_pane_follows_who_is_online(make_window):
    alice = make_window("alice")
    pump([alice], lambda: "Nobody else is online yet." in alice.conversation_text(), "the empty pane's hint")
    bob = make_window("bob")
    pump([alice, bob], lambda: "Pick someone on the left" in alice.conversation_text(), "the hint once bob is online")
    bob.window.write_event_value(sg.WINDOW_CLOSE_ATTEMPTED_EVENT, None)
    pump([alice, bob], lambda: "Nobody else is online yet." in alice.conversation_text(), "the hint once bob left")


def test_invalid_connect_input_shows_an_inline_message(make_window):
    window = make_window(connect=False)
    cases = [
        ("", "5555", "alice", "Enter the broker's host name"),
        ("127.0.0.1", "99999", "alice", "Port must be a number from 1 to 65534."),
        ("127.0.0.1", "port", "alice", "Port must be a number"),
        ("127.0.0.1", "5555", "", "Choose a user ID."),
        ("127.0.0.1", "5555", "bad id!", "User IDs are 1–32 letters"),
    ]
    for host, port, user, message in cases:
        window.window[K_HOST].update(host)
        window.window[K_PORT].update(port)
        window.window[K_USER].update(user)
        click(window, K_CONNECT)
        pump([window], lambda: message in window.form_error(), f"the message {message!r}")
        assert window.client is None and window.status_text() == "Offline not connected"


def test_enter_in_the_user_field_connects(make_window, broker):
    window = make_window(connect=False)
    window.window[K_USER].update("carol")
    entry = window.window[K_USER].Widget
    entry.focus_force()
    entry.event_generate("<Return>")
    pump([window], lambda: window.status_text() == f"Connected carol @ 127.0.0.1:{broker.port}", "carol to connect")
    assert window.form_error() == ""


def test_a_taken_user_id_is_reported_in_the_connect_panel(make_window):
    make_window("alice")
    second = make_window(connect=False)
    second.window[K_USER].update("alice")
    second.submit_connect()
    pump([second], lambda: "already signed in" in second.form_error(), "the refusal")
    assert second.status_text().startswith("Offline")


def test_a_user_id_registered_with_another_key_is_explained_in_the_connect_panel(make_window, monkeypatch, tmp_path):
    make_window("bob").close()
    monkeypatch.setenv("P2PCHAT_HOME", str(tmp_path / "reinstalled"))  # bob reinstalls: a fresh key
    again = make_window(connect=False)
    again.window[K_USER].update("bob")
    again.submit_connect()
    pump([again], lambda: "registered with another key" in again.form_error(), "the refusal")
    assert "use your recovery phrase (p2pchat recover --user bob) or ask the broker's operator" in again.form_error()
    assert "already signed in" not in again.form_error() and again.status_text().startswith("Offline")


def test_a_new_identity_shows_its_recovery_phrase_once(make_window):
    erin = make_window("erin")
    phrase = erin.client.recovery_phrase
    assert "Your recovery phrase" in erin.log_text() and phrase in erin.log_text()
    erin.disconnect("Disconnected.")
    erin.submit_connect()
    pump([erin], lambda: erin.status_text().startswith("Connected"), "erin to connect again")
    assert erin.log_text().count(phrase) == 1


def test_a_window_whose_id_moved_to_another_key_is_signed_out_and_says_why(make_window, tmp_path):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    type_and_press(bob, "hello")
    pump([alice, bob], lambda: "hello" in alice.conversation_text(), "bob's message, which pins his key")
    new_machine = ClientConfig(server=bob.client.config.server, state_dir=tmp_path / "laptop")
    recover_user("bob", bob.client.recovery_phrase, new_machine)
    pump([alice, bob], lambda: "Signed out" in bob.form_error(), "bob's window to sign out")
    assert "was moved to another key with its recovery phrase" in bob.form_error()
    assert bob.status_text().startswith("Offline")
    # Alice is warned, and sending to bob waits until she accepts the new key.
    pump([alice], lambda: "bob  ⚠" in " ".join(alice.roster_text()), "the changed key at alice")
    assert "bob's key changed" in alice.log_text()


def test_broker_loss_shows_reconnecting_and_the_window_recovers(make_window, broker):
    alice = make_window("alice")
    broker.kill()
    pump([alice], lambda: alice.status_text().startswith("Reconnecting"), "the status bar to say reconnecting")

    # The window stays responsive while the broker is down: a click is handled at once.
    started = time.monotonic()
    click(alice, K_THEME)
    pump([alice], lambda: alice.settings.theme == "dark", "the theme switch", timeout=3.0)
    assert time.monotonic() - started < 3.0
    assert alice.status_text().startswith("Reconnecting")  # state survives the rebuilt window

    broker.start()
    pump([alice], lambda: alice.status_text().startswith("Connected"), "the status bar to recover")
    assert "Reconnected" in alice.log_text()


def test_a_stopped_client_returns_to_the_connect_panel_and_reconnects(make_window):
    alice = make_window("alice")

    def crash(now: float) -> list:
        raise RuntimeError("simulated bug")

    alice.client._session.on_tick = crash  # the agent's next loop turn fails
    pump([alice], lambda: "internal error" in alice.form_error(), "the stopped client to be reported")
    assert alice.status_text().startswith("Offline") and alice.client is None
    click(alice, K_CONNECT)
    pump([alice], lambda: alice.status_text().startswith("Connected"), "the reconnect")


def test_command_line_options_prefill_and_connect_at_once(display, broker, home):
    args = argparse.Namespace(server=f"127.0.0.1:{broker.port}", user="dave")
    window = open_window(args, GuiOptions(notifications=False, heartbeat_ivl=HEARTBEAT))
    try:
        pump([window], lambda: window.status_text().startswith("Connected"), "dave to connect")
        saved = json.loads((home / "gui.json").read_text())
        assert (saved["host"], saved["port"], saved["user"]) == ("127.0.0.1", broker.port, "dave")
    finally:
        window.close()
    again = open_window(argparse.Namespace(server=None, user=None), GuiOptions(notifications=False))
    try:  # the next run remembers the last connection but waits to be asked
        assert (again.window[K_HOST].get(), again.window[K_PORT].get(), again.window[K_USER].get()) == \
            ("127.0.0.1", str(broker.port), "dave")
        assert again.status_text() == "Offline not connected"
    finally:
        again.close()


def test_a_bad_server_option_is_shown_in_the_panel_not_raised(display, home):
    window = open_window(argparse.Namespace(server="nohost", user="erin"), GuiOptions(notifications=False))
    try:
        assert "server must be HOST:PORT" in window.form_error()
        assert window.client is None
    finally:
        window.close()


# --- the connect form's checks, without a display ---------------------------------------------
def test_connect_form_accepts_a_good_target():
    assert validate_connect(" example.org ", "7000", "alice") == ConnectTarget(ServerAddress("example.org", 7000), "alice")


@pytest.mark.parametrize("host, port, user, bad_field", [
    ("", "5555", "a", "host"), ("a b", "5555", "a", "host"), ("h", "0", "a", "port"),
    ("h", "65535", "a", "port"), ("h", "-1", "a", "port"), ("h", "5555", "", "user"),
    ("h", "5555", "-x", "user"), ("h", "5555", "x" * 33, "user"),
])
def test_connect_form_names_the_first_bad_field(host, port, user, bad_field):
    result = validate_connect(host, port, user)
    assert isinstance(result, FormError) and result.field == bad_field and result.message
