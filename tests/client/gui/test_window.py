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
import tkinter as tk
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sg = pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")
tkinter = pytest.importorskip("tkinter", reason="the desktop GUI needs tkinter")

from p2pchat.client.gui.app import open_window  # noqa: E402
from p2pchat.client.gui.desktop import Desktop  # noqa: E402
from p2pchat.client.gui.filecard import FileCard  # noqa: E402
from p2pchat.client.gui.model import (  # noqa: E402
    ChatLine,
    ChatModel,
    Delivery,
    FileLine,
    KeyChange,
    Link,
    Search,
    Transfer,
    describe_failure,
    human_eta,
    human_size,
    match_spans,
    search_summary,
    should_notify,
    transfer_status,
)
from p2pchat.client.gui.settings import (  # noqa: E402
    ConnectTarget,
    FormError,
    GuiSettings,
    SettingsStore,
    validate_connect,
)
from p2pchat.client.gui.theme import DARK  # noqa: E402
from p2pchat.client.gui.layout import (  # noqa: E402
    K_ACCEPT_KEY,
    K_ATTACH,
    K_COMPARE_KEY,
    K_COMPOSER,
    K_COMPOSER_NOTE,
    K_CONNECT,
    K_CONVERSATION,
    K_DISCONNECT,
    K_HOST,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_INFO,
    K_KEY_PANEL,
    K_OWN_FP,
    K_PEER_FP,
    K_PEER_KEY,
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_PEERS,
    K_PEOPLE_COUNT,
    K_PORT,
    K_RECEIPTS,
    K_RECEIPTS_NOTE,
    K_SAFETY,
    K_SEARCH,
    K_SEARCH_CLOSE,
    K_SEND,
    K_THEME,
    K_USER,
)
from p2pchat.client.gui.window import ChatWindow, GuiOptions  # noqa: E402
from p2pchat.client.storage.history import History, HistoryEntry  # noqa: E402
from p2pchat.client.storage.trust import KeyStore  # noqa: E402
from p2pchat.common.crypto import Identity, fingerprint  # noqa: E402
from p2pchat.common.endpoints import ServerAddress  # noqa: E402
from p2pchat.common.errors import ErrorCode, RemoteError, TransferError  # noqa: E402
from p2pchat.common.paths import user_dir  # noqa: E402
from tests.conftest import HEARTBEAT, BrokerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Each run writes here (git-ignored); docs/screenshots holds the copies the README shows.
SCREENSHOTS = Path(os.environ.get("P2PCHAT_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
STEP_MS = 20  # how long one idle window may hold the loop before the next gets its turn
# One small chunk per round trip through the broker: a big (sparse) file stays in flight for seconds,
# long enough to watch its progress and press Cancel, without writing much to disk.
SLOW_FILES = (("chunk_size", 16 * 1024), ("window", 1))


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


@dataclass
class FakeDesktop:
    """Answers the file dialog with what the test queued; records the folders it was asked to show."""

    to_choose: list[Path] = field(default_factory=list)
    opened: list[Path] = field(default_factory=list)

    def choose_file(self, _parent: tk.Misc, _peer: str) -> str | None:
        return str(self.to_choose.pop(0)) if self.to_choose else None

    def open_folder(self, folder: Path) -> None:
        self.opened.append(folder)

    def desktop(self) -> Desktop:
        return Desktop(choose_file=self.choose_file, open_folder=self.open_folder)


def received_dir(tmp_path: Path, user: str) -> Path:
    return tmp_path / "homes" / user / "client_received"


@pytest.fixture
def make_window(display: str, broker: BrokerProcess, home: Path,
                tmp_path: Path) -> Iterator[Callable[..., ChatWindow]]:
    windows: list[ChatWindow] = []

    def make(user: str = "", connect: bool = True, notifications: bool = False, send_timeout: float = 10.0,
             desktop: FakeDesktop | None = None, slow_files: bool = False) -> ChatWindow:
        settings = GuiSettings(host="127.0.0.1", port=broker.port, user=user)
        options = GuiOptions(notifications=notifications, heartbeat_ivl=HEARTBEAT, toast_ms=60_000,
                             send_timeout=send_timeout, received_dir=received_dir(tmp_path, user or "nobody"),
                             client_overrides=SLOW_FILES if slow_files else ())
        window = ChatWindow(settings, store=SettingsStore(home / "gui.json"), options=options,
                            desktop=(desktop or FakeDesktop()).desktop())
        windows.append(window)
        if connect:
            window.submit_connect()
            pump([window], lambda: window.status_text().startswith("Connected"), f"{user} to connect")
        return window

    yield make
    for window in windows:
        window.close()


def act(window: ChatWindow, action: Callable[[], None], timeout: float = 10.0) -> None:
    """Run a synthetic input inside this window's own ``read``, where real input happens.

    PySimpleGUI keeps one pending event per window, and a ``read`` that finds a client event queued returns
    that and forgets the pending one: an input generated between reads could be lost.
    """
    ran: list[bool] = []
    window.window.TKroot.after(0, lambda: (action(), ran.append(True)))
    deadline = time.monotonic() + timeout
    while not ran:
        if time.monotonic() > deadline:
            raise AssertionError("the window never ran its event loop")
        window.step(STEP_MS)


def click(window: ChatWindow, key: str) -> None:
    act(window, window.window[key].click)


def select_peer(window: ChatWindow, peer: str, others: list[ChatWindow]) -> None:
    """Click a row of the people list (a real Treeview selection, through the window's own events)."""
    tree = window.window[K_PEERS].Widget
    rows = window.roster_text()
    index = next(i for i, row in enumerate(rows) if row.split()[1] == peer)
    act(window, lambda: tree.selection_set(tree.get_children()[index]))
    pump([window, *others], lambda: window.model.active == peer, f"{peer}'s conversation to open")


def focus(window: ChatWindow) -> None:
    """The user comes back to this window: the composer has the keyboard focus."""
    composer = window.window[K_COMPOSER].Widget
    # Tk sends a key to the widget it believes focused, which changes only once X confirms the focus.
    act(window, composer.focus_force)
    pump([window], lambda: composer.focus_get() == composer, "the composer to take the keyboard focus")


def type_and_press(window: ChatWindow, text: str, key: str = "<Return>") -> None:
    """Type into the composer and press a key, as the keyboard would."""
    composer = window.window[K_COMPOSER].Widget
    focus(window)

    def keyboard() -> None:
        composer.insert("insert", text)
        composer.event_generate(key)

    act(window, keyboard)


def shows(window: ChatWindow, peer: str, marker: str) -> bool:
    return any(row.split()[:2] == [marker, peer] for row in window.roster_text())


# --- end to end -------------------------------------------------------------------------
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
        click(first, K_THEME)
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


# --- files ------------------------------------------------------------------------------------
def attach(window: ChatWindow, desktop: FakeDesktop, path: Path) -> FileLine:
    """Press Attach and pick ``path`` in the (faked) dialog; the file's line in the timeline."""
    desktop.to_choose.append(path)
    before = {card.xfer for card in window.file_cards()}
    click(window, K_ATTACH)
    new = [window.model.file(card.xfer) for card in window.file_cards() if card.xfer not in before]
    sent = [line for line in new if line is not None and line.outgoing]
    assert len(sent) == 1, "the file appears in the timeline at once"
    return sent[0]


def meet(a: ChatWindow, b: ChatWindow) -> None:
    """Both online, each with the other's conversation open."""
    pump([a, b], lambda: shows(a, b.model.user, "●") and shows(b, a.model.user, "●"), "each to see the other")
    select_peer(a, b.model.user, [b])
    select_peer(b, a.model.user, [a])


def test_a_file_attached_in_one_window_is_saved_and_listed_in_the_other(make_window, tmp_path):
    alice_desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice, bob = make_window("alice", desktop=alice_desktop), make_window("bob", desktop=bob_desktop)
    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to see the other")
    select_peer(alice, "bob", both)
    source = tmp_path / "quarterly report.pdf"
    source.write_bytes(os.urandom(3_000_000))  # a dozen chunks

    sent = attach(alice, alice_desktop, source)
    card = alice.file_card(sent.xfer)
    assert card is not None and card.action_text == "Cancel" and card.bar_shown
    assert not sent.finished and sent.outgoing and sent.name == "quarterly report.pdf"

    # bob has another conversation open (none): the file counts as unread, like a message
    pump(both, lambda: "●  alice  1" in bob.roster_text(), "the incoming file as unread at bob")
    pump(both, lambda: card.status_text.startswith("Sent ✓"), "alice's file to be verified by bob")
    assert card.action_text == "" and not card.bar_shown and sent.done == sent.size == 3_000_000
    assert "bob received quarterly report.pdf" in alice.log_text()

    select_peer(bob, "alice", both)
    (got,) = bob.file_cards()
    line = bob.model.file(got.xfer)
    assert line is not None and line.state is Transfer.DONE and line.path is not None
    assert line.path.parent == received_dir(tmp_path, "bob") and line.path.name.endswith("quarterly report.pdf")
    assert line.path.read_bytes() == source.read_bytes()
    assert got.status_text == "Received ✓ · verified and saved"
    assert got.saved_text == f"{line.path.parent}/{line.path.name}"  # not under $HOME here: shown in full
    assert got.action_text == "Open folder" and got.bar_fraction() == 0 and not got.bar_shown

    act(bob, got.action.invoke)
    pump([bob], lambda: bob_desktop.opened != [], "the folder to be shown")
    assert bob_desktop.opened == [received_dir(tmp_path, "bob")]


def test_progress_rows_move_to_done_in_both_directions(make_window, tmp_path):
    alice_desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice, bob = make_window("alice", desktop=alice_desktop), make_window("bob", desktop=bob_desktop)
    meet(alice, bob)
    big = sparse(tmp_path / "disk.img", 24 << 20)  # about a hundred chunks
    small = tmp_path / "notes.txt"
    small.write_text("the other way\n")
    out = attach(alice, alice_desktop, big)
    back = attach(bob, bob_desktop, small)
    seen: set[tuple[str, str]] = set()  # (window, status) as the rows changed

    def done() -> bool:
        for name, window in (("alice", alice), ("bob", bob)):
            for card in window.file_cards():
                seen.add((name, card.status_text.split(" ")[0]))
        lines = [alice.model.file(out.xfer), bob.model.file(out.xfer), bob.model.file(back.xfer),
                 alice.model.file(back.xfer)]
        return all(line is not None and line.state is Transfer.DONE for line in lines)

    pump([alice, bob], done, "both files to arrive")
    assert {("alice", "Sent"), ("bob", "Received"), ("bob", "Sent"), ("alice", "Received")} <= seen
    assert [c.status_text.split(" ")[0] for c in alice.file_cards()] == ["Sent", "Received"]
    assert [c.status_text.split(" ")[0] for c in bob.file_cards()] == ["Received", "Sent"]
    assert (received_dir(tmp_path, "bob") / bob.model.file(out.xfer).path.name).stat().st_size == 24 << 20
    assert alice.transfers_status_text() == "" and bob.transfers_status_text() == ""


def sparse(path: Path, size: int) -> Path:
    """A big file that costs nothing to make: it reads as zeros."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def moving(card: FileCard | None, verb: str) -> bool:
    """The row shows a transfer under way, with its rate and time left."""
    return card is not None and card.status_text.startswith(verb) and "/s · " in card.status_text \
        and card.status_text.endswith(" left")


def test_cancel_in_the_window_stops_the_transfer_on_both_sides(make_window, tmp_path):
    alice_desktop = FakeDesktop()
    alice = make_window("alice", desktop=alice_desktop, slow_files=True)
    bob = make_window("bob", slow_files=True)
    meet(alice, bob)
    line = attach(alice, alice_desktop, sparse(tmp_path / "huge.img", 256 << 20))
    card = alice.file_card(line.xfer)
    pump([alice, bob], lambda: moving(card, "Sending") and moving(next(iter(bob.file_cards()), None), "Receiving"),
         "progress with rate and time left on both sides")
    assert 0 < card.bar_fraction() < 1 and alice.transfers_status_text().startswith("↑ huge.img ")
    assert bob.transfers_status_text().startswith("↓ huge.img ")

    act(alice, card.action.invoke)
    pump([alice, bob], lambda: line.state is Transfer.CANCELLED, "alice's cancel")
    assert card.status_text == "Cancelled" and card.action_text == "" and not card.bar_shown
    assert "Sending huge.img to bob: Cancelled" in alice.log_text() and alice.transfers_status_text() == ""
    pump([alice, bob], lambda: [c.status_text for c in bob.file_cards()] == ["Cancelled by alice"],
         "bob to see it cancelled")
    assert [c.action_text for c in bob.file_cards()] == [""]
    assert not any(received_dir(tmp_path, "bob").iterdir())  # no file, no leftover .part


def test_a_file_from_someone_else_pops_a_notification(make_window, tmp_path):
    carol_desktop = FakeDesktop()
    alice = make_window("alice", notifications=True)
    bob, carol = make_window("bob"), make_window("carol", desktop=carol_desktop)
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(carol, "alice", "●"),
         "everyone online")
    select_peer(alice, "bob", everyone)
    select_peer(carol, "alice", everyone)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8" + os.urandom(5000))
    attach(carol, carol_desktop, photo)
    pump(everyone, lambda: alice.toast is not None, "a notification at alice")
    assert "●  carol  1" in alice.roster_text()


# --- keys -------------------------------------------------------------------------------------
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


def test_a_stopped_client_returns_to_the_connect_panel_and_reconnects(make_window):
    alice = make_window("alice")

    def crash(now: float) -> list:
        raise RuntimeError("simulated bug")

    alice.client._session.on_tick = crash  # the agent's next loop turn fails
    pump([alice], lambda: "internal error" in alice.form_error(), "the stopped client to be reported")
    assert alice.status_text().startswith("Offline") and alice.client is None
    click(alice, K_CONNECT)
    pump([alice], lambda: alice.status_text().startswith("Connected"), "the reconnect")


# --- history, delivery states, read receipts, search ------------------------------------------
def line_of(window: ChatWindow, peer: str, text: str) -> ChatLine:
    return next(line for line in window.model.conversation(peer).lines
                if isinstance(line, ChatLine) and line.text == text)


def state(window: ChatWindow, peer: str, text: str) -> tuple[str, str]:
    """The delivery state of our message ``text`` to ``peer`` as on screen: (text, style)."""
    return window.delivery_shown(line_of(window, peer, text).msg_id)


def search_for(window: ChatWindow, query: str) -> None:
    """Type into the sidebar's search box and press Enter."""
    entry = window.window[K_SEARCH].Widget
    act(window, entry.focus_force)
    pump([window], lambda: entry.focus_get() == entry, "the search box to take the keyboard focus")

    def keyboard() -> None:
        window.window[K_SEARCH].update(query)  # typed text (the element tracks whether its placeholder shows)
        entry.icursor("end")
        entry.event_generate("<Return>")

    act(window, keyboard)


def click_text(window: ChatWindow, index: str) -> None:
    """A mouse click on the conversation pane at ``index`` (the pointer moves there first, as a mouse does)."""
    widget = window.window[K_CONVERSATION].Widget

    def mouse() -> None:
        widget.see(index)
        widget.update_idletasks()
        x, y, _w, h = widget.bbox(index)
        widget.event_generate("<Motion>", x=x + 2, y=y + h // 2)
        widget.event_generate("<Button-1>", x=x + 2, y=y + h // 2)

    act(window, mouse)


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
    assert bob.window[K_RECEIPTS_NOTE].get() == "applies when you reconnect"
    click(bob, K_DISCONNECT)
    click(bob, K_CONNECT)
    pump([bob], lambda: bob.status_text().startswith("Connected"), "bob to connect again")
    assert bob.window[K_RECEIPTS_NOTE].get() == "" and not bob.window[K_RECEIPTS].get()

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


def test_search_finds_a_message_and_opens_its_conversation(make_window):
    alice, bob, carol = make_window("alice"), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(bob, "alice", "●")
         and shows(carol, "alice", "●"), "everyone online")
    select_peer(bob, "alice", everyone)
    type_and_press(bob, "the numbers for Thursday are in")
    select_peer(carol, "alice", everyone)
    type_and_press(carol, "lunch on thursday?")
    type_and_press(carol, "or friday")
    pump(everyone, lambda: "●  bob  1" in alice.roster_text() and "●  carol  2" in alice.roster_text(),
         "both messages at alice")
    select_peer(alice, "carol", everyone)

    search_for(alice, "thurs")
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "Search", "the results")
    text = alice.conversation_text()
    assert "the numbers for Thursday are in" in text and "lunch on thursday?" in text and "or friday" not in text
    assert text.index("lunch on thursday?") < text.index("the numbers for Thursday")  # newest first
    assert alice.window[K_PEER_PRESENCE].get() == "2 messages matching “thurs”" and alice.shown(K_SEARCH_CLOSE)
    assert alice.window[K_SEND].Widget.cget("state") == "disabled"

    found = line_of(alice, "bob", "the numbers for Thursday are in")
    index = alice._view().result_index(found.msg_id)
    assert index is not None
    click_text(alice, index)
    pump(everyone, lambda: alice.model.active == "bob" and alice.window[K_PEER_NAME].get() == "bob",
         "bob's conversation to open")
    assert "the numbers for Thursday are in" in alice.conversation_text() and not alice.shown(K_SEARCH_CLOSE)
    assert alice.window[K_SEARCH].get() == "" and alice.roster_text() == ["●  bob", "●  carol"]

    search_for(alice, "friday")  # Esc in the search box goes back to the conversation
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "Search", "the results")
    act(alice, lambda: alice.window[K_SEARCH].Widget.event_generate("<Escape>"))
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "bob", "the conversation again")
    assert "the numbers for Thursday are in" in alice.conversation_text()


