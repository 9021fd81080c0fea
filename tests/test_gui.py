"""The desktop GUI: real Tk windows (under Xvfb when there is no display), a real broker, real clients.

Every window lives on this test's thread, as Tk requires; tests step each
window's read loop (``ChatWindow.step``) until what a user would see on screen
matches, with a deadline instead of sleeps. Notifications are off unless a test
turns them on, so no popup can steal a step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sg = pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")
tkinter = pytest.importorskip("tkinter", reason="the desktop GUI needs tkinter")

from client.gui import open_window  # noqa: E402
from client.gui_model import ChatModel, Delivery, Link, describe_failure, should_notify  # noqa: E402
from client.gui_settings import (  # noqa: E402
    ConnectTarget,
    FormError,
    GuiSettings,
    SettingsStore,
    validate_connect,
)
from client.gui_theme import DARK  # noqa: E402
from client.gui_layout import (  # noqa: E402
    K_COMPOSER,
    K_CONNECT,
    K_DISCONNECT,
    K_HOST,
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_PEERS,
    K_PEOPLE_COUNT,
    K_PORT,
    K_THEME,
    K_USER,
)
from client.gui_window import ChatWindow, GuiOptions  # noqa: E402
from common.endpoints import ServerAddress  # noqa: E402
from common.errors import ErrorCode, RemoteError  # noqa: E402
from tests.conftest import HEARTBEAT, BrokerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each run writes here (git-ignored); docs/screenshots holds the copies the README shows.
SCREENSHOTS = Path(os.environ.get("P2PCHAT_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
STEP_MS = 20  # how long one idle window may hold the loop before the next gets its turn


# --- display and window fixtures ------------------------------------------------------------
@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """The existing DISPLAY, or a private Xvfb on a free display number for this module."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("no DISPLAY and Xvfb is not installed (apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    # -displayfd: Xvfb picks a free display number and writes it once it accepts connections.
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    try:
        while not number.endswith(b"\n"):
            chunk = os.read(read_fd, 16)  # EOF if Xvfb died before it was ready
            if not chunk:
                pytest.fail(f"Xvfb exited with {xvfb.wait(5)} before it was ready")
            number += chunk
    finally:
        os.close(read_fd)
    os.environ["DISPLAY"] = f":{number.decode().strip()}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        # Tk dies with the X server if its root is still connected: destroy it first.
        root = sg.Window.hidden_master_root
        if root is not None:
            root.destroy()
            sg.Window.hidden_master_root = None
        del os.environ["DISPLAY"]
        xvfb.terminate()
        xvfb.wait(10)


def pump(windows: list[ChatWindow], until: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Step every open window's event loop until ``until()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        for window in windows:
            if not window.finished:
                window.step(STEP_MS)


@pytest.fixture
def make_window(display: str, broker: BrokerProcess, home: Path) -> Iterator[Callable[..., ChatWindow]]:
    windows: list[ChatWindow] = []

    def make(user: str = "", connect: bool = True, notifications: bool = False, send_timeout: float = 10.0) -> ChatWindow:
        settings = GuiSettings(host="127.0.0.1", port=broker.port, user=user)
        options = GuiOptions(notifications=notifications, heartbeat_ivl=HEARTBEAT, toast_ms=60_000,
                             send_timeout=send_timeout)
        window = ChatWindow(settings, store=SettingsStore(home / "gui.json"), options=options)
        windows.append(window)
        if connect:
            window.submit_connect()
            pump([window], lambda: window.status_text().startswith("Connected"), f"{user} to connect")
        return window

    yield make
    for window in windows:
        window.close()


def select_peer(window: ChatWindow, peer: str, others: list[ChatWindow]) -> None:
    """Click a row of the people list (a real Treeview selection, through the window's own events)."""
    tree = window.window[K_PEERS].Widget
    rows = window.roster_text()
    index = next(i for i, row in enumerate(rows) if row.split()[1] == peer)
    tree.selection_set(tree.get_children()[index])
    pump([window, *others], lambda: window.model.active == peer, f"{peer}'s conversation to open")


def type_and_press(window: ChatWindow, text: str, key: str = "<Return>") -> None:
    """Type into the composer and press a key, as the keyboard would."""
    composer = window.window[K_COMPOSER].Widget
    composer.focus_force()
    composer.insert("insert", text)
    composer.event_generate(key)


def shows(window: ChatWindow, peer: str, marker: str) -> bool:
    return any(row.split()[:2] == [marker, peer] for row in window.roster_text())


# --- end to end -------------------------------------------------------------------------
def test_two_windows_meet_exchange_messages_and_see_the_peer_leave(make_window, broker):
    alice, bob = make_window("alice"), make_window("bob")
    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to list the other online")

    select_peer(alice, "bob", both)
    type_and_press(alice, "hello bob")
    pump(both, lambda: "sent ✓" in alice.conversation_text(), "the broker's ack in alice's window")
    assert "hello bob" in alice.conversation_text()
    assert alice.window[K_COMPOSER].Widget.get("1.0", "end-1c") == ""

    pump(both, lambda: "●  alice  1" in bob.roster_text(), "an unread count on bob's side")
    select_peer(bob, "alice", both)
    assert "hello bob" in bob.conversation_text()
    assert "●  alice" in bob.roster_text()  # opening the conversation cleared the count

    type_and_press(bob, "line one")
    type_and_press(bob, "", "<Shift-Return>")
    pump(both, lambda: bob.window[K_COMPOSER].Widget.get("1.0", "end-1c") == "line one\n", "Shift+Enter's newline")
    type_and_press(bob, "line two")
    pump(both, lambda: "line one\nline two" in alice.conversation_text(), "bob's two-line message at alice")

    bob.window[K_DISCONNECT].click()
    pump(both, lambda: shows(alice, "bob", "○"), "bob to show as offline at alice")
    assert "bob went offline" in alice.log_text()
    assert "offline" in alice.window[K_PEER_PRESENCE].get()
    assert bob.status_text() == f"Offline disconnected from 127.0.0.1:{broker.port}"


def test_closing_a_window_signs_the_user_out(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    bob.window.write_event_value(sg.WINDOW_CLOSE_ATTEMPTED_EVENT, None)  # what the title bar's X sends
    pump([bob], lambda: bob.finished, "bob's window to close")
    assert bob.client is None and bob.step() is False
    pump([alice], lambda: "nobody else online" in alice.window[K_PEOPLE_COUNT].get(), "bob to leave")


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
        window.window[K_CONNECT].click()
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


def test_broker_loss_shows_reconnecting_and_the_window_recovers(make_window, broker):
    alice = make_window("alice")
    broker.kill()
    pump([alice], lambda: alice.status_text().startswith("Reconnecting"), "the status bar to say reconnecting")

    # The window stays responsive while the broker is down: a click is handled at once.
    started = time.monotonic()
    alice.window[K_THEME].click()
    pump([alice], lambda: alice.settings.theme == "dark", "the theme switch", timeout=3.0)
    assert time.monotonic() - started < 3.0
    assert alice.status_text().startswith("Reconnecting")  # state survives the rebuilt window

    broker.start()
    pump([alice], lambda: alice.status_text().startswith("Connected"), "the status bar to recover")
    assert "Reconnected" in alice.log_text()


def test_message_sent_while_the_broker_is_down_shows_sending_then_failed(make_window, broker):
    alice, bob = make_window("alice", send_timeout=1.0), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    select_peer(alice, "bob", [alice, bob])
    broker.kill()
    pump([alice], lambda: alice.status_text().startswith("Reconnecting"), "alice to notice")
    type_and_press(alice, "anyone there?")
    pump([alice], lambda: "anyone there?   sending…" in alice.conversation_text(), "the sending state")
    pump([alice], lambda: "failed: no answer from the broker" in alice.conversation_text(), "the failure")
    assert "Message to bob failed: no answer from the broker" in alice.log_text()


def test_a_message_too_large_to_send_is_marked_failed(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online at alice")
    select_peer(alice, "bob", [alice, bob])
    type_and_press(alice, "x" * 70_000)
    pump([alice], lambda: "failed: message too large" in alice.conversation_text(), "the refusal")


def test_people_with_digits_only_ids_can_be_picked(make_window):
    alice, agent = make_window("alice"), make_window("007")
    pump([alice, agent], lambda: shows(alice, "007", "●"), "007 online at alice")
    select_peer(alice, "007", [alice, agent])
    assert alice.window[K_PEER_NAME].get() == "007"


def test_message_from_another_conversation_pops_a_notification(make_window):
    alice = make_window("alice", notifications=True)
    bob, carol = make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(carol, "alice", "●"),
         "everyone online")
    select_peer(alice, "bob", everyone)
    select_peer(carol, "alice", everyone)
    type_and_press(carol, "psst, alice")
    pump(everyone, lambda: alice.toast is not None, "a notification at alice")
    toast = alice.toast
    assert toast is not None
    toast.window.TKroot.event_generate("<Button-1>")  # clicking it opens carol's conversation
    pump(everyone, lambda: alice.model.active == "carol", "the notification's conversation to open")
    assert "psst, alice" in alice.conversation_text()
    assert alice.toast is None


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


def test_theme_switch_is_remembered_for_the_next_run(display, home):
    first = open_window(argparse.Namespace(server=None, user=None), GuiOptions(notifications=False))
    try:
        first.window[K_THEME].click()
        pump([first], lambda: first.settings.theme == "dark", "the theme switch")
    finally:
        first.close()
    again = open_window(argparse.Namespace(server=None, user=None), GuiOptions(notifications=False))
    try:
        assert again.settings.theme == "dark"
        assert again.window.TKroot.cget("background").lower() == DARK.chat_bg.lower()
        assert again.window[K_THEME].get_text() == "Light theme"
    finally:
        again.close()


def test_a_bad_server_option_is_shown_in_the_panel_not_raised(display, home):
    window = open_window(argparse.Namespace(server="nohost", user="erin"), GuiOptions(notifications=False))
    try:
        assert "server must be HOST:PORT" in window.form_error()
        assert window.client is None
    finally:
        window.close()


def test_screenshots_of_both_themes(make_window):
    alice, bob, carol = make_window("alice"), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(bob, "alice", "●"),
         "everyone online")
    select_peer(bob, "alice", everyone)
    type_and_press(bob, "Hi Alice! Did the broker restart go fine last night?")
    pump(everyone, lambda: "●  bob  1" in alice.roster_text(), "bob's message")
    select_peer(alice, "bob", everyone)
    type_and_press(alice, "Yes, every client reconnected within a second.")
    type_and_press(alice, "", "<Shift-Return>")
    type_and_press(alice, "No messages lost.")
    pump(everyone, lambda: "sent ✓" in alice.conversation_text(), "alice's ack")
    type_and_press(bob, "Great, thanks for checking.")
    select_peer(carol, "alice", everyone)
    type_and_press(carol, "Lunch at 12?")
    pump(everyone, lambda: "Great, thanks" in alice.conversation_text() and "●  carol  1" in alice.roster_text(),
         "the rest of the conversation")

    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    for theme in ("light", "dark"):
        if alice.settings.theme != theme:
            alice.window[K_THEME].click()
            pump(everyone, lambda: alice.settings.theme == theme, f"the {theme} theme")
        screenshot(alice, f"gui-{theme}.png")
    signin = make_window(connect=False)
    signin.window[K_USER].update("bad id!")
    signin.window[K_CONNECT].click()
    pump([signin], lambda: "User IDs are" in signin.form_error(), "the inline message")
    screenshot(signin, "gui-connect.png")


def screenshot(window: ChatWindow, name: str) -> None:
    root = window.window.TKroot
    root.lift()
    root.update()
    root.winfo_pointerxy()  # a round trip: the X server has drawn everything Tk sent
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / name
    subprocess.run(["import", "-window", root.wm_frame(), str(target)], check=True, timeout=20,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert target.stat().st_size > 10_000


# --- the rules behind the window, without a display ----------------------------------------
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


def test_settings_round_trip_and_survive_a_damaged_file(tmp_path):
    store = SettingsStore(tmp_path / "gui.json")
    assert store.load() == GuiSettings()
    wanted = GuiSettings(host="10.0.0.2", port=7000, user="alice", theme="dark", notifications=False)
    store.save(wanted)
    assert store.load() == wanted
    store.path.write_text("{not json")
    assert store.load() == GuiSettings()
    store.path.write_text(json.dumps({"port": "7000", "theme": "purple", "user": "bob"}))
    assert store.load() == GuiSettings(user="bob")  # wrong types and unknown themes fall back


def test_unread_counts_and_roster_order():
    model = ChatModel("me")
    model.set_online(frozenset({"me", "zed", "amy"}))
    model.receive(b"1", "zed", "hi", 0)
    model.receive(b"2", "zed", "there", 0)
    model.receive(b"3", "gone", "bye", 0)  # talked to us, no longer online
    assert [(r.name, r.online, r.unread) for r in model.roster()] == [
        ("amy", True, 0), ("zed", True, 2), ("gone", False, 1)]
    model.open("zed")
    model.receive(b"4", "zed", "read at once", 0)
    assert model.conversation("zed").unread == 0


def test_delivery_goes_sending_then_sent_or_failed_once():
    model = ChatModel("me")
    sent = model.sending(b"a", "bob", "x", 0)
    failed = model.sending(b"b", "bob", "y", 0)
    assert model.acked(b"a") is sent and sent.delivery is Delivery.SENT
    assert model.failed(b"b", "recipient is offline") is failed and failed.delivery is Delivery.FAILED
    assert model.failed(b"a", "late") is None and sent.delivery is Delivery.SENT  # an ack is final
    assert model.acked(b"b") is None and model.pending() == []
    refused = model.refused("bob", "z", 0, "message too large")
    assert refused.delivery is Delivery.FAILED and refused.failure == "message too large"
    assert model.link is Link.OFFLINE


@pytest.mark.parametrize("enabled, focused, active, expected", [
    (True, True, "bob", False),  # already reading it
    (True, True, "carol", True),  # another conversation is open
    (True, True, None, True),
    (True, False, "bob", True),  # window in the background
    (False, False, "carol", False),  # turned off
])
def test_notification_rule(enabled, focused, active, expected):
    assert should_notify(enabled, focused, active, "bob") is expected


def test_notifications_can_be_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("P2PCHAT_GUI_NOTIFY", "0")
    assert GuiOptions.from_env().notifications is False
    monkeypatch.setenv("P2PCHAT_GUI_NOTIFY", "1")
    assert GuiOptions.from_env().notifications is True


def test_failure_descriptions_speak_chat():
    assert describe_failure(RemoteError("x", ErrorCode.RECIPIENT_OFFLINE)) == "recipient is offline"
    assert describe_failure(RemoteError("odd thing", ErrorCode.BAD_FRAME)) == "odd thing"
