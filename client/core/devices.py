"""What the session does for several devices per user (docs/PROTOCOL.md §5.6), apart from its main loop.

With a broker that grants ``CAPS_DEVICES``, keys come from ``devices`` lists (ours included) instead of
``key_info``; a message is sealed once per device of its recipient and once per other device of ours (its
echo). The broker refuses a message sealed for a list that changed (``devices_changed``): the lists are
fetched again and it goes again, same id and time. A body from a device not in its sender's list waits
here while the list is fetched. An echo becomes our own outgoing message here; a ``read`` receipt from
ourselves marks a received message read here as well.

``DeviceSync`` is a mixin of ``ClientSession``: it uses the session's ``e2e``, ``history``, ``outbox``,
``transfers``, ``user``, ``_flush``, ``_on_chat``, ``_after_history``, ``_key_changed``, ``_fail_sends_to``,
``_seen`` and ``_transmit``.
"""

from __future__ import annotations

import logging

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit
from p2pchat.client.core.held import HeldMessages
from p2pchat.client.e2e import DeviceListRefused, PeerKeyChanged, UnknownDevice
from p2pchat.common.errors import ProtocolError, RemoteError
from p2pchat.common.protocol import ChatMessage, Devices, Receipt, ReceiptStatus, pack

log = logging.getLogger(__name__)

# Bodies kept while their sender's list is fetched: a queue page (256) and more per sender, since the broker pages
# on as they are kept; past the bound they stay queued at the broker for the next session. Bodies are at most
# 64 KiB, so the worst case is 128 MiB: the bound is in messages because a page is.
UNLISTED_PER_SENDER = 600
UNLISTED_MAX = 2_000


class DeviceSync:
    _unlisted: HeldMessages | None = None  # bodies from devices not in their sender's list yet; made when needed

    def _on_devices(self, msg: Devices, now: float) -> list[Action]:
        """A user's device list: checked, then what waited for it is sealed, and their waiting bodies opened."""
        self._key_requests = {ref: user for ref, user in self._key_requests.items() if user != msg.user}
        self._room_unusable.discard(msg.user)  # checked afresh below: refused again, it is set again
        unlisted = self._unlisted.take(msg.user) if self._unlisted is not None else []
        log.debug("user=%s peer=%s devices %s (ver %d); %d bodies waited", self.user, msg.user,
                  [d[0] for d in msg.devices], msg.ver, len(unlisted))
        try:
            self.e2e.set_devices(msg)
        except PeerKeyChanged as exc:  # their primary is a new key: what came from them waits for the user
            if unlisted and self._held is None:
                self._held = HeldMessages()
            for msg_id, held, ts in unlisted:
                self._held.add(msg_id, held, ts)
            return self._key_changed(exc, now)
        except DeviceListRefused as exc:  # the user hears it: what waits for that list does not go
            log.warning("user=%s peer=%s %s", self.user, msg.user, exc.message)
            return [Emit(ev.ErrorReported(exc))] + self._fail_sends_to(msg.user, exc)
        actions = self._flush(now)
        if self.transfers is not None:
            actions += self.transfers.on_key(msg.user, now)
        for msg_id, held, ts in unlisted:
            actions += self._on_chat(msg_id, held, ts, now, refetched=True)
        return actions

    def _unknown_device(self, exc: UnknownDevice, msg_id: bytes, msg: ChatMessage, ts: int,
                        now: float) -> list[Action]:
        """``msg`` opened under a key its sender's list (as we have it) lacks: kept until the list is fetched."""
        log.debug("user=%s peer=%s a body from a device not in their list: fetching it", self.user, exc.user)
        if self._unlisted is None:
            self._unlisted = HeldMessages(UNLISTED_MAX, UNLISTED_PER_SENDER)
        self._unlisted.add(msg_id, msg, ts)
        self.e2e.forget_devices(exc.user)
        return self._ask_keys({exc.user}, now)

    def _devices_changed(self, ref: bytes | None, error: RemoteError, now: float) -> list[Action] | None:
        """The broker refused our frame ``ref``: sealed for device lists that changed since. None if not ours, or
        refused too often (it fails then, as any refused message)."""
        recipient = self.outbox.unseal(ref) if ref is not None else None
        if recipient is None:
            return None
        log.info("user=%s peer=%s %s", self.user, recipient, error.message)
        self.e2e.forget_devices()
        return self._flush(now)

    def _on_echo(self, msg_id: bytes, msg: ChatMessage, ts: int, now: float, refetched: bool) -> list[Action]:
        """What another device of ours sent ``msg.recipient``: kept as our own outgoing message."""
        if msg_id in self._seen:
            return self._after_history(msg_id, None, now)
        try:
            plaintext = self.e2e.open(self.user, msg_id, ts, msg.body, msg.recipient, refetched)
        except UnknownDevice as exc:
            return self._unknown_device(exc, msg_id, msg, ts, now)
        except ProtocolError as exc:  # not from a device of ours: dropped for good
            log.warning("user=%s dropped an echo: %s", self.user, exc.message)
            return self._after_history(msg_id, None, now)
        self._seen[msg_id] = None
        text = plaintext.decode("utf-8", errors="replace")
        actions = self._after_history(msg_id, None, now)
        if self.history is not None and not self.history.add_echo(msg_id, msg.recipient, text, ts):
            return actions
        return [Emit(ev.MessageEchoed(msg_id, msg.recipient, text, ts))] + actions

    def _read_elsewhere(self, ref: bytes) -> list[Action]:
        """Another device of ours showed message ``ref``."""
        if self.history is None:
            return []
        peer = self.history.read_elsewhere(ref)
        return [Emit(ev.ReadElsewhere(ref, peer))] if peer is not None else []

    def _read_sync(self, ids: list[bytes]) -> list[list[bytes]]:
        """``read`` receipts to ourselves for these ids, when we have other devices (the broker fans them out)."""
        ours = self.e2e.devices_of(self.user)
        if ours is None or len(ours.devices) < 2:
            return []
        return [pack(Receipt(self.user, self.user, ref, ReceiptStatus.READ), self._wall_ms(), self._new_id())
                for ref in ids]