def earlier_run(user: str, peer: str, messages: list[tuple[bool, str, str]], minutes_ago: int) -> None:
    """What a previous run of ``user``'s client left in history: (outgoing, text, state) a while ago."""
    history = History(user_dir(user) / "history.sqlite")
    ts = int(time.time() * 1000) - minutes_ago * 60_000
    for i, (outgoing, text, state_) in enumerate(messages):
        msg_id = os.urandom(16)
        if outgoing:
            history.add_outgoing(msg_id, peer, text, ts + i * 60_000)
            history.advance(msg_id, state_)
        else:
            history.add_incoming(msg_id, peer, text, ts + i * 60_000)
    history.mark_read(peer)
    history.close()


def test_screenshots_of_both_themes(make_window, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(received_dir(tmp_path, "alice").parent))  # paths read "~/client_received/…"
    user_dir("alice").mkdir(parents=True, mode=0o700)
    earlier_run("alice", "dave", [(False, "Is the nightly build green again?", "received"),
                                  (True, "Yes, fixed last night. Flaky test.", "read")], minutes_ago=26 * 60)
    alice_desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice = make_window("alice", desktop=alice_desktop, slow_files=True)
    bob = make_window("bob", desktop=bob_desktop, slow_files=True)
    carol = make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(bob, "alice", "●"),
         "everyone online")
    select_peer(bob, "alice", everyone)
    type_and_press(bob, "Hi Alice! Did the broker restart go fine last night?")
    pump(everyone, lambda: "●  bob  1" in alice.roster_text(), "bob's message")
    select_peer(alice, "bob", everyone)
    type_and_press(alice, "Yes, every client reconnected within a second.", "<Shift-Return>")
    type_and_press(alice, "No messages lost, and the logs are attached.")
    logs = tmp_path / "broker-logs.tar.gz"
    logs.write_bytes(os.urandom(1_400_000))
    attach(alice, alice_desktop, logs)
    both_lines = "Yes, every client reconnected within a second.\nNo messages lost, and the logs are attached."
    pump(everyone, lambda: state(alice, "bob", both_lines)[0] == "delivered ✓✓", "delivered at alice")
    type_and_press(bob, "Great, thanks for checking. Here are the numbers for Thursday.")
    report = tmp_path / "Q3 report.pdf"
    report.write_bytes(os.urandom(2_400_000))
    attach(bob, bob_desktop, report)
    pump(everyone, lambda: [c.status_text.split(" ")[0] for c in alice.file_cards()] == ["Sent", "Received"],
         "bob's report")
    type_and_press(alice, "Thanks! The numbers look right.")
    pump(everyone, lambda: state(alice, "bob", "Thanks! The numbers look right.")[0] == "delivered ✓✓",
         "delivered at alice")
    focus(bob)  # bob looks at his window again: he has read it
    pump(everyone, lambda: state(alice, "bob", "Thanks! The numbers look right.")[0] == "read ✓✓", "read at alice")
    type_and_press(alice, "Sending the VM snapshot from last night too.")
    snapshot = attach(alice, alice_desktop, sparse(tmp_path / "vm-snapshot.qcow2", 1 << 30))
    select_peer(carol, "alice", everyone)
    type_and_press(carol, "Lunch at 12?")
    pump(everyone, lambda: moving(alice.file_card(snapshot.xfer), "Sending") and snapshot.fraction > 0.01
         and "●  carol  1" in alice.roster_text() and state(alice, "bob", both_lines)[0] == "read ✓✓"
         and state(alice, "bob", "Sending the VM snapshot from last night too.")[0] == "delivered ✓✓",
         "the rest of the conversation")
    assert "○  dave" in alice.roster_text()

    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    for theme in ("light", "dark"):
        if alice.settings.theme != theme:
            click(alice, K_THEME)
            pump(everyone, lambda: alice.settings.theme == theme, f"the {theme} theme")
        screenshot(alice, f"gui-{theme}.png")
    act(alice, alice.file_card(snapshot.xfer).action.invoke)  # Cancel: the snapshot has been seen enough

    click(alice, K_THEME)
    alice.client.e2e._pinned.put("carol", Identity.generate().public)
    type_and_press(carol, "New laptop, same Carol. Can you check my key?")
    pump(everyone, lambda: "⚠" in " ".join(alice.roster_text()), "carol's key change at alice")
    select_peer(alice, "carol", everyone)
    click(alice, K_KEY_INFO)
    screenshot(alice, "gui-key-changed.png")

    search_for(alice, "night")
    pump(everyone, lambda: alice.window[K_PEER_NAME].get() == "Search", "the search results")
    screenshot(alice, "gui-search.png")

    signin = make_window(connect=False)
    signin.window[K_USER].update("bad id!")
    click(signin, K_CONNECT)
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


