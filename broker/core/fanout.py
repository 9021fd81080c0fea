"""The broker core's delivery to several devices of a user (docs/PROTOCOL.md §5.6), apart from its main loop.

A message or offer from a client that seals per device carries a body for each device of its recipient
(``copies``) and, for a message, of its sender's other devices (``echo``): ``_targets`` checks them against
the current device lists and makes the frame each device queue gets, or says why the sender must fetch the
lists and send again (``devices_changed``). Receipts go to every device. Without a store, ``_relay_now``
hands each copy to its own device's session. Transfer frames name a device (``dev``), and the credit ledger
keeps a window per transfer and receiving device (``ledger_key``).

``DeviceFanOut`` is a mixin of ``BrokerCore``: it uses the core's ``keys``, ``directory``, ``link``,
``broker_id``, ``_sessions`` and ``_frames``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from p2pchat.broker.core.actions import Action, Relay, Send
from p2pchat.broker.core.delivery import queue_name
from p2pchat.broker.core.ports import DEVICE_CAPS, DEVICE_ROOMS, Frames, Location
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Envelope, FileOffer, Receipt, pack
from p2pchat.common.protocol_rooms import RoomKey

if TYPE_CHECKING:
    from p2pchat.broker.core.routing import _Session


def ledger_key(xfer: bytes, dev: int | None) -> bytes:
    """A transfer in the credit ledger: with several devices, its chunks go to the one device that took it."""
    return xfer if dev is None else xfer + dev.to_bytes(8, "big")


def device_name(user: str, dev: int | None) -> str:
    """Where another broker delivers a frame that is not queued: ``user/dev`` to that device, ``user`` to any."""
    return user if dev is None else f"{user}/{dev}"


class DeviceFanOut:
    def _targets(self, session: _Session, env: Envelope, frames: Frames) -> list[tuple[str, Frames]] | str:
        """The device queues a durable frame goes to, each with its frames; or why the sender must fetch the
        device lists and send again (§5.6). A receipt goes to every device of its recipient but the sending one;
        a message or offer from a client that seals per device goes as the copy sealed for each device, and a
        message's echo to each other device of its sender; a plain one from an older client to the primary."""
        msg = env.message
        recipient = msg.recipient  # type: ignore[attr-defined]
        devices = self.keys.devices(recipient)
        kind = type(msg)
        if devices is None or (kind is not Receipt and not session.caps and not msg.copies):  # type: ignore
            return [(recipient, frames)]  # an unbound ID (its queue waits for its first device), an older client
        primary = devices.primary.id
        if kind is Receipt:
            return [(queue_name(recipient, d.id, primary), frames) for d in devices.devices
                    if recipient != session.user or d.id != session.dev]
        copies = msg.copies  # type: ignore[attr-defined]
        wanted = [d.id for d in devices.devices]
        if copies is None and len(wanted) > 1:
            return f"{recipient!r} has {len(wanted)} devices: seal a copy for each (fetch devices)"
        if copies is not None and sorted(dev for dev, _ in copies) != wanted:
            return f"the devices of {recipient!r} changed: fetch devices and send again"
        echo = getattr(msg, "echo", None)
        own = self.keys.devices(session.user)
        if kind is ChatMessage:
            others = [d.id for d in own.devices if d.id != session.dev] if own is not None else []
            if sorted(dev for dev, _ in echo or ()) != others:
                return "your own devices changed: fetch your devices and send again"
        if copies is None and not echo and (kind is not FileOffer or not devices.primary.flags & DEVICE_CAPS):
            return [(recipient, frames)]  # the one device, the frame unchanged (it has no field of §5.6)
        bodies = copies if copies is not None else ((primary, msg.body),)  # type: ignore[attr-defined]
        flags = {d.id: d.flags for d in devices.devices}
        targets = [(queue_name(recipient, dev, primary), self._copy(env, dev, body, flags[dev] & DEVICE_CAPS, session))
                   for dev, body in bodies]
        if echo:  # to our devices that know echoes (an older client would keep an echo queued, unread)
            own_flags = {d.id: d.flags for d in own.devices}  # type: ignore[union-attr]
            own_primary = own.primary.id  # type: ignore[union-attr]
            targets += [(queue_name(session.user, dev, own_primary), self._copy(env, dev, body, 0, session))
                        for dev, body in echo if own_flags[dev] & DEVICE_CAPS]
        if kind is RoomKey:  # a sender key only to devices that know rooms (§5.8)
            rooms_aware = {queue_name(user, d.id, ds.primary.id) for user, ds in ((recipient, devices),
                           (session.user, own)) if ds is not None for d in ds.devices if d.flags & DEVICE_ROOMS}
            targets = [target for target in targets if target[0] in rooms_aware]
        return targets

    @staticmethod
    def _copy(env: Envelope, dev: int, body: bytes, caps: int, session: _Session) -> Frames:
        """The frame one device gets (of the recipient, or of the sender for an echo): its own body; an offer also
        says which device made it, to a device that knows the field."""
        msg = env.message
        if type(msg) is FileOffer:
            copy = replace(msg, body=body, copies=None, src=session.dev if caps and session.caps else None)
        else:
            copy = replace(msg, body=body, copies=None, echo=None)
        return pack(copy, env.ts, env.msg_id)

    def _relay_now(self, conn: bytes, env: Envelope, original: Frames, targets: list[tuple[str, Frames]]
                   ) -> list[Action]:
        """Durability off (or the store down): each copy to its device's session if it is online, else it is
        lost; the sender hears ``relayed`` once, or ``recipient_offline`` if no device had it. The frame
        unchanged (``original``: one for the ID, not per device) goes to its lowest-numbered device online."""
        actions: list[Action] = []
        ack = self._frames.make(Ack(env.msg_id, AckStatus.RELAYED)) if env.message.ACKED else None
        for queue, frames in targets:
            user, _, dev = queue.partition("/")
            devices = self.keys.devices(user) if frames is not original else None
            number = int(dev) if dev else devices.primary.id if devices is not None else None  # the primary's copy
            where = self._device_location(user, number, self.directory.locate(user))
            if where is None:
                continue
            if where.broker != self.broker_id:  # there a store finds the device by its queue, else by its number
                self.link.forward(where.broker, queue if self.delivery.durable else device_name(user, number), frames)
                if ack is not None:
                    actions.append(Send(conn, ack))
            else:
                actions.append(Relay(where.conn, frames, conn, ack, lambda u=user: self._frames.error(
                    ErrorCode.RECIPIENT_BUSY, f"recipient {u!r} is not keeping up", env.msg_id)))
            ack = None
        if not actions and env.message.ACKED:
            recipient = getattr(env.message, "recipient", None)
            if recipient is None:  # a room's message, and no member online: nobody had it
                return [Send(conn, self._frames.make(Ack(env.msg_id, AckStatus.RELAYED, len(targets) or None)))]
            return [Send(conn, self._frames.error(ErrorCode.RECIPIENT_OFFLINE, f"recipient {recipient!r} is offline",
                                                  env.msg_id))]
        return actions

    def _device_location(self, user: str, dev: int | None, sessions: tuple[Location, ...]) -> Location | None:
        """Where ``user``'s device ``dev`` is connected, on this broker or another (None: its lowest-numbered device
        online); None if it is offline."""
        if dev is None or not sessions:
            return sessions[0] if sessions else None
        return self.directory.locate_device(user, dev)
