"""Several devices of one user in the window (issue 15, points 3 and 4): bob on a desktop and a laptop, each a real
window on a real broker. What one sends shows on the other as sent, with its ticks; what one reads is read on the
other; a file goes to one and shows as taken on the other; alice verifies bob's account once, with his devices
under its number; the Devices panel lists bob's devices, links one by code and unlinks one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_DEVICES,
    K_DEVICES_LIST,
    K_DEVICES_NOTE,
    K_DEVICES_PANEL,
    K_KEY_INFO,
    K_KEY_PANEL_TITLE,
    K_LINK_CODE,
    K_LINK_DEVICE,
    K_MARK_VERIFIED,
    K_PEER_DEVICES,
    K_PEER_KEY,
    K_PEERS,
    K_SAFETY,
    K_UNLINK_DEVICE,
    K_UNLINK_WHICH,
)
from p2pchat.common.crypto import account_safety_number, fingerprint  # noqa: E402
from p2pchat.common.errors import ExitCode  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import (  # noqa: E402
    FakeDesktop,
    act,
    attach,
    click,
    focus,
    meet,
    select_peer,
    shows,
    state,
    type_and_press,
)
from tests.client.test_recovery import cli  # noqa: E402
from tests.conftest import ROOT  # noqa: E402


@pytest.fixture
def bob_twice(make_window, broker, tmp_path: Path):
    """alice, bob's desktop (his first device) and his laptop (linked with his phrase), all windows online."""
    def make(desktop: FakeDesktop | None = None, talking: bool = False):
        """``talking``: alice and bob's desktop have each other's conversation open, his laptop alice's."""
        alice = make_window("alice", desktop=desktop)
        desk = make_window("bob")
        linked = cli(tmp_path / "laptop", "link", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                     "--recovery", "--name", "laptop", stdin=desk.client.recovery_phrase + "\n")
        assert linked.returncode == ExitCode.OK, linked.stderr
        laptop = make_window("bob", state_dir=tmp_path / "laptop" / "users" / "bob",
                             received=tmp_path / "laptop" / "received")
        if talking:
            meet(alice, desk)
            pump([alice, desk, laptop], lambda: shows(laptop, "alice", "●"), "alice online at the laptop")
            select_peer(laptop, "alice", [alice, desk, laptop])
        return alice, desk, laptop
    return make


def test_what_one_device_sends_shows_on_the_other_with_its_ticks_and_reading_follows(bob_twice):
    alice, desk, laptop = bob_twice()
    everyone = [alice, desk, laptop]
    meet(alice, desk)
    pump(everyone, lambda: shows(laptop, "alice", "●"), "alice online at the laptop")
    type_and_press(desk, "sent from my desktop")
    pump(everyone, lambda: "sent from my desktop" in alice.conversation_text()
         and any(line.text == "sent from my desktop" for line in laptop.model.conversation("alice").lines),
         "the message at alice, and at the laptop as bob's own")
    line = next(line for line in laptop.model.conversation("alice").lines if line.text == "sent from my desktop")
    assert line.outgoing and laptop.roster_text() == ["●  alice"]  # ours: nothing unread
    select_peer(laptop, "alice", everyone)
    assert "sent from my desktop" in laptop.conversation_text()
    # delivered, or read already if alice's window had bob's conversation open when it came (both receipts may
    # reach the laptop in one batch)
    pump(everyone, lambda: state(laptop, "alice", "sent from my desktop")[0] in ("delivered ✓✓", "read ✓✓"),
         "alice's client's receipt moving the laptop's ticks too")
    focus(alice)  # alice looks at her window: she has read it
    pump(everyone, lambda: state(laptop, "alice", "sent from my desktop")[0] == "read ✓✓",
         "alice's read receipt moving the laptop's ticks too")

    select_peer(laptop, "alice", everyone)
    select_peer(desk, "alice", everyone)
    select_peer(alice, "bob", everyone)
    def look_elsewhere() -> None:  # what comes is unread there (the list's row unselected, as nothing is open)
        tree = laptop.window[K_PEERS].Widget
        tree.selection_remove(*tree.selection())
        laptop.model.active = None

    act(laptop, look_elsewhere)
    type_and_press(alice, "read me on one of them")
    pump(everyone, lambda: "●  alice  1" in laptop.roster_text() and "read me" in desk.conversation_text(),
         "unread at the laptop, shown at the desk")
    focus(desk)  # bob looks at his desk
    pump(everyone, lambda: laptop.roster_text() == ["●  alice"], "read on the desk: no longer unread at the laptop")


