"""Drawing ``ChatModel`` onto the window's elements, and reading the screen back as text (what tests check).

A mixin of ``ChatWindow`` (window.py holds its state): the connect form, the
status bar, the people list, the conversation header, the connection log. The
parts that belong to one concern are drawn by its own mixin
(``_render_security`` in key_verification, ``_render_transfers`` in transfers,
``_render_rooms`` and ``_render_room_view`` in rooms).
"""

from __future__ import annotations

import time
import tkinter as tk

from p2pchat.client.gui.conversation import ConversationView
from p2pchat.client.gui.filecard import FileCard
from p2pchat.client.gui.layout import (
    K_ATTACH,
    K_ATTACH_FOLDER,
    K_CHAT_VIEW,
    K_COMPOSER,
    K_CONNECT,
    K_CONNECT_VIEW,
    K_CONVERSATION,
    K_FORM_ERROR,
    K_FORM_PROGRESS,
    K_HOST,
    K_LOG,
    K_ME,
    K_NOTIFY,
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_PEERS,
    K_PEOPLE_COUNT,
    K_PORT,
    K_SETTINGS_NOTE,
    K_SEARCH_CLOSE,
    K_SEND,
    K_STATUS,
    K_STATUS_DETAIL,
    K_STATUS_DOT,
    K_STATUS_KEY,
    K_STATUS_TRANSFERS,
    K_THEME,
    K_USER,
)
from p2pchat.client.gui.found import search_summary
from p2pchat.client.gui.model import LOG_LINES, Key, Link
from p2pchat.client.gui.settings import FormError
from p2pchat.common.crypto import fingerprint

STATUS_TEXT = {
    Link.OFFLINE: "Offline",
    Link.CONNECTING: "Connecting…",
    Link.CONNECTED: "Connected",
    Link.RECONNECTING: "Reconnecting…",
}


def now_ms() -> int:
    """The wall clock, for what the window itself timestamps: log lines, and messages and files it sends."""
    return int(time.time() * 1000)


