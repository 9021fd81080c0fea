"""The broker's routing core: frames from a connection in, actions out.

No sockets, threads or clock reads: the shell hands in ``now`` (monotonic
seconds) and a wall clock for timestamps, and carries out the returned
``Send`` / ``Relay`` / ``Publish`` actions. Sessions are kept in an ordered
dict by last activity, so heartbeat expiry pops from the front in O(1).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from p2pchat.broker.core.credit import CreditLedger, CreditLimits
from p2pchat.broker.core.directory import Location, PeerDirectory
from p2pchat.broker.backends.sqlite_keys import REFUSALS, KeyRegistry
from p2pchat.broker.core.ratelimit import AggregatedLog, ConnectionLimiter, RateLimits
from p2pchat.broker.backends.sqlite_store import MessageStore, NoStore, QueueLimits, Refusal, StoreUnavailable
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import (
    Ack,
    AckStatus,
    Consume,
    Envelope,
    Error,
    FileCancel,
    FileChunk,
    FileCredit,
    FileDone,
    Heartbeat,
    KeyInfo,
    KeyRequest,
    Message,
    PeerSync,
    PeerUpdate,
    Register,
    Registered,
    Snapshot,
    SnapshotRequest,
    Unregister,
    decode,
    new_msg_id,
    pack,
)

log = logging.getLogger(__name__)

Frames = Sequence[Any]  # bytes, or zmq.Frame for zero-copy payloads
MAX_LIMITERS = 200_000
EXPIRY_SWEEP = 60.0  # seconds between sweeps of expired queued frames


@dataclass(frozen=True, slots=True)
class Send:
    conn: bytes
    frames: Frames
    queued_for: str | None = None  # a store-and-forward delivery: report a failed send (on_delivery_failed)


@dataclass(frozen=True, slots=True)
class Relay:
    """Forward ``frames`` to ``conn``; then send ``on_success`` or ``on_failure()`` to ``sender``."""

    conn: bytes
    frames: Frames
    sender: bytes
    on_success: Frames | None
    on_failure: Callable[[], Frames]  # built only when needed: the common case never pays for it


@dataclass(frozen=True, slots=True)
class Publish:
    frames: Frames


@dataclass(frozen=True, slots=True)
class Forward:
    """Cluster mode: hand ``frames`` for ``user`` to the broker that holds their connection."""

    broker: bytes
    user: str
    frames: Frames


@dataclass(frozen=True, slots=True)
class Kick:
    """Cluster mode: tell ``broker`` that its session ``conn`` of ``user`` was taken over elsewhere."""

    broker: bytes
    conn: bytes
    user: str


Action = Send | Relay | Publish | Forward | Kick


@dataclass(slots=True)
class _Session:
    user: str
    token: bytes
    last_seen: float
    key: bytes | None = None  # the CURVE key that registered it: every later frame must carry the same one
    # Paged delivery of the queue: the last seq sent, whether pages remain, frames sent but not consumed.
    cursor: int = 0
    draining: bool = True
    unconsumed: int = 0


@dataclass(frozen=True, slots=True)
class _Appended:
    """A durable frame appended in the open batch: answered once the shell reports the commit."""

    sender: bytes
    msg_id: bytes
    acked: bool
    recipient: str
    frames: Frames
    queued: bool  # False: the store refused it for space (store bound or disk); relay it or say storage_full


class BrokerCore:
    def __init__(
        self,
        directory: PeerDirectory,
        *,
        broker_id: bytes,
        heartbeat_ivl: float,
        liveness: int,
        wall_ms: Callable[[], int],
        keys: KeyRegistry,
        store: MessageStore | None = None,
        queue_limits: QueueLimits = QueueLimits(),
        require_key: bool = True,
        limits: RateLimits = RateLimits(),
        credit: CreditLimits = CreditLimits(),
        new_id: Callable[[], bytes] = new_msg_id,
    ) -> None:
        self.directory = directory
        self._new_id = new_id  # ids of the broker's own frames: fixed in a replayed session
        self.keys = keys
        self.store = store or NoStore()
        self.queue_limits = queue_limits
        self._next_expiry = 0.0
        self._stalled: set[str] = set()  # users whose next page is due at the next redelivery tick
        self._appended: list[_Appended] = []
        self._next_redelivery = 0.0
        self.require_key = require_key  # CURVE: a REGISTER's key must be the connection's key
        self.limits = limits
        self._limiters: OrderedDict[bytes, ConnectionLimiter] = OrderedDict()
        self.credit = CreditLedger(credit)
        self._credit_drops: dict[bytes, int] = {}  # sender conn -> chunks refused since its last relayed one
        self._now = 0.0  # the latest tick's time, for inputs that come without one (on_forwarded)
        self.bad_frames = AggregatedLog("bad frame")
        self.broker_id = broker_id
        self.heartbeat_ivl = heartbeat_ivl
        self.expiry = heartbeat_ivl * liveness
        self._wall_ms = wall_ms
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._next_sync = 0.0
        # Cluster: a frame queued by another broker just before this one registered its recipient may
        # miss both the first delivery and the registration's sweep; sweep once more a beat later.
        self._recheck: deque[tuple[float, str]] = deque()
        self._handlers: dict[type[Message], Callable[[bytes, Envelope, Frames, float], list[Action]]] = {
            Unregister: self._on_unregister,
            Heartbeat: self._on_heartbeat,
            SnapshotRequest: self._on_snapshot_request,
            KeyRequest: self._on_key_request,
            Consume: self._on_consume,
        }

    # --- inputs -------------------------------------------------------------
    def on_frames(self, conn: bytes, frames: Frames, now: float,
                  peer_key: Callable[[], bytes | None] = lambda: None) -> list[Action]:
        """One ZeroMQ message from ``conn`` (routing id stripped); ``peer_key()`` gives its CURVE key."""
        size = len(frames[0]) + (len(frames[1]) if len(frames) > 1 else 0)  # more parts fail decode anyway
        if not self._limiter(conn, now).allow(size, now):
            refused = self._limiters[conn].refused
            if refused == 1 or refused % 1000 == 0:  # say so, without amplifying the flood
                log.warning("conn=%s user=%s rate limited", conn.hex(), self.user_of(conn))
                return [Send(conn, self._error(ErrorCode.RATE_LIMITED, "slow down: frames are being dropped", None))]
            return []
        session = self._sessions.get(conn)
        if session is not None:
            if self.require_key and peer_key() != session.key:  # a routing id is no credential
                self.bad_frames.record(conn, session.user, "CURVE key is not the session's", now)
                return [Send(conn, self._error(ErrorCode.KEY_MISMATCH, "this frame's CURVE key is not the key of "
                                               "the session on this routing id", None))]
            session.last_seen = now  # any traffic counts as a heartbeat, even a malformed frame
            self._sessions.move_to_end(conn)
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.bad_frames.record(conn, session.user if session else None, exc.message, now)
            return [Send(conn, self._error(exc.code, exc.message, exc.ref))]
        msg = env.message
        try:
            if msg.RELAYED:
                return self._relay(conn, session, env, frames, now)
            if type(msg) is Register:
                return self._on_register(conn, env, now, peer_key)
            handler = self._handlers.get(type(msg))
            if handler is None:
                return [Send(conn, self._error(ErrorCode.BAD_FRAME, f"{msg.TYPE.value} is not a request", env.msg_id))]
            return handler(conn, env, frames, now)
        except StoreUnavailable:  # a shared store (cluster: Redis) is down; the request changed nothing
            return [Send(conn, self._error(ErrorCode.STORAGE_UNAVAILABLE,
                                           "the broker's shared store is unavailable; try again later", env.msg_id))]

    def on_tick(self, now: float) -> list[Action]:
        """Expire silent sessions; publish the periodic PEER_SYNC."""
        self._now = now
        actions: list[Action] = []
        self.bad_frames.flush(now)
        while self._sessions:
            conn, session = next(iter(self._sessions.items()))
            if now - session.last_seen <= self.expiry:
                break
            log.info("user=%s conn=%s expired after %.1fs of silence", session.user, conn.hex(), self.expiry)
            actions += self._drop(conn)
        while self._recheck and self._recheck[0][0] <= now:
            self._stalled.add(self._recheck.popleft()[1])
        if self._stalled and now >= self._next_redelivery:
            self._next_redelivery = now + self.heartbeat_ivl
            users, self._stalled = self._stalled, set()
            for user in users:
                where = self.directory.locate(user)
                if where is not None and where.broker == self.broker_id and where.conn in self._sessions:
                    actions += self._next_page(where.conn)
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_SWEEP
            if self.store.expire(self._wall_ms()) >= self.queue_limits.expire_batch:
                self._next_expiry = now + self.heartbeat_ivl  # more are due: next step soon, loop never stalls
            self.credit.expire(now)
        if now >= self._next_sync:
            self._next_sync = now + self.heartbeat_ivl
            actions.append(Publish(self._pack(PeerSync(self.directory.epoch, self.directory.seq()))))
        return actions

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

    # --- handlers -----------------------------------------------------------
    def _on_register(self, conn: bytes, env: Envelope, now: float,
                     peer_key: Callable[[], bytes | None]) -> list[Action]:
        msg: Register = env.message  # type: ignore[assignment]
        user = msg.user
        session = self._sessions.get(conn)
        if session is not None and session.user != user:
            return [Send(conn, self._error(ErrorCode.ALREADY_REGISTERED,
                                           f"this connection is registered as {session.user!r}", env.msg_id))]
        if self.require_key and msg.key != peer_key():
            return [Send(conn, self._error(ErrorCode.KEY_MISMATCH,
                                           "the key in REGISTER is not this connection's CURVE key", env.msg_id))]
        refused = self.keys.bind(user, msg.key)
        if refused is not None:
            log.warning("user=%s conn=%s refused: %s", user, conn.hex(), refused.value)
            return [Send(conn, self._error(refused, REFUSALS[refused].format(user=user), env.msg_id))]
        reply = Send(conn, self._pack(Registered(user, self.directory.epoch, int(self.heartbeat_ivl * 1000))))
        if session is not None:  # a repeated REGISTER is answered, not re-announced
            return [reply]
        actions: list[Action] = [reply]
        if self.directory.shared:
            self._recheck.append((now + self.heartbeat_ivl, user))
        if not self.directory.claim(user, Location(self.broker_id, conn), msg.token):
            stale = self._stale_session_of(user, msg.token)
            if stale is None:
                previous = self.directory.take_over(user, Location(self.broker_id, conn), msg.token)
                if previous is not None:  # the session lived on another broker, now gone or replaced
                    log.info("user=%s conn=%s takes over from broker=%s", user, conn.hex(), previous.broker.hex())
                    self._sessions[conn] = _Session(user, msg.token, now, msg.key)
                    return [Kick(previous.broker, previous.conn, user), reply] + self._next_page(conn)
                log.info("user=%s conn=%s refused: ID online elsewhere", user, conn.hex())
                return [Send(conn, self._error(ErrorCode.ID_TAKEN, f"user ID {user!r} is already online", env.msg_id))]
            # The same installation reconnected before its old session expired: hand over quietly.
            log.info("user=%s conn=%s takes over from conn=%s", user, conn.hex(), stale.hex())
            del self._sessions[stale]
            self.credit.recipient_gone(user)
            self.directory.release(user, Location(self.broker_id, stale))
            self.directory.claim(user, Location(self.broker_id, conn))
            self._sessions[conn] = _Session(user, msg.token, now, msg.key)
            replaced = Send(stale, self._error(ErrorCode.SESSION_REPLACED, "a newer connection took over", None))
            return [replaced, reply] + self._next_page(conn)
        self._sessions[conn] = _Session(user, msg.token, now, msg.key)
        log.info("user=%s conn=%s registered", user, conn.hex())
        return actions + self._presence(user, True) + self._next_page(conn)

    def _on_unregister(self, conn: bytes, env: Envelope, frames: Frames, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        log.info("user=%s conn=%s unregistered", self._sessions[conn].user, conn.hex())
        return self._drop(conn)

    def _on_heartbeat(self, conn: bytes, env: Envelope, frames: Frames, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        return [Send(conn, self._pack(Heartbeat()))]

    def _on_snapshot_request(self, conn: bytes, env: Envelope, frames: Frames, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        snap = Snapshot(self.directory.epoch, self.directory.seq(), tuple(self.directory.online()))
        return [Send(conn, self._pack(snap))]

    def _on_key_request(self, conn: bytes, env: Envelope, frames: Frames, now: float) -> list[Action]:
        if conn not in self._sessions:
            return [self._not_registered(conn, env)]
        user = env.message.user  # type: ignore[attr-defined]
        key = self.keys.lookup(user)
        if key is None:
            return [Send(conn, self._error(ErrorCode.UNKNOWN_RECIPIENT, f"no key known for {user!r}", env.msg_id))]
        return [Send(conn, self._pack(KeyInfo(user, key)))]

    def _relay(self, conn: bytes, session: _Session | None, env: Envelope, frames: Frames,
               now: float) -> list[Action]:
        msg = env.message
        if session is None:
            return [self._not_registered(conn, env)]
        if msg.sender != session.user:  # type: ignore[attr-defined]
            return [Send(conn, self._error(ErrorCode.SPOOFED_SENDER,
                                           f"sender must be {session.user!r}", env.msg_id))]
        recipient = msg.recipient  # type: ignore[attr-defined]
        where = self.directory.locate(recipient)
        known = where is not None or self.directory.is_known(recipient) or self.keys.lookup(recipient) is not None
        if not known:
            return [Send(conn, self._error(ErrorCode.UNKNOWN_RECIPIENT, f"recipient {recipient!r} is unknown",
                                           env.msg_id))]
        if msg.DURABLE and self.store.durable:
            try:
                return self._store_and_forward(conn, env, frames, recipient, where)
            except StoreUnavailable:
                if where is None or where.broker != self.broker_id:
                    raise
                # The store is down but the recipient is here: relay it unstored, acknowledged "relayed".
        if where is None:
            return [Send(conn, self._error(ErrorCode.RECIPIENT_OFFLINE, f"recipient {recipient!r} is offline",
                                           env.msg_id))]
        if type(msg) is FileChunk:
            return self._relay_chunk(conn, env, frames, where, now)
        if where.broker == self.broker_id or type(msg) is not FileCredit:
            self._track_transfer(msg, now)  # a credit is tracked where its file's sender is connected
        ack = self._pack(Ack(env.msg_id, AckStatus.RELAYED)) if msg.ACKED else None
        if where.broker != self.broker_id:  # relayed = handed to the other broker's stream
            return [Forward(where.broker, recipient, frames)] + ([Send(conn, ack)] if ack is not None else [])
        return [Relay(where.conn, frames, conn, ack,
                      lambda: self._error(ErrorCode.RECIPIENT_BUSY, f"recipient {recipient!r} is not keeping up",
                                          env.msg_id))]

    def _relay_chunk(self, conn: bytes, env: Envelope, frames: Frames, where: Location, now: float) -> list[Action]:
        """A file chunk goes on only inside its recipient's credit window (broker/core/credit.py)."""
        msg: FileChunk = env.message  # type: ignore[assignment]
        size = len(frames[1]) if len(frames) > 1 else 0
        if not self.credit.admit(msg.sender, msg.recipient, msg.xfer, msg.index, size, now):
            drops = self._credit_drops[conn] = self._credit_drops.get(conn, 0) + 1
            if drops == 1 or drops % 1000 == 0:  # say so, without amplifying a flood
                log.warning("user=%s conn=%s xfer=%s %d chunks refused: outside the recipient's credit",
                            msg.sender, conn.hex(), msg.xfer.hex(), drops)
                return [Send(conn, self._error(ErrorCode.CREDIT_EXCEEDED, f"chunk {msg.index} is outside the credit "
                                               f"{msg.recipient!r} granted; wait for file_credit", env.msg_id))]
            return []
        if self._credit_drops:
            self._credit_drops.pop(conn, None)
        if where.broker != self.broker_id:
            return [Forward(where.broker, msg.recipient, frames)]

        def refused() -> Frames:  # the recipient's queue is full: the chunk is not in flight after all
            self.credit.unadmit(msg.sender, msg.recipient, msg.xfer, msg.index, size)
            return self._error(ErrorCode.RECIPIENT_BUSY, f"recipient {msg.recipient!r} is not keeping up", env.msg_id)

        return [Relay(where.conn, frames, conn, None, refused)]

    def _track_transfer(self, msg: Message, now: float) -> None:
        """Keep the credit ledger up to date with a relayed transfer control frame."""
        kind = type(msg)
        if kind is FileCredit:  # from the file's recipient to its sender
            self.credit.on_credit(msg.recipient, msg.sender, msg.xfer, msg.next, msg.upto, now)  # type: ignore
        elif kind is FileDone or kind is FileCancel:
            self.credit.forget(msg.recipient, msg.sender, msg.xfer)  # type: ignore[attr-defined]
            self.credit.forget(msg.sender, msg.recipient, msg.xfer)  # type: ignore[attr-defined]

    def _store_and_forward(self, conn: bytes, env: Envelope, frames: Frames, recipient: str,
                           where: Location | None) -> list[Action]:
        """Queue first; acknowledge and deliver once the shell reports the commit (``on_commit``)."""
        expires = self._wall_ms() + int(self.queue_limits.ttl_seconds * 1000)
        sender: str = env.message.sender  # type: ignore[attr-defined]
        refusal = self.store.append(env.msg_id, sender, recipient, bytes(frames[0]), expires)
        if refusal is Refusal.QUEUE_FULL or refusal is Refusal.SHARE_FULL:
            whose = f"{recipient!r} has" if refusal is Refusal.QUEUE_FULL else f"your share of {recipient!r}'s queue has"
            return [Send(conn, self._error(ErrorCode.QUEUE_FULL, f"{whose} too many undelivered messages; try later",
                                           env.msg_id))]
        self._appended.append(_Appended(conn, env.msg_id, env.message.ACKED, recipient, frames, refusal is None))
        if refusal is None and where is not None and where.broker != self.broker_id:
            return [Forward(where.broker, recipient, [bytes(frames[0])])]  # in the same pipeline as the append
        return []

    def on_commit(self, failure: ErrorCode | None = None) -> list[Action]:
        """The shell committed the batch (``failure`` None) or could not: answer and deliver its durable frames.

        Committed: ``ack stored`` and delivery to a recipient here. Not committed: a recipient online
        here still gets the frame (``ack relayed``); the rest get ``error`` with the failure's code
        (``storage_full``: disk full; ``storage_unavailable``: Redis down): not stored, send again later.
        """
        ok = failure is None
        if not self._appended:
            return []
        appended, self._appended = self._appended, []
        actions: list[Action] = []
        for item in appended:
            where = self.directory.locate(item.recipient)
            session = self._sessions.get(where.conn) if where is not None and where.broker == self.broker_id else None
            if ok and item.queued:
                if session is not None and not session.draining:  # else it comes with a later page
                    actions.append(Send(where.conn, item.frames, item.recipient))  # type: ignore[union-attr]
                if item.acked:
                    actions.append(Send(item.sender, self._pack(Ack(item.msg_id, AckStatus.STORED))))
            elif session is not None:
                ack = self._pack(Ack(item.msg_id, AckStatus.RELAYED)) if item.acked else None
                actions.append(Relay(where.conn, item.frames, item.sender, ack,  # type: ignore[union-attr]
                                     lambda r=item.recipient, m=item.msg_id: self._error(
                                         ErrorCode.RECIPIENT_BUSY, f"recipient {r!r} is not keeping up", m)))
            else:
                actions.append(Send(item.sender, self._error(
                    failure, "the broker cannot store messages now; try again later", item.msg_id)))
        return actions

    def _on_consume(self, conn: bytes, env: Envelope, frames: Frames, now: float) -> list[Action]:
        session = self._sessions.get(conn)
        if session is None:
            return [self._not_registered(conn, env)]
        self.store.consume(session.user, env.message.ref)  # type: ignore[attr-defined]
        if session.unconsumed:
            session.unconsumed -= 1
            if session.draining and session.unconsumed <= self.queue_limits.page // 2:
                return self._next_page(conn)
        return []

    # --- helpers ------------------------------------------------------------
    def _stale_session_of(self, user: str, token: bytes) -> bytes | None:
        """The connection holding ``user`` on this broker, if it was registered with ``token``."""
        where = self.directory.locate(user)
        if where is None or where.broker != self.broker_id:
            return None
        session = self._sessions.get(where.conn)
        return where.conn if session is not None and session.token == token else None

    def _next_page(self, conn: bytes) -> list[Action]:
        """The next page of ``conn``'s queue, in order: never the whole queue at once."""
        session = self._sessions[conn]
        limit = self.queue_limits.page
        page = self.store.pending(session.user, self._wall_ms(), session.cursor, limit)
        session.draining = len(page) == limit
        if session.draining:  # one more page a heartbeat even if the recipient consumes nothing
            self._stalled.add(session.user)
        if not page:
            return []
        session.cursor = page[-1][0]
        session.unconsumed += len(page)
        log.debug("user=%s delivering %d queued frames", session.user, len(page))
        return [Send(conn, [header], session.user) for _, header in page]

    def on_forwarded(self, user: str, frames: Frames) -> list[Action]:
        """Frames another broker routed to ``user`` here: deliver if they are still connected here."""
        where = self.directory.locate(user)
        if where is None or where.broker != self.broker_id or where.conn not in self._sessions:
            return []  # moved on: durable frames wait in the shared store, transfers resume
        try:
            msg = decode(frames).message
        except ProtocolError:
            return []
        if msg.DURABLE and self.store.durable and self._sessions[where.conn].draining:
            return []  # it is in the shared queue, behind older frames: a later page brings it, in order
        self._track_transfer(msg, self._now)
        return [Send(where.conn, frames, user)]

    def on_kicked(self, conn: bytes, user: str) -> list[Action]:
        """Another broker took ``user``'s session over (same token): end ours without a presence change."""
        session = self._sessions.get(conn)
        if session is None or session.user != user:
            return []
        del self._sessions[conn]
        self._limiters.pop(conn, None)
        self._credit_drops.pop(conn, None)
        self.credit.recipient_gone(user)
        self.directory.release(user, Location(self.broker_id, conn))  # no-op in Redis: it moved already
        log.info("user=%s conn=%s session taken over by another broker", user, conn.hex())
        return [Send(conn, self._error(ErrorCode.SESSION_REPLACED, "a newer connection took over", None))]

    def sessions(self) -> list[tuple[str, bytes, bytes]]:
        """(user, conn, token) of every session here: a cluster broker re-asserts them after an outage."""
        return [(s.user, conn, s.token) for conn, s in self._sessions.items()]

    def on_delivery_failed(self, user: str) -> None:
        """The shell could not hand a queued frame to ``user`` (high-water mark): page it again soon."""
        where = self.directory.locate(user)
        session = self._sessions.get(where.conn) if where is not None and where.broker == self.broker_id else None
        if session is not None:
            session.cursor, session.draining, session.unconsumed = 0, True, 0
        self._stalled.add(user)

    def _limiter(self, conn: bytes, now: float) -> ConnectionLimiter:
        limiter = self._limiters.get(conn)
        if limiter is None:
            limiter = self._limiters[conn] = ConnectionLimiter(self.limits, now)
            if len(self._limiters) > MAX_LIMITERS:  # bounded: forget the oldest connection's bucket
                self._limiters.popitem(last=False)
        return limiter

    def _drop(self, conn: bytes) -> list[Action]:
        self._limiters.pop(conn, None)
        self._credit_drops.pop(conn, None)
        session = self._sessions.pop(conn)
        self.credit.recipient_gone(session.user)
        if self.directory.release(session.user, Location(self.broker_id, conn)):
            return self._presence(session.user, False)
        return []

    def _presence(self, user: str, online: bool) -> list[Action]:
        if self.directory.shared:  # the cluster directory sequences it and every broker republishes it
            return []
        update = PeerUpdate(self.directory.epoch, self.directory.next_seq(), user, online)
        return [Publish(self._pack(update))]

    def _not_registered(self, conn: bytes, env: Envelope) -> Send:
        return Send(conn, self._error(ErrorCode.NOT_REGISTERED, "register first", env.msg_id))

    def _error(self, code: ErrorCode, message: str, ref: bytes | None) -> list[bytes]:
        return self._pack(Error(code, message[:1024], ref))

    def _pack(self, message: Message) -> list[bytes]:
        return pack(message, self._wall_ms(), self._new_id())