def test_delivery_only_moves_forward_and_a_failure_is_final():
    model = ChatModel("me")
    line = model.sending(b"a", "bob", "x", 0)
    assert model.acked(b"a") is line and line.delivery is Delivery.SENT
    assert model.failed(b"a", "late") is None and line.delivery is Delivery.SENT  # the broker has it
    assert model.receipt(b"a", "read") is line and line.delivery is Delivery.READ  # "delivered" may come later
    assert model.receipt(b"a", "delivered") is None and model.acked(b"a") is None and line.delivery is Delivery.READ
    failed = model.sending(b"b", "bob", "y", 0)
    assert model.failed(b"b", "recipient is offline") is failed and failed.delivery is Delivery.FAILED
    assert model.acked(b"b") is None and model.receipt(b"b", "delivered") is None
    refused = model.refused("bob", "z", 0, "message too large")
    assert refused.delivery is Delivery.FAILED and refused.failure == "message too large"
    model.receive(b"c", "bob", "theirs", 0)
    assert model.receipt(b"c", "read") is None  # receipts are about our messages only
    assert model.link is Link.OFFLINE


def entry(msg_id: bytes, peer: str, outgoing: bool, text: str, ts: int, state: str) -> HistoryEntry:
    return HistoryEntry(msg_id, peer, outgoing, text, ts, state)


