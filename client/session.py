"""The client's session core: register, heartbeat, send, receive, presence.

Sans-I/O: frames and ``now`` (monotonic seconds) in, ``Transmit``/``Emit``
actions out. The agent thread owns the sockets and carries the actions out.

States: CONNECTING (REGISTER sent, re-sent every heartbeat until answered),
READY, and CLOSED. A silent broker or a NOT_REGISTERED answer (the broker
restarted) sends a READY session back to CONNECTING; messages not yet
acknowledged are sent again once registered, and receivers drop duplicates by
message id.
"""

from __future__ import annotations

import enum
import os
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from client import events as ev
from client.actions import Action, Emit, Transmit
from client.presence import PresenceTracker
from client.transfer import TransferManager
from client.e2e import EndToEnd, PeerKeyChanged
from common.crypto import KEY_BYTES, TAG_BYTES
from common.errors import BrokenError, ErrorCode, P2PChatError, ProtocolError, RemoteError
from common.protocol import (
    Ack,
    ChatMessage,
    Error,
    Heartbeat,
    KeyInfo,
    KeyRequest,
    PeerSync,
    PeerUpdate,
    Register,
    Registered,
    Snapshot,
    SnapshotRequest,
    Unregister,
    check_user_id,
    decode,
    new_msg_id,
    pack,
    MAX_BODY_BYTES,
)

log = logging.getLogger(__name__)

DEDUP_WINDOW = 10_000
MAX_TEXT_BYTES = MAX_BODY_BYTES - 1 - KEY_BYTES - TAG_BYTES  # room for the sealing overhead
# REGISTER is retried quickly at first: with IMMEDIATE set, a send before the
# TCP connection completes is dropped, and users should not wait a heartbeat.
REGISTER_RETRY_FIRST = 0.02


class State(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


def validate_text(recipient: str, text: str) -> bytes:
    """The UTF-8 body of a message, or ProtocolError for a bad recipient or an oversized text."""
    check_user_id(recipient)
    body = text.encode("utf-8")
    if len(body) > MAX_TEXT_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_TEXT_BYTES}", ErrorCode.TOO_LARGE)
    return body


@dataclass(slots=True)
class _Pending:
    recipient: str
    text: bytes
    deadline: float
    frames: list[bytes] | None = None  # sealed and packed once the recipient's key is known


