"""BrokerCore without sockets: frames and a fake clock in, Send/Relay/Publish actions out.

The second half wires real ClientSession cores to a BrokerCore in memory (h11's
ConnectionPair idea), so whole conversations and the Clone presence protocol run
without a socket, in microseconds.

(Over 500 lines: the broker core's behaviours, one test each, sharing the in-memory ports at the top.)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink, NoStore
from p2pchat.broker.core.actions import Publish, Relay, Send
from p2pchat.broker.core.ports import DEVICE_CAPS, Location
from p2pchat.broker.core.ratelimit import RateLimits
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.e2e import EndToEnd, MemoryKeys
from p2pchat.client.core.session import ClientSession, State, validate_text
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ErrorCode, RemoteError
from p2pchat.common.protocol import CAPS_DEVICES, MAX_HEADER_BYTES, Ack, AckStatus, ChatMessage, Devices, DevicesRequest, Error, FileChunk, FileCredit, Heartbeat, KeyChangeHow, KeyChanged, KeyInfo, KeyRequest, Message, PeerSync, PeerUpdate, Register, Registered, Snapshot, SnapshotRequest, Unregister, decode, new_msg_id, pack
from tests.common.test_protocol import example_message
from tests.cores import KeyBook, id_source

EPOCH = b"epoch-01"
BROKER = b"broker-1"
IVL, LIVENESS = 1.0, 3
EXPIRY = IVL * LIVENESS
A, B, C = b"conn-a", b"conn-b", b"conn-c"
MSG_ID = b"m" * 16


class CurveCore(BrokerCore):
    """The core as the CURVE shell drives it: every frame carries the key its connection authenticated with."""

    def __init__(self, *args, **options) -> None:
        super().__init__(*args, **options)
        self.curve_keys: dict[bytes, bytes] = {}  # conn -> its CURVE key, learned from ``register``

    def on_frames(self, conn, frames, now, peer_key=None):
        return super().on_frames(conn, frames, now, peer_key or (lambda: self.curve_keys.get(conn)))


def make_core(**options) -> BrokerCore:
    return CurveCore(LocalDirectory(EPOCH), **{**dict(
        broker_id=BROKER, heartbeat_ivl=IVL, liveness=LIVENESS, wall_ms=lambda: 0, new_id=id_source(), keys=KeyBook(),
        store=NoStore(), link=LocalLink()), **options})


@pytest.fixture
def core() -> BrokerCore:
    return make_core()


def key_of(user: str) -> bytes:
    return hashlib.sha256(user.encode()).digest()  # stands in for the user's X25519 public key


def message(frames) -> Message:
    return decode(frames).message


def replies(actions, conn: bytes) -> list[Message]:
    """Messages the broker sends straight back to ``conn``."""
    return [message(a.frames) for a in actions if type(a) is Send and a.conn == conn]


def published(actions) -> list[Message]:
    return [message(a.frames) for a in actions if type(a) is Publish]


def only_error(actions, conn: bytes) -> Error:
    assert len(actions) == 1, actions
    [reply] = replies(actions, conn)
    assert type(reply) is Error, reply
    return reply


def register(core: BrokerCore, conn: bytes, user: str, now: float = 0.0, msg_id: bytes | None = None,
             token: bytes | None = None, key: bytes | None = None, curve_key: bytes | None = None,
             recovery: bytes | None = None, caps: int | None = None, name: str | None = None):
    """REGISTER ``user`` from ``conn``; by default with the user's key, which CURVE proved for ``conn``, and
    without a recovery key or caps (as a client older than recovery phrases and devices)."""
    token = token if token is not None else b"token-of-" + conn  # one installation per connection
    key = key if key is not None else key_of(user)
    curve_key = curve_key if curve_key is not None else core.curve_keys.get(conn, key)  # fixed per connection
    frames = pack(example_message(Register, user=user, token=token, key=key, recovery=recovery, caps=caps, name=name),
                  0, msg_id)
    core.curve_keys.setdefault(conn, curve_key)
    return core.on_frames(conn, frames, now, lambda: curve_key)


def test_a_register_with_caps_is_answered_with_the_caps_granted_its_device_and_the_list_version(core):
    assert replies(register(core, A, "alice", caps=CAPS_DEVICES | 8, name="laptop"), A) == [
        Registered("alice", EPOCH, int(IVL * 1000), CAPS_DEVICES, 1, 1)]
    assert replies(core.on_frames(A, pack(DevicesRequest("alice"), 0), 0.1), A) == [
        Devices("alice", 1, ((1, key_of("alice"), "laptop", DEVICE_CAPS),))]


def test_a_frame_with_another_key_on_a_sessions_routing_id_is_refused(core):
    register(core, A, "alice")
    error = only_error(core.on_frames(A, pack(Heartbeat(), 0), 0.1, lambda: key_of("mallory")), A)
    assert error.code is ErrorCode.KEY_MISMATCH
    assert replies(core.on_frames(A, pack(Heartbeat(), 0), 0.2), A) == [Heartbeat()]  # alice's own key still works


def chat(core: BrokerCore, conn: bytes, sender: str, recipient: str, now: float = 0.0, msg_id: bytes = MSG_ID):
    return core.on_frames(conn, pack(ChatMessage(sender, recipient, b"hi"), 0, msg_id), now)


# --- registration ------------------------------------------------------------------
def test_register_is_answered_and_announced_online(core):
    actions = register(core, A, "alice")
    assert [type(a) for a in actions] == [Send, Publish]
    assert replies(actions, A) == [Registered("alice", EPOCH, int(IVL * 1000))]
    assert published(actions) == [PeerUpdate(EPOCH, 1, "alice", True)]
    assert core.user_of(A) == "alice" and core.session_count == 1


def test_duplicate_id_is_refused_on_another_connection(core):
    register(core, A, "alice")
    error = only_error(register(core, B, "alice", msg_id=MSG_ID), B)
    assert (error.code, error.ref) == (ErrorCode.ID_TAKEN, MSG_ID)
    assert core.user_of(B) is None
    assert core.directory.locate("alice") == (Location(BROKER, A),)
    assert core.directory.seq() == 1  # nothing announced


def test_a_client_that_sends_a_recovery_key_hears_id_online_when_the_id_is_online_elsewhere(core):
    register(core, A, "alice")
    error = only_error(register(core, B, "alice", msg_id=MSG_ID, recovery=b"r" * 32), B)
    assert (error.code, error.ref) == (ErrorCode.ID_ONLINE, MSG_ID)


def test_a_client_that_sends_a_recovery_key_still_hears_id_taken_for_an_id_bound_to_another_key(core):
    register(core, A, "alice")
    error = only_error(register(core, B, "alice", key=key_of("mallory"), recovery=b"r" * 32), B)
    assert error.code is ErrorCode.ID_TAKEN


def test_the_recovery_key_of_a_register_is_kept_with_the_binding(core):
    register(core, A, "alice", recovery=b"r" * 32)
    assert core.keys.recovery == {"alice": b"r" * 32}


def test_same_installation_on_a_new_connection_takes_over_its_stale_session(core):
    register(core, A, "alice", token=b"alice-install")
    actions = register(core, B, "alice", now=1.0, token=b"alice-install")
    [replaced] = replies(actions, A)
    assert (replaced.code, replaced.ref) == (ErrorCode.SESSION_REPLACED, None)
    assert replies(actions, B) == [Registered("alice", EPOCH, int(IVL * 1000))]
    assert published(actions) == []  # alice never went offline
    assert (core.user_of(A), core.user_of(B)) == (None, "alice")
    assert core.directory.locate("alice") == (Location(BROKER, B),)
    assert core.session_count == 1


def test_repeated_register_on_the_same_connection_is_answered_not_reannounced(core):
    register(core, A, "alice")
    actions = register(core, A, "alice")
    assert replies(actions, A) == [Registered("alice", EPOCH, int(IVL * 1000))]
    assert published(actions) == []
    assert core.directory.seq() == 1 and core.session_count == 1


def test_registered_connection_cannot_switch_user(core):
    register(core, A, "alice")
    error = only_error(register(core, A, "bob"), A)
    assert error.code is ErrorCode.ALREADY_REGISTERED
    assert core.directory.online() == ["alice"]


def test_register_with_a_key_that_is_not_the_connections_curve_key_is_refused(core):
    error = only_error(register(core, A, "alice", key=key_of("alice"), curve_key=key_of("mallory"),
                                msg_id=MSG_ID), A)
    assert (error.code, error.ref) == (ErrorCode.KEY_MISMATCH, MSG_ID)
    assert core.user_of(A) is None and core.directory.online() == []


def test_user_id_stays_bound_to_its_first_key(core):
    register(core, A, "alice")
    core.on_frames(A, pack(Unregister(), 0), 0.0)
    error = only_error(register(core, B, "alice", key=key_of("mallory"), msg_id=MSG_ID), B)
    assert (error.code, error.ref) == (ErrorCode.ID_TAKEN, MSG_ID)
    assert replies(register(core, C, "alice"), C)[0] == Registered("alice", EPOCH, int(IVL * 1000))


def test_without_curve_the_key_is_not_checked_against_the_connection():
    core = make_core(require_key=False)
    actions = register(core, A, "alice", key=key_of("alice"), curve_key=key_of("mallory"))
    assert replies(actions, A) == [Registered("alice", EPOCH, int(IVL * 1000))]


def test_flood_is_refused_with_one_rate_limited_error_then_silence():
    core = make_core(limits=RateLimits(frames_per_s=10.0, frame_burst=5.0))
    register(core, A, "alice")  # the first of alice's 5-frame burst
    heartbeat = pack(Heartbeat(), 0)
    assert [replies(core.on_frames(A, heartbeat, 0.0), A) for _ in range(4)] == [[Heartbeat()]] * 4
    error = only_error(core.on_frames(A, heartbeat, 0.0), A)
    assert error.code is ErrorCode.RATE_LIMITED
    assert core.on_frames(A, heartbeat, 0.0) == []  # no reply per dropped frame: no amplification
    assert replies(register(core, B, "bob"), B)  # other connections have their own bucket
    assert replies(core.on_frames(A, heartbeat, 1.0), A) == [Heartbeat()]  # refilled


def test_a_connection_that_keeps_flooding_is_told_once_per_period():
    """The rate_limited error is an incident: the first refused frame of a period is answered, the rest of
    the period only counted, however often the bucket refills in between."""
    core = make_core(limits=RateLimits(frames_per_s=1.0, frame_burst=1.0), liveness=100)
    register(core, A, "alice")  # the one token
    heartbeat = pack(Heartbeat(), 0)
    assert only_error(core.on_frames(A, heartbeat, 0.0), A).code is ErrorCode.RATE_LIMITED
    for t in (2.0, 4.0, 6.0):
        assert replies(core.on_frames(A, heartbeat, t), A) == [Heartbeat()]  # refilled
        assert core.on_frames(A, heartbeat, t) == []  # refused again, within the period: not answered
    core.on_tick(10.0)  # the period ends
    assert replies(core.on_frames(A, heartbeat, 10.0), A) == [Heartbeat()]
    assert only_error(core.on_frames(A, heartbeat, 10.0), A).code is ErrorCode.RATE_LIMITED


def test_chunks_outside_the_credit_are_refused_with_one_error_per_run():
    core = make_core(liveness=100)
    register(core, A, "alice")
    register(core, B, "bob")
    xfer = b"x" * 16

    def chunk(index: int, now: float):
        return core.on_frames(A, pack(FileChunk("alice", "bob", xfer, index, False), 0, MSG_ID, b"data"), now)

    error = only_error(chunk(0, 0.0), A)  # bob granted nothing
    assert (error.code, error.ref) == (ErrorCode.CREDIT_EXCEEDED, MSG_ID)
    assert [chunk(i, 1.0) for i in range(1, 50)] == [[]] * 49  # no reply per refused chunk
    core.on_frames(B, pack(FileCredit("bob", "alice", xfer, 0, 4, True), 0), 10.0)
    [relay] = chunk(0, 10.0)
    assert type(relay) is Relay and relay.conn == B  # inside the credit: relayed, and the run of refusals ends
    assert only_error(chunk(9, 10.0), A).code is ErrorCode.CREDIT_EXCEEDED  # a new run is said again
    assert chunk(10, 10.0) == []


def test_unregister_announces_offline_and_frees_the_id(core):
    register(core, A, "alice")
    actions = core.on_frames(A, pack(Unregister(), 0), 1.0)
    assert replies(actions, A) == []  # no reply (PROTOCOL.md §4)
    assert published(actions) == [PeerUpdate(EPOCH, 2, "alice", False)]
    assert core.user_of(A) is None
    assert replies(register(core, B, "alice"), B)[0] == Registered("alice", EPOCH, int(IVL * 1000))


@pytest.mark.parametrize("request_msg", [
    Heartbeat(), SnapshotRequest(), Unregister(), ChatMessage("alice", "bob", b"hi"),
    example_message(FileCredit), KeyRequest("bob"),
], ids=lambda m: m.TYPE.value)
def test_requests_before_register_get_not_registered(core, request_msg):
    register(core, B, "bob")
    error = only_error(core.on_frames(A, pack(request_msg, 0, MSG_ID), 0.0), A)
    assert (error.code, error.ref) == (ErrorCode.NOT_REGISTERED, MSG_ID)


@pytest.mark.parametrize("reply_type", [
    Ack(MSG_ID, AckStatus.RELAYED), Registered("alice", EPOCH, 1), Snapshot(EPOCH, 0, ()),
    PeerUpdate(EPOCH, 1, "alice", True), PeerSync(EPOCH, 0), Error(ErrorCode.TIMEOUT, "x"),
], ids=lambda m: m.TYPE.value)
def test_broker_to_client_types_sent_to_the_broker_are_bad_frames(core, reply_type):
    register(core, A, "alice")
    error = only_error(core.on_frames(A, pack(reply_type, 0, MSG_ID), 0.0), A)
    assert (error.code, error.ref) == (ErrorCode.BAD_FRAME, MSG_ID)


def test_key_request_returns_the_key_the_user_registered_with(core):
    register(core, A, "alice")
    register(core, B, "bob")
    core.on_frames(B, pack(Unregister(), 0), 0.0)
    assert replies(core.on_frames(A, pack(KeyRequest("bob"), 0), 0.0), A) == [KeyInfo("bob", key_of("bob"))]
    error = only_error(core.on_frames(A, pack(KeyRequest("nobody"), 0, MSG_ID), 0.0), A)
    assert (error.code, error.ref) == (ErrorCode.UNKNOWN_RECIPIENT, MSG_ID)


# --- relaying ------------------------------------------------------------------------
def test_message_is_relayed_with_the_original_frames_and_acked(core):
    register(core, A, "alice")
    register(core, B, "bob")
    frames = pack(ChatMessage("alice", "bob", b"hello"), 0, MSG_ID)
    [relay] = core.on_frames(A, frames, 1.0)
    assert type(relay) is Relay
    assert (relay.conn, relay.sender) == (B, A)
    assert len(relay.frames) == len(frames) and all(x is y for x, y in zip(relay.frames, frames))
    assert message(relay.on_success) == Ack(MSG_ID, AckStatus.RELAYED)
    busy = message(relay.on_failure())
    assert (busy.code, busy.ref) == (ErrorCode.RECIPIENT_BUSY, MSG_ID)


def test_relayed_types_without_acks_get_no_ack(core):
    register(core, A, "alice")
    register(core, B, "bob")
    frames = pack(example_message(FileCredit, sender="alice", recipient="bob"), 0, MSG_ID)
    [relay] = core.on_frames(A, frames, 1.0)
    assert type(relay) is Relay and relay.conn == B and relay.on_success is None
    assert message(relay.on_failure()).code is ErrorCode.RECIPIENT_BUSY


def test_spoofed_sender_is_refused(core):
    register(core, A, "alice")
    register(core, B, "bob")
    error = only_error(chat(core, A, "bob", "bob"), A)
    assert (error.code, error.ref) == (ErrorCode.SPOOFED_SENDER, MSG_ID)


def test_unknown_recipient_is_refused(core):
    register(core, A, "alice")
    error = only_error(chat(core, A, "alice", "nobody"), A)
    assert (error.code, error.ref) == (ErrorCode.UNKNOWN_RECIPIENT, MSG_ID)


def test_offline_recipient_is_reported_as_offline(core):
    register(core, A, "alice")
    register(core, B, "bob")
    core.on_frames(B, pack(Unregister(), 0), 0.0)
    error = only_error(chat(core, A, "alice", "bob"), A)
    assert (error.code, error.ref) == (ErrorCode.RECIPIENT_OFFLINE, MSG_ID)


# --- heartbeats and expiry -------------------------------------------------------------
def test_heartbeat_is_answered_with_a_heartbeat(core):
    register(core, A, "alice")
    assert replies(core.on_frames(A, pack(Heartbeat(), 0), 0.5), A) == [Heartbeat()]


def test_silent_session_expires_after_liveness_intervals(core):
    register(core, A, "alice", now=0.0)
    register(core, B, "bob", now=0.0)
    core.on_tick(0.0)
    core.on_frames(B, pack(Heartbeat(), 0), 2.0)
    assert not [m for m in published(core.on_tick(EXPIRY)) if type(m) is PeerUpdate]
    assert core.user_of(A) == "alice"  # silent for exactly the expiry: still alive
    expired = [m for m in published(core.on_tick(EXPIRY + 0.01)) if type(m) is PeerUpdate]
    assert expired == [PeerUpdate(EPOCH, 3, "alice", False)]  # seq + 1 after the two joins
    assert core.user_of(A) is None and core.user_of(B) == "bob"
    expired = [m for m in published(core.on_tick(2.0 + EXPIRY + 0.01)) if type(m) is PeerUpdate]
    assert expired == [PeerUpdate(EPOCH, 4, "bob", False)]
    assert core.session_count == 0 and core.directory.online() == []


def test_expired_session_must_register_again(core):
    register(core, A, "alice", now=0.0)
    core.on_tick(EXPIRY + 1)
    assert only_error(core.on_frames(A, pack(Heartbeat(), 0, MSG_ID), EXPIRY + 1), A).code is ErrorCode.NOT_REGISTERED
    assert replies(register(core, B, "alice", now=EXPIRY + 1), B)[0].user == "alice"  # the ID is free again


@pytest.mark.parametrize("traffic", [
    lambda core, now: chat(core, A, "alice", "bob", now),
    lambda core, now: chat(core, A, "alice", "nobody", now),  # refused, but still traffic
    lambda core, now: core.on_frames(A, pack(SnapshotRequest(), 0), now),
    lambda core, now: register(core, A, "alice", now),
], ids=["relay", "refused-relay", "snapshot-request", "re-register"])
def test_any_traffic_counts_as_heartbeat(core, traffic):
    register(core, A, "alice", now=0.0)
    register(core, B, "bob", now=0.0)
    for t in (2.0, 4.0, 6.0, 8.0):
        traffic(core, t)
        core.on_frames(B, pack(Heartbeat(), 0), t)
        assert not [m for m in published(core.on_tick(t + 0.5)) if type(m) is PeerUpdate]
    assert core.user_of(A) == "alice"


def test_next_deadline_is_the_earliest_expiry_or_sync(core):
    core.on_tick(0.0)  # first sync at once, next one an interval later
    assert core.next_deadline() == IVL
    register(core, A, "alice", now=0.5)
    assert core.next_deadline() == IVL
    for t in (IVL, 2 * IVL, 3 * IVL):
        core.on_tick(t)
        assert core.next_deadline() == min(t + IVL, 0.5 + EXPIRY)  # 4.0, then alice's expiry at 3.5


# --- presence: snapshot and PEER_SYNC (Clone) -----------------------------------------
def test_snapshot_lists_online_peers_with_current_seq(core):
    for conn, user in ((A, "carol"), (B, "alice"), (C, "bob")):
        register(core, conn, user)
    core.on_frames(C, pack(Unregister(), 0), 0.0)
    assert replies(core.on_frames(A, pack(SnapshotRequest(), 0), 0.0), A) == [
        Snapshot(EPOCH, 4, ("alice", "carol"))]


def test_peer_sync_is_published_every_interval(core):
    assert published(core.on_tick(0.0)) == [PeerSync(EPOCH, 0)]
    assert core.on_tick(IVL / 2) == []
    register(core, A, "alice")
    assert published(core.on_tick(IVL)) == [PeerSync(EPOCH, 1)]
    assert core.on_tick(IVL + 0.1) == []


# --- malformed input -------------------------------------------------------------------
ID = b"i" * 16
HEARTBEAT_HEADER = {"v": 1, "t": "heartbeat", "id": ID, "ts": 0}
MALFORMED = {  # frames, the error code, and its ref: the id whenever the header yielded a valid one
    "empty-frame": ([b""], ErrorCode.BAD_FRAME, None),
    "not-msgpack": ([b"\xc1\xc1"], ErrorCode.BAD_FRAME, None),
    "a-list": ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_FRAME, None),
    "bad-version": ([msgpack.packb({**HEARTBEAT_HEADER, "v": 2})], ErrorCode.UNSUPPORTED_VERSION, ID),
    "unknown-type": ([msgpack.packb({**HEARTBEAT_HEADER, "t": "nope"})], ErrorCode.BAD_FRAME, ID),
    "map-as-type": ([msgpack.packb({**HEARTBEAT_HEADER, "t": {}})], ErrorCode.BAD_FRAME, ID),
    "short-id": ([msgpack.packb({**HEARTBEAT_HEADER, "id": b"i"})], ErrorCode.BAD_FRAME, None),
    "bad-timestamp": ([msgpack.packb({**HEARTBEAT_HEADER, "ts": -1})], ErrorCode.BAD_FRAME, ID),
    "extra-field": ([msgpack.packb({**HEARTBEAT_HEADER, "x": 1})], ErrorCode.BAD_FRAME, ID),
    "missing-field": ([msgpack.packb({**HEARTBEAT_HEADER, "t": "register"})], ErrorCode.BAD_FRAME, ID),
    "stray-payload": ([msgpack.packb(HEARTBEAT_HEADER), b"payload"], ErrorCode.BAD_FRAME, ID),
    "three-frames": ([msgpack.packb(HEARTBEAT_HEADER)] * 3, ErrorCode.BAD_FRAME, ID),
    "oversized": ([b"\x00" * (MAX_HEADER_BYTES + 1)], ErrorCode.TOO_LARGE, None),
}


@pytest.mark.parametrize("registered", [False, True], ids=["anonymous", "registered"])
@pytest.mark.parametrize("frames,code,ref", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_get_an_error_reply(core, frames, code, ref, registered):
    if registered:
        register(core, A, "alice")
    error = only_error(core.on_frames(A, frames, 0.0), A)
    assert (error.code, error.ref) == (code, ref)
    assert core.user_of(A) == ("alice" if registered else None)


def test_malformed_frames_from_a_registered_connection_count_as_a_sign_of_life(core):
    register(core, A, "alice", now=0.0)
    for t in (2.0, 4.0):
        core.on_frames(A, [b"\xc1"], t)
    assert not [m for m in published(core.on_tick(EXPIRY + 1.0)) if type(m) is PeerUpdate]
    assert core.user_of(A) == "alice"


# --- in-memory pairs: client cores wired to a broker core --------------------------------
class Network:
    """ClientSessions and a BrokerCore joined by in-memory queues (h11's ConnectionPair).

    Every client Transmit goes to ``core.on_frames``; Send and Relay go to the target
    session's ``on_frames``; Publish goes to every session's ``on_publish`` unless
    ``drop(user, message)`` says that subscriber loses it.
    """

    def __init__(self) -> None:
        self.core = make_core(require_key=False)  # no CURVE in memory
        self.now = 0.0
        self.sessions: dict[bytes, ClientSession] = {}
        self.events: dict[str, list[ev.Event]] = defaultdict(list)
        self.sent: dict[str, list[Message]] = defaultdict(list)
        self.drop: Callable[[str, Message], bool] = lambda user, msg: False
        self._queue: deque[tuple[str, bytes, list]] = deque()
        self.log: list[tuple[str, bytes, list]] = []  # every delivery, in order
        self._incarnation = 0
        self._identities: dict[str, Identity] = {}

    def join(self, user: str) -> ClientSession:
        self._incarnation += 1
        conn = f"{user}#{self._incarnation}".encode()
        e2e = EndToEnd(user, self.identity(user), MemoryKeys(), MemoryKeys())
        session = ClientSession(user, wall_ms=lambda: 0, heartbeat_ivl=IVL, liveness=LIVENESS, e2e=e2e,
                                token=b"install " + conn, new_id=new_msg_id)
        self.sessions[conn] = session
        self._from_client(conn, session.start(self.now))
        self.run()
        return session

    def identity(self, user: str) -> Identity:
        """One keypair per user, kept across that user's sessions (its installation)."""
        if user not in self._identities:
            self._identities[user] = Identity.from_private_bytes(hashlib.sha256(user.encode()).digest())
        return self._identities[user]

    def leave(self, session: ClientSession) -> None:
        self._from_client(self._conn(session), session.close(self.now))
        self.run()

    def send(self, session: ClientSession, to: str, text: str) -> bytes:
        msg_id = new_msg_id()
        self._from_client(self._conn(session), session.send_text(to, validate_text(to, text), self.now, msg_id))
        self.run()
        return msg_id

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self._from_broker(self.core.on_tick(self.now))
        for conn, session in list(self.sessions.items()):
            self._from_client(conn, session.on_tick(self.now))
        self.run()

    def run(self) -> None:
        for _ in range(100_000):
            if not self._queue:
                return
            where, conn, frames = self._queue.popleft()
            self.log.append((where, conn, frames))
            session = self.sessions[conn] if conn in self.sessions else None
            if where == "broker":
                self._from_broker(self.core.on_frames(conn, frames, self.now))
            elif where == "client":
                self._from_client(conn, session.on_frames(list(frames), self.now))
            elif not self.drop(session.user, message(frames)):
                self._from_client(conn, session.on_publish(list(frames), self.now))
        raise AssertionError("the network never went quiet")

    def live(self) -> list[ClientSession]:
        return [s for s in self.sessions.values() if s.state is State.READY]

    def _conn(self, session: ClientSession) -> bytes:
        return next(conn for conn, s in self.sessions.items() if s is session)

    def _from_client(self, conn: bytes, actions) -> None:
        user = self.sessions[conn].user
        for action in actions:
            if type(action) is Transmit:
                self.sent[user].append(message(action.frames))
                self._queue.append(("broker", conn, action.frames))
            elif type(action) is Emit:
                self.events[user].append(action.event)

    def _from_broker(self, actions) -> None:
        for action in actions:
            if type(action) is Send:
                self._queue.append(("client", action.conn, action.frames))
            elif type(action) is Relay:
                self._queue.append(("client", action.conn, action.frames))
                if action.on_success is not None:
                    self._queue.append(("client", action.sender, action.on_success))
            elif type(action) is Publish:
                for conn in self.sessions:
                    self._queue.append(("publish", conn, action.frames))


def of_type(events, kind):
    return [e for e in events if type(e) is kind]


def test_pair_alice_message_reaches_bob_and_alice_gets_the_ack():
    net = Network()
    alice, bob = net.join("alice"), net.join("bob")
    assert alice.state is State.READY and bob.state is State.READY
    msg_id = net.send(alice, "bob", "hello bob ✓")
    [received] = of_type(net.events["bob"], ev.MessageReceived)
    assert (received.msg_id, received.sender, received.text) == (msg_id, "alice", "hello bob ✓")
    assert of_type(net.events["alice"], ev.Acked) == [ev.Acked(msg_id, AckStatus.RELAYED.value)]
    assert of_type(net.events["alice"], ev.MessageReceived) == []


def test_pair_send_to_unknown_recipient_fails_with_the_broker_code():
    net = Network()
    alice = net.join("alice")
    msg_id = net.send(alice, "nobody", "anyone?")
    [failed] = of_type(net.events["alice"], ev.SendFailed)
    assert failed.msg_id == msg_id
    assert isinstance(failed.error, RemoteError) and failed.error.code is ErrorCode.UNKNOWN_RECIPIENT


def test_pair_duplicate_id_fails_registration():
    net = Network()
    net.join("alice")
    impostor = net.join("alice")
    assert impostor.state is State.CLOSED
    [failed] = of_type(net.events["alice"], ev.RegisterFailed)
    assert failed.error.code is ErrorCode.ID_TAKEN


def test_pair_peer_lists_converge_on_join_and_leave():
    net = Network()
    alice, bob, carol = net.join("alice"), net.join("bob"), net.join("carol")
    for session in (alice, bob, carol):
        assert session.peers == {"alice", "bob", "carol"}
    net.leave(bob)
    assert alice.peers == carol.peers == {"alice", "carol"}
    assert of_type(net.events["alice"], ev.PeersChanged)[-1].left == {"bob"}


def test_pair_gap_in_presence_updates_triggers_a_new_snapshot():
    net = Network()
    alice, _ = net.join("alice"), net.join("bob")
    asked_before = sum(type(m) is SnapshotRequest for m in net.sent["alice"])
    net.drop = lambda user, msg: user == "alice" and type(msg) is PeerUpdate and msg.user == "carol"
    net.join("carol")
    assert alice.peers == {"alice", "bob"}  # alice missed carol's arrival...
    net.drop = lambda user, msg: False
    net.join("dave")  # ...and notices at the next update, whose seq skips one
    assert sum(type(m) is SnapshotRequest for m in net.sent["alice"]) == asked_before + 1
    assert alice.peers == {"alice", "bob", "carol", "dave"}
    assert alice.presence.synced and alice.presence.seq == net.core.directory.seq()


def test_pair_missed_last_update_is_noticed_through_peer_sync():
    net = Network()
    net.tick()  # the first PEER_SYNC goes out at once
    alice, _ = net.join("alice"), net.join("bob")
    net.drop = lambda user, msg: user == "alice" and type(msg) is PeerUpdate
    net.join("carol")
    assert alice.peers == {"alice", "bob"}
    net.drop = lambda user, msg: False
    net.tick(IVL)  # PEER_SYNC: seq 3 > alice's 2
    assert alice.peers == {"alice", "bob", "carol"}


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["join", "leave", "send"]), st.sampled_from("abcde")),
                 min_size=1, max_size=25),
    drops=st.lists(st.booleans(), min_size=1, max_size=64),
)
def test_pair_peer_lists_converge_despite_lost_presence_updates(ops, drops):
    net = Network()
    net.tick()
    pattern = iter(drops * 1000)
    net.drop = lambda user, msg: next(pattern)
    online: dict[str, ClientSession] = {}
    for op, user in ops:
        if op == "join" and user not in online:
            online[user] = net.join(user)
        elif op == "leave" and user in online:
            net.leave(online.pop(user))
        elif op == "send" and user in online:
            net.send(online[user], next(iter(online)), "x")
        net.tick(0.1)
    net.drop = lambda user, msg: False
    net.tick(IVL)  # a PEER_SYNC reveals any gap; the snapshots that follow settle it
    truth = set(net.core.directory.online())
    assert truth == set(online)
    for session in net.live():
        assert session.peers == truth, session.user