def test_history_merges_with_what_this_run_already_shows():
    model = ChatModel("me")
    model.file_incoming(b"f", "bob", "f.bin", 10, 150)  # files are not in history
    mine = model.sending(b"2", "bob", "mine", 200)
    model.receive(b"3", "bob", "theirs", 300)
    history = [entry(b"1", "bob", False, "old", 100, "received"), entry(b"2", "bob", True, "mine", 200, "delivered"),
               entry(b"3", "bob", False, "theirs", 300, "received")]
    conv = model.load("bob", history)
    assert [line.text if isinstance(line, ChatLine) else line.name for line in conv.lines] == \
        ["old", "f.bin", "mine", "theirs"]
    assert conv.lines[2] is mine and mine.delivery is Delivery.DELIVERED
    assert conv.unread == 3  # the file, "theirs", and "old" from an earlier run
    model.load("bob", history)  # loading again, or an event arriving after the load, changes nothing
    assert model.receive(b"1", "bob", "old", 100) is None
    assert len(conv.lines) == 4 and conv.unread == 3
    model.load("bob", [entry(b"2", "bob", True, "mine", 200, "sent")])
    assert mine.delivery is Delivery.DELIVERED  # history read before a receipt never undoes it


def test_people_from_history_are_listed_offline_after_those_online():
    model = ChatModel("me")
    model.set_online(frozenset({"amy"}))
    model.load("zed", [entry(b"1", "zed", True, "hi", 0, "read")])
    model.load("bea", [entry(b"2", "bea", False, "yo", 0, "received"), entry(b"3", "bea", False, "?", 0, "read")])
    assert [(r.name, r.online, r.unread) for r in model.roster()] == [
        ("amy", True, 0), ("bea", False, 1), ("zed", False, 0)]


