"""Connecting, signing in and out, reconnecting, and who is online: the connect panel's half of ``ChatWindow``.

A mixin of ``ChatWindow`` (window.py holds its state). ``connect`` only starts
the client: its agent thread connects and reports back by events
(``Registered``, ``RegisterFailed``, ``Reconnecting``, ``Stopped``,
``PeersChanged``), which ``ChatWindow._on_client_event`` hands to the methods here.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.client.gui.layout import K_HOST, K_PORT, K_SEARCH, K_USER
from p2pchat.client.gui.model import HISTORY_LIMIT, ChatModel, Link
from p2pchat.client.gui.settings import ConnectTarget, FormError, validate_connect
from p2pchat.client.storage.history import History
from p2pchat.common.crypto import fingerprint
from p2pchat.common.errors import ErrorCode, P2PChatError

log = logging.getLogger(__name__)


class ConnectionFlow:
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
        received = Path(self.settings.received_dir) if self.settings.received_dir else self.options.received_dir
        if received is not None:
            extra["received_dir"] = received
        config = ClientConfig(server=target.server, heartbeat_ivl=self.options.heartbeat_ivl,
                              liveness=self.options.liveness, send_timeout=self.options.send_timeout,
                              read_receipts=self.settings.read_receipts,
                              trust_key_changes=self.settings.trust_key_changes,
                              accept_files=self.settings.accept_files, **extra)
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
        if client.new_recovery_phrase:  # a new identity: its phrase, shown this once
            self._log(f"Your recovery phrase — write it down and keep it safe; with it you can move "
                      f"“{target.user}” to another machine (p2pchat recover --user {target.user}), and "
                      f"`p2pchat recovery-phrase --user {target.user}` shows it again: {client.recovery_phrase}")
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
        """Every conversation's recent messages, with their delivery states, and who we have talked to; each room's
        (the broker's list says which rooms are still ours)."""
        history: History | None = None
        try:
            history = client.open_history()
            for peer in history.peers():
                self.model.load(peer, history.conversation(peer, HISTORY_LIMIT))
            for rid, name in history.room_names().items():
                self.model.rooms.names[rid] = name
                self.model.load(rid, history.room_conversation(rid, HISTORY_LIMIT))
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
        self.forget_devices()
        self.forget_room_requests()
        self.model.search = None
        self.window[K_SEARCH].update("")
        if history is not None:
            history.close()
        if client is None:
            return
        client.close()  # joins the agent: quick, and it never waits on us (see bridge.py)
        # Unacknowledged messages stay "sending…": they wait in the outbox and go out on the next connect.
        for file in self.model.pause_transfers():  # the library resumes them on the next connect
            self._view().update_file(file)

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

    def _on_register_failed(self, error: P2PChatError) -> None:
        """The broker refused to sign us in: back to the connect panel, the field to correct in focus."""
        if error.code in (ErrorCode.ID_TAKEN, ErrorCode.ID_ONLINE):  # the library says why, and what to do
            text, field_name = error.message + ".", "user"
        elif error.code is ErrorCode.ALREADY_REGISTERED:
            text = f"“{self.model.user}” is already signed in on this broker. Choose another user ID."
            field_name = "user"
        elif error.code is ErrorCode.BROKER_KEY_CHANGED:
            text = f"Security warning: {error.message}"
            field_name = "host"
        else:
            text = f"Could not sign in: {error.message}"
            field_name = "user"
        self._back_to_connect_panel(FormError(field_name, text))

    def _back_to_connect_panel(self, error: FormError) -> None:
        """The client is gone (refused, or its agent stopped): say why where the user can try again."""
        self._stop_client()
        self.model.link = Link.OFFLINE
        self.model.set_online(frozenset())
        self._log(error.message)
        self._render_all()
        self._show_form_error(error)

    def _on_peers_changed(self, event: ev.PeersChanged) -> None:
        user = self.model.user
        self.model.set_online(event.peers)
        for name in sorted(event.joined - {user}):
            self._log(f"{name} is online")
            self._check_pending_key(name)  # a change left unaccepted in an earlier run
        for name in sorted(event.left - {user}):
            self._log(f"{name} went offline")
        self._render_roster()
        self._render_header()
        if self.model.active is None and self.model.search is None:  # the empty pane's hint depends on who is online
            self._view().show(None, self._empty_hint())
