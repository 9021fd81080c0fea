"""The chat window: ``ChatWindow``, its read loop, and ``handle``, the one place every event is dispatched.

Threads: everything here runs on the Tk thread. The client library's agent
owns the network and the disk of a transfer; its events come back through
``TkEventBridge`` as ``CLIENT_EVENT`` window events, so the loop is a plain
blocking ``window.read()``. Tests drive the same ``handle`` by stepping the loop.
The window reads past conversations and searches through its own ``History``
connection, opened with each client; the agent writes, the window only reads.

``ChatWindow`` holds the state and dispatches; what it does is split by concern
into one mixin per module (as tkinter's ``Tk`` is ``Misc`` plus ``Wm``):
connection, messaging, rooms, search, transfers, key_verification, devices,
notifications, theme_switch and rendering. Only ``handle`` (window events) and
``_on_client_event`` (the library's events) decide which of them runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tkinter as tk
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PySimpleGUI as sg

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient
from p2pchat.client.gui.bridge import TkEventBridge
from p2pchat.client.gui.connection import ConnectionFlow
from p2pchat.client.gui.conversation import ConversationView
from p2pchat.client.gui.desktop import Desktop
from p2pchat.client.gui.dropping import accept_drops
from p2pchat.client.gui.devices import DeviceJob, DeviceManagement
from p2pchat.client.gui.key_verification import KeyVerification
from p2pchat.client.gui.layout import (
    CLIENT_EVENT,
    COMPOSER_SEND,
    FILE_CANCEL,
    FILE_OPEN,
    FILE_OPEN_FOLDER,
    FILES_DROPPED,
    FORM_SUBMIT,
    K_ACCEPT_KEY,
    K_ATTACH,
    K_ATTACH_FOLDER,
    K_COMPARE_KEY,
    K_CONNECT,
    K_CONVERSATION,
    K_DEVICES,
    K_DEVICES_HIDE,
    K_DISCONNECT,
    K_HOST,
    K_KEY_HIDE,
    K_KEY_INFO,
    K_LINK_DEVICE,
    K_MARK_VERIFIED,
    K_NOTICE_OK,
    K_NOTICE_VERIFY,
    K_NOTIFY,
    K_PEERS,
    K_PORT,
    K_RECEIPTS,
    K_RECEIVED_DIR,
    K_SEARCH,
    K_SEARCH_CLOSE,
    K_SEND,
    K_THEME,
    K_TRUST_KEYS,
    K_ACCEPT_FILES,
    K_UNLINK_DEVICE,
    K_USER,
    SEARCH_ESCAPE,
    SEARCH_OPEN,
    SEARCH_SUBMIT,
    THUMBNAIL_READY,
    TOAST_CLICKED,
    WINDOW_FOCUSED,
    build_window,
    dot_image,
)
from p2pchat.client.gui.messaging import Messaging
from p2pchat.client.gui.model import ChatModel, Link
from p2pchat.client.gui.notifications import Notifications, Toast
from p2pchat.client.gui.received_files import ReceivedFiles
from p2pchat.client.gui.rendering import Rendering
from p2pchat.client.gui.room_layout import (
    K_DECLINE_ROOM,
    K_JOIN_ROOM,
    K_MEMBER_ADMIN,
    K_MEMBERS,
    K_ROOM_FIELDS,
    K_ROOM_FORM_CANCEL,
    K_ROOM_FORM_OK,
    K_ROOMS,
    ROOM_FORM_ESCAPE,
    ROOM_FORM_SUBMIT,
)
from p2pchat.client.gui.rooms import FORM_BUTTONS, RoomJob, RoomViews
from p2pchat.client.gui.search import MessageSearch
from p2pchat.client.gui.settings import ConnectTarget, FormError, GuiSettings, SettingsStore
from p2pchat.client.gui.theme import Fonts, pick_fonts
from p2pchat.client.gui.theme_switch import ThemeSwitch
from p2pchat.client.gui.thumbnails import Thumbnail, ThumbnailMaker
from p2pchat.client.gui.transfers import FILE_EVENTS, FileTransfers
from p2pchat.client.storage.history import History
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)

_ROOM_FORM_SUBMITS = frozenset(field + ROOM_FORM_SUBMIT for field in K_ROOM_FIELDS)
_ROOM_FORM_ESCAPES = frozenset(field + ROOM_FORM_ESCAPE for field in K_ROOM_FIELDS)


@dataclass(frozen=True, slots=True)
class GuiOptions:
    """Start-up options that are not user settings: test speed-ups and the notification kill switch."""

    notifications: bool = True  # False hides the toggle and never pops a notification
    toast_ms: int = 5000
    heartbeat_ivl: float = 1.0
    liveness: int = 3
    send_timeout: float = 10.0
    received_dir: Path | None = None  # unless the user chose one in settings; None: the library's (~/client_received)
    client_overrides: tuple[tuple[str, Any], ...] = ()  # more ClientConfig fields (tests slow transfers down)

    @classmethod
    def from_env(cls) -> GuiOptions:
        """``P2PCHAT_GUI_NOTIFY=0`` turns notifications off (tests, screen sharing, kiosks)."""
        setting = os.environ.get("P2PCHAT_GUI_NOTIFY", "1").strip().lower()
        return cls(notifications=setting not in ("0", "false", "no", "off"))


class ChatWindow(ConnectionFlow, Messaging, RoomViews, MessageSearch, FileTransfers, ReceivedFiles, KeyVerification,
                 DeviceManagement, Notifications, ThemeSwitch, Rendering):
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
        self._dots: dict[bool, tk.PhotoImage] = {}  # presence dots, made with each build of the window
        self._thumbnail_images: dict[bytes, tk.PhotoImage] = {}  # received images' (received_files.py)
        self.drag_over = False  # something that may be dropped is over the window (its timeline shows it)
        self.window = self._build()
        self.bridge = TkEventBridge(self.window.TKroot.tk, self._deliver)
        self._thumbnails = ThumbnailMaker(self.bridge.post)
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
        elif event in (K_PEERS, K_ROOMS):
            selected = self._selected_peer() if event == K_PEERS else self._selected_room()
            if selected is not None:
                self.open_conversation(selected)
        elif event == K_MEMBERS:
            self._render_member_actions()
        elif event in FORM_BUTTONS:
            self.open_room_form(FORM_BUTTONS[event])
        elif event == K_ROOM_FORM_OK or event in _ROOM_FORM_SUBMITS:
            self.submit_room_form()
        elif event == K_ROOM_FORM_CANCEL or event in _ROOM_FORM_ESCAPES:
            self.close_room_form()
        elif event == K_MEMBER_ADMIN:
            self.toggle_admin()
        elif event == K_JOIN_ROOM:
            self.join_room()
        elif event == K_DECLINE_ROOM:
            self.decline_room()
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
            self.attach_files()
        elif event == K_ATTACH_FOLDER:
            self.attach_folder()
        elif event == FILES_DROPPED:
            self.drop_paths(values[FILES_DROPPED])
        elif event == FILE_CANCEL:
            self.cancel_transfer(values[FILE_CANCEL])
        elif event == FILE_OPEN:
            self.open_received(values[FILE_OPEN])
        elif event == FILE_OPEN_FOLDER:
            self.show_in_folder(values[FILE_OPEN_FOLDER])
        elif event == THUMBNAIL_READY:
            self._on_thumbnail(values[THUMBNAIL_READY])
        elif event == K_ACCEPT_KEY:
            self.accept_key()
        elif event in (K_KEY_INFO, K_KEY_HIDE, K_COMPARE_KEY, K_NOTICE_VERIFY):
            self._key_panel_open = event in (K_COMPARE_KEY, K_NOTICE_VERIFY) or (
                event == K_KEY_INFO and not self._key_panel_open)
            self._render_security()
        elif event == K_MARK_VERIFIED:
            self.toggle_verified()
        elif event == K_NOTICE_OK:
            self.dismiss_key_notice()
        elif event in (K_DEVICES, K_DEVICES_HIDE):
            self.toggle_devices(open_=event == K_DEVICES and not self._devices_open)
        elif event == K_LINK_DEVICE:
            self.link_device()
        elif event == K_UNLINK_DEVICE:
            self.unlink_device()
        elif event == K_THEME:
            self.set_theme("dark" if self.settings.theme == "light" else "light")
        elif event == K_NOTIFY:
            self._update_settings(notifications=not self.settings.notifications)
            self._render_status()
        elif event == K_RECEIPTS:
            self._update_settings(read_receipts=bool(self.window[K_RECEIPTS].get()))
            self._render_status()
        elif event == K_TRUST_KEYS:
            self._update_settings(trust_key_changes=bool(self.window[K_TRUST_KEYS].get()))
            self._render_status()
        elif event == K_RECEIVED_DIR:
            self.choose_received_dir()
        elif event == K_ACCEPT_FILES:
            self._update_settings(accept_files=bool(self.window[K_ACCEPT_FILES].get()))
            self._render_status()
        elif event == TOAST_CLICKED:
            self.window.bring_to_front()
            self.open_conversation(values[TOAST_CLICKED])
        else:
            log.debug("user=%s unhandled window event %r", self.model.user, event)
        return True

    def _on_client_event(self, event: ev.Event) -> None:
        """The single dispatcher for the client library's events, on the Tk thread (through the bridge)."""
        kind = type(event)
        if kind is ev.Registered:
            self._on_registered(event)
        elif kind is ev.Reconnecting:
            self.model.link = Link.RECONNECTING
            self._log(f"Connection lost ({event.reason}); reconnecting…")
            self._render_status()
        elif kind is ev.RegisterFailed:
            self._on_register_failed(event.error)
        elif kind is ev.Stopped and event.error.code is ErrorCode.SESSION_REPLACED:  # signed out by the broker
            self._back_to_connect_panel(FormError("user", f"Signed out: {event.error.message}."))
        elif kind is ev.Stopped:
            self._back_to_connect_panel(FormError(
                "user", f"The connection stopped after an internal error ({event.error.message}). "
                        "Press Connect to try again."))
        elif kind is ev.PeersChanged:
            self._on_peers_changed(event)
        elif kind is ev.MessageReceived:
            self._check_key_decided(event.sender)
            self._on_message(event)
        elif kind is ev.MessageEchoed:
            self._on_echo(event)
        elif kind is ev.ReadElsewhere:
            self._on_read_elsewhere(event)
        elif kind is DeviceJob:
            self._on_device_job(event)
        elif kind is RoomJob:
            self._on_room_job(event)
        elif kind is ev.RoomsListed:
            self._on_rooms_listed(event)
        elif kind is ev.RoomUpdated:
            self._on_room_updated(event.room)
        elif kind is ev.RoomGone:
            self._on_room_gone(event)
        elif kind is ev.RoomEvent:
            self._on_room_event(event)
        elif kind is ev.Acked:
            line = self.model.acked(event.msg_id)
            if line is not None:
                self._check_key_decided(line.peer)
            if line is not None and self._showing(line.key):
                self._view().update_delivery(line)
                self._render_security()  # the first message pins the peer's key
        elif kind is ev.Receipt:
            line = self.model.receipt(event.msg_id, event.status)
            if line is not None and self._showing(line.key):
                self._view().update_delivery(line)
        elif kind is ev.SendFailed:
            self._on_send_failed(event)
        elif kind is ev.SendState:
            self._on_send_state(event)
        elif kind is ev.PeerKeyChanged:
            self._key_changed(event.user, event.old, event.new, event.accepted, event.how)
        elif kind is ev.ErrorReported:
            error = event.error
            if error.code is ErrorCode.INTEGRITY:
                self._log(f"Security: refused a message that failed its integrity check ({error.message})")
            else:
                self._log(f"Broker error: {error.message}")
        elif kind in FILE_EVENTS:
            self._on_file_event(event)
        else:
            log.debug("user=%s ignoring client event %s", self.model.user, kind.__name__)

    def close(self) -> None:
        """Idempotent: stop the client, then the bridge, then the windows."""
        if self.finished:
            return
        self.finished = True
        self._stop_client()
        if self._toast is not None:
            self._toast.close()
        self._thumbnails.close()  # before the bridge: a thumbnail made meanwhile still has somewhere to go
        self.bridge.close()
        self._drop_dots()
        self._drop_thumbnails()
        self.window.close()

    # --- events into the window's queue -----------------------------------------------
    def _deliver(self, item: Any) -> None:
        """Called by the bridge on the Tk thread: a client event (with its generation), or a thumbnail."""
        if self._parked is not None:
            self._parked.append(item)
        else:
            self.window.write_event_value(THUMBNAIL_READY if type(item) is Thumbnail else CLIENT_EVENT, item)

    def _post_action(self, key: str, ref: bytes) -> None:
        """A file card's button or a search result: into the window's queue, so ``handle`` stays the dispatcher."""
        self.window.write_event_value(key, ref)

    def _on_focus_in(self, _event: tk.Event) -> None:
        """Tk fires this for every widget that takes the focus: post only when it can mark something read."""
        if self.model.search is None and self.model.has_unread(self.model.active):
            self.window.write_event_value(WINDOW_FOCUSED, None)

    def _focused(self) -> bool:
        """Whether the keyboard focus is in this window (not in a notification, not in another program)."""
        try:
            widget = self.window.TKroot.focus_get()
        except (KeyError, tk.TclError):  # tkinter cannot name some transient widgets (menus)
            return False
        return widget is not None and widget.winfo_toplevel() == self.window.TKroot

    # --- settings and layout ------------------------------------------------------------
    def _update_settings(self, **changes: Any) -> None:
        self.settings = dataclasses.replace(self.settings, **changes)
        if self.store is not None:
            self.store.save(self.settings)

    def _build(self, location: tuple[int, int] | None = None, size: tuple[int, int] | None = None) -> sg.Window:
        pal, fonts = self.palette, self.fonts
        window = build_window(self.settings, pal, fonts, notify_toggle=self.options.notifications,
                              location=location, size=size)
        self._conversation_view = ConversationView(window[K_CONVERSATION].Widget, pal, fonts, self.model.user,
                                                   on_action=self._post_action, thumbnail=self._thumbnail_image)
        window.TKroot.bind("<FocusIn>", self._on_focus_in, add="+")
        accept_drops(window.TKroot, self._can_attach, self._drag_hover,
                     lambda paths: window.write_event_value(FILES_DROPPED, paths))
        self._drop_dots()
        self._dots = {True: dot_image(window.TKroot, pal.ok), False: dot_image(window.TKroot, pal.offline)}
        return window

    def _drop_dots(self) -> None:
        """Delete the presence dots here, on the Tk thread: a PhotoImage the garbage collector finalises on another
        thread (the client's agent) would call into Tk from there and hang it."""
        for image in self._dots.values():
            image.tk.call("image", "delete", image.name)
            image.name = ""  # its __del__ then leaves Tk alone