def test_reading_a_conversation_is_news_once():
    model = ChatModel("me")
    model.sending(b"1", "bob", "mine", 0)
    assert not model.has_unread("bob") and not model.mark_read("bob")
    model.receive(b"2", "bob", "theirs", 0)
    assert model.has_unread("bob") and model.mark_read("bob")
    assert not model.has_unread("bob") and not model.mark_read("bob") and not model.has_unread(None)


def test_search_marks_the_words_the_query_starts():
    assert match_spans("Numbers for Thursday, thus", "thu num") == [(0, 3), (12, 15), (22, 25)]
    assert match_spans("re: the re-run, more", "re") == [(0, 2), (8, 10)] and match_spans("anything", "  ") == []
    one = entry(b"1", "bob", False, "hi", 0, "read")
    assert search_summary(Search("hi", (one,), 1)) == "1 message matching “hi”"
    assert search_summary(Search("hi", (one,), 1000, capped=True)) == "newest 1 of 1000+ messages matching “hi”"
    assert search_summary(Search("zz", (), 0)) == "nothing matches “zz”"


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


def test_a_transfer_ends_once_and_late_events_change_nothing():
    model = ChatModel("me")
    line = model.file_sending(b"x1", "bob", "a.bin", 1000, 0)
    assert line.state is Transfer.OFFERING and transfer_status(line) == "Waiting for bob to accept…"
    model.file_progress(b"x1", "bob", "a.bin", True, 250, 1000, 125.0, 6.0, 0)
    assert line.state is Transfer.ACTIVE and line.fraction == 0.25
    assert transfer_status(line) == "Sending 25% · 250 B of 1.0 KB · 125 B/s · 6 s left"
    assert model.file_sent(b"x1") is line and line.state is Transfer.DONE and line.fraction == 1.0
    assert model.file_failed(b"x1", TransferError("late", ErrorCode.CANCELLED)) is None
    assert model.file_progress(b"x1", "bob", "a.bin", True, 10, 1000, 1.0, 1.0, 0) is None
    assert line.state is Transfer.DONE and model.active_transfers() == []


