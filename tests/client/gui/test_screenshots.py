"""Screenshots of a busy window in both themes, search results, the connect panel, and a contact's key change
(the states of what waits, the banner, Verify…, after Continue, and the notice of a change accepted automatically);
bob's second device (what his first sent, read and took, and the Devices panel) in both themes, and alice's
Verify panel with one safety number for bob's account and his devices under it; a room with its members in both
themes, an invitation, and the room form with the broker's refusal; files in a room (a thumbnail) in both themes,
and a file the broker holds for someone offline.

Each run writes them to ``artifacts/screenshots`` (git-ignored, or
``$P2PCHAT_SCREENSHOTS``); docs/screenshots holds the copies the README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_ACCEPT_KEY,
    K_COMPARE_KEY,
    K_CONNECT,
    K_DEVICES,
    K_DEVICES_LIST,
    K_DISCONNECT,
    K_KEY_BANNER_TEXT,
    K_KEY_HIDE,
    K_KEY_INFO,
    K_KEY_NOTICE,
    K_PEER_NAME,
    K_THEME,
    K_TRUST_KEYS,
    K_USER,
)
from p2pchat.client.gui.room_layout import K_INVITE, K_NEW_ROOM, K_ROOM_FORM_NOTE  # noqa: E402
from p2pchat.client.gui.window import ChatWindow  # noqa: E402
from p2pchat.client.storage.history import History  # noqa: E402
from p2pchat.common.crypto import Identity  # noqa: E402
from p2pchat.common.paths import user_dir  # noqa: E402
from tests.client.gui.conftest import pump, received_dir  # noqa: E402
from tests.client.gui.driving import (  # noqa: E402
    FakeDesktop,
    act,
    attach,
    click,
    focus,
    meet,
    moving,
    fill_room_form,
    search_for,
    select_peer,
    select_room,
    shows,
    sparse,
    state,
    type_and_press,
)
from tests.client.gui.test_devices import bob_twice  # noqa: E402,F401 - a fixture
from tests.client.gui.test_rooms import room_state  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

SCREENSHOTS = Path(os.environ.get("P2PCHAT_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))


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
    screenshots_of_both_themes(alice, everyone, "gui-")
    act(alice, alice.file_card(snapshot.xfer).button("Cancel").invoke)  # Cancel: the snapshot has been seen enough

    click(alice, K_THEME)
    search_for(alice, "night")
    pump(everyone, lambda: alice.window[K_PEER_NAME].get() == "Search", "the search results")
    screenshot(alice, "gui-search.png")

    signin = make_window(connect=False)
    signin.window[K_USER].update("bad id!")
    click(signin, K_CONNECT)
    pump([signin], lambda: "User IDs are" in signin.form_error(), "the inline message")
    screenshot(signin, "gui-connect.png")


def test_screenshots_of_a_key_change(make_window, reinstalled_bob):
    """bob reinstalled: alice's message sealed to his old key, his first message and hers since, all waiting;
    the banner, Verify…, after Continue; then carol's change accepted automatically (the setting)."""
    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    alice, bob = make_window("alice"), make_window("bob", state_dir=reinstalled_bob)
    meet(alice, bob)
    type_and_press(alice, "Are you there? The deploy is at 3.")
    pump([alice, bob], lambda: state(alice, "bob", "Are you there? The deploy is at 3.")[1] == "meta-warn",
         "bob's refusal")
    type_and_press(bob, "Hi Alice, it's Bob. I reinstalled p2p-chat on my new laptop.")
    pump([alice, bob], lambda: "received message to show" in alice.window[K_KEY_BANNER_TEXT].get(), "bob's message held")
    type_and_press(alice, "Is this really you, Bob?")
    pump([alice, bob], lambda: state(alice, "bob", "Is this really you, Bob?")[0].startswith("waiting"),
         "alice's message held")
    screenshot(alice, "gui-key-changed.png")
    click(alice, K_COMPARE_KEY)
    screenshot(alice, "gui-key-verify.png")
    click(alice, K_KEY_HIDE)
    click(alice, K_ACCEPT_KEY)
    pump([alice, bob], lambda: state(alice, "bob", "Is this really you, Bob?")[0] == "delivered ✓✓"
         and state(alice, "bob", "Are you there? The deploy is at 3.")[0] == "delivered ✓✓", "both delivered")
    type_and_press(bob, "It is. Same time, same place.")
    pump([alice, bob], lambda: "Same time" in alice.conversation_text(), "bob's answer")
    screenshot(alice, "gui-key-accepted.png")

    act(alice, alice.window[K_TRUST_KEYS].Widget.invoke)  # accept new keys automatically, from the next connect
    click(alice, K_DISCONNECT)
    click(alice, K_CONNECT)
    carol = make_window("carol")
    pump([alice, carol], lambda: alice.status_text().startswith("Connected"), "alice back")
    meet(alice, carol)
    alice.client.e2e._pinned.put("carol", Identity.generate().public)  # as if carol had reinstalled
    alice.client.e2e.forget_devices()  # the list fetched before vouches for the real key
    type_and_press(carol, "New laptop, same Carol.")
    pump([alice, carol], lambda: "New laptop" in alice.conversation_text() and alice.shown(K_KEY_NOTICE),
         "carol's message and the notice")
    screenshot(alice, "gui-key-notice.png")


