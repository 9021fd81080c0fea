"""Switching between the light and the dark theme, which means building the window again in place.

A mixin of ``ChatWindow`` (window.py holds its state and builds the window).
"""

from __future__ import annotations

import queue
from typing import Any

from p2pchat.client.gui.layout import K_FORM_ERROR, K_HOST, K_PORT, K_SEARCH, K_USER
from p2pchat.client.gui.room_layout import K_ROOM_FIELDS
from p2pchat.client.gui.theme import Palette, palette


class ThemeSwitch:
    def set_theme(self, theme: str) -> None:
        """PySimpleGUI fixes colours when a window is built, so build it again, keeping its place."""
        self._update_settings(theme=theme)
        draft = self._composer().get("1.0", "end-1c")
        form = {key: self.window[key].get() for key in (K_HOST, K_PORT, K_USER, K_FORM_ERROR, K_SEARCH, *K_ROOM_FIELDS)}
        location, size = self.window.current_location(), self.window.size
        old = self.window
        self._parked = []
        old.close()
        stale: list[tuple[Any, Any]] = []
        while True:  # events already handed to the old window but not read yet
            try:
                stale.append(old.thread_queue.get_nowait())
            except queue.Empty:
                break
        self.window = self._build(location=location, size=size)
        parked, self._parked = self._parked, None
        for key, value in stale:
            self.window.write_event_value(key, value)
        for item in parked:
            self._deliver(item)
        self._composer().insert("1.0", draft)  # before _render_all may disable the composer
        for key, value in form.items():
            self.window[key].update(value)
        self._render_all()

    @property
    def palette(self) -> Palette:
        return palette(self.settings.theme)