def test_pair_sessions_recover_after_a_broker_restart():
    net = Network()
    alice, bob = net.join("alice"), net.join("bob")
    net.core = BrokerCore(LocalDirectory(b"epoch-02"), broker_id=b"broker-2", heartbeat_ivl=IVL, liveness=LIVENESS,
                          wall_ms=lambda: 0, new_id=id_source(), keys=KeyBook(), store=NoStore(), link=LocalLink(),
                          require_key=False)  # a new broker that knows no one
    net.tick(IVL)  # heartbeats get NOT_REGISTERED: both re-register on their own
    assert [e.reconnect for e in of_type(net.events["alice"], ev.Registered)] == [False, True]
    assert of_type(net.events["bob"], ev.Reconnecting)
    assert alice.state is bob.state is State.READY
    assert alice.peers == bob.peers == {"alice", "bob"}
    assert alice.presence.epoch == b"epoch-02" and alice.presence.seq == net.core.directory.seq()
    msg_id = net.send(alice, "bob", "after the restart")
    assert of_type(net.events["bob"], ev.MessageReceived)[-1].text == "after the restart"
    assert of_type(net.events["alice"], ev.Acked)[-1].msg_id == msg_id


def test_pair_duplicate_delivery_is_shown_once():
    net = Network()
    alice, _ = net.join("alice"), net.join("bob")
    net.send(alice, "bob", "once")
    [sealed] = [m for m in net.sent["alice"] if type(m) is ChatMessage]
    assert b"once" not in sealed.body  # end-to-end sealed: the broker relays ciphertext
    frames = next(f for where, conn, f in net.log if where == "broker" and type(message(f)) is ChatMessage)
    for _ in range(2):  # at-least-once: a resend after a lost ack relays the same id again
        net._from_client(net._conn(alice), [Transmit(frames)])
        net.run()
    assert [e.text for e in of_type(net.events["bob"], ev.MessageReceived)] == ["once"]


