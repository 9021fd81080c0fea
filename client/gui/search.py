"""Searching every conversation's history; the results replace the open conversation until one is opened.

A mixin of ``ChatWindow`` (window.py holds its state). The search reads the
window's own ``History`` connection, never the agent's.
"""

from __future__ import annotations

import sqlite3

from p2pchat.client.gui.layout import K_SEARCH
from p2pchat.client.gui.found import Search

SEARCH_FETCH = 1000  # matches counted, newest first
SEARCH_SHOWN = 100  # of which shown
OPEN_RESULT_LIMIT = 10_000  # how far back a search result's conversation is loaded to show it in place


class MessageSearch:
    def search(self, query: str) -> None:
        """Search every conversation's history; the results replace the conversation until one is opened."""
        query = query.strip()
        if not query:
            self.close_search()
            return
        if self.history is None:
            return
        try:
            found = self.history.search(query, limit=SEARCH_FETCH, newest_first=True)
        except sqlite3.Error as exc:
            self._log(f"Search failed: {exc}")
            return
        self.model.search = Search(query, tuple(found[:SEARCH_SHOWN]), len(found),
                                   capped=len(found) == SEARCH_FETCH)
        self._view().show_results(self.model.search, self.model.rooms.name)
        self._render_header()

    def close_search(self) -> None:
        """Back to the open conversation (Esc in the search box, or Close search)."""
        self.window[K_SEARCH].update("")
        if self.model.search is None:
            return
        self.model.search = None
        active = self.model.active
        self._view().show(self.model.conversation(active) if active else None, self._empty_hint())
        self._render_header()
        self._mark_read_if_viewing(opened=True)

    def open_result(self, msg_id: bytes) -> None:
        """A search result was clicked: its conversation, scrolled to the message, which is highlighted."""
        search = self.model.search
        entry = next((e for e in search.results if e.msg_id == msg_id), None) if search else None
        if entry is None:
            return
        key = entry.peer if entry.room is None else entry.room  # a room's message opens the room
        if self.model.line(msg_id) is None and self.history is not None:  # older than what was loaded
            try:
                self.model.load(key, self.history.conversation(entry.peer, OPEN_RESULT_LIMIT) if entry.room is None
                                else self.history.room_conversation(entry.room, OPEN_RESULT_LIMIT))
            except sqlite3.Error as exc:
                self._log(f"Cannot read the conversation: {exc}")
        self.window[K_SEARCH].update("")
        self.open_conversation(key, reveal=msg_id)