def test_a_file_goes_to_one_device_and_the_other_shows_it_taken(bob_twice, tmp_path):
    desktop = FakeDesktop()
    alice, desk, laptop = bob_twice(desktop, talking=True)
    everyone = [alice, desk, laptop]
    src = tmp_path / "photo.bin"
    src.write_bytes(os.urandom(300_000))
    attach(alice, desktop, src)
    pump(everyone, lambda: sorted(c.status_text for w in (desk, laptop) for c in w.file_cards()) == [
        "Received ✓ · verified and saved", "Taken by another of your devices"], "one received, one taken")
    assert "Failed" not in desk.log_text() + laptop.log_text()


def test_alice_verifies_bobs_account_once_and_his_devices_stay_verified(bob_twice):
    alice, desk, laptop = bob_twice()
    everyone = [alice, desk, laptop]
    meet(alice, desk)
    type_and_press(alice, "hello both")
    pump(everyone, lambda: "hello both" in desk.conversation_text() and shows(laptop, "alice", "●"), "the message")
    click(alice, K_KEY_INFO)
    number = account_safety_number(alice.client.account_of("alice"), desk.client.account_of("bob"))
    assert alice.window[K_SAFETY].get() == number
    assert alice.window[K_KEY_PANEL_TITLE].get() == "VERIFY BOB · ONE NUMBER FOR THEIR ACCOUNT"
    assert alice.window[K_PEER_DEVICES].get() == (f"device 1 · {fingerprint(desk.client.identity.public)}\n"
                                                  f"device 2 · {fingerprint(laptop.client.identity.public)}")
    select_peer(laptop, "alice", everyone)
    click(laptop, K_KEY_INFO)
    assert laptop.window[K_SAFETY].get() == number  # bob's laptop shows the same digits as his desktop
    click(alice, K_MARK_VERIFIED)
    assert alice.window[K_PEER_KEY].get().startswith("✓ verified")
    assert alice.client.is_verified("bob")


def test_the_devices_panel_lists_links_by_code_and_unlinks(bob_twice, broker, tmp_path):
    alice, desk, laptop = bob_twice()
    everyone = [alice, desk, laptop]
    click(desk, K_DEVICES)
    pump(everyone, lambda: len(desk.window[K_DEVICES_LIST].get().splitlines()) == 2, "bob's two devices")
    assert desk.shown(K_DEVICES_PANEL)
    first, second = desk.window[K_DEVICES_LIST].get().splitlines()
    assert first.endswith(f"{fingerprint(desk.client.identity.public)}  · this device")
    assert "laptop" in second and fingerprint(laptop.client.identity.public) in second

    click(desk, K_LINK_DEVICE)
    pump(everyone, lambda: desk.window[K_LINK_CODE].get() != "", "the code")
    code = desk.window[K_LINK_CODE].get()
    assert f"p2pchat link --user bob --code {code}" in desk.window[K_DEVICES_NOTE].get()
    joining = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "link", "--user", "bob", "--server",
                                f"127.0.0.1:{broker.port}", "--code", code, "--name", "tablet"], cwd=ROOT,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "tablet")))
    try:
        pump(everyone, lambda: "tablet" in desk.window[K_DEVICES_LIST].get(), "the tablet linked", timeout=60)
    finally:
        _, err = joining.communicate(timeout=60)
    assert joining.returncode == ExitCode.OK, err
    assert desk.window[K_DEVICES_NOTE].get().startswith("Linked tablet")

    desk.window[K_UNLINK_WHICH].update(value="2 · laptop")
    click(desk, K_UNLINK_DEVICE)
    pump(everyone, lambda: "laptop" not in desk.window[K_DEVICES_LIST].get(), "the laptop unlinked: "
         + desk.window[K_DEVICES_NOTE].get())
    pump(everyone, lambda: laptop.client is None and "unlinked" in laptop.form_error(),
         "the laptop signed out, saying why")
