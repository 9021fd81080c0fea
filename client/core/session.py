"""The client's session core: register, heartbeat, send, receive, presence.

Sans-I/O: frames and ``now`` (monotonic seconds) in, ``Transmit``/``Emit``
actions out. The agent thread owns the sockets and carries the actions out.
Ids come from the shell's ``new_id``, the register token from the shell too;
the history is a port (``core.ports.Conversations``) whose writes the shell
commits, telling the session (``history_saved``/``history_failed``). The shell
calls ``end_batch`` after each batch of inputs it handled: the consumes of the
batch leave as one CONSUME frame, not one per message.

States: CONNECTING (REGISTER sent, re-sent every heartbeat until answered),
READY, and CLOSED. A silent broker or a NOT_REGISTERED answer (the broker
restarted) sends a READY session back to CONNECTING, and so does ``leave``
(the shell closes its sockets for a while); messages not yet acknowledged are
sent again once registered, and receivers drop duplicates by message id.

(About 620 lines: one state machine (register, heartbeats, send/ack, receive, consumes) read as a whole;
what it does around key changes is in key_changes.py, around several devices in devices.py.)
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Callable

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit, Transmit
from p2pchat.client.core.devices import DeviceSync
from p2pchat.client.core.held import HeldMessages
from p2pchat.client.core.key_changes import KeyChanges
from p2pchat.client.core.outbox import Outbox
from p2pchat.client.core.ports import Conversations
from p2pchat.client.core.presence import PresenceTracker
from p2pchat.client.core.rooms import RoomSync
from p2pchat.client.core.transfer import TransferManager
from p2pchat.client.e2e import PeerKeyChanged, Sealing, UnknownDevice
from p2pchat.client.sender_keys import SenderKeys, SenderKeyStore
from p2pchat.client.refusals import explain_refusal
from p2pchat.common.crypto import KEY_BYTES, TAG_BYTES
from p2pchat.common.room_crypto import MIN_BODY_BYTES as ROOM_OVERHEAD
from p2pchat.common.errors import BrokenError, ErrorCode, P2PChatError, ProtocolError, RemoteError, StorageError, TransferError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Consume, FileDone, Devices, DevicesRequest, Envelope, Receipt, ReceiptStatus, Error, Heartbeat, KeyChanged, KeyInfo, KeyRequest, PeerSync, PeerUpdate, Register, Registered, Snapshot, SnapshotRequest, Unregister, check_user_id, decode, pack, CAPS_DEVICES, MAX_BODY_BYTES, MAX_CONSUME_REFS

from p2pchat.common.protocol_rooms import CAPS_ROOMS, RoomChunk, RoomCredit, RoomEvent, RoomInfo, RoomKey, RoomListing, RoomMessage, RoomOffer, RoomReceipts

log = logging.getLogger(__name__)

DEDUP_WINDOW = 10_000
RATE_LIMIT_BACKOFF = 1.0
MAX_TEXT_BYTES = MAX_BODY_BYTES - 1 - KEY_BYTES - TAG_BYTES  # room for the sealing overhead
MAX_ROOM_TEXT_BYTES = MAX_BODY_BYTES - ROOM_OVERHEAD  # a room body: header, tag and signature (§10.6)
# REGISTER is retried quickly at first: with IMMEDIATE set, a send before the
# TCP connection completes is dropped, and users should not wait a heartbeat.
REGISTER_RETRY_FIRST = 0.02
REFUSAL_PERIOD = 60.0  # seconds: refused messages are logged and reported once per sender and period, then summed up
REFUSAL_SENDERS = 100  # senders counted apart in one period


class State(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


def validate_room_text(text: str) -> bytes:
    """The UTF-8 body of a room message, or ProtocolError for an oversized text."""
    body = text.encode("utf-8")
    if len(body) > MAX_ROOM_TEXT_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_ROOM_TEXT_BYTES}", ErrorCode.TOO_LARGE)
    return body


def validate_text(recipient: str, text: str) -> bytes:
    """The UTF-8 body of a message, or ProtocolError for a bad recipient or an oversized text."""
    check_user_id(recipient)
    body = text.encode("utf-8")
    if len(body) > MAX_TEXT_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_TEXT_BYTES}", ErrorCode.TOO_LARGE)
    return body


_ROOM_FRAMES = frozenset({RoomMessage, RoomOffer, RoomInfo, RoomListing, RoomEvent, RoomReceipts, RoomCredit, RoomChunk})
_NOBODY: frozenset[str] = frozenset()  # one for every session (the load tool runs 10,000 in a process)


class ClientSession(KeyChanges, DeviceSync, RoomSync):
    def __init__(
        self,
        user: str,
        *,
        wall_ms: Callable[[], int],
        heartbeat_ivl: float | None = 1.0,
        liveness: int = 3,
        history: Conversations | None = None,
        read_receipts: bool = True,
        e2e: Sealing,
        transfers: TransferManager | None = None,
        token: bytes,
        new_id: Callable[[], bytes],
        key: bytes | None = None,
        recovery: bytes | None = None,
        presence: bool = True,
        delivery_receipts: bool = True,
        trust_key_changes: bool = False,
        devices: bool = False,
        device_name: str | None = None,
        rooms: bool = False,
        sender_key_store: SenderKeyStore | None = None,
    ) -> None:
        """``token``: this installation's (``storage.identity.InstanceClaim``); ``new_id``: the id source of every
        frame (``common.protocol.new_msg_id``, or a fixed sequence to replay a session); ``key``: the key to
        register with, needed when sealing is off (``e2e.NO_SEALING`` has no identity); ``recovery``: the public key
        of the user's recovery phrase, sent with REGISTER for the broker to keep with the binding.

        Switches for the load tool, which runs thousands of sessions in one process: ``heartbeat_ivl=None``
        follows the broker's REGISTERED heartbeat_ms (1 s until known), expiry included; ``presence=False`` keeps
        no peer list and never asks for a snapshot; ``delivery_receipts=False`` sends no DELIVERED receipts.
        ``trust_key_changes``: accept a peer's new key at once (the change is still reported) instead of
        holding messages to and from them until the user accepts it. ``devices``: register with ``CAPS_DEVICES``
        (several devices per user, docs/PROTOCOL.md §5.6) as the device ``device_name``. ``rooms``: register with
        ``CAPS_ROOMS`` (§5.7); ``sender_key_store``: where this device keeps its room keys (§10.6), needed with
        sealing on."""
        self.user = check_user_id(user)
        self.e2e = e2e
        self._key = key if key is not None else e2e.identity.public
        self._token = token
        self._recovery = recovery
        self._caps = ((CAPS_DEVICES if devices else 0) | (CAPS_ROOMS if rooms else 0)) or None
        self._init_rooms()
        self._sender_key_store = sender_key_store
        self._device_name = device_name
        self.device: int | None = None  # our number in our ID's device list, once a broker granted CAPS_DEVICES
        self._register_ids: list[bytes] = []  # of the REGISTERs not answered yet (an older broker's bad_frame)
        self._new_id = new_id
        self._key_requests: dict[bytes, str] = {}  # KEY_REQ msg id -> user asked about
        self.outbox = Outbox(self.user)
        self.state = State.CONNECTING
        self.presence = PresenceTracker() if presence else None
        self.transfers = transfers
        self._wall_ms = wall_ms
        self._follow_broker = heartbeat_ivl is None
        self._hb_ivl = heartbeat_ivl or 1.0
        self._liveness = liveness
        self._expiry = self._hb_ivl * liveness
        self.delivery_receipts = delivery_receipts
        self.history = history
        self.read_receipts = read_receipts
        self._receipts: OrderedDict[bytes, None] = OrderedDict()  # ids of receipts we sent (ignore their errors)
        self._registered_once = False
        self._register_retry = REGISTER_RETRY_FIRST
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._snapshot_due: float | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._published = _NOBODY
        self._refusals = IncidentLog("messages refused and consumed", log, interval=REFUSAL_PERIOD,
                                     max_keys=REFUSAL_SENDERS)
        self._after_commit: list[Action] = []  # receipts waiting for the history's commit
        self._held_consumes: list[bytes] = []  # ids to consume once the history's commit holds what they confirm
        self._consumes: list[bytes] = []  # ids to consume at the end of the shell's batch (``end_batch``)
        self._after_consumes: list[Action] = []  # refusals to send once the batch's consumes are out
        self.trust_key_changes = trust_key_changes
        # Peers whose new key waits for the user (``accept_peer_key``), and their messages meanwhile. Made when
        # first needed: the load tool runs 10,000 sessions in a process, nearly all of them never see a key change.
        self._blocked: frozenset[str] = _NOBODY
        self._held: HeldMessages | None = None
        self._storage_failing = False
        if history is not None:  # the outbox of an earlier run goes out again, same ids
            for entry in history.outbox():
                if entry.room is not None:
                    self._room_out[entry.msg_id] = self._room_pending(entry.room, entry.text.encode("utf-8"), entry.ts)
                else:
                    self.outbox.add(entry.msg_id, entry.peer, entry.text.encode("utf-8"), entry.ts, 0.0)

    # --- commands -----------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        self._last_heard = now
        return [self._transmit(self._register_frames(), now)]

    def send_text(self, recipient: str, body: bytes, now: float, msg_id: bytes | None = None
                  ) -> list[Action]:
        """Queue ``body`` (from ``validate_text``) for ``recipient``; sealed once their key is known.

        With a history, the message joins the outbox, which the shell commits before it sends anything.
        """
        msg_id, ts = msg_id or self._new_id(), self._wall_ms()
        if self.history is not None:
            self.history.add_outgoing(msg_id, recipient, body.decode("utf-8"), ts)
        if self.outbox.waiting:  # after those, in order
            self.outbox.add(msg_id, recipient, body, ts, now)
            actions = self._flush(now)
        else:  # only this one to seal: no pass over the outbox (the load tool's path)
            actions = []
            user = self._sealed(msg_id, self.outbox.add_sealed(msg_id, recipient, body, ts, now, self.e2e), now,
                                actions)
            wanted = self.transfers.take_key_wants() if self.transfers is not None else set()
            if user is not None:
                wanted.add(user)
            if wanted:
                actions += self._ask_keys(wanted, now)
        if recipient in self._blocked:  # waits for the user's decision on their new key: the caller hears it
            actions.append(Emit(ev.SendState(msg_id, recipient, "held")))
        return actions

    def mark_read(self, peer: str, now: float) -> list[Action]:
        """The user has seen ``peer``'s conversation: record it and, if enabled, tell ``peer``."""
        if self.history is None:
            return []
        ids = self.history.mark_read(peer)
        synced = [self._transmit(frames, now) for frames in self._read_sync(ids)]  # read on every device of ours
        if not self.read_receipts:
            return synced
        return synced + [self._receipt(peer, msg_id, ReceiptStatus.READ, now) for msg_id in ids]

    def history_saved(self) -> list[Action]:
        """The shell committed this batch's history: the consumes and receipts that waited for it go out."""
        if self._storage_failing:
            self._storage_failing = False
            log.warning("user=%s history saved again", self.user)
        held, self._after_commit = self._after_commit, []
        self._consumes += self._held_consumes
        self._held_consumes = []
        return held

    def end_batch(self, now: float) -> list[Action]:
        """The shell has handled a batch of inputs (and committed its history): the consumes gathered in it go
        out, one CONSUME per ``MAX_CONSUME_REFS + 1`` ids rather than one per frame (docs/PROTOCOL.md §11)."""
        marks = self._room_marks(now)
        if not self._consumes and not self._after_consumes:
            return marks
        ids, self._consumes = self._consumes, []
        refusals, self._after_consumes = self._after_consumes, []
        if self.state is not State.READY:  # the broker pages them again after registering: consumed then
            return []
        step = MAX_CONSUME_REFS + 1
        # The consumes first: a sender re-sealing a refused message must find its first copy gone (§10.4).
        return [self._transmit(self._pack(Consume(ids[i], tuple(ids[i + 1:i + step]) or None)), now)
                for i in range(0, len(ids), step)] + refusals + marks

    def history_failed(self, error: StorageError) -> list[Action]:
        """The shell could not commit: what waited stays held (the broker keeps the messages queued) until a
        later commit succeeds; the first failure is reported."""
        if self._storage_failing:
            return []
        self._storage_failing = True
        log.error("user=%s history not saved: %s; received messages stay queued at the broker until it is",
                  self.user, error.message)
        return [Emit(ev.ErrorReported(error))]

    def send_file(self, recipient: str, path, now: float, later: bool = False) -> tuple[bytes, list[Action]]:
        """Offer ``path`` to ``recipient``: live when it is online, else (or with ``later``) left at the broker for
        it to fetch when it comes (§8.2), if the broker keeps files and sealing is on."""
        assert self.transfers is not None
        offline = self.presence is not None and self.presence.synced and recipient not in self.presence.peers
        held = (later or offline) and self.rooms_enabled and self.e2e.enabled
        if later and not held:
            raise TransferError("this broker cannot keep files for later (or sealing is off): send it live")
        xfer, actions = self.transfers.send_file(check_user_id(recipient), path, now, held)
        return xfer, actions + self._flush(now)

    def leave(self, now: float, unregister: bool = True) -> list[Action]:
        """The shell closes this session's sockets for a while (UNREGISTER first if asked); ``start`` on fresh
        ones registers again, and what is unacknowledged is sent again then."""
        actions: list[Action] = []
        if unregister and self.state is State.READY:
            actions.append(self._transmit(self._pack(Unregister()), now))
        if self.state is State.READY:
            self.state = State.CONNECTING
            self._register_retry = REGISTER_RETRY_FIRST
            self._snapshot_due = None
            if self.presence is not None:
                self.presence.reset()
        return actions

    def close(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.state is State.READY:
            actions.append(self._transmit(self._pack(Unregister()), now))
        self.state = State.CLOSED
        if self.transfers is not None:
            self.transfers.close()
        actions += self._rooms_closed()
        kept = " (kept in the outbox for the next run)" if self.history is not None else ""
        for msg_id in self.outbox:
            self.outbox.drop(msg_id)
            actions.append(Emit(ev.SendFailed(msg_id, BrokenError(
                "client closed before the broker acknowledged" + kept, ErrorCode.CLOSED))))
        return actions

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def peers(self) -> frozenset[str]:
        return self._published

    # --- inputs -------------------------------------------------------------
    def on_frames(self, frames: list[bytes], now: float) -> list[Action]:
        """A message from the broker on the DEALER."""
        if self.state is State.CLOSED:
            return []
        try:
            env = decode(frames)
        except ProtocolError as exc:
            log.warning("user=%s dropped a bad frame from the broker: %s", self.user, exc.message)
            return []
        return self.on_envelope(env, now)

    def on_envelope(self, env: Envelope, now: float) -> list[Action]:
        """A decoded message from the broker on the DEALER (for a shell that looked at it first)."""
        if self.state is State.CLOSED:
            return []
        self._last_heard = now
        msg = env.message
        if type(msg) is ChatMessage or type(msg) is RoomKey:
            return self._on_chat(env.msg_id, msg, env.ts, now)
        if type(msg) in _ROOM_FRAMES:
            return self._on_room_frame(env, now)
        if type(msg) is Receipt:
            return self._on_receipt(env.msg_id, msg, now)
        if type(msg) is FileDone and (delivered := self._held_delivered(msg)) is not None:
            return delivered
        if msg.RELAYED:  # file transfer frames
            if self.transfers is None or msg.recipient != self.user:  # type: ignore[attr-defined]
                return []
            actions = self.transfers.on_message(env, now) + self._ask_keys(self.transfers.take_key_wants(), now)
            for change in self.transfers.take_key_changes():  # an offer under a new key: as a message's
                actions += self._key_changed(change, now)
            if msg.DURABLE:  # a queued file offer: the transfer manager has taken it over
                self._consumes.append(env.msg_id)
            return actions
        if type(msg) is Ack:  # of a message, or of a file offer (its ref is the offer's id)
            room = self._room_acked(msg)
            if room is not None:
                return room
            if not self.outbox.acked(msg.ref, now):
                return [Emit(ev.Acked(msg.ref, msg.status.value))]
            if self.history is not None:
                self.history.advance(msg.ref, "stored" if msg.status is AckStatus.STORED else "sent")
            return [Emit(ev.Acked(msg.ref, msg.status.value))]
        if type(msg) is Error:
            return self._on_error(msg, now)
        if type(msg) is KeyInfo:
            return self._on_key_info(msg, now)
        if type(msg) is Devices:
            return self._on_devices(msg, now)
        if type(msg) is KeyChanged:  # a contact's ID moved to a new key: held as a change until accepted
            return self._on_key_info(msg, now) if self.e2e.pinned_key(msg.user) is not None else []
        if type(msg) is Registered:
            if msg.heartbeat_ms and self._follow_broker:
                self._hb_ivl = msg.heartbeat_ms / 1000
                self._expiry = self._hb_ivl * self._liveness
            elif msg.heartbeat_ms:  # the broker's expiry rules: heartbeat at least as often as it asks
                self._hb_ivl = min(self._hb_ivl, msg.heartbeat_ms / 1000)
            self.rooms_enabled = bool(msg.caps and msg.caps & CAPS_ROOMS)
            if self.rooms_enabled and self.e2e.enabled and msg.dev is not None and (
                    self.sender_keys is None or self.sender_keys.device != msg.dev):
                assert self._sender_key_store is not None, "sealing rooms needs a sender key store"
                self.sender_keys = SenderKeys(self.user, msg.dev, self._sender_key_store)
            if msg.caps is not None and msg.caps & CAPS_DEVICES and self.e2e.enabled:
                self.device = msg.dev
                self.e2e.device_aware = True
                if self.transfers is not None:
                    self.transfers.device = msg.dev
            return self._on_registered(now)
        if type(msg) is Snapshot and self.presence is not None:
            self._snapshot_due = None
            if not self.presence.on_snapshot(msg):
                return self._request_snapshot(now)
            return self._peers_changed(now)
        return []  # HEARTBEAT replies need nothing beyond _last_heard

    def on_publish(self, frames: list[bytes], now: float) -> list[Action]:
        """A message from the broker's PUB on the SUB."""
        if self.state is not State.READY or self.presence is None:
            return []
        try:
            msg = decode(frames).message
        except ProtocolError as exc:
            log.warning("user=%s dropped a bad presence frame: %s", self.user, exc.message)
            return []
        if type(msg) is PeerUpdate:
            in_sync = self.presence.on_update(msg)
        elif type(msg) is PeerSync:
            in_sync = self.presence.on_sync(msg)
        else:
            return []
        if not in_sync:
            return self._request_snapshot(now)
        return self._peers_changed(now)

    def on_tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.state is State.CLOSED:
            return actions
        if self.state is State.READY and self.outbox and now >= self.outbox.resend_at:
            actions += [self._transmit(frames, now) for frames in self.outbox.resend(now)]
        if self.state is State.READY and now - self._last_heard > self._expiry:
            actions += self._lost("broker silent for %.1fs" % (now - self._last_heard), now)
        elif self.state is State.CONNECTING and now - self._last_sent >= self._register_retry:
            self._register_retry = min(self._register_retry * 2, self._hb_ivl)
            actions.append(self._transmit(self._register_frames(), now))
        elif self.state is State.READY and now - self._last_sent >= self._hb_ivl:
            actions.append(self._transmit(self._pack(Heartbeat()), now))
        if self._snapshot_due is not None and now >= self._snapshot_due:
            actions += self._request_snapshot(now, force=True)
        self._refusals.flush(now)
        actions += self._accepted_elsewhere(now)
        actions += self._room_tick(now)
        if self.transfers is not None and self.state is State.READY:
            actions += self.transfers.on_tick(now)
            actions += self._ask_keys(self.transfers.take_key_wants(), now)
        return actions

    def next_deadline(self) -> float:
        retry = self._register_retry if self.state is State.CONNECTING else self._hb_ivl
        deadline = self._last_sent + retry
        if self.state is State.READY and self.outbox:
            deadline = min(deadline, self.outbox.resend_at)
        if self.state is State.READY:
            deadline = min(deadline, self._last_heard + self._expiry)
        if self._snapshot_due is not None:
            deadline = min(deadline, self._snapshot_due)
        if self.transfers is not None and self.state is State.READY:
            deadline = min(deadline, self.transfers.next_deadline())
        return deadline

    # --- handlers -----------------------------------------------------------
    def _on_chat(self, msg_id: bytes, msg: ChatMessage, ts: int, now: float, refetched: bool = False
                 ) -> list[Action]:
        if msg.recipient != self.user:
            return self._on_echo(msg_id, msg, ts, now, refetched) if msg.sender == self.user else []
        if msg_id in self._seen:  # a redelivery: say again that we have it, in case that was lost
            return self._got(msg.sender, msg_id, now)
        try:
            plaintext = self.e2e.open(msg.sender, msg_id, ts, msg.body, refetched=refetched)
        except UnknownDevice as exc:
            return self._unknown_device(exc, msg_id, msg, ts, now)
        except PeerKeyChanged as exc:  # authentic under a new key: kept queued (and here) until the user decides
            if self._held is None:
                self._held = HeldMessages()
            self._held.add(msg_id, msg, ts)
            return self._key_changed(exc, now)
        except ProtocolError as exc:  # tampered, replayed under a new id, not encrypted, or sealed to an old key
            # Consumed: a message that cannot open now never will, and must not come back at every reconnect.
            # The sender hears it (after the consume) with the key to seal to, so nothing is lost silently.
            self._consumes.append(msg_id)
            if self.e2e.enabled:
                self._after_consumes.append(Transmit(self._receipt_frames(
                    msg.sender, msg_id, ReceiptStatus.UNDECRYPTABLE, self.e2e.identity.public)))
            if not self._refusals.record(msg.sender, f"user={self.user} peer={msg.sender}", exc.message, now):
                return []
            return [Emit(ev.ErrorReported(exc))]
        self._seen[msg_id] = None  # only once authentic: a forged copy must not hide the real one
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        if type(msg) is RoomKey:
            return self._on_room_key_opened(msg_id, msg, plaintext, now)
        text = plaintext.decode("utf-8", errors="replace")
        got = self._got(msg.sender, msg_id, now)
        if self.history is not None and not self.history.add_incoming(msg_id, msg.sender, text, ts):
            return got  # received in an earlier run
        return [Emit(ev.MessageReceived(msg_id, msg.sender, text, ts))] + got

    def _got(self, sender: str, msg_id: bytes, now: float) -> list[Action]:
        """CONSUME for the broker's queue and a delivery receipt for the sender (sent after the commit)."""
        receipt = self._receipt_frames(sender, msg_id, ReceiptStatus.DELIVERED) if self.delivery_receipts else None
        return self._after_history(msg_id, receipt, now)

    def _after_history(self, consume: bytes, frames: list[bytes] | None, now: float) -> list[Action]:
        """Consume ``consume`` and send ``frames`` once the history holds what they confirm: without a history, at
        the end of this batch; with one, after the batch's commit (``history_saved``)."""
        if self.history is None:
            self._consumes.append(consume)
            return [self._transmit(frames, now)] if frames is not None else []
        self._held_consumes.append(consume)
        if frames is not None:
            self._after_commit.append(Transmit(frames))  # not sent yet: the heartbeat clock runs on
        return []

    def _receipt(self, peer: str, ref: bytes, status: ReceiptStatus, now: float) -> Transmit:
        return self._transmit(self._receipt_frames(peer, ref, status), now)

    def _receipt_frames(self, peer: str, ref: bytes, status: ReceiptStatus, key: bytes | None = None
                        ) -> list[bytes]:
        msg_id = self._new_id()
        self._receipts[msg_id] = None
        if len(self._receipts) > DEDUP_WINDOW:
            self._receipts.popitem(last=False)
        return pack(Receipt(self.user, peer, ref, status, key), self._wall_ms(), msg_id)

    def _on_receipt(self, msg_id: bytes, msg: Receipt, now: float) -> list[Action]:
        actions = self._after_history(msg_id, None, now)
        if msg.recipient != self.user:
            return actions
        if msg.sender == self.user:  # another device of ours read it
            return actions + (self._read_elsewhere(msg.ref) if msg.status is ReceiptStatus.READ else [])
        if msg.status is ReceiptStatus.UNDECRYPTABLE:
            return actions + self._on_undecryptable(msg.sender, msg.ref, msg.key, now)
        if self.history is None or self.history.advance(msg.ref, msg.status.value):
            actions.append(Emit(ev.Receipt(msg.ref, msg.sender, msg.status.value)))
        return actions

    def _on_key_info(self, msg: KeyInfo | KeyChanged, now: float) -> list[Action]:
        try:
            self.e2e.learn(msg.user, msg.key)
        except PeerKeyChanged as exc:  # our messages and offers to them wait for the user's decision
            how = msg.how.value if type(msg) is KeyChanged and msg.how is not None else None
            return self._key_changed(exc, now, how)
        actions = self._flush(now)
        if self.transfers is not None:
            actions += self.transfers.on_key(msg.user, now)
        return actions

    def _on_registered(self, now: float) -> list[Action]:
        if self.state is not State.CONNECTING:
            return []
        self.state = State.READY
        self._register_retry = REGISTER_RETRY_FIRST
        reconnect = self._registered_once
        actions: list[Action] = [Emit(ev.Registered(self.user, reconnect=reconnect))]
        self._registered_once = True
        log.info("user=%s registered", self.user)
        self._key_requests.clear()  # lost with the old session
        for frames in self.outbox.sealed():  # at-least-once: receivers dedup by id
            actions.append(self._transmit(frames, now))
        if self.presence is not None:
            self.presence.reset()
            actions += self._request_snapshot(now, force=True)
        if self.transfers is not None:
            actions += self.transfers.on_reconnected(now) if reconnect else self.transfers.resume_all(now)
        if not reconnect:
            actions += self._waiting_from_earlier_run(now)
        return actions + self._rooms_registered(now) + self._flush(now)

    def _on_error(self, msg: Error, now: float) -> list[Action]:
        error = RemoteError(msg.message, msg.code)
        if msg.code is ErrorCode.NOT_REGISTERED:  # the broker restarted and forgot us
            return self._lost("broker no longer knows this session", now) if self.state is State.READY else []
        if msg.code is ErrorCode.RATE_LIMITED:  # some frames were dropped: slow down, then send again
            log.warning("user=%s rate limited by the broker; re-sending unacknowledged messages shortly", self.user)
            self.outbox.resend_at = now + RATE_LIMIT_BACKOFF
            return []
        if msg.code is ErrorCode.BAD_FRAME and msg.ref in self._register_ids and (
                self._recovery is not None or self._caps is not None):
            # A broker older than recovery keys or devices refuses the fields: register without them.
            log.warning("user=%s the broker does not know recovery keys or devices (%s): registering without them",
                        self.user, msg.message)
            self._recovery = self._caps = None
            return [self._transmit(self._register_frames(), now)]
        if msg.code is ErrorCode.DEVICES_CHANGED:
            handled = self._devices_changed(msg.ref, error, now)
            if handled is not None:
                return handled
        handled = self._room_error(msg.code, error, msg.ref, now)
        if handled is not None:
            return handled
        if msg.code is ErrorCode.SESSION_REPLACED:  # our restarted self took over, or the ID left our key: stop
            self.state = State.CLOSED
            return [Emit(ev.Stopped(error))]
        if self.state is State.CONNECTING and msg.code in (ErrorCode.ID_TAKEN, ErrorCode.ALREADY_REGISTERED,
                                                           ErrorCode.ID_ONLINE):
            # With a recovery key sent, id_taken means the ID is bound to another key (id_online: online elsewhere).
            if not self._registered_once or (msg.code is ErrorCode.ID_TAKEN and self._recovery is not None):
                self.state = State.CLOSED
                return [Emit(ev.RegisterFailed(explain_refusal(self.user, error)))]
            return []  # our own stale session: it expires soon, keep re-registering
        if self.outbox.drop(msg.ref):
            if self.history is not None:
                self.history.fail(msg.ref)
            return [Emit(ev.SendFailed(msg.ref, error))]
        if msg.ref in self._receipts:
            return []  # a receipt that could not be delivered (durability off): nothing to do
        if msg.ref in self._key_requests:
            return self._fail_sends_to(self._key_requests.pop(msg.ref), error)
        if msg.ref is not None and self.transfers is not None:
            handled = self.transfers.on_error(msg.ref, error, now)
            if handled is not None:  # (an offer for an old device list waits for the new one: asked here)
                return handled + self._ask_keys(self.transfers.take_key_wants(), now)
        return [Emit(ev.ErrorReported(error))]

    # --- helpers ------------------------------------------------------------
    def _lost(self, reason: str, now: float) -> list[Action]:
        log.warning("user=%s connection lost: %s; re-registering", self.user, reason)
        self.state = State.CONNECTING
        self._last_heard = now
        if self.presence is not None:
            self.presence.reset()
        self._snapshot_due = None
        return [Emit(ev.Reconnecting(reason)), self._transmit(self._register_frames(), now)]

    def _register_frames(self) -> list[bytes]:
        msg_id = self._new_id()
        self._register_ids = [*self._register_ids[-3:], msg_id]  # the last few: answers cross retries
        return pack(Register(self.user, self._token, self._key, self._recovery, self._caps,
                             self._device_name if self._caps else None), self._wall_ms(), msg_id)

    def _flush(self, now: float) -> list[Action]:
        """Seal what waited for a key, ask for keys still missing, transmit if registered."""
        actions: list[Action] = []
        wanted: set[str] = set()
        for msg_id, sealed in self.outbox.seal(self.e2e):
            if (user := self._sealed(msg_id, sealed, now, actions)) is not None:
                wanted.add(user)
        if self.transfers is not None:
            wanted |= self.transfers.take_key_wants()
        return actions + self._ask_keys(wanted, now) + self._flush_rooms(now)

    def _sealed(self, msg_id: bytes, sealed: list[bytes] | PeerKeyChanged | str, now: float,
                actions: list[Action]) -> str | None:
        """One outcome of ``Outbox.seal`` into ``actions``; the user whose key it waits for, if any."""
        if type(sealed) is str:
            return sealed
        if type(sealed) is list:
            if self.state is State.READY:
                actions.append(self._transmit(sealed, now))
        elif sealed.user not in self._blocked:  # a key change waits for the user: so does the message
            actions += self._key_changed(sealed, now)
        return None

    def _ask_keys(self, users: set[str], now: float) -> list[Action]:
        if not users or self.state is not State.READY:
            return []  # nothing to ask (every send with sealing off), or asked again after registering
        asked = set(self._key_requests.values())
        actions: list[Action] = []
        request = DevicesRequest if self.e2e.enabled and self.e2e.device_aware else KeyRequest
        for user in sorted(users - asked):
            msg_id = self._new_id()
            self._key_requests[msg_id] = user
            actions.append(self._transmit(pack(request(user), self._wall_ms(), msg_id), now))
        return actions

    def _fail_sends_to(self, user: str, error: P2PChatError) -> list[Action]:
        self._room_unusable.add(user)  # nor sender keys: its rooms go on without it
        actions: list[Action] = []
        for msg_id in self.outbox.drop_unsealed_to(user):
            if self.history is not None:
                self.history.fail(msg_id)
            actions.append(Emit(ev.SendFailed(msg_id, error)))
        if self.transfers is not None:
            actions += self.transfers.fail_peer(user, error)
        return actions

    def _request_snapshot(self, now: float, force: bool = False) -> list[Action]:
        if self._snapshot_due is not None and not force:
            return []  # one in flight; re-asked at the deadline if lost
        self._snapshot_due = now + self._expiry
        return [self._transmit(self._pack(SnapshotRequest()), now)]

    def _peers_changed(self, now: float) -> list[Action]:
        current = frozenset(self.presence.peers)
        if current == self._published:
            return []
        joined, left = current - self._published, self._published - current
        self._published = current
        actions: list[Action] = [Emit(ev.PeersChanged(current, joined, left))]
        if self.transfers is not None:
            actions += self.transfers.on_peers(current, now)
        return actions

    def _pack(self, message) -> list[bytes]:
        return pack(message, self._wall_ms(), self._new_id())

    def _transmit(self, frames: list[bytes], now: float) -> Transmit:
        self._last_sent = now
        return Transmit(frames)
