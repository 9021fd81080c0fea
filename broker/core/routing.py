"""The broker's routing core: frames from a connection in, actions out.

No sockets, threads, clock reads or randomness: the shell hands in ``now`` (monotonic seconds), a
wall clock for timestamps and an id source for the broker's own frames, and carries out the
returned ``Send`` / ``Relay`` / ``Publish`` actions (broker/core/actions.py). Everything kept
outside this process goes through the ports of broker/core/ports.py, so one broker and a cluster
run the same code: they differ only in the implementations the shell wires in. Sessions are kept
in an ordered dict by last activity, so heartbeat expiry pops from the front in O(1).
Store-and-forward is broker/core/delivery.py; the credit ledger for file chunks broker/core/credit.py;
delivery to several devices of a user broker/core/fanout.py. (Just over 500 lines: the one dispatch of every
request, read as a whole.)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from p2pchat.broker.core.actions import Action, FrameMaker, Publish, Relay, Send
from p2pchat.broker.core.credit import CreditLedger, CreditLimits
from p2pchat.broker.core.delivery import EXPIRY_SWEEP, QueuedDelivery, queue_name
from p2pchat.broker.core.fanout import DeviceFanOut, device_name, ledger_key
from p2pchat.broker.core.room_files import RoomFileLimits, RoomFiles
from p2pchat.broker.core.room_service import RoomService
from p2pchat.broker.core.ports import (
    DEVICE_CAPS,
    DEVICE_ROOMS,
    REFUSALS,
    BindingChange,
    BrokerLink,
    Device,
    DeviceList,
    Forwarded,
    Frames,
    KeyRegistry,
    Kicked,
    LinkEvent,
    Location,
    PeerDirectory,
    QueueLimits,
    QueueStore,
    RoomFileStore,
    RoomRegistry,
    StoreUnavailable,
)
from p2pchat.broker.core.ratelimit import ConnectionLimiter, RateLimits
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol_rooms import CAPS_ROOMS, RoomKey, inbox_id
from p2pchat.common.protocol import CAPS_DEVICES, Ack, AckStatus, Consume, Devices, DevicesRequest, Envelope, FileCancel, FileOffer, FileChunk, FileCredit, FileDone, Heartbeat, KeyChangeHow, KeyChanged, KeyInfo, KeyRequest, Message, PeerSync, PeerUpdate, Register, Registered, Snapshot, SnapshotRequest, Unregister, decode

log = logging.getLogger(__name__)

MAX_LIMITERS = 200_000
_HOW = frozenset(h.value for h in KeyChangeHow)
_LEFT_KEY = {  # BindingChange.why -> what the old key's session is told
    "recovered": "was moved to another key with its recovery phrase",
    "moved": "was moved to another key by the broker's operator",
    "released": "was released by the broker's operator",
    "unlinked": "unlinked this device",
}


@dataclass(slots=True)
class _Session:
    user: str
    token: bytes
    last_seen: float
    key: bytes | None = None  # the CURVE key that registered it: every later frame must carry the same one
    dev: int = 0  # its device's number in the ID's device list (0: the ID left that key meanwhile)
    caps: bool = False  # registered with caps CAPS_DEVICES: it seals a copy per device (§5.6)
    rooms: bool = False  # registered with caps CAPS_ROOMS: it may use rooms and gets their frames (§5.7)


class BrokerCore(DeviceFanOut, RoomService):
    def __init__(
        self,
        directory: PeerDirectory,
        *,
        broker_id: bytes,
        heartbeat_ivl: float,
        liveness: int,
        wall_ms: Callable[[], int],
        new_id: Callable[[], bytes],
        keys: KeyRegistry,
        store: QueueStore,
        link: BrokerLink,
        queue_limits: QueueLimits = QueueLimits(),
        require_key: bool = True,
        limits: RateLimits = RateLimits(),
        credit: CreditLimits = CreditLimits(),
        rooms: RoomRegistry | None = None,
        room_files: RoomFileStore | None = None,
        room_file_limits: RoomFileLimits = RoomFileLimits(),
    ) -> None:
        self.directory, self.keys, self.link = directory, keys, link
        self.rooms = rooms  # None: this broker has no rooms (CAPS_ROOMS is never granted)
        self._wall_ms = wall_ms
        self.broker_id = broker_id
        self.heartbeat_ivl = heartbeat_ivl
        self.expiry = heartbeat_ivl * liveness
        self.require_key = require_key  # CURVE: a REGISTER's key must be the connection's key
        self.limits = limits
        self._frames = FrameMaker(new_id, wall_ms)
        # The rooms' files, kept sealed by the broker (§8.1); None: rooms without files.
        self.room_files = RoomFiles(room_files, room_file_limits, self._frames) if room_files is not None else None
        self.delivery = QueuedDelivery(store, queue_limits, directory, link, self._frames, wall_ms, broker_id,
                                       heartbeat_ivl)
        self.credit = CreditLedger(credit)
        self._limiters: OrderedDict[bytes, ConnectionLimiter] = OrderedDict()
        # Per connection, logged aggregated; the first of a period is also answered (never one reply per frame).
        self.bad_frames = IncidentLog("bad frame", log)
        self.rate_limited = IncidentLog("rate limited", log)
        self.credit_refused = IncidentLog("chunks refused", log)
        self._refusing: set[bytes] = set()  # connections whose last chunk was refused (§8: said once per run)
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._next_sync = 0.0
        self._next_sweep = 0.0
        self._handlers: dict[type[Message], Callable[[bytes, Envelope, float], list[Action]]] = {
            Unregister: self._on_unregister,
            Heartbeat: self._on_heartbeat,
            SnapshotRequest: self._on_snapshot_request,
            KeyRequest: self._on_key_request,
            DevicesRequest: self._on_devices_request,
            Consume: self._on_consume,
        }
        if rooms is not None:
            self._handlers.update(self._room_handlers())

    # --- inputs -------------------------------------------------------------
    def on_frames(self, conn: bytes, frames: Frames, now: float,
                  peer_key: Callable[[], bytes | None] = lambda: None) -> list[Action]:
        """One ZeroMQ message from ``conn`` (routing id stripped); ``peer_key()`` gives its CURVE key."""
        size = len(frames[0]) + (len(frames[1]) if len(frames) > 1 else 0)  # more parts fail decode anyway
        if not self._limiter(conn, now).allow(size, now):
            if self.rate_limited.record(conn, self._who(conn), "frames are being dropped", now):
                return [Send(conn, self._frames.error(ErrorCode.RATE_LIMITED, "slow down: frames are being dropped",
                                                      None))]
            return []  # no reply per dropped frame: no amplification
        session = self._sessions.get(conn)
        if session is not None:
            if self.require_key and peer_key() != session.key:  # a routing id is no credential
                self.bad_frames.record(conn, self._who(conn), "CURVE key is not the session's", now)
                return [Send(conn, self._frames.error(ErrorCode.KEY_MISMATCH, "this frame's CURVE key is not the key "
                                                      "of the session on this routing id", None))]
            session.last_seen = now  # any traffic counts as a heartbeat, even a malformed frame
            self._sessions.move_to_end(conn)
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.bad_frames.record(conn, self._who(conn), exc.message, now)
            return [Send(conn, self._frames.error(exc.code, exc.message, exc.ref))]
        msg = env.message
        try:
            if msg.RELAYED:
                return self._relay(conn, session, env, frames, now)
            if type(msg) is Register:
                return self._on_register(conn, env, now, peer_key)
            handler = self._handlers.get(type(msg))
            if handler is None:
                return [Send(conn, self._frames.error(ErrorCode.BAD_FRAME, f"{msg.TYPE.value} is not a request",
                                                      env.msg_id))]
            return handler(conn, env, now)
        except StoreUnavailable:  # a shared store (cluster: Redis) is down; the request changed nothing
            return [Send(conn, self._frames.error(ErrorCode.STORAGE_UNAVAILABLE, "the broker's shared store is "
                                                  "unavailable; try again later", env.msg_id))]

    def on_tick(self, now: float) -> list[Action]:
        """Expire silent sessions; take in what other brokers sent; publish presence and the periodic PEER_SYNC."""
        for incidents in (self.bad_frames, self.rate_limited, self.credit_refused):
            incidents.flush(now)
        actions: list[Action] = []
        while self._sessions:
            conn, session = next(iter(self._sessions.items()))
            if now - session.last_seen <= self.expiry:
                break
            log.info("user=%s conn=%s expired after %.1fs of silence", session.user, conn.hex(), self.expiry)
            actions += self._drop(conn)
        for event in self.link.receive(now):
            actions += self._on_link_event(event, now)
        for change in self.keys.changes(now):
            actions += self._on_binding_changed(change)
        actions += self._presence()
        actions += self.delivery.on_tick(now, self.directory.recheck(now))
        actions += self._rooms_tick(now)
        if now >= self._next_sweep:
            self._next_sweep = now + EXPIRY_SWEEP
            self.credit.expire(now)
        if now >= self._next_sync:
            self._next_sync = now + self.heartbeat_ivl
            actions.append(Publish(self._frames.make(PeerSync(self.directory.epoch, self.directory.seq()))))
        return actions

    def on_commit(self, failure: ErrorCode | None = None) -> list[Action]:
        """The shell committed its batch (``failure`` None) or could not: answer the batch's durable frames."""
        return self.delivery.on_commit(failure)

    def on_delivery_failed(self, queue: str) -> None:
        """The shell could not hand a frame of ``queue`` to its session (high-water mark): page it again soon."""
        self.delivery.failed(queue)

    def next_deadline(self) -> float:
        """When ``on_tick`` next has work to do."""
        deadline = self._next_sync
        if self._sessions:
            deadline = min(deadline, next(iter(self._sessions.values())).last_seen + self.expiry)
        return deadline

    def user_of(self, conn: bytes) -> str | None:
        session = self._sessions.get(conn)
        return session.user if session else None

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # --- registration -------------------------------------------------------
    def _on_register(self, conn: bytes, env: Envelope, now: float,
                     peer_key: Callable[[], bytes | None]) -> list[Action]:
        msg: Register = env.message  # type: ignore[assignment]
        user = msg.user
        session = self._sessions.get(conn)
        if session is not None and session.user != user:
            return [Send(conn, self._frames.error(ErrorCode.ALREADY_REGISTERED,
                                                  f"this connection is registered as {session.user!r}", env.msg_id))]
        if self.require_key and msg.key != peer_key():
            return [Send(conn, self._frames.error(ErrorCode.KEY_MISMATCH, "the key in REGISTER is not this "
                                                  "connection's CURVE key", env.msg_id))]
        refused = self.keys.bind(user, msg.key, msg.recovery)
        if refused is not None:
            log.warning("user=%s conn=%s refused: %s", user, conn.hex(), refused.value)
            return [Send(conn, self._frames.error(refused, REFUSALS[refused].format(user=user), env.msg_id))]
        devices = self.keys.devices(user)
        device = devices.find(msg.key) if devices is not None else None
        # None: moved to another key since the bind (another broker, the operator); the session ends at once.
        dev = device.id if device is not None else 0
        queue = queue_name(user, dev, devices.primary.id if devices is not None else dev)
        reply = Send(conn, self._frames.make(self._registered(msg, devices, device)))
        if session is not None:  # a repeated REGISTER is answered, not re-announced
            return [reply]
        here = Location(self.broker_id, conn)
        if self.directory.claim(user, dev, here, msg.token):  # the first device of the ID announces it online
            log.info("user=%s conn=%s registered (device %d)", user, conn.hex(), dev)
            return [reply] + self._open(conn, msg, dev, queue, now) + self._presence()
        stale = self._stale_session_of(user, dev, msg.token)
        if stale is not None:  # the same installation reconnected before its old session expired: hand over quietly
            log.info("user=%s conn=%s takes over from conn=%s (device %d)", user, conn.hex(), stale.hex(), dev)
            self._end(stale)
            self.directory.hand_over(user, dev, Location(self.broker_id, stale), here, msg.token)
            replaced = Send(stale, self._frames.error(ErrorCode.SESSION_REPLACED, "a newer connection took over", None))
            return [replaced, reply] + self._open(conn, msg, dev, queue, now) + self._presence()
        previous = self.directory.take_over(user, dev, here, msg.token)
        if previous is None:
            log.info("user=%s conn=%s refused: ID online elsewhere", user, conn.hex())
            # A client that sends a recovery key knows id_online; an older one knows only id_taken (§5.1).
            code = ErrorCode.ID_ONLINE if msg.recovery is not None else ErrorCode.ID_TAKEN
            return [Send(conn, self._frames.error(code, REFUSALS[ErrorCode.ID_ONLINE].format(user=user),
                                                  env.msg_id))]
        # The session lived on another broker, now gone or replaced by this one (the same token).
        log.info("user=%s conn=%s takes over from broker=%s", user, conn.hex(), previous.broker.hex())
        if previous.broker:
            self.link.kick(previous.broker, previous.conn, user)
        return [reply] + self._open(conn, msg, dev, queue, now) + self._presence()

    def _registered(self, msg: Register, devices: DeviceList | None, device: Device | None) -> Registered:
        """The answer to a successful ``register``: version 1's fields, and the device's only if it sent ``caps``
        (an older client's strict decoder would drop a ``registered`` with fields it does not know)."""
        registered = Registered(msg.user, self.directory.epoch, int(self.heartbeat_ivl * 1000))
        if msg.caps is None or devices is None or device is None:
            return registered
        granted = msg.caps & (CAPS_DEVICES | (CAPS_ROOMS if self.rooms is not None else 0))
        flags = (DEVICE_CAPS if granted & CAPS_DEVICES else 0) | (DEVICE_ROOMS if granted & CAPS_ROOMS else 0)
        self.keys.describe_device(msg.user, device.id, flags, msg.name)
        return Registered(msg.user, registered.epoch, registered.heartbeat_ms, granted, device.id, devices.ver)

    def _open(self, conn: bytes, msg: Register, dev: int, queue: str, now: float) -> list[Action]:
        caps = msg.caps or 0
        rooms = bool(caps & CAPS_ROOMS) and self.rooms is not None
        self._sessions[conn] = _Session(msg.user, msg.token, now, msg.key, dev, bool(caps & CAPS_DEVICES), rooms)
        return self.delivery.opened(conn, queue)

    def _stale_session_of(self, user: str, dev: int, token: bytes) -> bytes | None:
        """The connection holding ``user``'s device ``dev`` on this broker, if it was registered with ``token``."""
        for where in self._sessions_here(user):
            session = self._sessions[where.conn]
            if session.dev == dev and session.token == token:
                return where.conn
        return None

    def _sessions_here(self, user: str) -> list[Location]:
        """``user``'s sessions on this broker, its lowest-numbered device's first."""
        return [where for where in self.directory.locate(user)
                if where.broker == self.broker_id and where.conn in self._sessions]

    def _on_unregister(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        log.info("user=%s conn=%s unregistered", self._sessions[conn].user, conn.hex())
        return self._drop(conn)

    def _drop(self, conn: bytes) -> list[Action]:
        """``conn``'s session ends here (unregistered or expired): its user goes offline."""
        session = self._end(conn)
        self.directory.release(session.user, session.dev, Location(self.broker_id, conn))
        return self._presence()

    def _end(self, conn: bytes) -> _Session:
        """Forget session ``conn`` and what this broker held for it."""
        session = self._sessions.pop(conn)
        self._limiters.pop(conn, None)
        for incidents in (self.bad_frames, self.rate_limited, self.credit_refused):
            incidents.forget(conn)
        self._refusing.discard(conn)
        self.credit.recipient_gone(session.user)
        self.delivery.closed(conn)
        if self.rooms is not None:
            self._rooms_session_ended(conn)
        if self.room_files is not None:
            self.room_files.closed(conn)
        return session

    def _presence(self) -> list[Action]:
        """Publish the directory's changes (one broker: its own; a cluster: everyone's, in the global order).
        Always an input's last actions: a cluster's changes may come now or with a later tick."""
        changes = self.directory.changes()
        if not changes:
            return []
        epoch = self.directory.epoch
        return [Publish(self._frames.make(PeerUpdate(epoch, c.seq, c.user, c.online))) for c in changes]

    def _on_binding_changed(self, change: BindingChange) -> list[Action]:
        """``change.user``'s ID left its key (recovered, moved or released): the old key's session here ends, and
        everyone else here hears of the new key (their clients hold it as a changed key until accepted). A device
        unlinked: its session ends. A device linked: nothing to do here (senders hear of it as devices_changed)."""
        actions = self._rooms_of_changed_devices(change.user)
        if change.why == "linked":
            return actions
        unlinked = change.why == "unlinked"
        for where in self._sessions_here(change.user):
            if (self._sessions[where.conn].key != change.key) if unlinked else (self._sessions[where.conn].key == change.key):
                continue
            log.warning("user=%s conn=%s session closed: the ID was %s", change.user, where.conn.hex(), change.why)
            text = f"user ID {change.user!r} {_LEFT_KEY.get(change.why, change.why)}: this key no longer holds it"
            actions.append(Send(where.conn, self._frames.error(ErrorCode.SESSION_REPLACED, text, None)))
            actions += self._drop(where.conn)
        if change.key is not None and not unlinked:
            how = KeyChangeHow(change.why) if change.why in _HOW else None
            told = self._frames.make(KeyChanged(change.user, change.key, how))
            actions += [Send(conn, told) for conn, other in self._sessions.items() if other.user != change.user]
        return actions

    # --- requests -------------------------------------------------------------
    def _on_heartbeat(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        return [Send(conn, self._frames.make(Heartbeat()))]

    def _on_snapshot_request(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        snap = Snapshot(self.directory.epoch, self.directory.seq(), tuple(self.directory.online()))
        return [Send(conn, self._frames.make(snap))]

    def _on_key_request(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        user = env.message.user  # type: ignore[attr-defined]
        key = self.keys.lookup(user)
        if key is None:
            return [Send(conn, self._frames.error(ErrorCode.UNKNOWN_RECIPIENT, f"no key known for {user!r}",
                                                  env.msg_id))]
        return [Send(conn, self._frames.make(KeyInfo(user, key)))]

    def _on_devices_request(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        user = env.message.user  # type: ignore[attr-defined]
        try:
            devices, state = self.keys.devices(user, fresh=True), self.keys.recovery_state(user)
        except StoreUnavailable:  # the shared store is down: as this broker last saw them
            devices, state = self.keys.devices(user), None
        if devices is None:
            return [Send(conn, self._frames.error(ErrorCode.UNKNOWN_RECIPIENT, f"no devices known for {user!r}",
                                                  env.msg_id))]
        entries = tuple((d.id, d.key, d.name, d.flags) for d in devices.devices)
        proofs = tuple((d.id, d.gen, d.proof) for d in devices.devices if d.proof) or None
        account = state.recovery if state is not None else None
        return [Send(conn, self._frames.make(Devices(user, devices.ver, entries, account, proofs)))]

    def _on_consume(self, conn: bytes, env: Envelope, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        msg: Consume = env.message  # type: ignore[assignment]
        return self.delivery.consumed(conn, (msg.ref, *msg.refs) if msg.refs else (msg.ref,))

    # --- relaying -----------------------------------------------------------
    def _relay(self, conn: bytes, session: _Session | None, env: Envelope, frames: Frames,
               now: float) -> list[Action]:
        msg = env.message
        if session is None:
            return [self._not_registered(conn, env)]
        if msg.sender != session.user:  # type: ignore[attr-defined]
            return [Send(conn, self._frames.error(ErrorCode.SPOOFED_SENDER, f"sender must be {session.user!r}",
                                                  env.msg_id))]
        # (An offer's ``src`` is the broker's to set: one a client sets must be true as well, since a frame for
        # a single device goes on unchanged.)
        if getattr(msg, "src", None) is not None and msg.src != session.dev:
            return [Send(conn, self._frames.error(ErrorCode.SPOOFED_SENDER, f"src must be {session.dev}",
                                                  env.msg_id))]
        recipient = msg.recipient  # type: ignore[attr-defined]
        if type(msg) is RoomKey and (refused := self._room_key_refused(session, msg)) is not None:
            return [Send(conn, self._frames.error(refused, f"{recipient!r} and you must both be members of the room",
                                                  env.msg_id))]
        sessions = self.directory.locate(recipient)
        known = bool(sessions) or self.directory.is_known(recipient) or self.keys.lookup(recipient) is not None
        if not known:
            return [Send(conn, self._frames.error(ErrorCode.UNKNOWN_RECIPIENT, f"recipient {recipient!r} is unknown",
                                                  env.msg_id))]
        if type(msg) is FileOffer and msg.held and (refused := self._not_held(inbox_id(recipient), msg, session)):
            return [Send(conn, self._frames.error(refused, "offer a held file once the broker holds all of it, as "
                                                  "uploaded", env.msg_id))]
        if msg.DURABLE:
            targets = self._targets(session, env, frames)
            if type(targets) is str:
                return [Send(conn, self._frames.error(ErrorCode.DEVICES_CHANGED, targets, env.msg_id))]
            if self.delivery.durable:
                try:
                    return self.delivery.queue(conn, env, targets, sessions)
                except StoreUnavailable:
                    if not any(where.broker == self.broker_id for where in sessions):
                        raise
                    # The store is down but the recipient is here: relay it unstored, acknowledged "relayed".
            return self._relay_now(conn, env, frames, targets)
        dev = getattr(msg, "dev", None)
        where = self._device_location(recipient, dev, sessions)
        if where is None:
            return [Send(conn, self._frames.error(ErrorCode.RECIPIENT_OFFLINE, f"recipient {recipient!r} is offline",
                                                  env.msg_id))]
        if type(msg) is FileChunk:
            return self._relay_chunk(conn, env, frames, where, now)
        if where.broker == self.broker_id or type(msg) is not FileCredit:
            self._track_transfer(msg, now)  # a credit is tracked where its file's sender is connected
        ack = self._frames.make(Ack(env.msg_id, AckStatus.RELAYED)) if msg.ACKED else None
        if where.broker != self.broker_id:  # relayed = handed to the link to the other broker
            self.link.forward(where.broker, device_name(recipient, dev), frames)
            return [Send(conn, ack)] if ack is not None else []
        return [Relay(where.conn, frames, conn, ack,
                      lambda: self._frames.error(ErrorCode.RECIPIENT_BUSY, f"recipient {recipient!r} is not keeping up",
                                                 env.msg_id))]

    def _relay_chunk(self, conn: bytes, env: Envelope, frames: Frames, where: Location, now: float) -> list[Action]:
        """A file chunk goes on only inside its recipient's credit window (broker/core/credit.py)."""
        msg: FileChunk = env.message  # type: ignore[assignment]
        size = len(frames[1]) if len(frames) > 1 else 0
        xfer = ledger_key(msg.xfer, msg.dev)
        if not self.credit.admit(msg.sender, msg.recipient, xfer, msg.index, size, now):
            self.credit_refused.record(conn, self._who(conn), f"xfer={msg.xfer.hex()} outside the credit "
                                       f"{msg.recipient!r} granted", now)
            if conn in self._refusing:
                return []  # one reply per run of refused chunks: a flood is not amplified
            self._refusing.add(conn)
            return [Send(conn, self._frames.error(ErrorCode.CREDIT_EXCEEDED, f"chunk {msg.index} is outside the "
                                                  f"credit {msg.recipient!r} granted; wait for file_credit",
                                                  env.msg_id))]
        self._refusing.discard(conn)
        if where.broker != self.broker_id:  # there, to the device it names (the one that took the file)
            self.link.forward(where.broker, device_name(msg.recipient, msg.dev), frames)
            return []

        def refused() -> Frames:  # the recipient's queue is full: the chunk is not in flight after all
            self.credit.unadmit(msg.sender, msg.recipient, xfer, msg.index, size)
            return self._frames.error(ErrorCode.RECIPIENT_BUSY, f"recipient {msg.recipient!r} is not keeping up",
                                      env.msg_id)

        return [Relay(where.conn, frames, conn, None, refused)]

    def _track_transfer(self, msg: Message, now: float) -> None:
        """Keep the credit ledger up to date with a relayed transfer control frame."""
        kind = type(msg)
        if kind is FileCredit:  # from the file's recipient (one device of it) to its sender
            self.credit.on_credit(msg.recipient, msg.sender, ledger_key(msg.xfer, msg.src),  # type: ignore
                                  msg.next, msg.upto, now)  # type: ignore[attr-defined]
        elif kind is FileDone or (kind is FileCancel and msg.code is not ErrorCode.TAKEN):  # type: ignore
            # (``taken`` tells another device of the recipient: the transfer goes on with the one that took it)
            # Either way round: from the file's receiver (its device is ``src``) or its sender (to ``dev``).
            self.credit.forget(msg.recipient, msg.sender, ledger_key(msg.xfer, msg.src))  # type: ignore
            self.credit.forget(msg.sender, msg.recipient, ledger_key(msg.xfer, msg.dev))  # type: ignore

    # --- other brokers --------------------------------------------------------
    def _on_link_event(self, event: LinkEvent, now: float) -> list[Action]:
        if type(event) is Forwarded:
            return self._on_forwarded(event.user, event.frames, now)
        if type(event) is Kicked:
            return self._on_kicked(event.conn, event.user)
        self.delivery.failed_all()  # Rejoined: queues could not be read meanwhile
        return []

    def _on_forwarded(self, name: str, frames: Frames, now: float) -> list[Action]:
        """Frames another broker routed here to ``name``: a device queue (durable frames) or ``user/dev`` (a
        device's transfer frames), else ``user``: deliver if that session is still connected here."""
        try:
            msg = decode(frames).message
        except ProtocolError:
            return []
        user, _, dev = name.partition("/")
        if msg.DURABLE and self.delivery.durable:  # from a device's queue: for that device's session
            conn = self.delivery.conn_of(name)
        else:
            here = self._sessions_here(user)
            conn = next((w.conn for w in here if not dev or self._sessions[w.conn].dev == int(dev)), None)
        if conn is None:
            return []  # moved on: durable frames wait in the shared store, transfers resume
        if self.delivery.delivers_later(conn, msg):
            return []
        self._track_transfer(msg, now)
        return [Send(conn, frames, name)]

    def _on_kicked(self, conn: bytes, user: str) -> list[Action]:
        """Another broker took ``user``'s session over (same token): end ours; it stays online there."""
        session = self._sessions.get(conn)
        if session is None or session.user != user:
            return []
        self._end(conn)
        self.directory.release(user, session.dev, Location(self.broker_id, conn))  # a no-op where it moved already
        log.info("user=%s conn=%s session taken over by another broker", user, conn.hex())
        replaced = Send(conn, self._frames.error(ErrorCode.SESSION_REPLACED, "a newer connection took over", None))
        return [replaced] + self._presence()

    # --- helpers ------------------------------------------------------------
    def _limiter(self, conn: bytes, now: float) -> ConnectionLimiter:
        limiter = self._limiters.get(conn)
        if limiter is None:
            limiter = self._limiters[conn] = ConnectionLimiter(self.limits, now)
            if len(self._limiters) > MAX_LIMITERS:  # bounded: forget the oldest connection's bucket
                self._limiters.popitem(last=False)
        return limiter

    def _who(self, conn: bytes) -> str:
        """``conn`` and its user, for a log line."""
        return f"conn={conn.hex()} user={self.user_of(conn)}"

    def _not_registered(self, conn: bytes, env: Envelope) -> Send:
        return Send(conn, self._frames.error(ErrorCode.NOT_REGISTERED, "register first", env.msg_id))