def test_screenshots_of_a_second_device(bob_twice, tmp_path):
    """bob's laptop: what his desktop sent (read by alice), what he read there, a file his desktop took, and the
    Devices panel; alice's Verify panel with bob's account number and his two devices."""
    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    desktop = FakeDesktop()
    alice, desk, laptop = bob_twice(desktop, talking=True)
    everyone = [alice, desk, laptop]
    type_and_press(alice, "Are you at your desk? The release notes need a last look.")
    pump(everyone, lambda: "release notes" in desk.conversation_text(), "alice's question at the desk")
    focus(desk)  # bob reads it at his desk: read on the laptop too
    type_and_press(desk, "At my desk now, reading them.")
    pump(everyone, lambda: "reading them" in alice.conversation_text(), "bob's answer")
    focus(alice)
    pump(everyone, lambda: state(laptop, "alice", "At my desk now, reading them.")[0] == "read ✓✓",
         "read ticks on the laptop")
    notes = tmp_path / "release-notes.pdf"
    notes.write_bytes(os.urandom(400_000))
    attach(alice, desktop, notes)
    taken = "Taken by another of your devices"
    pump(everyone, lambda: sorted(c.status_text for w in (desk, laptop) for c in w.file_cards()) == [
        "Received ✓ · verified and saved", taken], "the file taken by one of bob's devices")
    if laptop.file_cards()[0].status_text != taken:  # the laptop was first: show the desk, which says "taken"
        laptop = desk
    click(laptop, K_DEVICES)
    pump(everyone, lambda: len(laptop.window[K_DEVICES_LIST].get().splitlines()) == 2, "bob's devices")
    screenshots_of_both_themes(laptop, everyone, "gui-devices-")
    click(alice, K_KEY_INFO)
    screenshot(alice, "gui-account-verify.png")


def open_team(alice: ChatWindow, everyone: list[ChatWindow], invitees: str) -> None:
    """alice creates #team (the release's) in the room form and invites ``invitees`` there."""
    click(alice, K_NEW_ROOM)
    fill_room_form(alice, "team", "Release 2.4: branch cut Monday, QA Tuesday")
    pump(everyone, lambda: alice.window[K_PEER_NAME].get() == "# team", "#team open")
    click(alice, K_INVITE)
    fill_room_form(alice, invitees)
    pump(everyone, lambda: "You invited" in alice.conversation_text(), "the invitations")


def screenshots_of_both_themes(window: ChatWindow, everyone: list[ChatWindow], prefix: str) -> None:
    """``{prefix}light.png`` and ``{prefix}dark.png``, switching the window's theme as a user does; it stays dark."""
    for theme in ("light", "dark"):
        if window.settings.theme != theme:
            click(window, K_THEME)
            pump(everyone, lambda: window.settings.theme == theme, f"the {theme} theme")
        screenshot(window, f"{prefix}{theme}.png")


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


