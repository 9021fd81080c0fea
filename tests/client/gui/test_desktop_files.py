"""The desktop's file handling in real windows on a real broker (issue 17, point 4): files and folders dragged onto
the window (real XDND, from another X client), several files chosen at once, Open and Show in folder through the
desktop's opener (and the message when there is none), the received folder chosen in settings, and thumbnails of
received images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from PIL import Image  # noqa: E402

from p2pchat.client import events as ev  # noqa: E402
from p2pchat.client.gui.desktop import Desktop  # noqa: E402
from p2pchat.client.gui.file_model import Transfer  # noqa: E402
from p2pchat.client.gui.layout import (  # noqa: E402
    K_ATTACH_FOLDER,
    K_CONNECT,
    K_DISCONNECT,
    K_RECEIVED_DIR,
    K_SETTINGS_NOTE,
)
from tests.client.gui.conftest import pump, received_dir  # noqa: E402
from tests.client.gui.dragging import drag_onto  # noqa: E402
from tests.client.gui.driving import FakeDesktop, act, attach, click, meet  # noqa: E402


def arrived(window, count: int) -> bool:
    """``count`` files in the open conversation, all received and saved."""
    lines = [window.model.file(card.xfer) for card in window.file_cards()]
    return len(lines) == count and all(line.state is Transfer.DONE and not line.outgoing for line in lines)


def test_files_dragged_onto_the_window_go_to_the_open_conversation(make_window, tmp_path):
    alice, bob = make_window("alice"), make_window("bob")
    meet(alice, bob)
    first = tmp_path / "meeting notes.txt"  # a space: the drop's list quotes it
    first.write_text("agenda\n")
    second = tmp_path / "café-menu.pdf"  # not ASCII: the file manager's URI percent-encodes it
    second.write_bytes(os.urandom(50_000))

    drag_onto(alice, [bob], first, second)
    assert not alice.drag_over  # the timeline's drop border is gone again
    pump([alice, bob], lambda: arrived(bob, 2), "both files at bob")
    got = {bob.model.file(card.xfer).name: bob.model.file(card.xfer).path for card in bob.file_cards()}
    assert got["meeting notes.txt"].read_text() == "agenda\n"
    assert got["café-menu.pdf"].read_bytes() == second.read_bytes()
    assert [alice.model.file(card.xfer).name for card in alice.file_cards()] == ["meeting notes.txt", "café-menu.pdf"]


def test_a_dropped_or_chosen_folder_is_handed_to_the_library_as_one_transfer(make_window, tmp_path):
    desktop = FakeDesktop()
    alice, bob = make_window("alice", desktop=desktop), make_window("bob")
    meet(alice, bob)
    photos = tmp_path / "holiday photos"
    (photos / "day 1").mkdir(parents=True)
    (photos / "day 1" / "beach.jpg").write_bytes(os.urandom(2000))
    drag_onto(alice, [bob], photos)
    (dropped,) = alice.file_cards()
    chosen = attach(alice, desktop, photos, key=K_ATTACH_FOLDER)
    assert desktop.titles == ["Send a folder to bob"]
    for line in (alice.model.file(dropped.xfer), chosen):
        # One card each, named after the folder; whether it goes (the library's folders) or is refused, the
        # library had the folder itself, not its files one by one.
        assert line.name == "holiday photos" and line.folder and line.outgoing
    assert len(alice.file_cards()) == 2


def test_a_received_folder_is_one_card_that_opens_the_folder(make_window, tmp_path):
    desktop = FakeDesktop()
    alice, bob = make_window("alice"), make_window("bob", desktop=desktop)
    meet(alice, bob)
    folder = received_dir(tmp_path, "bob") / "20261130_101500_alice_holiday photos"
    (folder / "day 1").mkdir(parents=True)
    # What the library reports once a folder is in (the folders branch adds files and bytes to it).
    bob.bridge.post((bob._generation, ev.FileReceived(b"folder-xfer-1", "alice", "holiday photos", folder, 4096)))
    pump([alice, bob], lambda: len(bob.file_cards()) == 1, "the folder's card")
    (card,) = bob.file_cards()
    assert card.status_text == "Received ✓ · folder, verified and saved" and card.thumbnail_size is None
    act(bob, card.button("Open").invoke)
    act(bob, card.button("Show in folder").invoke)
    pump([bob], lambda: len(desktop.opened) == 2, "the folder and its parent opened")
    assert desktop.opened == [folder, folder.parent]


def test_several_files_chosen_at_once_are_each_sent(make_window, tmp_path):
    desktop = FakeDesktop()
    alice, bob = make_window("alice", desktop=desktop), make_window("bob")
    meet(alice, bob)
    paths = [tmp_path / f"part-{i}.bin" for i in range(3)]
    for path in paths:
        path.write_bytes(os.urandom(10_000))
    attach(alice, desktop, *paths)
    assert desktop.titles == ["Send files to bob"]
    pump([alice, bob], lambda: arrived(bob, 3), "the three files at bob")
    assert sorted(bob.model.file(c.xfer).path.read_bytes() for c in bob.file_cards()) == \
        sorted(path.read_bytes() for path in paths)


def fake_opener(bin_dir: Path, log: Path) -> None:
    """An ``xdg-open`` that only writes down what it was asked to open."""
    bin_dir.mkdir()
    opener = bin_dir / "xdg-open"
    opener.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{log}'\n")
    opener.chmod(0o755)


def received_file(make_window, tmp_path):
    """bob's window, with the desktop's real opener and a file from alice received: (window, card, saved path)."""
    alice, bob = make_window("alice"), make_window("bob")
    bob.desktop = Desktop()
    meet(alice, bob)
    source = tmp_path / "report.pdf"
    source.write_bytes(os.urandom(20_000))
    alice.send_file("bob", source)
    pump([alice, bob], lambda: arrived(bob, 1), "the file at bob")
    (card,) = bob.file_cards()
    return bob, card, bob.model.file(card.xfer).path


def test_open_and_show_in_folder_run_the_desktops_opener(make_window, tmp_path, monkeypatch):
    log = tmp_path / "opened.txt"
    fake_opener(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    bob, card, path = received_file(make_window, tmp_path)
    act(bob, card.button("Open").invoke)
    pump([bob], lambda: log.exists() and len(log.read_text().splitlines()) == 1, "the opener to run")
    act(bob, card.button("Show in folder").invoke)
    pump([bob], lambda: len(log.read_text().splitlines()) == 2, "the opener to run again")
    assert log.read_text().splitlines() == [str(path), str(path.parent)]
    assert card.note_text == ""


def test_without_an_opener_the_card_says_so(make_window, tmp_path, monkeypatch):
    (tmp_path / "empty-bin").mkdir()
    bob, card, path = received_file(make_window, tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # neither xdg-open nor gio
    act(bob, card.button("Show in folder").invoke)
    pump([bob], lambda: card.note_text != "", "the card's note")
    assert card.note_text.endswith(": no program to open files is installed (looked for xdg-open and gio)")
    assert "no program to open files" in bob.log_text() and "exist" not in bob.log_text()
    path.unlink()
    act(bob, card.button("Open").invoke)
    pump([bob], lambda: "moved or deleted" in card.note_text, "the note about the file gone")
    assert card.note_text.endswith("report.pdf: it is no longer there (moved or deleted)")


def test_the_received_folder_chosen_in_settings_is_used_from_the_next_connection(make_window, tmp_path, home):
    desktop = FakeDesktop()
    alice, bob = make_window("alice"), make_window("bob", desktop=desktop)
    meet(alice, bob)
    assert bob.window[K_RECEIVED_DIR].get_text() == "Save files in …/client_received"  # the tail of a long path
    chosen = tmp_path / "Downloads"
    chosen.mkdir()
    desktop.folders.append(chosen)
    click(bob, K_RECEIVED_DIR)
    assert desktop.titles == ["Save received files in"]
    assert json.loads((home / "gui.json").read_text())["received_dir"] == str(chosen)
    assert bob.window[K_SETTINGS_NOTE].get() == "applies when you reconnect"
    assert bob.window[K_RECEIVED_DIR].get_text() == "Save files in …/Downloads"
    first = tmp_path / "first.txt"
    first.write_text("before\n")
    alice.send_file("bob", first)
    pump([alice, bob], lambda: arrived(bob, 1), "the first file")
    assert bob.model.file(bob.file_cards()[0].xfer).path.parent == received_dir(tmp_path, "bob")

    click(bob, K_DISCONNECT)
    click(bob, K_CONNECT)
    pump([alice, bob], lambda: bob.status_text().startswith("Connected"), "bob back")
    assert bob.window[K_SETTINGS_NOTE].get() == "" and bob.client.config.received_dir == chosen
    meet(alice, bob)
    second = tmp_path / "second.txt"
    second.write_text("after\n")
    alice.send_file("bob", second)
    pump([alice, bob], lambda: arrived(bob, 2), "the second file")
    assert bob.model.file(bob.file_cards()[1].xfer).path.parent == chosen


def image(path: Path, size: tuple[int, int], fmt: str) -> Path:
    Image.new("RGB", size, (40, 120, 200)).save(path, fmt)
    return path


def test_received_images_show_thumbnails_and_a_damaged_one_shows_none(make_window, tmp_path, caplog):
    desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice, bob = make_window("alice", desktop=desktop), make_window("bob", desktop=bob_desktop)
    meet(alice, bob)
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(5000))  # a JPEG's start, then noise
    photo = image(tmp_path / "photo.jpg", (1200, 900), "JPEG")
    chart = image(tmp_path / "chart.png", (200, 400), "PNG")
    attach(alice, desktop, damaged, photo, chart)
    pump([alice, bob], lambda: arrived(bob, 3), "the images at bob")
    cards = {bob.model.file(card.xfer).name: card for card in bob.file_cards()}
    # One worker makes them in order: the last one shown means the others were made, or found unusable.
    pump([alice, bob], lambda: cards["chart.png"].thumbnail_size is not None, "the thumbnails")
    assert cards["photo.jpg"].thumbnail_size == (213, 160) and cards["chart.png"].thumbnail_size == (80, 160)
    assert cards["damaged.jpg"].thumbnail_size is None
    assert cards["damaged.jpg"].status_text == "Received ✓ · verified and saved"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert all(card.thumbnail_size is None for card in alice.file_cards())  # ours are not received images
    thumb = cards["chart.png"].thumbnail
    pump([bob], lambda: thumb.winfo_viewable(), "the last card in view, with its thumbnail")
    act(bob, lambda: thumb.event_generate("<Button-1>", x=5, y=5))  # a click on it opens the image
    pump([bob], lambda: bob_desktop.opened != [], "the image to open")
    assert bob_desktop.opened == [bob.model.file(cards["chart.png"].xfer).path]
