"""Message notifications: a ``Toast`` in the corner of the screen, and when the window pops one.

``sg.popup_notify`` runs its own read loop for the whole display time (seconds
of a frozen chat window), so ``Toast`` builds the same kind of borderless,
always-on-top window and lets Tk timers close it while the main loop runs on.
``Notifications`` is a mixin of ``ChatWindow`` (window.py holds its state);
``should_notify`` in model.py is the rule.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable

import PySimpleGUI as sg

from p2pchat.client.gui.layout import TOAST_CLICKED
from p2pchat.client.gui.theme import Fonts, Palette

MARGIN = 24
PREVIEW_CHARS = 120


class Toast:
    def __init__(self, pal: Palette, fonts: Fonts, title: str, message: str, duration_ms: int,
                 on_click: Callable[[], None]) -> None:
        preview = message if len(message) <= PREVIEW_CHARS else message[: PREVIEW_CHARS - 1] + "…"
        card = sg.Column([
            [sg.Text(title, font=fonts.bold, text_color=pal.text, background_color=pal.chat_bg, pad=((14, 14), (10, 2)))],
            [sg.Text(preview, font=fonts.base, text_color=pal.muted, background_color=pal.chat_bg,
                     size=(38, None), pad=((14, 14), (0, 12)))],
        ], background_color=pal.chat_bg, pad=1)  # the 1 px the window's colour shows through is the border
        screen_w, screen_h = sg.Window.get_screen_size()
        self.window = sg.Window(
            "p2p-chat notification", [[card]], no_titlebar=True, keep_on_top=True, alpha_channel=0.97,
            background_color=pal.border, margins=(0, 0), element_padding=(0, 0), finalize=True,
            location=(screen_w, screen_h),  # off screen until its size is known
        )
        width, height = self.window.size  # known only once built: the preview may wrap
        self.window.move(screen_w - width - MARGIN, screen_h - height - MARGIN)
        root = self.window.TKroot
        self._on_click = on_click
        root.bind("<Button-1>", self._clicked)  # every child's bindtags include its toplevel
        self._timer = root.after(duration_ms, self.close)

    @property
    def is_open(self) -> bool:
        return not self.window.was_closed()

    def _clicked(self, _event: tk.Event) -> None:
        self.close()
        self._on_click()

    def close(self) -> None:
        if not self.is_open:
            return
        try:
            self.window.TKroot.after_cancel(self._timer)
        except tk.TclError:
            pass  # the timer is what called us
        self.window.close()


class Notifications:
    """When the window pops a ``Toast``: a mixin of ``ChatWindow`` (window.py holds its state)."""

    def _notifications_on(self) -> bool:
        return self.options.notifications and self.settings.notifications

    def _notify(self, sender: str | bytes, text: str, title: str | None = None) -> None:
        """``sender``: the conversation a click opens (a person's name, or a room's id, with a ``title``)."""
        if self._toast is not None:
            self._toast.close()
        self._toast = Toast(self.palette, self.fonts, title or str(sender), text, self.options.toast_ms,
                            on_click=lambda: self.window.write_event_value(TOAST_CLICKED, sender))

    @property
    def toast(self) -> Toast | None:
        return self._toast if self._toast is not None and self._toast.is_open else None
