"""Remembered settings: the theme switch survives a restart, and a damaged settings file means defaults."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.app import open_window  # noqa: E402
from p2pchat.client.gui.layout import K_THEME  # noqa: E402
from p2pchat.client.gui.settings import GuiSettings, SettingsStore  # noqa: E402
from p2pchat.client.gui.theme import DARK  # noqa: E402
from p2pchat.client.gui.window import GuiOptions  # noqa: E402
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import click  # noqa: E402


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