# --- bindings moved or released by a recovery or the operator (docs/PROTOCOL.md §10.2) -------------------------
def test_a_moved_id_ends_the_old_keys_session_with_a_clear_error_and_announces_it_offline(core):
    register(core, A, "bob")
    core.keys.move("bob", key_of("bob-new"))
    actions = core.on_tick(0.1)
    [error] = [m for m in replies(actions, A) if type(m) is Error]
    assert error.code is ErrorCode.SESSION_REPLACED and error.ref is None
    assert "moved to another key with its recovery phrase" in error.message
    assert PeerUpdate(EPOCH, 2, "bob", False) in published(actions)
    assert core.user_of(A) is None and core.directory.online() == []
    assert only_error(core.on_frames(A, pack(Heartbeat(), 0), 0.2), A).code is ErrorCode.NOT_REGISTERED


def test_a_moved_id_is_announced_to_everyone_else_online_with_its_new_key(core):
    register(core, A, "bob")
    register(core, B, "alice")
    register(core, C, "carol")
    core.keys.move("bob", key_of("bob-new"))
    actions = core.on_tick(0.1)
    for conn in (B, C):  # with how it moved, for their users' warning
        assert KeyChanged("bob", key_of("bob-new"), KeyChangeHow.RECOVERED) in replies(actions, conn)
    assert all(type(m) is not KeyChanged for m in replies(actions, A))
    core.keys.move("bob", key_of("bob-newer"), "moved")
    assert KeyChanged("bob", key_of("bob-newer"), KeyChangeHow.MOVED) in replies(core.on_tick(0.2), B)


def test_the_new_keys_own_session_is_kept_when_its_id_moves_to_it():
    core = make_core(require_key=False)  # no CURVE: the registered key is the register's own
    register(core, A, "bob", key=key_of("bob-new"))
    core.keys.move("bob", key_of("bob-new"))
    actions = core.on_tick(0.1)
    assert replies(actions, A) == [] and core.user_of(A) == "bob"


def test_a_released_id_ends_its_session_and_tells_nobody_of_a_key(core):
    register(core, A, "bob")
    register(core, B, "alice")
    core.keys.release("bob")
    actions = core.on_tick(0.1)
    [error] = replies(actions, A)
    assert error.code is ErrorCode.SESSION_REPLACED and "released by the broker's operator" in error.message
    assert replies(actions, B) == []
    assert replies(register(core, C, "bob", key=key_of("bob-next")), C)[0] == Registered("bob", EPOCH,
                                                                                          int(IVL * 1000))