def test_screenshots_of_rooms(make_window):
    """alice's #team (bob an admin, carol gone offline, dave invited) with messages from each and the lines of who
    joined, another room with unread messages and an invitation in the ROOMS list, in both themes; then the
    invitation's banner, and the New room form refused a name that is taken."""
    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    alice, bob, carol = make_window("alice"), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●"), "everyone online")
    open_team(alice, everyone, "bob, carol, dave")
    bob.client.room_join("team")
    alice.client.room_admin("team", "bob")
    pump(everyone, lambda: "bob is now an admin" in alice.conversation_text(), "bob an admin")
    bob.client.send_room("team", "Morning! The release branch is cut, CI is green.")
    carol.client.room_join("team")
    pump(everyone, lambda: "carol joined" in alice.conversation_text(), "carol in #team")
    carol.client.send_room("team", "QA starts after lunch. I'll post the test plan here.")
    pump(everyone, lambda: "test plan" in alice.conversation_text(), "carol's message")
    type_and_press(alice, "Great, thanks both. I'll update the changelog tonight.")
    bob.client.room_create("ops", "on-call and incidents")
    bob.client.room_invite("ops", ["alice"])
    pump(everyone, lambda: "✉  ops" in alice.rooms_text(), "the invitation to #ops")
    alice.client.room_join("ops")
    bob.client.send_room("ops", "Disk alert on broker-2 again.")
    bob.client.send_room("ops", "Cleared it; root cause tomorrow.")
    carol.client.room_create("design", "")
    carol.client.room_invite("design", ["alice"])
    carol.client.send_room("team", "Found one flaky test in the transfer suite, looking at it.")
    pump(everyone, lambda: alice.rooms_text() == ["✉  design", "#  ops  2", "#  team"]
         and "flaky test" in alice.conversation_text()
         and room_state(alice, "Great, thanks both. I'll update the changelog tonight.") == "sent ✓",
         "the rooms at alice")
    carol.close()
    everyone.remove(carol)
    pump(everyone, lambda: "○  carol" in alice.members_text(), "carol offline in #team")
    screenshots_of_both_themes(alice, everyone, "gui-rooms-")
    click(alice, K_THEME)
    select_room(alice, "design", everyone)
    screenshot(alice, "gui-rooms-invitation.png")
    select_room(alice, "team", everyone)
    click(alice, K_NEW_ROOM)
    fill_room_form(alice, "Team", "")
    pump(everyone, lambda: "Refused" in alice.window[K_ROOM_FORM_NOTE].get(), "the refusal")
    screenshot(alice, "gui-rooms-form.png")


def dashboard(path: Path) -> Path:
    """A picture worth a thumbnail: a build dashboard's bars on a gradient."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1200, 800))
    draw = ImageDraw.Draw(image)
    for y in range(800):
        draw.line([(0, y), (1200, y)], fill=(28 + y // 20, 40 + y // 16, 72 + y // 10))
    for i, height in enumerate((300, 420, 380, 520, 610, 560, 680)):
        x = 110 + i * 150
        draw.rectangle([x, 740 - height, x + 90, 740], fill=(76, 175, 80) if i != 2 else (229, 115, 115))
    draw.line([(80, 740), (1140, 740)], fill=(230, 230, 230), width=4)
    image.save(path, "PNG")
    return path


def test_screenshots_of_files(make_window, tmp_path, monkeypatch):
    """alice's #team with files from bob (the release notes) and carol (an image, with its thumbnail), in both
    themes; then a file for bob while he is offline, which the broker holds: "Uploaded — waiting for bob"."""
    if shutil.which("import") is None:
        pytest.skip("ImageMagick's import is not installed: no screenshots")
    monkeypatch.setenv("HOME", str(received_dir(tmp_path, "alice").parent))  # paths read "~/client_received/…"
    alice_desktop = FakeDesktop()
    alice, bob, carol = make_window("alice", desktop=alice_desktop), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●"), "everyone online")
    select_peer(alice, "bob", everyone)
    type_and_press(alice, "Can you put last night's CI numbers in #team?")
    pump(everyone, lambda: state(alice, "bob", "Can you put last night's CI numbers in #team?")[0] != "sending…",
         "alice's question sent")
    open_team(alice, everyone, "bob, carol")
    bob.client.room_join("team")
    carol.client.room_join("team")
    pump(everyone, lambda: "carol joined" in alice.conversation_text(), "carol in #team")
    bob.client.send_room("team", "Last night's CI run: all green but the transfer suite. Draft notes attached.")
    notes = tmp_path / "release-notes-2.4.pdf"
    notes.write_bytes(os.urandom(1_800_000))
    bob.client.send_room_file("team", notes)
    pump(everyone, lambda: len(alice.file_cards()) == 1, "bob's notes")  # in this order in the timeline
    carol.client.send_room("team", "The dashboard: the red bar is the flaky test, I'm on it.")
    carol.client.send_room_file("team", dashboard(tmp_path / "ci-dashboard.png"))
    pump(everyone, lambda: len(alice.file_cards()) == 2 and all(c.status_text.startswith("Received ✓")
                                                                for c in alice.file_cards())
         and alice.file_cards()[1].thumbnail_size is not None, "the files, with the thumbnail")
    screenshots_of_both_themes(alice, everyone, "gui-room-files-")

    click(alice, K_THEME)
    bob.close()
    everyone.remove(bob)
    pump(everyone, lambda: "○  bob" in alice.roster_text(), "bob offline")
    select_peer(alice, "bob", everyone)
    draft = tmp_path / "release-notes-2.4-draft.pdf"
    draft.write_bytes(os.urandom(2_600_000))
    held = attach(alice, alice_desktop, draft)
    pump(everyone, lambda: held.state.value == "uploaded",
         "the broker to hold it")
    screenshot(alice, "gui-file-held.png")
