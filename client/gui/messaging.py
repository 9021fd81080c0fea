"""Opening a conversation, sending what was typed, messages and their delivery states arriving, marking as read.

A mixin of ``ChatWindow`` (window.py holds its state and dispatches the events). A conversation is a person's or a
room's (keyed by its id, ``model.Key``): both go through here; what only rooms have is in rooms.py.
"""

from __future__ import annotations

from p2pchat.client import events as ev
from p2pchat.client.gui.delivery import Delivery
from p2pchat.client.gui.model import ChatLine, Key, Link, describe_failure, should_notify
from p2pchat.client.gui.rendering import now_ms
from p2pchat.common.errors import ErrorCode, P2PChatError


class Messaging:
    def open_conversation(self, peer: Key, reveal: bytes | None = None) -> None:
        """Show ``peer``'s (or a room's) conversation (leaving a search), scrolled to the end or to message
        ``reveal``."""
        if peer == self.model.active and self.model.search is None and reveal is None:
            return
        conv = self.model.open(peer)
        if type(peer) is str:
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
            if type(peer) is bytes:
                client.mark_room_read(peer)  # a room has no read receipts: its unread count only
            else:
                client.mark_read(peer)

    def send_composed(self) -> None:
        composer = self._composer()
        text = composer.get("1.0", "end-1c").strip("\n")
        peer = self.model.active
        if not text.strip() or peer is None or self.client is None or not self._can_send():
            return
        now, me = now_ms(), self.model.user
        room = peer if type(peer) is bytes else None
        try:
            if room is not None:
                msg_id, _acked = self.client.send_room_async(room, text)
                line: ChatLine = self.model.sending(msg_id, me, text, now, room)
            else:
                msg_id, _acked = self.client.send_async(peer, text)  # the ack arrives as an event
                line = self.model.sending(msg_id, peer, text, now)
        except P2PChatError as exc:
            line = self.model.refused(me if room else peer, text, now, describe_failure(exc), room)
        composer.delete("1.0", "end")
        self._view().append(line)
        self._render_roster()
        self._mark_read_if_viewing()  # replying is reading

    def _on_message(self, event: ev.MessageReceived) -> None:
        line = self.model.receive(event.msg_id, event.sender, event.text, event.ts, event.room)
        if line is None:  # history showed it already
            return
        if self._showing(line.key):
            self._view().append(line)
            self._render_security()  # the first message pins the peer's key
            self._mark_read_if_viewing()
        self._render_roster()
        if should_notify(self._notifications_on(), self._focused(), self.model.active, line.key):
            room = f"#{event.room_name or self.model.rooms.name(event.room)} · " if event.room else ""
            self._notify(line.key, line.text, title=room + event.sender)

    def _on_echo(self, event: ev.MessageEchoed) -> None:
        """What another device of ours sent: shown as ours, its ticks moving with the receipts that follow."""
        line = self.model.echoed(event.msg_id, event.peer, event.text, event.ts, event.room)
        if line is None:  # history showed it already
            return
        if self._showing(line.key):
            conv = self.model.conversation(line.key)
            if conv.lines[-1] is line:
                self._view().append(line)
            else:  # written before the last line shown: in its place
                self._view().show(conv, self._empty_hint())
        self._render_roster()

    def _on_read_elsewhere(self, event: ev.ReadElsewhere) -> None:
        """Read on another device of ours: no longer unread here."""
        if self.model.read_elsewhere(event.msg_id) is not None:
            self._render_roster()

    def _on_send_failed(self, event: ev.SendFailed) -> None:
        line = self.model.failed(event.msg_id, describe_failure(event.error))
        if line is not None:
            to = line.peer if line.room is None else f"#{self.model.rooms.name(line.room)}"
            self._log(f"Message to {to} failed: {line.failure}")
            if event.error.code is ErrorCode.PEER_KEY_CHANGED and line.room is None:
                self._check_pending_key(line.peer)
            if self._showing(line.key):
                self._view().update_delivery(line)

    def _on_send_state(self, event: ev.SendState) -> None:
        """A message of ours off the usual line: held for a key decision, refused by the recipient, resealed to
        their new key, or refused again."""
        line = self.model.send_state(event.msg_id, event.state)
        if line is None:
            return
        peer = line.peer
        if line.delivery is Delivery.UNDECRYPTABLE:
            self._log(f"{peer} couldn't open a message sealed to a key they no longer have; it is re-sent once "
                      f"you accept their new key")
        elif line.delivery is Delivery.FAILED:
            self._log(f"Message to {peer} failed: {line.failure}")
        if line.delivery in (Delivery.HELD, Delivery.UNDECRYPTABLE):
            self._check_pending_key(peer)
        else:
            self._check_key_decided(peer)
        if self._showing(peer):
            self._view().update_delivery(line)
            self._render_security()  # the banner counts what waits
