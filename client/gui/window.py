"""The chat window: ``ChatWindow.handle``, the one place every event is dispatched.

Threads: everything here runs on the Tk thread. The client library's agent
owns the network and the disk of a transfer; its events come back through
``TkEventBridge`` as ``CLIENT_EVENT`` window events, so the loop is a plain
blocking ``window.read()``. Tests drive the same ``handle`` by stepping the loop.
The window reads past conversations and searches through its own ``History``
connection, opened with each client; the agent writes, the window only reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sqlite3
import time
import tkinter as tk
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PySimpleGUI as sg

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.client.gui.bridge import TkEventBridge
from p2pchat.client.gui.conversation import ConversationView
from p2pchat.client.gui.desktop import Desktop
from p2pchat.client.gui.filecard import FileCard
from p2pchat.client.gui.layout import (
    CLIENT_EVENT,
    COMPOSER_SEND,
    FILE_CANCEL,
    FILE_OPEN_FOLDER,
    FORM_SUBMIT,
    K_ACCEPT_KEY,
    K_ATTACH,
    K_COMPARE_KEY,
    K_CHAT_VIEW,
    K_COMPOSER,
    K_CONNECT,
    K_CONNECT_VIEW,
    K_COMPOSER_NOTE,
    K_CONVERSATION,
    K_DISCONNECT,
    K_FORM_ERROR,
    K_FORM_PROGRESS,
    K_HOST,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_BANNER_TITLE,
    K_KEY_HIDE,
    K_KEY_INFO,
    K_KEY_PANEL,
    K_KEY_PANEL_NOTE,
    K_KEY_PANEL_TITLE,
    K_LOG,
    K_ME,
    K_NOTIFY,
    K_OWN_FP,
    K_PEER_FP,
    K_PEER_FP_LABEL,
    K_PEER_KEY,
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_PEERS,
    K_PEOPLE_COUNT,
    K_PORT,
    K_RECEIPTS,
    K_RECEIPTS_NOTE,
    K_SAFETY,
    K_SEARCH,
    K_SEARCH_CLOSE,
    K_SEND,
    K_STATUS,
    K_STATUS_DETAIL,
    K_STATUS_DOT,
    K_STATUS_KEY,
    K_STATUS_TRANSFERS,
    K_THEME,
    K_USER,
    SEARCH_ESCAPE,
    SEARCH_OPEN,
    SEARCH_SUBMIT,
    TOAST_CLICKED,
    WINDOW_FOCUSED,
    build_window,
    dot_image,
)
from p2pchat.client.gui.model import (
    HISTORY_LIMIT,
    LOG_LINES,
    ChatLine,
    ChatModel,
    FileLine,
    KeyChange,
    Link,
    Search,
    Transfer,
    describe_failure,
    human_size,
    search_summary,
    should_notify,
    short_path,
)
from p2pchat.client.gui.settings import ConnectTarget, FormError, GuiSettings, SettingsStore, validate_connect
from p2pchat.client.gui.theme import Fonts, Palette, palette, pick_fonts
from p2pchat.client.gui.toast import Toast
from p2pchat.client.storage.history import History
from p2pchat.common.crypto import fingerprint, safety_number
from p2pchat.common.errors import ErrorCode, P2PChatError

log = logging.getLogger(__name__)

STATUS_TEXT = {
    Link.OFFLINE: "Offline",
    Link.CONNECTING: "Connecting…",
    Link.CONNECTED: "Connected",
    Link.RECONNECTING: "Reconnecting…",
}
SEARCH_FETCH = 1000  # matches counted, newest first
SEARCH_SHOWN = 100  # of which shown
OPEN_RESULT_LIMIT = 10_000  # how far back a search result's conversation is loaded to show it in place


@dataclass(frozen=True, slots=True)
class GuiOptions:
    """Start-up options that are not user settings: test speed-ups and the notification kill switch."""

    notifications: bool = True  # False hides the toggle and never pops a notification
    toast_ms: int = 5000
    heartbeat_ivl: float = 1.0
    liveness: int = 3
    send_timeout: float = 10.0
    received_dir: Path | None = None  # None: the client library's default (~/client_received)
    client_overrides: tuple[tuple[str, Any], ...] = ()  # more ClientConfig fields (tests slow transfers down)

    @classmethod
    def from_env(cls) -> GuiOptions:
        """``P2PCHAT_GUI_NOTIFY=0`` turns notifications off (tests, screen sharing, kiosks)."""
        setting = os.environ.get("P2PCHAT_GUI_NOTIFY", "1").strip().lower()
        return cls(notifications=setting not in ("0", "false", "no", "off"))


def _now_ms() -> int:
    return int(time.time() * 1000)


class ChatWindow:
    def __init__(self, settings: GuiSettings, *, store: SettingsStore | None = None,
                 options: GuiOptions = GuiOptions(), notice: str = "", desktop: Desktop = Desktop()) -> None:
        self.settings = settings
        self.store = store
        self.options = options
        self.desktop = desktop
        self._key_panel_open = False
        self.model = ChatModel(settings.user)
        self.client: ChatClient | None = None
        self.history: History | None = None  # the window's read connection to the client's history
        self.target: ConnectTarget | None = None
        self.finished = False
        self._generation = 0  # bumped per client: events from a closed client are stale
        self._toast: Toast | None = None
        self._parked: list[Any] | None = None  # client events that arrive while the window is rebuilt
        self.fonts: Fonts = pick_fonts()
        self.window = self._build()
        self.bridge = TkEventBridge(self.window.TKroot.tk, self._deliver)
        self._render_all()
        if notice:
            self._show_form_error(FormError("host", notice))

    # --- the loop -------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self.step():
                pass
        finally:
            self.close()

    def step(self, timeout_ms: int | None = None) -> bool:
        """Read one event (blocking unless a timeout is given) and handle it. False once closed."""
        event, values = self.window.read(timeout=timeout_ms)
        return self.handle(event, values)

    def handle(self, event: Any, values: dict[Any, Any] | None) -> bool:
        """The single dispatcher for user, client and timer events. False once the window is closed."""
        if event in (sg.WIN_CLOSED, sg.WINDOW_CLOSE_ATTEMPTED_EVENT):
            self.close()
            return False
        values = values or {}
        if event == sg.TIMEOUT_EVENT:
            return True
        if event == CLIENT_EVENT:
            generation, client_event = values[CLIENT_EVENT]
            if generation == self._generation:
                self._on_client_event(client_event)
        elif event in (K_CONNECT, K_HOST + FORM_SUBMIT, K_PORT + FORM_SUBMIT, K_USER + FORM_SUBMIT):
            if self.model.link is Link.CONNECTING:
                self.disconnect("Cancelled.")
            elif self.model.link is Link.OFFLINE:
                self.submit_connect()
        elif event == K_DISCONNECT:
            self.disconnect("Disconnected.")
        elif event == K_PEERS:
            selected = self._selected_peer()
            if selected is not None:
                self.open_conversation(selected)
        elif event == WINDOW_FOCUSED:
            self._mark_read_if_viewing()
        elif event == SEARCH_SUBMIT:
            self.search(self.window[K_SEARCH].get())
        elif event in (SEARCH_ESCAPE, K_SEARCH_CLOSE):
            self.close_search()
        elif event == SEARCH_OPEN:
            self.open_result(values[SEARCH_OPEN])
        elif event in (K_SEND, COMPOSER_SEND):
            self.send_composed()
        elif event == K_ATTACH:
            self.attach_file()
        elif event == FILE_CANCEL:
            self.cancel_transfer(values[FILE_CANCEL])
        elif event == FILE_OPEN_FOLDER:
            self.open_folder(values[FILE_OPEN_FOLDER])
        elif event == K_ACCEPT_KEY:
            self.accept_key()
        elif event in (K_KEY_INFO, K_KEY_HIDE, K_COMPARE_KEY):
            self._key_panel_open = event == K_COMPARE_KEY or (event == K_KEY_INFO and not self._key_panel_open)
            self._render_security()
        elif event == K_THEME:
            self.set_theme("dark" if self.settings.theme == "light" else "light")
        elif event == K_NOTIFY:
            self._update_settings(notifications=not self.settings.notifications)
            self._render_status()
        elif event == K_RECEIPTS:
            self._update_settings(read_receipts=bool(self.window[K_RECEIPTS].get()))
            self._render_status()
        elif event == TOAST_CLICKED:
            self.window.bring_to_front()
            self.open_conversation(values[TOAST_CLICKED])
        else:
            log.debug("user=%s unhandled window event %r", self.model.user, event)
        return True

    # --- connection -----------------------------------------------------------------
    def submit_connect(self) -> None:
        """Validate the connect panel and start connecting; a bad field gets an inline message."""
        result = validate_connect(self.window[K_HOST].get(), self.window[K_PORT].get(), self.window[K_USER].get())
        if isinstance(result, FormError):
            self._show_form_error(result)
            return
        self.connect(result)

    def connect(self, target: ConnectTarget) -> None:
        self._stop_client()
        if target.user != self.model.user:
            self.model = ChatModel(target.user)  # another identity: another set of conversations
            self._view().me = target.user
        extra = dict(self.options.client_overrides)
        if self.options.received_dir is not None:
            extra["received_dir"] = self.options.received_dir
        config = ClientConfig(server=target.server, heartbeat_ivl=self.options.heartbeat_ivl,
                              liveness=self.options.liveness, send_timeout=self.options.send_timeout,
                              read_receipts=self.settings.read_receipts, **extra)
        generation = self._generation
        bridge = self.bridge
        try:
            client = ChatClient(target.user, config, on_event=lambda e: bridge.post((generation, e)))
        except (P2PChatError, OSError) as exc:
            message = exc.message if isinstance(exc, P2PChatError) else str(exc)
            self._show_form_error(FormError("user", f"Cannot start the client: {message}"))
            return
        self.client, self.target = client, target
        # Before the agent starts: every message after this snapshot arrives as an event.
        self._load_history(client)
        client.start()  # returns at once: the agent thread connects and reports by events
        self.model.link = Link.CONNECTING
        self._log(f"Connecting to {target.server} as {target.user}…")
        log.info("user=%s connecting to %s", target.user, target.server)
        self._render_all()

    def disconnect(self, why: str) -> None:
        if self.client is None:
            return
        self._stop_client()
        self.model.link = Link.OFFLINE
        self.model.set_online(frozenset())
        self._log(why)
        self._render_all()

    def _load_history(self, client: ChatClient) -> None:
        """Every conversation's recent messages, with their delivery states, and who we have talked to."""
        history: History | None = None
        try:
            history = client.open_history()
            for peer in history.peers():
                self.model.load(peer, history.conversation(peer, HISTORY_LIMIT))
        except sqlite3.Error as exc:  # the chat works without it: only the past (and search) is missing
            log.warning("user=%s cannot read history: %s", client.user, exc)
            self._log(f"Cannot read past conversations: {exc}")
            if history is not None:
                history.close()
            return
        self.history = history

    def _stop_client(self) -> None:
        client, self.client = self.client, None
        history, self.history = self.history, None
        self._generation += 1
        self.model.search = None
        self.window[K_SEARCH].update("")
        if history is not None:
            history.close()
        if client is None:
            return
        client.close()  # joins the agent: quick, and it never waits on us (see gui_bridge)
        # Unacknowledged messages stay "sending…": they wait in the outbox and go out on the next connect.
        for file in self.model.pause_transfers():  # the library resumes them on the next connect
            self._view().update_file(file)

    def _deliver(self, item: Any) -> None:
        """Called by the bridge on the Tk thread."""
        if self._parked is not None:
            self._parked.append(item)
        else:
            self.window.write_event_value(CLIENT_EVENT, item)

    # --- client events ----------------------------------------------------------------
    def _on_client_event(self, event: ev.Event) -> None:
        kind = type(event)
        user = self.model.user
        if kind is ev.Registered:
            self._on_registered(event)
        elif kind is ev.Reconnecting:
            self.model.link = Link.RECONNECTING
            self._log(f"Connection lost ({event.reason}); reconnecting…")
            self._render_status()
        elif kind is ev.RegisterFailed:
            error = event.error
            if error.code in (ErrorCode.ID_TAKEN, ErrorCode.ALREADY_REGISTERED):
                text = f"“{user}” is already signed in on this broker. Choose another user ID."
                field_name = "user"
            elif error.code is ErrorCode.BROKER_KEY_CHANGED:
                text = f"Security warning: {error.message}"
                field_name = "host"
            else:
                text = f"Could not sign in: {error.message}"
                field_name = "user"
            self._back_to_connect_panel(FormError(field_name, text))
        elif kind is ev.Stopped:
            self._back_to_connect_panel(FormError(
                "user", f"The connection stopped after an internal error ({event.error.message}). "
                        "Press Connect to try again."))
        elif kind is ev.PeersChanged:
            self.model.set_online(event.peers)
            for name in sorted(event.joined - {user}):
                self._log(f"{name} is online")
                self._check_pending_key(name)  # a change left unaccepted in an earlier run
            for name in sorted(event.left - {user}):
                self._log(f"{name} went offline")
            self._render_roster()
            self._render_header()
        elif kind is ev.MessageReceived:
            self._on_message(event)
        elif kind is ev.Acked:
            line = self.model.acked(event.msg_id)
            if line is not None and self._showing(line.peer):
                self._view().update_delivery(line)
                self._render_security()  # the first message pins the peer's key
        elif kind is ev.Receipt:
            line = self.model.receipt(event.msg_id, event.status)
            if line is not None and self._showing(line.peer):
                self._view().update_delivery(line)
        elif kind is ev.SendFailed:
            line = self.model.failed(event.msg_id, describe_failure(event.error))
            if line is not None:
                self._log(f"Message to {line.peer} failed: {line.failure}")
                if event.error.code is ErrorCode.PEER_KEY_CHANGED:
                    self._check_pending_key(line.peer)
                if self._showing(line.peer):
                    self._view().update_delivery(line)
        elif kind is ev.PeerKeyChanged:
            self._key_changed(event.user, event.old, event.new)
        elif kind is ev.ErrorReported:
            error = event.error
            if error.code is ErrorCode.INTEGRITY:
                self._log(f"Security: refused a message that failed its integrity check ({error.message})")
            else:
                self._log(f"Broker error: {error.message}")
        elif kind in (ev.FileIncoming, ev.FileProgress, ev.FileReceived, ev.FileSent, ev.FileFailed):
            self._on_file_event(event)
        else:
            log.debug("user=%s ignoring client event %s", user, kind.__name__)

    def _back_to_connect_panel(self, error: FormError) -> None:
        """The client is gone (refused, or its agent stopped): say why where the user can try again."""
        self._stop_client()
        self.model.link = Link.OFFLINE
        self.model.set_online(frozenset())
        self._log(error.message)
        self._render_all()
        self._show_form_error(error)

    def _on_registered(self, event: ev.Registered) -> None:
        first = self.model.link is Link.CONNECTING
        self.model.link = Link.CONNECTED
        target = self.target
        assert target is not None
        if first:
            self._log(f"Connected to {target.server} as {target.user}")
            if self.client is not None and self.client.broker_key is not None:
                self._log(f"Encrypted; broker key {fingerprint(self.client.broker_key)}")
            self._update_settings(host=target.server.host, port=target.server.port, user=target.user)
            self._render_all()
            self._composer().focus_set()
        else:
            self._log("Reconnected")
            self._render_status()
        self._mark_read_if_viewing()  # read while we were away, receipts could not go out

    def _on_message(self, event: ev.MessageReceived) -> None:
        line = self.model.receive(event.msg_id, event.sender, event.text, event.ts)
        if line is None:  # history showed it already
            return
        if self._showing(event.sender):
            self._view().append(line)
            self._render_security()  # the first message pins the peer's key
            self._mark_read_if_viewing()
        self._render_roster()
        if should_notify(self._notifications_on(), self._focused(), self.model.active, event.sender):
            self._notify(event.sender, line.text)

    def _on_file_event(self, event: Any) -> None:
        """Files in both directions: each event moves one ``FileLine``; new ones join the timeline."""
        model, now, kind = self.model, _now_ms(), type(event)
        known = model.file(event.xfer) is not None
        line: FileLine | None
        if kind is ev.FileIncoming:
            line, _ = model.file_incoming(event.xfer, event.sender, event.name, event.size, now)
            if not known:
                self._log(f"Receiving {event.name} ({human_size(event.size)}) from {event.sender}")
                if should_notify(self._notifications_on(), self._focused(), model.active, event.sender):
                    self._notify(event.sender, f"sent you a file: {event.name} ({human_size(event.size)})")
        elif kind is ev.FileProgress:
            progress = model.file_progress(event.xfer, event.peer, event.name, event.direction == "out",
                                           event.done, event.size, event.rate, event.eta, now)
            line = progress[0] if progress else None
        elif kind is ev.FileReceived:
            line = model.file_received(event.xfer, event.sender, event.name, event.path, event.size, now)
            self._log(f"Saved {event.name} from {event.sender} to {short_path(event.path)}")
        elif kind is ev.FileSent:
            line = model.file_sent(event.xfer)
            if line is not None:
                self._log(f"{event.recipient} received {event.name}")
        else:  # FileFailed; an offer refused at once, or a transfer resumed from an earlier run, is news here
            if event.error.code is ErrorCode.PEER_KEY_CHANGED:
                self._check_pending_key(event.peer)
            if not known and event.direction == "in":
                model.file_incoming(event.xfer, event.peer, event.name, 0, now)
            elif not known:
                model.file_sending(event.xfer, event.peer, event.name, 0, now)
            line = model.file_failed(event.xfer, event.error)
            if line is not None:
                way = f"Sending {event.name} to" if line.outgoing else f"Receiving {event.name} from"
                self._log(f"{way} {event.peer}: {line.failure}")
        if line is None:
            return
        if self._showing(line.peer):
            if known:
                self._view().update_file(line)
            else:
                self._view().append(line)
        if not known:
            self._render_roster()
        self._render_transfers()

    # --- user actions -----------------------------------------------------------------
    def open_conversation(self, peer: str, reveal: bytes | None = None) -> None:
        """Show ``peer``'s conversation (leaving a search), scrolled to the end or to message ``reveal``."""
        if peer == self.model.active and self.model.search is None and reveal is None:
            return
        conv = self.model.open(peer)
        self._check_pending_key(peer)
        self._view().show(conv, self._empty_hint(), reveal)
        self._render_roster(select=peer)
        self._render_header()
        self._composer().focus_set()
        self._mark_read_if_viewing(opened=True)

    def _mark_read_if_viewing(self, opened: bool = False) -> None:
        """The user sees the open conversation (just opened, or the window has the focus): tell the library.

        Only when something in it is unread, so focus changes and new messages cost nothing otherwise;
        and only while connected, so the read receipts it sends are not lost on the way.
        """
        peer, client = self.model.active, self.client
        if peer is None or client is None or self.model.link is not Link.CONNECTED or self.model.search is not None:
            return
        if (opened or self._focused()) and self.model.mark_read(peer):
            client.mark_read(peer)

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
        self._view().show_results(self.model.search)
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
        if self.model.line(msg_id) is None and self.history is not None:  # older than what was loaded
            try:
                self.model.load(entry.peer, self.history.conversation(entry.peer, OPEN_RESULT_LIMIT))
            except sqlite3.Error as exc:
                self._log(f"Cannot read the conversation with {entry.peer}: {exc}")
        self.window[K_SEARCH].update("")
        self.open_conversation(entry.peer, reveal=msg_id)

    def attach_file(self) -> None:
        """Ask the desktop for a file (the dialog is modal) and offer it to the open conversation."""
        peer = self.model.active
        if peer is None or not self._can_send():
            return
        chosen = self.desktop.choose_file(self.window.TKroot, peer)
        # The dialog ran Tk's loop: the conversation or the connection may have changed meanwhile.
        if chosen and self.model.active == peer and self._can_send():
            self.send_file(peer, Path(chosen))

    def send_file(self, peer: str, path: Path) -> None:
        assert self.client is not None
        now = _now_ms()
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # the library says why it cannot send it
        try:
            xfer, _done = self.client.send_file(peer, path)  # the outcome arrives as FileSent or FileFailed
        except (P2PChatError, FutureTimeout) as exc:
            reason = exc.message if isinstance(exc, P2PChatError) else "the client did not answer"
            line = self.model.file_refused(peer, path.name, now, reason)
            self._log(f"Cannot send {path.name}: {reason}")
        else:
            existing = self.model.file(xfer)
            if existing is not None and not existing.finished:  # the same file, still on its way
                return
            line = self.model.file_sending(xfer, peer, path.name, size, now)
            self._log(f"Offering {path.name} ({human_size(size)}) to {peer}")
        if self._showing(peer):
            self._view().append(line)
        self._render_roster()
        self._render_transfers()

    def cancel_transfer(self, xfer: bytes) -> None:
        line = self.model.file(xfer)
        if line is None or line.finished or self.client is None:
            return
        line.cancel_asked = True  # the FileFailed(CANCELLED) that follows is ours
        try:
            self.client.cancel_transfer(xfer)
        except P2PChatError as exc:
            self._log(f"Cannot cancel {line.name}: {exc.message}")

    def open_folder(self, xfer: bytes) -> None:
        line = self.model.file(xfer)
        if line is None or line.path is None:
            return
        folder = line.path.parent
        try:
            self.desktop.open_folder(folder)
        except OSError as exc:
            self._log(f"Cannot open {short_path(folder)}: {exc.strerror or exc}")

    def accept_key(self) -> None:
        """The user compared the new key with the peer: trust it and let sending resume."""
        peer, client = self.model.active, self.client
        if peer is None or client is None or peer not in self.model.key_changed:
            return
        change = self.model.key_changed[peer]
        try:
            client.accept_peer_key(peer)
        except P2PChatError as exc:
            self._log(f"Cannot accept {peer}'s key: {exc.message}")
            return
        self.model.peer_key_accepted(peer)
        self._log(f"You accepted {peer}'s new key {change.new}")
        self._render_roster()
        self._render_header()

    def _key_changed(self, peer: str, old: bytes, new: bytes) -> None:
        """Sends, offers and messages refused because a peer's key changed all raise the same banner."""
        change = KeyChange(fingerprint(old) if old else "none", fingerprint(new), new)
        if not self.model.peer_key_changed(peer, change):
            return
        self._log(f"{peer}'s key changed to {change.new}; sending to them is paused until you accept it")
        self._render_roster()
        if peer == self.model.active:
            self._render_header()

    def _check_pending_key(self, peer: str) -> None:
        """A change still pending (from this run or an earlier one) shows its banner before the user sends."""
        change = self.client.pending_key_change(peer) if self.client is not None else None
        if change is not None:
            self._key_changed(peer, *change)

    def send_composed(self) -> None:
        composer = self._composer()
        text = composer.get("1.0", "end-1c").strip("\n")
        peer = self.model.active
        if not text.strip() or peer is None or self.client is None or not self._can_send():
            return
        now = _now_ms()
        try:
            msg_id, _acked = self.client.send_async(peer, text)  # the ack arrives as an event
            line: ChatLine = self.model.sending(msg_id, peer, text, now)
        except P2PChatError as exc:
            line = self.model.refused(peer, text, now, describe_failure(exc))
        composer.delete("1.0", "end")
        self._view().append(line)
        self._render_roster()
        self._mark_read_if_viewing()  # replying is reading

    def set_theme(self, theme: str) -> None:
        """PySimpleGUI fixes colours when a window is built, so build it again, keeping its place."""
        self._update_settings(theme=theme)
        draft = self._composer().get("1.0", "end-1c")
        form = {key: self.window[key].get() for key in (K_HOST, K_PORT, K_USER, K_FORM_ERROR, K_SEARCH)}
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
            self.window.write_event_value(CLIENT_EVENT, item)
        self._composer().insert("1.0", draft)  # before _render_all may disable the composer
        for key, value in form.items():
            self.window[key].update(value)
        self._render_all()

    def close(self) -> None:
        """Idempotent: stop the client, then the bridge, then the windows."""
        if self.finished:
            return
        self.finished = True
        self._stop_client()
        if self._toast is not None:
            self._toast.close()
        self.bridge.close()
        self.window.close()

    # --- notifications ----------------------------------------------------------------
    def _notifications_on(self) -> bool:
        return self.options.notifications and self.settings.notifications

    def _focused(self) -> bool:
        try:
            widget = self.window.TKroot.focus_get()
        except (KeyError, tk.TclError):  # tkinter cannot name some transient widgets (menus)
            return False
        return widget is not None and widget.winfo_toplevel() == self.window.TKroot

    def _notify(self, sender: str, text: str) -> None:
        if self._toast is not None:
            self._toast.close()
        self._toast = Toast(self.palette, self.fonts, sender, text, self.options.toast_ms,
                            on_click=lambda: self.window.write_event_value(TOAST_CLICKED, sender))

    @property
    def toast(self) -> Toast | None:
        return self._toast if self._toast is not None and self._toast.is_open else None

    # --- settings ---------------------------------------------------------------------
    def _update_settings(self, **changes: Any) -> None:
        self.settings = dataclasses.replace(self.settings, **changes)
        if self.store is not None:
            self.store.save(self.settings)

    @property
    def palette(self) -> Palette:
        return palette(self.settings.theme)

    # --- rendering --------------------------------------------------------------------
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
            self._view().show_results(search)
        else:
            self._view().show(self.model.conversation(active) if active else None, self._empty_hint())
        self._render_log()
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
        pending = client is not None and client.config.read_receipts != self.settings.read_receipts
        self.window[K_RECEIPTS_NOTE].update("applies when you reconnect" if pending else "")
        if self.options.notifications:
            self.window[K_NOTIFY].update("Notifications: on" if self.settings.notifications else "Notifications: off")
        self.window[K_THEME].update("Dark theme" if self.settings.theme == "light" else "Light theme")

    def _render_transfers(self) -> None:
        """The status bar's transfer segment: what is moving in any conversation, and how fast."""
        moving = [t for t in self.model.active_transfers() if t.state is not Transfer.PAUSED]
        if not moving:
            text = ""
        elif len(moving) == 1:
            t = moving[0]
            arrow = "↑" if t.outgoing else "↓"
            text = f"{arrow} {t.name} {round(t.fraction * 100)}%"
            if t.rate > 0:
                text += f" · {human_size(t.rate)}/s"
        else:
            ups = sum(1 for t in moving if t.outgoing)
            rate = sum(t.rate for t in moving)
            text = f"↑ {ups}  ↓ {len(moving) - ups} transfers · {human_size(rate)}/s"
        self.window[K_STATUS_TRANSFERS].update(text)

    def _render_roster(self, select: str | None = None) -> None:
        """``select``: the row of a conversation being opened (by the list, a notification or a search result)."""
        pal, fonts = self.palette, self.fonts
        rows = self.model.roster()
        names = [r.name for r in rows]
        table = self.window[K_PEERS]
        # A click not handled yet outranks the open conversation: re-rendering must not undo it.
        keep = select or self._selected_peer() or self.model.active
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

    @staticmethod
    def _badge(unread: int, key_changed: bool) -> str:
        count = str(unread) if unread else ""
        return f"⚠ {count}".strip() if key_changed else count

    def _selected_peer(self) -> str | None:
        """The row selected on screen, by name (row numbers shift as people come and go)."""
        tree = self.window[K_PEERS].Widget
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
        pal, can_send = self.palette, self._can_send()
        # Tk greys out neither a disabled Text nor a coloured Button: recolour them so "disabled" shows.
        self._composer().configure(state="normal" if can_send else "disabled",
                                   background=pal.input_bg if can_send else pal.chat_bg,
                                   highlightcolor=pal.accent if can_send else pal.border)
        self.window[K_SEND].update(disabled=not can_send, button_color=(pal.accent_text, pal.accent) if can_send
                                   else (pal.muted, pal.border))
        self.window[K_ATTACH].update(disabled=not can_send, button_color=(pal.text, pal.input_bg) if can_send
                                     else (pal.muted, pal.chat_bg))
        self._render_security()

    def _render_presence(self, peer: str | None) -> None:
        self.window[K_PEER_NAME].update(peer or "No conversation open")
        if peer is None:
            presence = ""
        elif peer in self.model.online:
            presence = "● online"
        else:
            presence = "○ offline — messages cannot be delivered until they are back"
        self.window[K_PEER_PRESENCE].update(presence, text_color=self.palette.ok if peer in self.model.online
                                            else self.palette.muted)

    def _render_security(self) -> None:
        """The peer's key in the header, the Verify panel, and the banner of a changed key (none while searching)."""
        peer = self.model.active if self.model.search is None else None
        client, user, pal = self.client, self.model.user, self.palette
        keys_known = peer is not None and client is not None
        change = self.model.key_changed.get(peer) if peer is not None else None
        peer_fp = client.fingerprint_of(peer) if keys_known else None
        if change is not None:
            header, colour = "key changed", pal.warn
        else:
            header = f"key {peer_fp}" if peer_fp else "key not known yet" if keys_known else ""
            colour = pal.muted
        self.window[K_PEER_KEY].update(header, text_color=colour)
        self._set_visible(K_KEY_INFO, keys_known)

        self._set_visible(K_KEY_BANNER, change is not None)
        if change is not None:
            self.window[K_KEY_BANNER_TITLE].update(f"{peer}'s key has changed")
            self.window[K_KEY_BANNER_TEXT].update(
                f"It was {change.old} and is now {change.new}. That happens when {peer} reinstalls p2p-chat, "
                f"but it can also mean someone is impersonating them. Sending to {peer} is paused until you "
                f"compare the new safety number with them (in person or on a call) and accept the new key.")
        self.window[K_COMPOSER_NOTE].update(
            f"Sending to {peer} is paused until you accept their new key." if change else "")
        self._set_visible(K_COMPOSER_NOTE, change is not None)

        show_panel = self._key_panel_open and keys_known
        self._set_visible(K_KEY_PANEL, show_panel)
        self.window[K_KEY_INFO].update("Hide keys" if show_panel else "Verify")
        if not show_panel:
            return
        assert client is not None and peer is not None
        if change is not None and change.new_key:  # what to check before accepting is the new key
            number: str | None = safety_number(client.identity.public, change.new_key)
            shown_fp, label = change.new, "Their new key"
        else:
            number, shown_fp, label = client.safety_number(peer), peer_fp, "Their key"
        self.window[K_KEY_PANEL_TITLE].update(f"VERIFY {peer.upper()}")
        self.window[K_SAFETY].update(number or "known once you have exchanged a message")
        self.window[K_PEER_FP_LABEL].update(label)
        self.window[K_PEER_FP].update(shown_fp or "not known yet")
        self.window[K_OWN_FP].update(client.fingerprint_of(user) or "")
        self.window[K_KEY_PANEL_NOTE].update(
            f"Compare the safety number with {peer} in person or on a call. If you both see the same digits, "
            f"what you send can only be read by {peer}. It changes when either of you gets a new key.")

    def _set_visible(self, key: str, visible: bool) -> None:
        element = self.window[key]
        if element.visible != visible:  # re-packing a visible element moves it: only on a change
            element.update(visible=visible)

    def _showing(self, peer: str) -> bool:
        """Whether ``peer``'s conversation is on screen (not hidden by search results)."""
        return peer == self.model.active and self.model.search is None

    def _can_send(self) -> bool:
        return (self.model.active is not None and self.model.search is None and self.model.active in self.model.online
                and self.model.active not in self.model.key_changed
                and self.model.link in (Link.CONNECTED, Link.RECONNECTING))

    def _empty_hint(self) -> str:
        peer = self.model.active
        if peer is not None:
            sealed = self.client is not None and self.client.config.encrypt
            return f"This is the start of your conversation with {peer}." + (
                "\nMessages and files are end-to-end encrypted; press Verify to compare keys." if sealed else "")
        if self.model.online:
            return "Pick someone on the left to start a conversation."
        return "Nobody else is online yet.\nConversations appear here when someone joins."

    def _log(self, text: str) -> None:
        ts = _now_ms()
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

    def _post_action(self, key: str, ref: bytes) -> None:
        """A file card's button or a search result: into the window's queue, so ``handle`` stays the dispatcher."""
        self.window.write_event_value(key, ref)

    def _on_focus_in(self, _event: tk.Event) -> None:
        """Tk fires this for every widget that takes the focus: post only when it can mark something read."""
        if self.model.search is None and self.model.has_unread(self.model.active):
            self.window.write_event_value(WINDOW_FOCUSED, None)

    # --- layout -----------------------------------------------------------------------
    def _build(self, location: tuple[int, int] | None = None, size: tuple[int, int] | None = None) -> sg.Window:
        pal, fonts = self.palette, self.fonts
        window = build_window(self.settings, pal, fonts, notify_toggle=self.options.notifications,
                              location=location, size=size)
        self._conversation_view = ConversationView(window[K_CONVERSATION].Widget, pal, fonts, self.model.user,
                                                   on_action=self._post_action)
        window.TKroot.bind("<FocusIn>", self._on_focus_in, add="+")
        self._dots = {True: dot_image(window.TKroot, pal.ok), False: dot_image(window.TKroot, pal.offline)}
        return window
