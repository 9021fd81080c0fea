"""Notifications: a message or a file from someone whose conversation is not open pops one; clicking it opens it."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.window import GuiOptions  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import FakeDesktop, attach, select_peer, shows, type_and_press  # noqa: E402


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


def test_notifications_can_be_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("P2PCHAT_GUI_NOTIFY", "0")
    assert GuiOptions.from_env().notifications is False
    monkeypatch.setenv("P2PCHAT_GUI_NOTIFY", "1")
    assert GuiOptions.from_env().notifications is True