class ClientSession:
    def __init__(
        self,
        user: str,
        *,
        wall_ms: Callable[[], int],
        heartbeat_ivl: float = 1.0,
        liveness: int = 3,
        send_timeout: float = 10.0,
        e2e: EndToEnd,
        transfers: TransferManager | None = None,
        token: bytes | None = None,
    ) -> None:
        self.user = check_user_id(user)
        self.e2e = e2e
        self._token = token or os.urandom(32)
        self._key_requests: dict[bytes, str] = {}  # KEY_REQ msg id -> user asked about
        self.state = State.CONNECTING
        self.presence = PresenceTracker()
        self.transfers = transfers
        self._wall_ms = wall_ms
        self._hb_ivl = heartbeat_ivl
        self._expiry = heartbeat_ivl * liveness
        self._send_timeout = send_timeout
        self._registered_once = False
        self._register_retry = REGISTER_RETRY_FIRST
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._snapshot_due: float | None = None
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._published: frozenset[str] = frozenset()

    # --- commands -----------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        self._last_heard = now
        return [self._transmit(self._register_frames(), now)]

    def send_text(self, recipient: str, body: bytes, now: float, msg_id: bytes | None = None
                  ) -> list[Action]:
        """Queue ``body`` (from ``validate_text``) for ``recipient``; sealed once their key is known."""
        self._pending[msg_id or new_msg_id()] = _Pending(recipient, body, now + self._send_timeout)
        return self._flush(now)

    def send_file(self, recipient: str, path, now: float) -> tuple[bytes, list[Action]]:
        assert self.transfers is not None
        xfer, actions = self.transfers.send_file(check_user_id(recipient), path, now)
        return xfer, actions + self._flush(now)

    def accept_peer_key(self, user: str) -> bool:
        """The user verified ``user``'s new key: use it from now on."""
        return self.e2e.accept(user)

    def close(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.state is State.READY:
            actions.append(self._transmit(pack(Unregister(), self._wall_ms()), now))
        self.state = State.CLOSED
        for msg_id in list(self._pending):
            del self._pending[msg_id]
            actions.append(Emit(ev.SendFailed(msg_id, BrokenError("client closed before the broker acknowledged",
                                                                   ErrorCode.CLOSED))))
        return actions

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
        self._last_heard = now
        msg = env.message
        if type(msg) is ChatMessage:
            return self._on_chat(env.msg_id, msg, env.ts)
        if msg.RELAYED:  # file transfer frames
            if self.transfers is None or msg.recipient != self.user:  # type: ignore[attr-defined]
                return []
            return self.transfers.on_message(env, now) + self._ask_keys(self.transfers.take_key_wants(), now)
        if type(msg) is Ack:
            if self._pending.pop(msg.ref, None) is None:
                return []
            return [Emit(ev.Acked(msg.ref, msg.status.value))]
        if type(msg) is Error:
            return self._on_error(msg, now)
        if type(msg) is KeyInfo:
            return self._on_key_info(msg, now)
        if type(msg) is Registered:
            if msg.heartbeat_ms:  # the broker's expiry rules: heartbeat at least as often as it asks
                self._hb_ivl = min(self._hb_ivl, msg.heartbeat_ms / 1000)
            return self._on_registered(now)
        if type(msg) is Snapshot:
            self._snapshot_due = None
            if not self.presence.on_snapshot(msg):
                return self._request_snapshot(now)
            return self._peers_changed(now)
        return []  # HEARTBEAT replies need nothing beyond _last_heard

    def on_publish(self, frames: list[bytes], now: float) -> list[Action]:
        """A message from the broker's PUB on the SUB."""
        if self.state is not State.READY:
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
        for msg_id, pending in list(self._pending.items()):
            if pending.deadline > now:
                break  # insertion order is deadline order
            del self._pending[msg_id]
            actions.append(Emit(ev.SendFailed(msg_id, BrokenError("no acknowledgement from the broker",
                                                                   ErrorCode.TIMEOUT))))
        if self.state is State.READY and now - self._last_heard > self._expiry:
            actions += self._lost("broker silent for %.1fs" % (now - self._last_heard), now)
        elif self.state is State.CONNECTING and now - self._last_sent >= self._register_retry:
            self._register_retry = min(self._register_retry * 2, self._hb_ivl)
            actions.append(self._transmit(self._register_frames(), now))
        elif self.state is State.READY and now - self._last_sent >= self._hb_ivl:
            actions.append(self._transmit(pack(Heartbeat(), self._wall_ms()), now))
        if self._snapshot_due is not None and now >= self._snapshot_due:
            actions += self._request_snapshot(now, force=True)
        if self.transfers is not None and self.state is State.READY:
            actions += self.transfers.on_tick(now)
            actions += self._ask_keys(self.transfers.take_key_wants(), now)
        return actions

    def next_deadline(self) -> float:
        retry = self._register_retry if self.state is State.CONNECTING else self._hb_ivl
        deadline = self._last_sent + retry
        if self.state is State.READY:
            deadline = min(deadline, self._last_heard + self._expiry)
        if self._pending:
            deadline = min(deadline, next(iter(self._pending.values())).deadline)
        if self._snapshot_due is not None:
            deadline = min(deadline, self._snapshot_due)
        if self.transfers is not None and self.state is State.READY:
            deadline = min(deadline, self.transfers.next_deadline())
        return deadline

    # --- handlers -----------------------------------------------------------
    def _on_chat(self, msg_id: bytes, msg: ChatMessage, ts: int) -> list[Action]:
        if msg.recipient != self.user or msg_id in self._seen:
            return []
        try:
            plaintext = self.e2e.open(msg.sender, msg_id, ts, msg.body)
        except PeerKeyChanged as exc:
            log.warning("user=%s peer=%s message refused: %s", self.user, msg.sender, exc.message)
            return [Emit(ev.PeerKeyChanged(exc.user, exc.old, exc.new, exc))]
        except ProtocolError as exc:  # tampered, replayed under a new id, or not encrypted
            log.warning("user=%s peer=%s message refused: %s", self.user, msg.sender, exc.message)
            return [Emit(ev.ErrorReported(exc))]
        self._seen[msg_id] = None  # only once authentic: a forged copy must not hide the real one
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        text = plaintext.decode("utf-8", errors="replace")
        return [Emit(ev.MessageReceived(msg_id, msg.sender, text, ts))]

    def _on_key_info(self, msg: KeyInfo, now: float) -> list[Action]:
        try:
            self.e2e.learn(msg.user, msg.key)
        except PeerKeyChanged as exc:
            return [Emit(ev.PeerKeyChanged(exc.user, exc.old, exc.new, exc))] + self._fail_sends_to(msg.user, exc)
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
        for pending in self._pending.values():  # at-least-once: receivers dedup by id
            if pending.frames is not None:
                actions.append(self._transmit(pending.frames, now))
        self.presence.reset()
        actions += self._request_snapshot(now, force=True)
        if self.transfers is not None:
            actions += self.transfers.on_reconnected(now) if reconnect else self.transfers.resume_all(now)
        return actions + self._flush(now)

    def _on_error(self, msg: Error, now: float) -> list[Action]:
        error = RemoteError(msg.message, msg.code)
        if msg.code is ErrorCode.NOT_REGISTERED:  # the broker restarted and forgot us
            return self._lost("broker no longer knows this session", now) if self.state is State.READY else []
        if msg.code is ErrorCode.SESSION_REPLACED:  # our restarted self took over; this one must stop
            self.state = State.CLOSED
            return [Emit(ev.ErrorReported(error))]
        if self.state is State.CONNECTING and msg.code in (ErrorCode.ID_TAKEN, ErrorCode.ALREADY_REGISTERED):
            if not self._registered_once:
                self.state = State.CLOSED
                return [Emit(ev.RegisterFailed(error))]
            return []  # our own stale session: it expires soon, keep re-registering
        if msg.ref is not None and self._pending.pop(msg.ref, None) is not None:
            return [Emit(ev.SendFailed(msg.ref, error))]
        if msg.ref in self._key_requests:
            return self._fail_sends_to(self._key_requests.pop(msg.ref), error)
        if msg.ref is not None and self.transfers is not None:
            handled = self.transfers.on_error(msg.ref, error, now)
            if handled is not None:
                return handled
        return [Emit(ev.ErrorReported(error))]

    # --- helpers ------------------------------------------------------------
    def _lost(self, reason: str, now: float) -> list[Action]:
        log.warning("user=%s connection lost: %s; re-registering", self.user, reason)
        self.state = State.CONNECTING
        self._last_heard = now
        self.presence.reset()
        self._snapshot_due = None
        return [Emit(ev.Reconnecting(reason)), self._transmit(self._register_frames(), now)]

    def _register_frames(self) -> list[bytes]:
        return pack(Register(self.user, self._token, self.e2e.identity.public), self._wall_ms())

    def _flush(self, now: float) -> list[Action]:
        """Seal what waited for a key, ask for keys still missing, transmit if registered."""
        actions: list[Action] = []
        wanted: set[str] = set()
        for msg_id, pending in list(self._pending.items()):
            if pending.frames is not None:
                continue
            try:
                key = self.e2e.key_of(pending.recipient) if self.e2e.enabled else b""
            except PeerKeyChanged as exc:
                del self._pending[msg_id]
                actions.append(Emit(ev.SendFailed(msg_id, exc)))
                continue
            if key is None:
                wanted.add(pending.recipient)
                continue
            ts = self._wall_ms()
            body = self.e2e.seal(pending.recipient, msg_id, ts, pending.text)
            pending.frames = pack(ChatMessage(self.user, pending.recipient, body), ts, msg_id)
            if self.state is State.READY:
                actions.append(self._transmit(pending.frames, now))
        if self.transfers is not None:
            wanted |= self.transfers.take_key_wants()
        return actions + self._ask_keys(wanted, now)

    def _ask_keys(self, users: set[str], now: float) -> list[Action]:
        if self.state is not State.READY:
            return []  # asked again after registering
        asked = set(self._key_requests.values())
        actions: list[Action] = []
        for user in sorted(users - asked):
            msg_id = new_msg_id()
            self._key_requests[msg_id] = user
            actions.append(self._transmit(pack(KeyRequest(user), self._wall_ms(), msg_id), now))
        return actions

    def _fail_sends_to(self, user: str, error: P2PChatError) -> list[Action]:
        actions: list[Action] = []
        for msg_id, pending in list(self._pending.items()):
            if pending.recipient == user and pending.frames is None:
                del self._pending[msg_id]
                actions.append(Emit(ev.SendFailed(msg_id, error)))
        if self.transfers is not None:
            actions += self.transfers.fail_peer(user, error)
        return actions

    def _request_snapshot(self, now: float, force: bool = False) -> list[Action]:
        if self._snapshot_due is not None and not force:
            return []  # one in flight; re-asked at the deadline if lost
        self._snapshot_due = now + self._expiry
        return [self._transmit(pack(SnapshotRequest(), self._wall_ms()), now)]

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

    def _transmit(self, frames: list[bytes], now: float) -> Transmit:
        self._last_sent = now
        return Transmit(frames)
