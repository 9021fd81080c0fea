"""Files that go through the broker's store, in real windows on a real broker: a room's (issue 16: uploaded once,
each member fetches it and sees it from its sender) and one for someone offline (issue 17: uploaded, the sender
may go, delivered when they come)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.file_model import Transfer  # noqa: E402
from p2pchat.client.gui.layout import K_ATTACH, K_ATTACH_FOLDER, K_SEND  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import FakeDesktop, attach, meet, select_peer, select_room, shows  # noqa: E402
from tests.client.gui.test_rooms import create_room, invite  # noqa: E402


def enabled(window, key: str) -> bool:
    return window.window[key].Widget.cget("state") == "normal"


def test_a_file_attached_in_a_room_reaches_each_member_with_its_senders_name(make_window, tmp_path):
    desktop = FakeDesktop()
    alice, bob, carol = make_window("alice", desktop=desktop), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●"), "everyone online")
    create_room(alice, "team", "", everyone[1:])
    invite(alice, "bob, carol", everyone[1:])
    bob.client.room_join("team")
    carol.client.room_join("team")
    pump(everyone, lambda: "bob joined" in alice.conversation_text() and "carol joined" in alice.conversation_text(),
         "bob and carol in #team")
    assert enabled(alice, K_ATTACH) and enabled(alice, K_ATTACH_FOLDER)
    plan = tmp_path / "test plan.pdf"
    plan.write_bytes(os.urandom(300_000))

    line = attach(alice, desktop, plan)
    assert desktop.titles == ["Send files to #team"] and line.room is not None and line.peer == "alice"
    card = alice.file_card(line.xfer)
    pump(everyone, lambda: line.state is Transfer.DONE, "the room to be told")
    assert card.status_text == "Sent ✓ · the room's members fetch it from the broker" and card.actions == []
    assert "#team was told about test plan.pdf" in alice.log_text()
    pump(everyone, lambda: bob.rooms_text() == ["#  team  1"] and carol.rooms_text() == ["#  team  1"],
         "the file unread in #team at bob and carol")
    for member in (bob, carol):
        select_room(member, "team", everyone)
        pump(everyone, lambda: member.file_cards() and member.file_cards()[0].status_text.startswith("Received ✓"),
             "the file fetched")
        (got,) = member.file_cards()
        saved = member.model.file(got.xfer)
        assert saved.peer == "alice" and saved.room == line.room and saved.path.read_bytes() == plan.read_bytes()
        assert got.actions == ["Open", "Show in folder"]
        header = [row for row in member.conversation_text().splitlines() if row.strip()][-1]
        assert header.startswith("alice ")  # the card's header (the card itself is no text): its sender
        assert member.rooms_text() == ["#  team"]


def test_a_file_for_someone_offline_is_uploaded_then_delivered_when_they_come(make_window, tmp_path):
    desktop = FakeDesktop()
    alice, bob = make_window("alice", desktop=desktop), make_window("bob")
    meet(alice, bob)
    bob.close()
    pump([alice], lambda: "bob" not in alice.model.online, "bob offline")
    assert alice.model.active == "bob"
    assert enabled(alice, K_ATTACH) and not enabled(alice, K_SEND)  # a file goes; a message waits as before
    slides = tmp_path / "slides.pdf"
    slides.write_bytes(os.urandom(400_000))

    line = attach(alice, desktop, slides)
    card = alice.file_card(line.xfer)
    assert line.held
    pump([alice], lambda: line.state is Transfer.UPLOADED, "the broker to hold it")
    assert card.status_text == "Uploaded — waiting for bob · you can go offline"
    assert card.actions == [] and not card.bar_shown and alice.transfers_status_text() == ""
    assert "Uploaded slides.pdf: the broker keeps it until bob fetches it" in alice.log_text()

    bob = make_window("bob")  # bob comes back
    pump([alice, bob], lambda: line.state is Transfer.DONE, "bob to fetch it")
    assert card.status_text == "Delivered ✓ · bob verified and saved it"
    select_peer(bob, "alice", [alice])
    (got,) = bob.file_cards()
    assert bob.model.file(got.xfer).path.read_bytes() == slides.read_bytes()