def test_who_cancelled_is_said_from_this_sides_point_of_view():
    model = ChatModel("me")
    mine = model.file_sending(b"a", "bob", "a.bin", 10, 0)
    mine.cancel_asked = True
    theirs, _ = model.file_incoming(b"b", "bob", "b.bin", 10, 0)
    model.file_failed(b"a", TransferError("cancelled by you", ErrorCode.CANCELLED))
    model.file_failed(b"b", RemoteError("bob: cancelled by you", ErrorCode.CANCELLED))
    assert (mine.state, transfer_status(mine)) == (Transfer.CANCELLED, "Cancelled")
    assert (theirs.state, transfer_status(theirs)) == (Transfer.CANCELLED, "Cancelled by bob")
    broken, _ = model.file_incoming(b"c", "bob", "c.bin", 10, 0)
    model.file_failed(b"c", TransferError("c.bin: chunk 0 failed authentication", ErrorCode.INTEGRITY))
    assert transfer_status(broken) == "Failed: c.bin: chunk 0 failed authentication"


def test_an_incoming_file_is_unread_once_even_if_offered_again():
    model = ChatModel("me")
    _, new = model.file_incoming(b"f", "bob", "f.bin", 10, 0)
    again, new_again = model.file_incoming(b"f", "bob", "f.bin", 10, 0)  # re-offered after a reconnect
    assert new and not new_again and model.conversation("bob").unread == 1
    assert [r.name for r in model.roster()] == ["bob"] and len(model.conversation("bob").lines) == 1
    model.open("bob")
    model.file_incoming(b"g", "bob", "g.bin", 10, 0)
    assert model.conversation("bob").unread == 0


