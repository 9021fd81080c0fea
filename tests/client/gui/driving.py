"""Driving real chat windows as a user would: click, type, pick a person or a room, fill in the room form, attach
a file, search; and look.

Each input runs inside the window's own read loop, where real input happens
(``act``); ``pump`` (conftest.py) then steps the windows until the screen shows
the outcome.
"""

from __future__ import annotations

import time
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PySimpleGUI as sg

from p2pchat.client.gui.desktop import Desktop
from p2pchat.client.gui.filecard import FileCard
from p2pchat.client.gui.layout import K_ATTACH, K_COMPOSER, K_CONVERSATION, K_PEERS, K_SEARCH
from p2pchat.client.gui.file_model import FileLine
from p2pchat.client.gui.model import ChatLine
from p2pchat.client.gui.room_layout import K_MEMBERS, K_ROOM_FIELDS, K_ROOM_FORM, K_ROOM_FORM_OK, K_ROOMS
from p2pchat.client.gui.window import ChatWindow
from tests.client.gui.conftest import pump


@dataclass
class FakeDesktop:
    """Answers the file and folder dialogs with what the test queued; records what it was asked to open."""

    to_choose: list[list[Path]] = field(default_factory=list)  # each dialog's answer: the files chosen
    folders: list[Path] = field(default_factory=list)  # each folder dialog's answer
    opened: list[Path] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)  # the dialogs' titles, as asked

    def choose_files(self, _parent: tk.Misc, title: str) -> list[str]:
        self.titles.append(title)
        return [str(path) for path in self.to_choose.pop(0)] if self.to_choose else []

    def choose_folder(self, _parent: tk.Misc, title: str, _start: str) -> str | None:
        self.titles.append(title)
        return str(self.folders.pop(0)) if self.folders else None

    def open_path(self, path: Path) -> None:
        self.opened.append(path)

    def desktop(self) -> Desktop:
        return Desktop(choose_files=self.choose_files, choose_folder=self.choose_folder, open_path=self.open_path)


def act(window: ChatWindow, action: Callable[[], None], timeout: float = 10.0) -> None:
    """Run a synthetic input inside this window's own ``read``, where real input happens.

    PySimpleGUI keeps one pending event per window, and a ``read`` that finds a client event queued returns
    that and forgets the pending one: an input generated between reads could be lost. The read waits without a
    short timeout: its alarm, due in the same pass of Tk's timers as the input on a busy machine, would overwrite
    the input's event with a timeout. A timeout event queued after the input ends the read if it made none.
    """
    ran: list[bool] = []

    def run() -> None:
        action()
        ran.append(True)
        window.window.write_event_value(sg.TIMEOUT_EVENT, None)

    window.window.TKroot.after(0, run)
    deadline = time.monotonic() + timeout
    while not ran:
        if time.monotonic() > deadline:
            raise AssertionError("the window never ran its event loop")
        window.step(int(timeout * 1000))


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


def meet(a: ChatWindow, b: ChatWindow) -> None:
    """Both online, each with the other's conversation open."""
    pump([a, b], lambda: shows(a, b.model.user, "●") and shows(b, a.model.user, "●"), "each to see the other")
    select_peer(a, b.model.user, [b])
    select_peer(b, a.model.user, [a])


def attach(window: ChatWindow, desktop: FakeDesktop, *paths: Path, key: str = K_ATTACH) -> FileLine:
    """Press Attach and pick ``paths`` in the (faked) dialog, or Folder (``key``) and pick the one in ``paths``;
    the first file's line in the timeline."""
    if key == K_ATTACH:
        desktop.to_choose.append(list(paths))
    else:
        desktop.folders.extend(paths)
    before = {card.xfer for card in window.file_cards()}
    click(window, key)
    new = [window.model.file(card.xfer) for card in window.file_cards() if card.xfer not in before]
    sent = [line for line in new if line is not None and line.outgoing]
    assert len(sent) == len(paths), "each file appears in the timeline at once"
    return sent[0]


def sparse(path: Path, size: int) -> Path:
    """A big file that costs nothing to make: it reads as zeros."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def moving(card: FileCard | None, verb: str) -> bool:
    """The row shows a transfer under way, with its rate and time left."""
    return card is not None and card.status_text.startswith(verb) and "/s · " in card.status_text \
        and card.status_text.endswith(" left")


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


def select_room(window: ChatWindow, name: str, others: list[ChatWindow]) -> None:
    """Click a row of the ROOMS list (a room, or an invitation)."""
    tree = window.window[K_ROOMS].Widget
    index = next(i for i, row in enumerate(window.rooms_text()) if row.split()[1] == name)
    act(window, lambda: tree.selection_set(tree.get_children()[index]))
    pump([window, *others], lambda: window.model.active == window._room_rows[index], f"#{name} to open")


def select_member(window: ChatWindow, user: str) -> None:
    """Click a member in the open room's members column."""
    tree = window.window[K_MEMBERS].Widget
    index = next(i for i, row in enumerate(window.members_text()) if row.split()[1] == user)
    act(window, lambda: tree.selection_set(tree.get_children()[index]))
    pump([window], lambda: window._selected_member() == user, f"{user} selected")


def fill_room_form(window: ChatWindow, *values: str, enter: bool = False) -> None:
    """Type into the room form's fields (after a button opened it) and click its button, or press Enter in the
    last field."""
    assert window.shown(K_ROOM_FORM), "the room form is open"
    for key, value in zip(K_ROOM_FIELDS, values):
        act(window, lambda key=key, value=value: window.window[key].update(value))
    if not enter:
        click(window, K_ROOM_FORM_OK)
        return
    entry = window.window[K_ROOM_FIELDS[len(values) - 1]].Widget
    act(window, entry.focus_force)
    pump([window], lambda: entry.focus_get() == entry, "the field to take the keyboard focus")
    act(window, lambda: entry.event_generate("<Return>"))


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