class Rendering:
    def _render_all(self) -> None:
        on_chat = self.model.link in (Link.CONNECTED, Link.RECONNECTING)
        self.window[K_CONNECT_VIEW].update(visible=not on_chat)
        self.window[K_CHAT_VIEW].update(visible=on_chat)
        self._render_form()
        self._render_status()
        self._render_roster()
        self._render_header()
        active, search = self.model.active, self.model.search
        if search is not None:
            self._view().show_results(search, self.model.rooms.name)
        else:
            self._view().show(self.model.conversation(active) if active else None, self._empty_hint())
        self._render_log()
        self._render_devices()
        self.window.set_title(f"p2p-chat — {self.model.user}" if on_chat else "p2p-chat")

    def _render_form(self) -> None:
        busy = self.model.link is Link.CONNECTING
        for key in (K_HOST, K_PORT, K_USER):
            self.window[key].update(disabled=busy)
        self.window[K_CONNECT].update("Cancel" if busy else "Connect")
        target = self.target
        self.window[K_FORM_PROGRESS].update(
            f"Connecting to {target.server} as {target.user}…" if busy and target else "")
        if busy:
            self.window[K_FORM_ERROR].update("")

    def _show_form_error(self, error: FormError) -> None:
        self.window[K_FORM_ERROR].update(error.message)
        # Two lines keep the card still for the usual messages; a security warning may take more.
        self.window[K_FORM_ERROR].Widget.configure(height=2 if len(error.message) < 90 else 0)
        field = {"host": K_HOST, "port": K_PORT, "user": K_USER}[error.field]
        self.window[field].set_focus()
        self.window[field].Widget.select_range(0, "end")

    def _render_status(self) -> None:
        pal, link = self.palette, self.model.link
        colour = {Link.CONNECTED: pal.ok, Link.OFFLINE: pal.offline}.get(link, pal.warn)
        self.window[K_STATUS_DOT].update(text_color=colour)
        self.window[K_STATUS].update(STATUS_TEXT[link])
        target = self.target
        if target is None:
            detail = "not connected"
        elif link is Link.OFFLINE:
            detail = f"disconnected from {target.server}"
        elif link is Link.RECONNECTING:
            detail = f"broker {target.server} is not answering; retrying"
        else:
            detail = f"{target.user} @ {target.server}"
        self.window[K_STATUS_DETAIL].update(detail)
        client = self.client
        if client is None or link in (Link.OFFLINE, Link.CONNECTING):
            self.window[K_STATUS_KEY].update("")
        elif client.broker_key is None:
            self.window[K_STATUS_KEY].update("·   not encrypted", text_color=pal.warn)
        else:
            self.window[K_STATUS_KEY].update(f"·   encrypted · broker key {fingerprint(client.broker_key)}",
                                             text_color=pal.status_text)
        self._render_transfers()
        pending = client is not None and (client.config.read_receipts != self.settings.read_receipts
                                          or client.config.trust_key_changes != self.settings.trust_key_changes
                                          or client.config.accept_files != self.settings.accept_files
                                          or self._received_dir_pending())
        self.window[K_SETTINGS_NOTE].update("applies when you reconnect" if pending else "")
        self._render_received_dir()
        if self.options.notifications:
            self.window[K_NOTIFY].update("Notifications: on" if self.settings.notifications else "Notifications: off")
        self.window[K_THEME].update("Dark theme" if self.settings.theme == "light" else "Light theme")

    def _render_roster(self, select: Key | None = None) -> None:
        """People, then rooms (rooms.py). ``select``: the row of a conversation being opened (by a list, a
        notification or a search result); a room's clears the people's selection, and the other way round."""
        pal, fonts = self.palette, self.fonts
        rows = self.model.roster()
        names = [r.name for r in rows]
        table = self.window[K_PEERS]
        # A click not handled yet outranks the open conversation: re-rendering must not undo it.
        keep = select if select is not None else self._selected_peer() or self.model.active
        selected = [names.index(keep)] if keep in names else []
        table.update(values=[[r.name, self._badge(r.unread, r.key_changed)] for r in rows], select_rows=selected)
        tree = table.Widget
        for i, (iid, row) in enumerate(zip(tree.get_children(), rows)):
            # sg.Table puts the row's text in the tree column too: replace it with the presence dot.
            tree.item(iid, text="", image=self._dots[row.online])
            tree.tag_configure(i, foreground=pal.sidebar_text if row.online else pal.offline,
                               font=fonts.bold if row.unread or row.key_changed else fonts.base)
        online = len(self.model.online)
        self.window[K_PEOPLE_COUNT].update(f"{online} online" if online else "nobody else online")
        self.window[K_ME].update(f"@{self.model.user}" if self.model.user else "")
        self._render_rooms(select)

    @staticmethod
    def _badge(unread: int, key_changed: bool) -> str:
        count = str(unread) if unread else ""
        return f"⚠ {count}".strip() if key_changed else count

    def _selected_peer(self) -> str | None:
        """The row selected on screen, by name (row numbers shift as people come and go)."""
        return self._selected_name(K_PEERS)

    def _selected_name(self, key: str) -> str | None:
        """The name in the selected row of a list of people (the people's, a room's members)."""
        tree = self.window[key].Widget
        for iid in tree.selection():
            values = tree.item(iid, "values")
            if values:
                return str(values[0])  # ttk turns a digits-only name into an int
        return None

    def _render_header(self) -> None:
        peer, search = self.model.active, self.model.search
        self._set_visible(K_SEARCH_CLOSE, search is not None)
        if search is not None:
            self.window[K_PEER_NAME].update("Search")
            self.window[K_PEER_PRESENCE].update(search_summary(search), text_color=self.palette.muted)
        else:
            self._render_presence(peer)
        pal, can_send, can_attach = self.palette, self._can_send(), self._can_attach()
        # Tk greys out neither a disabled Text nor a coloured Button: recolour them so "disabled" shows.
        self._composer().configure(state="normal" if can_send else "disabled",
                                   background=pal.input_bg if can_send else pal.chat_bg,
                                   highlightcolor=pal.accent if can_send else pal.border)
        self.window[K_SEND].update(disabled=not can_send, button_color=(pal.accent_text, pal.accent) if can_send
                                   else (pal.muted, pal.border))
        for key in (K_ATTACH, K_ATTACH_FOLDER):
            self.window[key].update(disabled=not can_attach, button_color=(pal.text, pal.input_bg) if can_attach
                                    else (pal.muted, pal.chat_bg))
        self._render_security()
        self._render_room_view()

    def _render_presence(self, peer: Key | None) -> None:
        if type(peer) is bytes:
            self._render_room_header(peer)
            return
        self.window[K_PEER_NAME].update(peer or "No conversation open")
        if peer is None:
            presence = ""
        elif peer in self.model.online:
            presence = "● online"
        else:
            presence = "○ offline — files wait for them at the broker"  # messages: Send is off
        self.window[K_PEER_PRESENCE].update(presence, text_color=self.palette.ok if peer in self.model.online
                                            else self.palette.muted)

    def _set_visible(self, key: str, visible: bool) -> None:
        element = self.window[key]
        if element.visible != visible:  # re-packing a visible element moves it: only on a change
            element.update(visible=visible)

    def _showing(self, peer: Key) -> bool:
        """Whether ``peer``'s (or a room's) conversation is on screen (not hidden by search results)."""
        return peer == self.model.active and self.model.search is None

    def _can_send(self) -> bool:
        """To a person online, or to a room we are in (its members offline get it later)."""
        active = self.model.active
        reachable = self.model.rooms.joined(active) if type(active) is bytes else active in self.model.online
        return (active is not None and self.model.search is None and reachable
                and self.model.link in (Link.CONNECTED, Link.RECONNECTING))

    def _can_attach(self) -> bool:
        """Files go to a room we are in, or to anyone whose key is not in doubt: to someone offline too, through the
        broker, which keeps them until they come (a message to them is not sent: ``_can_send``)."""
        active = self.model.active
        reachable = self.model.rooms.joined(active) if type(active) is bytes else \
            active is not None and active not in self.model.key_changed
        return (reachable and self.model.search is None
                and self.model.link in (Link.CONNECTED, Link.RECONNECTING))

    def _empty_hint(self) -> str:
        peer = self.model.active
        if type(peer) is bytes:
            sealed = self.client is not None and self.client.config.encrypt and self.model.rooms.joined(peer)
            return f"This is the start of #{self.model.rooms.name(peer)}." + (
                "\nMessages are end-to-end encrypted for its members." if sealed else "")
        if peer is not None:
            sealed = self.client is not None and self.client.config.encrypt
            return f"This is the start of your conversation with {peer}." + (
                "\nMessages and files are end-to-end encrypted; press Verify to compare keys." if sealed else "")
        if self.model.online:
            return "Pick someone on the left to start a conversation."
        return "Nobody else is online yet.\nConversations appear here when someone joins."

    def _log(self, text: str) -> None:
        ts = now_ms()
        self.model.add_log(ts, text)
        self._append_log_line(ts, text)

    def _render_log(self) -> None:
        widget = self.window[K_LOG].Widget
        widget.configure(state="normal")
        widget.delete("1.0", "end")
        widget.configure(state="disabled")
        for ts, text in self.model.log:
            self._append_log_line(ts, text)

    def _append_log_line(self, ts: int, text: str) -> None:
        widget = self.window[K_LOG].Widget
        widget.configure(state="normal")
        if widget.get("1.0", "end-1c"):
            widget.insert("end", "\n")
        widget.insert("end", time.strftime("%H:%M:%S", time.localtime(ts / 1000)) + "  ", ("time",))
        widget.insert("end", text)
        if int(widget.index("end-1c").split(".")[0]) > LOG_LINES:
            widget.delete("1.0", "2.0")
        widget.configure(state="disabled")
        widget.see("end")

    def _composer(self) -> tk.Text:
        return self.window[K_COMPOSER].Widget

    def _view(self) -> ConversationView:
        return self._conversation_view

    # --- reading the window (what a user sees; used by tests) -----------------------------
    def status_text(self) -> str:
        return f"{self.window[K_STATUS].get()} {self.window[K_STATUS_DETAIL].get()}".strip()

    def roster_text(self) -> list[str]:
        """Rows as "●  name  unread" ("○" when offline): the dot is an image on screen."""
        tree = self.window[K_PEERS].Widget
        rows = []
        for iid in tree.get_children():
            dot = "●" if tree.item(iid, "image") == (str(self._dots[True]),) else "○"
            rows.append("  ".join([dot, *(str(c) for c in tree.item(iid, "values") if str(c))]))
        return rows

    def conversation_text(self) -> str:
        """The open conversation, or the search results, as plain text."""
        return self.window[K_CONVERSATION].Widget.get("1.0", "end-1c")

    def delivery_shown(self, msg_id: bytes) -> tuple[str, str]:
        """(text, style) of an outgoing message's delivery state on screen, e.g. ("read ✓✓", "meta-read")."""
        line = self.model.line(msg_id)
        return self._view().delivery_shown(line) if line is not None else ("", "")

    def file_cards(self) -> list[FileCard]:
        """The files in the open conversation, oldest first."""
        return self._view().cards()

    def file_card(self, xfer: bytes) -> FileCard | None:
        return self._view().card(xfer)

    def key_status_text(self) -> str:
        return self.window[K_STATUS_KEY].get()

    def transfers_status_text(self) -> str:
        return self.window[K_STATUS_TRANSFERS].get()

    def shown(self, key: str) -> bool:
        """Whether an element that comes and goes (banner, panel, note) is on screen now."""
        return bool(self.window[key].visible)

    def form_error(self) -> str:
        return self.window[K_FORM_ERROR].get()

    def log_text(self) -> str:
        return self.window[K_LOG].Widget.get("1.0", "end-1c")