def test_disconnecting_pauses_transfers_and_progress_resumes_them():
    model = ChatModel("me")
    line = model.file_sending(b"p", "bob", "p.bin", 100, 0)
    model.file_progress(b"p", "bob", "p.bin", True, 40, 100, 10.0, 6.0, 0)
    assert model.pause_transfers() == [line] and line.state is Transfer.PAUSED
    assert transfer_status(line) == "Paused at 40% · resumes when you reconnect"
    model.file_progress(b"p", "bob", "p.bin", True, 60, 100, 10.0, 4.0, 0)
    assert line.state is Transfer.ACTIVE
    resumed, new = model.file_progress(b"q", "carol", "q.bin", False, 5, 10, 1.0, 5.0, 0)  # from an earlier run
    assert new and not resumed.outgoing and model.conversation("carol").lines == [resumed]


def test_a_key_change_marks_the_peer_until_accepted():
    model = ChatModel("me")
    change = KeyChange("aaaa", "bbbb")
    assert model.peer_key_changed("bob", change) and not model.peer_key_changed("bob", change)  # news once
    assert [(r.name, r.key_changed) for r in model.roster()] == [("bob", True)]
    model.peer_key_accepted("bob")
    assert model.roster() == []


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1_234_567, "1.2 MB"),
                                     (150_000_000, "150 MB"), (3 * 10**12, "3.0 TB")])
def test_sizes_read_like_a_file_manager(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize("seconds, text", [(None, ""), (0.2, "1 s left"), (42, "42 s left"), (150, "2 min left"),
                                           (3 * 3600 + 5 * 60, "3 h 5 min left")])
def test_time_left_reads_naturally(seconds, text):
    assert human_eta(seconds) == text
