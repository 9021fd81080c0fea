"""Conformance: docs/PROTOCOL.md, MUST by MUST, against a real broker process, with raw frames.

Long by design: one test per rule of the spec, each named after the section it checks.

Frames are built from the spec's text with msgpack, pyzmq and plain TCP only, never with the
project's codec or client, so a test fails when the broker and the spec disagree, whichever of the
two moved. Every frame the broker sends is checked against §2 as it arrives. The brokers are shared
per module (each test uses its own user IDs); the few rules that need other options (a tiny rate,
a full ticket table, a full disk, Redis gone) start a broker of their own.

``registry_full`` would need a million bound IDs: its two tests drive the broker's routing core and
key service in-process instead, with the same raw bytes, over a registry that binds one ID.

(Over 500 lines: one test per rule of docs/PROTOCOL.md, in the spec's order, so it reads as the spec.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from p2pchat.client import events as ev
from tests.conftest import HEARTBEAT, BrokerProcess, wait_for

TIMEOUT = 5.0  # seconds a reply may take before the test fails (never waited for when it comes)
LIVENESS = 3
ERROR_CODES = {  # §7, the codes an `error` may carry
    "bad_frame", "unsupported_version", "too_large", "not_registered", "already_registered", "id_taken",
    "session_replaced", "spoofed_sender", "unknown_recipient", "recipient_offline", "recipient_busy",
    "key_mismatch", "too_many_ids", "registry_full", "queue_full", "storage_full", "storage_unavailable",
    "credit_exceeded", "rate_limited", "id_online",
}
# Every test admits fresh keys, and the recovery tests recover from one address.
OPEN_ADMISSIONS = ["--admit-rate", "100000", "--admit-burst", "100000", "--recover-rate", "1000",
                   "--recover-burst", "1000"]


def uid(prefix: str) -> str:
    """A fresh user ID (§2.1: letters, digits, ``-``; at most 32 characters)."""
    return f"{prefix}-{os.urandom(4).hex()}"


def header(t: str, msg_id: bytes | None = None, ts: int | None = None, **fields: Any) -> dict:
    """A §2 header: ``v``, ``t``, ``id``, ``ts`` and the type's fields (``from``/``to`` as ``sender``/``to``)."""
    wire = {"from" if k == "sender" else k: v for k, v in fields.items()}
    return {"v": 1, "t": t, "id": msg_id or os.urandom(16), "ts": int(time.time() * 1000) if ts is None else ts,
            **wire}


def packed(h: dict) -> bytes:
    return msgpack.packb(h, use_bin_type=True)


def check_broker_frame(frames: list[bytes]) -> dict:
    """Decode a frame from the broker and hold it to §2: common keys, their kinds, no nil, a known type."""
    h = msgpack.unpackb(frames[0], raw=False)
    assert type(h) is dict and all(type(k) is str for k in h), h
    assert h["v"] == 1 and type(h["v"]) is int, h
    assert type(h["id"]) is bytes and len(h["id"]) == 16, h
    assert type(h["ts"]) is int and h["ts"] >= 0, h
    assert None not in h.values(), h  # optional fields are omitted, never nil
    assert len(frames) == (2 if h["t"] == "file_chunk" else 1), (h, len(frames))
    if h["t"] == "error":
        assert h["code"] in ERROR_CODES and type(h["message"]) is str, h
        assert set(h) <= {"v", "t", "id", "ts", "code", "message", "ref"}, h
    return h


# --- raw connections ------------------------------------------------------------------------------------
def key_service(broker: BrokerProcess, data: bytes, replies: int | None = None) -> list[bytes]:
    """Send ``data`` to the key service and read reply lines (newlines kept): ``replies`` of them, or
    (None) all until the service closes the connection, failing if it does not close it."""
    with socket.create_connection(("127.0.0.1", broker.port + 2), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        buffer = b""
        while replies is None or buffer.count(b"\n") < replies:
            chunk = sock.recv(4096)
            if not chunk:
                assert replies is None, f"closed after {buffer!r}"
                break
            buffer += chunk
    return buffer.splitlines(keepends=True)


def broker_key(broker: BrokerProcess) -> bytes:
    (line,) = key_service(broker, b"KEY\n", 1)
    return bytes.fromhex(line[4:-1].decode())  # §10.1: "KEY <64 hex>\n"


def fingerprint(key: bytes) -> str:
    """§10.3's canonical form, from its text."""
    digits = hashlib.sha256(key).hexdigest()[:20]
    return " ".join(digits[i:i + 4] for i in range(0, 20, 4))


class Keys:
    """A CURVE keypair: Z85 for libzmq, raw 32 bytes for the protocol (§10.2)."""

    def __init__(self) -> None:
        self.public, self.secret = zmq.curve_keypair()
        self.raw = z85.decode(self.public)


class Net:
    """Raw sockets to one broker; every socket it opens is closed at the end of the test."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.server_key = broker_key(broker)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()

    def socket(self, kind: int, keys: Keys | None, server_key: bytes | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            sock.curve_serverkey = server_key or self.server_key
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        self.sockets.append(sock)
        return sock

    def admit(self, user: str, keys: Keys) -> None:
        lines = key_service(self.broker, f"ADMIT {user} {keys.raw.hex()}\n".encode(), 1)
        assert lines == [b"OK\n"], lines

    def dealer(self, user: str | None = None, keys: Keys | None = None, routing_id: bytes | None = None,
               admit: bool = True, rcvhwm: int = 0) -> Dealer:
        """A DEALER to the ROUTER; admitted for ``user`` (or a throwaway ID) unless ``admit`` is False."""
        keys = keys or Keys()
        if admit:
            self.admit(user or uid("adm"), keys)
        sock = self.socket(zmq.DEALER, keys)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)  # before connecting: a pipe keeps the HWM it was made with
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(f"tcp://127.0.0.1:{self.broker.port}")
        return Dealer(self.broker, sock, keys)

    def client(self, user: str | None = None, keys: Keys | None = None) -> Dealer:
        """A DEALER registered as ``user``."""
        dealer = self.dealer(user, keys)
        dealer.register(user or uid("user"))
        return dealer

    def sub(self, keys: Keys | None = None) -> Sub:
        """A SUB on the PUB, with the broker's key in Z85 (§1: the ROUTER's key, the user's keypair)."""
        keys = keys or Keys()
        self.admit(uid("sub"), keys)
        sock = self.socket(zmq.SUB, keys, z85.encode(self.server_key))
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"tcp://127.0.0.1:{self.broker.port + 1}")
        sub = Sub(self.broker, sock)
        sub.until(lambda h: h["t"] == "peer_sync")  # subscribed: the next beacon has arrived
        return sub


def _recv(sock: zmq.Socket, broker: BrokerProcess, timeout: float) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while not sock.poll(50, zmq.POLLIN):
        if not broker.alive():
            raise AssertionError("broker died:\n" + "".join(broker.lines[-20:]))
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing from the broker within {timeout}s")
    return sock.recv_multipart()


class Dealer:
    def __init__(self, broker: BrokerProcess, sock: zmq.Socket, keys: Keys) -> None:
        self.broker, self.sock, self.keys = broker, sock, keys
        self.token = os.urandom(32)
        self.user: str | None = None
        self.peer_key: bytes | None = None  # the key of the client under test, from key_info (§10.3)
        self.payload: bytes | None = None  # of the last frame received, if it had one

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def request(self, t: str, payload: bytes | None = None, msg_id: bytes | None = None, **fields: Any) -> bytes:
        """Send one message of type ``t``; its id."""
        h = header(t, msg_id, **fields)
        self.send(packed(h), *([payload] if payload is not None else []))
        return h["id"]

    def relay(self, t: str, to: str, payload: bytes | None = None, msg_id: bytes | None = None, **fields) -> bytes:
        return self.request(t, payload, msg_id, sender=self.user, to=to, **fields)

    def raw_next(self, timeout: float = TIMEOUT) -> list[bytes]:
        return _recv(self.sock, self.broker, timeout)

    def next(self, timeout: float = TIMEOUT) -> dict:
        frames = self.raw_next(timeout)
        h = check_broker_frame(frames)
        self.payload = frames[1] if len(frames) > 1 else None
        return h

    def expect(self, t: str, **fields: Any) -> dict:
        h = self.next()
        assert h["t"] == t, h
        for key, value in fields.items():
            assert h["from" if key == "sender" else key] == value, (key, h)
        return h

    def expect_error(self, code: str, ref: bytes | None) -> dict:
        """The next frame is ``error code`` with ``ref`` (None: no ``ref`` key at all, §2)."""
        h = self.expect("error", code=code)
        assert h.get("ref") == ref and ("ref" in h) == (ref is not None), h
        return h

    def register(self, user: str, token: bytes | None = None, key: bytes | None = None, **fields: Any) -> dict:
        msg_id = self.request("register", user=user, token=token or self.token, key=key or self.keys.raw, **fields)
        reply = self.next()
        assert reply["t"] == "registered", (reply, msg_id)
        self.user = user
        return reply

    def quiet(self) -> None:
        """Nothing is waiting for us: a heartbeat's answer comes next (the broker answers in order, §4)."""
        self.request("heartbeat")
        self.expect("heartbeat")


class Sub:
    def __init__(self, broker: BrokerProcess, sock: zmq.Socket) -> None:
        self.broker, self.sock = broker, sock

    def next(self, timeout: float = TIMEOUT) -> dict:
        frames = _recv(self.sock, self.broker, timeout)
        assert len(frames) == 1, frames  # §1: no topic frame, ever
        h = check_broker_frame(frames)
        assert h["t"] in ("peer_update", "peer_sync"), h
        return h

    def until(self, predicate, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.next(max(0.05, deadline - time.monotonic()))
            if predicate(h):
                return h

    def update_of(self, user: str, online: bool) -> dict:
        return self.until(lambda h: h["t"] == "peer_update" and h["user"] == user and h["online"] is online)

    def updates_until(self, user: str) -> list[dict]:
        """Every ``peer_update`` up to ``user`` coming online (other tests' sessions may expire meanwhile)."""
        updates = []
        while not updates or (updates[-1]["user"], updates[-1]["online"]) != (user, True):
            updates.append(self.until(lambda h: h["t"] == "peer_update"))
        return updates


# --- brokers ----------------------------------------------------------------------------------------------
def _launch(tmp_path_factory, name: str, args: list[str]) -> Iterator[BrokerProcess]:
    proc = BrokerProcess.launch(tmp_path_factory.mktemp(name), OPEN_ADMISSIONS + args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[BrokerProcess]:
    """The default broker: CURVE, store on, heartbeat 0.2 s."""
    yield from _launch(tmp_path_factory, "store", [])


@pytest.fixture(scope="module")
def relay_broker(tmp_path_factory) -> Iterator[BrokerProcess]:
    yield from _launch(tmp_path_factory, "relay", ["--no-store"])


@pytest.fixture(scope="module")
def tight_broker(tmp_path_factory) -> Iterator[BrokerProcess]:
    """Small queues and ID shares; a 2 s heartbeat, so a session outlives its connection a while."""
    yield from _launch(tmp_path_factory, "tight", ["--heartbeat", "2", "--queue-max", "3", "--queue-sender-max", "2",
                                                   "--ids-per-key", "2"])


def _net(broker: BrokerProcess) -> Iterator[Net]:
    net = Net(broker)
    yield net
    net.close()


@pytest.fixture
def net(broker) -> Iterator[Net]:
    yield from _net(broker)


@pytest.fixture
def relay_net(relay_broker) -> Iterator[Net]:
    yield from _net(relay_broker)


@pytest.fixture
def tight_net(tight_broker) -> Iterator[Net]:
    yield from _net(tight_broker)


# --- §1 transport ----------------------------------------------------------------------------------------
def test_s1_sub_uses_the_brokers_key_and_a_pub_message_is_one_frame_without_topic(net):
    sub = net.sub()  # CURVE with the key the key service gave, in Z85; Sub.next asserts one frame each
    user = uid("pub")
    net.client(user)
    update = sub.update_of(user, True)
    assert set(update) == {"v", "t", "id", "ts", "epoch", "seq", "user", "online"}


def test_s1_unadmitted_key_fails_the_curve_handshake_on_router_and_pub(net):
    for kind, port in ((zmq.DEALER, net.broker.port), (zmq.SUB, net.broker.port + 1)):
        sock = net.socket(kind, Keys())  # never admitted (§10.1)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(f"tcp://127.0.0.1:{port}")
        assert monitor.poll(TIMEOUT * 1000), "no handshake outcome"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        sock.disable_monitor()
        monitor.close(0)


# --- §3 decoding and errors --------------------------------------------------------------------------------
ID = b"conformance-id16"
VALID_HB = header("heartbeat", ID)
MALFORMED = {  # name: (frames, code, ref) per the precedence of §3
    "not_msgpack": ([b"\xc1"], "bad_frame", None),
    "not_a_map": ([packed([1, 2])], "bad_frame", None),
    "header_over_max_header_bytes": ([b"\x80" * (1024 * 1024 + 1)], "too_large", None),
    "version_2": ([packed({**VALID_HB, "v": 2})], "unsupported_version", ID),
    "version_true": ([packed({**VALID_HB, "v": True})], "unsupported_version", ID),
    "version_float": ([packed({**VALID_HB, "v": 1.0})], "unsupported_version", ID),
    "body_over_max_body_bytes": ([packed(header("message", ID, sender="a", to="b", body=b"x" * (64 * 1024 + 1)))],
                                 "bad_frame", None),  # over a msgpack limit of §2.2: the header does not decode
    "seventeen_keys": ([packed({**VALID_HB, **{f"k{i}": i for i in range(13)}})], "bad_frame", None),
    "three_frames_with_a_valid_header": ([packed(VALID_HB), b"x", b"y"], "bad_frame", ID),
    "ten_frames": ([packed(VALID_HB)] * 10, "bad_frame", ID),
    "unknown_type": ([packed({**VALID_HB, "t": "gossip"})], "bad_frame", ID),
    "id_missing": ([packed({k: v for k, v in VALID_HB.items() if k != "id"})], "bad_frame", None),
    "id_of_15_bytes": ([packed({**VALID_HB, "id": b"x" * 15})], "bad_frame", None),
    "ts_negative": ([packed({**VALID_HB, "ts": -1})], "bad_frame", ID),
    "unknown_field": ([packed({**VALID_HB, "extra": 1})], "bad_frame", ID),
    "optional_field_as_nil": ([packed(header("error", ID, code="bad_frame", message="m", ref=None))], "bad_frame", ID),
    "missing_field": ([packed(header("key_req", ID))], "bad_frame", ID),
    "ill_typed_field": ([packed(header("key_req", ID, user=7))], "bad_frame", ID),
    "payload_on_a_plain_type": ([packed(VALID_HB), b"p"], "bad_frame", ID),
    "chunk_without_payload": ([packed(header("file_chunk", ID, sender="a", to="b", xfer=ID, index=0, final=True))],
                              "bad_frame", ID),
    "chunk_payload_over_max_payload_bytes": (
        [packed(header("file_chunk", ID, sender="a", to="b", xfer=ID, index=0, final=True)), b"p" * (1024 * 1024 + 1)],
        "too_large", ID),
}


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_s3_malformed_message_gets_one_error_with_the_specified_code_and_ref(net, case):
    frames, code, ref = MALFORMED[case]
    dealer = net.client()  # registered: every code is the codec's verdict, not not_registered
    dealer.send(*frames)
    dealer.expect_error(code, ref)
    dealer.quiet()  # exactly one error, and the broker still serves this connection


def test_s3_bad_header_gets_bad_frame_with_ref_even_unregistered(net):
    dealer = net.dealer()
    dealer.send(packed(VALID_HB), b"x", b"y")
    dealer.expect_error("bad_frame", ID)
    dealer.request("heartbeat", msg_id=ID)
    dealer.expect_error("not_registered", ID)


def test_s3_errors_come_one_per_message_in_order(net):
    dealer = net.client()
    batch = [MALFORMED[name] for name in ("not_msgpack", "version_2", "three_frames_with_a_valid_header",
                                          "id_missing", "unknown_field")]
    for frames, _, _ in batch:
        dealer.send(*frames)
    for _, code, ref in batch:
        dealer.expect_error(code, ref)
    dealer.quiet()


# --- §4 message types --------------------------------------------------------------------------------------
def test_s4_error_from_a_client_is_not_relayed_and_gets_bad_frame_with_ref(net):
    bob = net.client()
    alice = net.client()
    msg_id = alice.request("error", code="integrity", message="does not open", ref=os.urandom(16))
    alice.expect_error("bad_frame", msg_id)
    bob.quiet()  # nothing reached bob


BROKER_TO_CLIENT = {
    "registered": dict(user="x", epoch=b"e", heartbeat_ms=1),
    "ack": dict(ref=ID, status="stored"),
    "key_info": dict(user="x", key=b"k" * 32),
    "devices": dict(user="x", ver=1, devices=[[1, b"k" * 32, "", 0]]),
    "snapshot": dict(epoch=b"e", seq=0, peers=[]),
    "peer_update": dict(epoch=b"e", seq=1, user="x", online=True),
    "peer_sync": dict(epoch=b"e", seq=0),
}


@pytest.mark.parametrize("t", BROKER_TO_CLIENT)
def test_s4_broker_to_client_type_sent_as_request_gets_bad_frame_with_ref(net, t):
    dealer = net.client()
    msg_id = dealer.request(t, **BROKER_TO_CLIENT[t])
    dealer.expect_error("bad_frame", msg_id)


REQUESTS_BEFORE_REGISTER = {
    "unregister": {}, "heartbeat": {}, "snapshot_req": {}, "key_req": dict(user="x"), "consume": dict(ref=ID),
    "devices_req": dict(user="x"),
    "message": dict(sender="x", to="y", body=b"b"),
}


@pytest.mark.parametrize("t", REQUESTS_BEFORE_REGISTER)
def test_s4_request_without_a_session_gets_not_registered_with_ref(net, t):
    dealer = net.dealer()
    msg_id = dealer.request(t, **REQUESTS_BEFORE_REGISTER[t])
    dealer.expect_error("not_registered", msg_id)


def test_s4_consume_gets_no_reply_whether_or_not_ref_was_queued(net):
    dealer = net.client()
    dealer.request("consume", ref=os.urandom(16))
    dealer.quiet()


def test_s4_key_req_gets_key_info_or_unknown_recipient(net):
    bob = net.client()
    alice = net.client()
    alice.request("key_req", user=bob.user)
    alice.expect("key_info", user=bob.user, key=bob.keys.raw)
    msg_id = alice.request("key_req", user=uid("nobody"))
    alice.expect_error("unknown_recipient", msg_id)


# --- §5.1 registration ---------------------------------------------------------------------------------------
def test_s5_1_register_gets_registered_and_publishes_online(net):
    sub = net.sub()
    user = uid("reg")
    dealer = net.dealer(user)
    reply = dealer.register(user)
    assert reply["user"] == user and reply["heartbeat_ms"] == int(HEARTBEAT * 1000) and type(reply["epoch"]) is bytes
    update = sub.update_of(user, True)
    assert update["epoch"] == reply["epoch"]


def test_s5_1_repeated_register_is_answered_again_and_publishes_nothing(net):
    sub = net.sub()
    first = net.client()
    seq = sub.update_of(first.user, True)["seq"]
    first.register(first.user)  # again, same connection
    marker = net.client()
    updates = sub.updates_until(marker.user)
    assert [u["seq"] for u in updates] == list(range(seq + 1, seq + 1 + len(updates)))
    assert first.user not in {u["user"] for u in updates}


def test_s5_1_register_as_another_user_gets_already_registered(net):
    dealer = net.client()
    msg_id = dealer.request("register", user=uid("other"), token=dealer.token, key=dealer.keys.raw)
    dealer.expect_error("already_registered", msg_id)


def test_s5_1_register_key_other_than_the_curve_key_gets_key_mismatch(net):
    user = uid("liar")
    dealer = net.dealer(user)
    msg_id = dealer.request("register", user=user, token=dealer.token, key=Keys().raw)
    dealer.expect_error("key_mismatch", msg_id)


def test_s5_1_id_bound_to_another_key_gets_id_taken(net):
    owner = net.client()
    owner.request("unregister")
    thief = net.dealer()
    msg_id = thief.request("register", user=owner.user, token=owner.token, key=thief.keys.raw)
    thief.expect_error("id_taken", msg_id)


def test_s5_1_id_online_on_another_connection_with_another_token_gets_id_taken(net):
    keys = Keys()
    first = net.client(uid("twice"), keys)
    second = net.dealer(keys=keys, admit=False)  # the key is bound now: no ticket needed
    msg_id = second.request("register", user=first.user, token=os.urandom(32), key=keys.raw)
    second.expect_error("id_taken", msg_id)
    first.quiet()  # the first session goes on


def test_s5_1_same_token_takes_over_and_the_old_connection_gets_session_replaced(net):
    sub = net.sub()
    keys = Keys()
    old = net.client(uid("crash"), keys)
    seq = sub.update_of(old.user, True)["seq"]
    new = net.dealer(keys=keys, admit=False)
    new.register(old.user, token=old.token)
    old.expect_error("session_replaced", None)
    new.quiet()
    marker = net.client()  # no presence change for the takeover
    updates = sub.updates_until(marker.user)
    assert [u["seq"] for u in updates] == list(range(seq + 1, seq + 1 + len(updates)))
    assert old.user not in {u["user"] for u in updates}


def test_s5_1_key_beyond_its_share_of_ids_gets_too_many_ids(tight_net):
    keys = Keys()
    dealer = tight_net.client(uid("share"), keys)
    dealer.request("unregister")
    other = tight_net.dealer(keys=keys, admit=False)
    other.register(uid("share"))  # --ids-per-key 2: the second ID
    other.request("unregister")
    third = uid("share")
    msg_id = other.request("register", user=third, token=other.token, key=keys.raw)
    other.expect_error("too_many_ids", msg_id)
    lines = key_service(tight_net.broker, f"ADMIT {third} {keys.raw.hex()}\n".encode(), 1)
    assert lines[0].startswith(b"ERR too_many_ids "), lines


def test_s5_1_frame_with_another_key_on_a_sessions_routing_id_gets_key_mismatch_without_ref(tight_net):
    routing_id = b"\x01" + os.urandom(8)
    victim = tight_net.dealer(routing_id=routing_id)
    victim.register(uid("victim"))
    victim.sock.close(0)  # the session outlives its connection by up to 3 x 2 s
    thief = tight_net.dealer(routing_id=routing_id)
    deadline = time.monotonic() + TIMEOUT
    while not thief.sock.poll(0):  # until the old connection has gone, the id is still taken
        assert time.monotonic() < deadline, "no answer on the victim's routing id"
        thief.request("heartbeat")
        thief.sock.poll(100)
    thief.expect_error("key_mismatch", None)


def test_s5_1_connection_without_a_session_is_closed_after_ten_heartbeats(net):
    dealer = net.dealer()
    monitor = dealer.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    started = time.monotonic()
    assert monitor.poll(int((10 * HEARTBEAT + TIMEOUT) * 1000)), "the broker kept a connection with no session"
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    assert time.monotonic() - started >= 10 * HEARTBEAT * 0.9
    dealer.sock.disable_monitor()
    monitor.close(0)


# --- §5.2 heartbeats and expiry ---------------------------------------------------------------------------------
def test_s5_2_heartbeat_is_answered_with_one_heartbeat(net):
    dealer = net.client()
    dealer.request("heartbeat")
    dealer.request("heartbeat")
    assert [dealer.next()["t"], dealer.next()["t"]] == ["heartbeat", "heartbeat"]
    dealer.quiet()


def test_s5_2_silent_session_expires_publishes_offline_and_then_gets_not_registered(net):
    sub = net.sub()
    dealer = net.client()
    started = time.monotonic()
    sub.update_of(dealer.user, False)
    assert time.monotonic() - started >= LIVENESS * HEARTBEAT * 0.9
    msg_id = dealer.request("heartbeat")
    dealer.expect_error("not_registered", msg_id)
    dealer.register(dealer.user)  # the connection stays open: register again


def test_s5_2_any_frame_is_a_sign_of_life(net):
    dealer = net.client()
    until = time.monotonic() + 3 * LIVENESS * HEARTBEAT
    while time.monotonic() < until:  # consumes (no reply) and malformed frames, never a heartbeat
        dealer.request("consume", ref=os.urandom(16))
        dealer.send(b"\xc1")
        dealer.expect_error("bad_frame", None)
        dealer.sock.poll(int(HEARTBEAT * 500))  # half a heartbeat between signs of life
    dealer.quiet()  # still registered


# --- §5.3 relay and §5.4 leaving ----------------------------------------------------------------------------------
def test_s5_3_relay_with_another_from_gets_spoofed_sender(net):
    bob = net.client()
    alice = net.client()
    msg_id = alice.request("message", sender=bob.user, to=bob.user, body=b"x")
    alice.expect_error("spoofed_sender", msg_id)


@pytest.mark.parametrize("t", ["message", "file_credit"])
def test_s5_3_relay_to_an_id_no_key_is_bound_to_gets_unknown_recipient(net, t):
    alice = net.client()
    fields = dict(body=b"x") if t == "message" else dict(xfer=ID, next=0, upto=1, restart=True)
    msg_id = alice.relay(t, uid("ghost"), **fields)
    alice.expect_error("unknown_recipient", msg_id)


def test_s5_3_non_durable_frame_to_an_offline_user_gets_recipient_offline(net):
    bob = net.client()
    bob.request("unregister")
    alice = net.client()
    msg_id = alice.relay("file_credit", bob.user, xfer=os.urandom(16), next=0, upto=1, restart=True)
    alice.expect_error("recipient_offline", msg_id)


@pytest.mark.parametrize("t", ["file_credit", "file_done", "file_cancel"])
def test_s5_3_relayed_frames_arrive_unchanged_and_get_no_ack(net, t):
    bob = net.client()
    alice = net.client()
    fields = {"file_credit": dict(next=0, upto=4, restart=True), "file_done": {},
              "file_cancel": dict(code="cancelled", message="stop")}[t]
    sent = packed(header(t, sender=alice.user, to=bob.user, xfer=os.urandom(16), **fields))
    alice.send(sent)
    assert bob.raw_next() == [sent]
    alice.quiet()


@pytest.mark.parametrize("net_name,status", [("net", "stored"), ("relay_net", "relayed")],
                         ids=["store-on", "store-off"])
def test_s5_3_message_to_an_online_user_is_forwarded_unchanged_and_acked_stored_or_relayed(request, net_name,
                                                                                           status):
    net = request.getfixturevalue(net_name)  # §11: with the store on, the ack says stored
    bob = net.client()
    alice = net.client()
    sent = header("message", sender=alice.user, to=bob.user, body=b"sealed bytes")
    alice.send(packed(sent))
    alice.expect("ack", ref=sent["id"], status=status)
    assert bob.raw_next() == [packed(sent)]


def test_s5_3_durable_frame_with_the_store_off_to_an_offline_user_gets_recipient_offline(relay_net):
    bob = relay_net.client()
    bob.request("unregister")
    alice = relay_net.client()
    msg_id = alice.relay("message", bob.user, body=b"x")
    alice.expect_error("recipient_offline", msg_id)


def test_s5_3_receipt_is_relayed_without_ack(relay_net):
    bob = relay_net.client()
    alice = relay_net.client()
    alice.relay("receipt", bob.user, ref=os.urandom(16), status="delivered")
    assert bob.expect("receipt", sender=alice.user, status="delivered")
    alice.quiet()


def test_s5_3_recipient_that_does_not_read_gets_its_senders_recipient_busy(relay_net):
    bob = relay_net.dealer(rcvhwm=1)
    bob.register(uid("sleepy"))  # and then never reads again
    alice = relay_net.client()
    body = os.urandom(60_000)
    sent: set[bytes] = set()
    for _ in range(5000):  # the pipes, the kernel buffers and the broker's backlog fill up
        sent.add(alice.relay("message", bob.user, body=body))
        while alice.sock.poll(0):
            h = alice.next()
            if h["t"] == "error":
                assert h["code"] == "recipient_busy" and h["ref"] in sent, h
                return
            assert (h["t"], h["status"]) == ("ack", "relayed"), h
    raise AssertionError("never told the recipient is busy")


def test_s5_4_unregister_ends_the_session_at_once_and_publishes_offline(net):
    sub = net.sub()
    dealer = net.client()
    dealer.request("unregister")
    sub.update_of(dealer.user, False)
    msg_id = dealer.request("heartbeat")
    dealer.expect_error("not_registered", msg_id)


# --- §5.5 devices ---------------------------------------------------------------------------------------------
REGISTERED_V1 = {"v", "t", "id", "ts", "user", "epoch", "heartbeat_ms"}


def test_s5_5_register_without_caps_gets_registered_with_version_1_fields_only(net):
    dealer = net.dealer()
    assert set(dealer.register(uid("old"))) == REGISTERED_V1


def test_s5_5_register_with_caps_gets_the_caps_granted_its_device_and_the_list_version(net):
    dealer = net.dealer()
    reply = dealer.register(uid("new"), caps=1, name="laptop")
    assert set(reply) == REGISTERED_V1 | {"caps", "dev", "ver"}
    assert (reply["caps"], reply["dev"], reply["ver"]) == (1, 1, 1)


def test_s5_5_capabilities_the_broker_does_not_know_are_not_granted(net):
    assert net.dealer().register(uid("new"), caps=1 | 2 | 64)["caps"] == 1 | 2  # devices and rooms, not bit 6
    reply = net.dealer().register(uid("new"), caps=64)
    assert (reply["caps"], reply["dev"], reply["ver"]) == (0, 1, 1)


def test_s5_5_devices_req_lists_the_ids_devices_with_the_first_name_and_the_caps_flag(net):
    user, keys = uid("dev"), Keys()
    first = net.dealer(user, keys)
    first.register(user, caps=1, name="laptop")
    again = net.dealer(user, keys)  # the same installation reconnects (its token): it takes the session over
    again.register(user, token=first.token, caps=1, name="renamed")  # a later name does not rename the device
    other = net.client()
    other.request("devices_req", user=user)
    reply = other.expect("devices", user=user, ver=1)
    assert reply["devices"] == [[1, keys.raw, "laptop", 1]]
    plain = net.dealer()
    plain.register(uid("old"))
    plain.request("devices_req", user=plain.user)
    assert plain.expect("devices", ver=1)["devices"] == [[1, plain.keys.raw, "", 0]]  # never registered with caps


def test_s5_5_devices_req_for_an_unbound_id_gets_unknown_recipient_with_ref(net):
    dealer = net.client()
    msg_id = dealer.request("devices_req", user=uid("nobody"))
    dealer.expect_error("unknown_recipient", msg_id)


def test_s5_5_a_device_name_longer_than_its_limit_gets_bad_frame_with_ref(net):
    dealer = net.dealer()
    msg_id = dealer.request("register", user=uid("long"), token=dealer.token, key=dealer.keys.raw, caps=1,
                            name="n" * 33)
    dealer.expect_error("bad_frame", msg_id)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_s5_5_in_a_cluster_every_broker_lists_the_devices_as_registered_on_another(tmp_path):
    from tests.broker.test_cluster import RedisProcess

    redis_server = RedisProcess(tmp_path / "redis").start()
    brokers = [BrokerProcess.launch(tmp_path / name, OPEN_ADMISSIONS + ["--cluster", redis_server.url])
               for name in ("a", "b")]
    nets = [Net(broker) for broker in brokers]
    try:
        user, keys = uid("dev"), Keys()
        other = nets[1].client()  # asks before the device is described: the broker caches the binding then
        first = nets[0].dealer(user, keys)
        first.register(user)
        other.request("devices_req", user=user)
        assert other.expect("devices", user=user)["devices"] == [[1, keys.raw, "", 0]]
        reply = nets[0].dealer(user, keys).register(user, token=first.token, caps=1, name="desk")
        assert (reply["caps"], reply["dev"], reply["ver"]) == (1, 1, 1)
        other.request("devices_req", user=user)
        assert other.expect("devices", user=user, ver=1)["devices"] == [[1, keys.raw, "desk", 1]]
        assert set(nets[1].dealer().register(uid("old"))) == REGISTERED_V1
    finally:
        for net in nets:
            net.close()
        for broker in brokers:
            broker.stop()
        redis_server.stop()


# --- §6 presence -----------------------------------------------------------------------------------------------
def test_s6_snapshot_lists_who_is_online_as_of_a_seq_of_the_published_sequence(net):
    sub = net.sub()
    dealer = net.client()
    update = sub.update_of(dealer.user, True)
    dealer.request("snapshot_req")
    snap = dealer.expect("snapshot", epoch=update["epoch"])
    assert snap["seq"] >= update["seq"] and dealer.user in snap["peers"]


def test_s6_updates_are_numbered_one_by_one_and_peer_sync_says_the_last(net):
    sub = net.sub()
    first = net.client()
    updates = sub.updates_until(first.user)
    for _ in range(2):
        updates += sub.updates_until(net.client().user)
    seqs = [u["seq"] for u in updates]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and {u["epoch"] for u in updates} == {updates[0]["epoch"]}
    beacon = sub.until(lambda h: h["t"] == "peer_sync")
    assert beacon["epoch"] == updates[0]["epoch"] and beacon["seq"] >= seqs[-1]


# --- §8 file transfer: the broker relays and enforces credit ------------------------------------------------------
class Transfer:
    """A sender and a receiver, both registered, and one ``xfer`` between them."""

    def __init__(self, net: Net) -> None:
        self.receiver, self.sender = net.client(uid("recv")), net.client(uid("send"))
        self.xfer = os.urandom(16)

    def credit(self, next_: int, upto: int, restart: bool = True) -> None:
        self.receiver.relay("file_credit", self.sender.user, xfer=self.xfer, next=next_, upto=upto, restart=restart)
        self.sender.expect("file_credit", xfer=self.xfer, next=next_, upto=upto)

    def chunk(self, index: int, data: bytes = b"sealed chunk") -> bytes:
        # §8: a transfer frame's id is the xfer's first 10 bytes and 6 random ones
        return self.sender.relay("file_chunk", self.receiver.user, data, self.xfer[:10] + os.urandom(6),
                                 xfer=self.xfer, index=index, final=False)

    def relayed(self, index: int) -> None:
        self.chunk(index, b"payload %d" % index)
        assert self.receiver.expect("file_chunk", index=index, xfer=self.xfer)
        assert self.receiver.payload == b"payload %d" % index

    def refused(self, index: int) -> None:
        msg_id = self.chunk(index)
        self.sender.expect_error("credit_exceeded", msg_id)


def test_s8_offer_is_acked_stored_and_delivered_unchanged(net):
    t = Transfer(net)
    offer = header("file_offer", t.xfer[:10] + os.urandom(6), sender=t.sender.user, to=t.receiver.user, xfer=t.xfer,
                   size=10, chunk_size=4, body=b"\x01" + os.urandom(60))
    t.sender.send(packed(offer))
    t.sender.expect("ack", ref=offer["id"], status="stored")
    assert t.receiver.raw_next() == [packed(offer)]


def test_s8_chunk_without_a_credit_gets_credit_exceeded_with_ref(net):
    t = Transfer(net)
    t.refused(0)
    t.receiver.quiet()


def test_s8_chunks_inside_the_credit_are_relayed_with_their_payload_and_others_refused(net):
    t = Transfer(net)
    t.credit(0, 2)
    t.relayed(0)
    t.relayed(1)
    t.refused(2)  # index >= upto
    t.receiver.quiet()


def test_s8_credit_exceeded_is_said_once_per_run_of_refused_chunks(net):
    t = Transfer(net)
    t.refused(5)
    t.chunk(6)
    t.chunk(7)
    t.sender.quiet()  # refused too, silently
    t.credit(0, 1)
    t.relayed(0)
    t.refused(1)  # the first after a relayed chunk is said again


def test_s8_upto_is_clamped_to_next_plus_64(net):
    t = Transfer(net)
    t.credit(0, 1000)
    t.relayed(63)
    t.refused(64)


def test_s8_a_credit_with_a_higher_next_moves_the_window(net):
    t = Transfer(net)
    t.credit(0, 4)
    t.relayed(0)
    t.credit(3, 5, restart=False)
    t.refused(2)  # below next
    t.relayed(4)


def test_s8_file_done_and_file_cancel_close_the_window(net):
    for t_end, fields in (("file_done", {}), ("file_cancel", dict(code="cancelled", message="no"))):
        t = Transfer(net)
        t.credit(0, 4)
        t.receiver.relay(t_end, t.sender.user, xfer=t.xfer, **fields)
        t.sender.expect(t_end, xfer=t.xfer)
        t.refused(0)


# --- §10.1 the key service -----------------------------------------------------------------------------------------
def test_s10_1_key_gets_one_line_with_the_brokers_key_in_lowercase_hex(broker):
    lines = key_service(broker, b"KEY\nKEY\n", 2)  # answered, and the connection stays open
    assert len(lines[0]) == 69 and lines[1] == lines[0], lines
    word, key = lines[0][:-1].split(b" ")
    assert word == b"KEY" and key == key.lower() and len(bytes.fromhex(key.decode())) == 32


def test_s10_1_key_is_the_curve_server_key_of_the_router(net):
    keys = Keys()
    net.admit("keyed", keys)
    sock = net.socket(zmq.DEALER, keys, server_key=Keys().raw)  # any other key fails the handshake
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
    sock.connect(f"tcp://127.0.0.1:{net.broker.port}")
    assert monitor.poll(TIMEOUT * 1000)
    assert recv_monitor_message(monitor)["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED
    sock.disable_monitor()
    monitor.close(0)


def test_s10_1_admit_gets_ok_and_lets_the_key_register(net):
    user, keys = uid("new"), Keys()
    lines = key_service(net.broker, f"ADMIT {user} {keys.raw.hex()}\nKEY\n".encode(), 2)
    assert lines[0] == b"OK\n" and lines[1].startswith(b"KEY "), lines
    net.dealer(keys=keys, admit=False).register(user)
    assert key_service(net.broker, f"ADMIT {user} {keys.raw.hex()}\n".encode(), 1) == [b"OK\n"]  # bound: at once


def test_s10_1_admit_for_an_id_bound_to_another_key_gets_err_id_taken_and_stays_open(net):
    owner = net.client()
    lines = key_service(net.broker, f"ADMIT {owner.user} {Keys().raw.hex()}\nKEY\n".encode(), 2)
    assert lines[0].startswith(b"ERR id_taken ") and lines[1].startswith(b"KEY "), lines


@pytest.mark.parametrize("line", [b"key\n", b"KEY \n", b"KEY\r\n", b" KEY\n", b"KEY  x\n", b"ADMIT\n",
                                  b"ADMIT bad! " + b"a" * 64 + b"\n", b"ADMIT ok " + b"A" * 64 + b"\n",
                                  b"ADMIT ok " + b"a" * 63 + b"\n", b"ADMIT ok " + b"g" * 64 + b"\n",
                                  b"ADMIT ok  " + b"a" * 64 + b"\n", "KEY\u00e9\n".encode()])
def test_s10_1_malformed_request_gets_err_bad_frame_and_the_connection_closes(broker, line):
    lines = key_service(broker, line + b"KEY\n")  # the KEY after it is never answered
    assert len(lines) == 1 and lines[0].startswith(b"ERR bad_frame "), lines


def test_s10_1_line_over_1024_bytes_gets_err_too_large_and_the_connection_closes(broker):
    lines = key_service(broker, b"KEY\n" + b"A" * 1023 + b"\n")  # 1024 bytes with its newline: only malformed
    assert lines[0].startswith(b"KEY ") and lines[1].startswith(b"ERR bad_frame "), lines
    lines = key_service(broker, b"A" * 1024)  # no newline within 1024 bytes (nothing unread: no TCP reset)
    assert len(lines) == 1 and lines[0].startswith(b"ERR too_large "), lines


def test_s10_1_every_err_line_fits_256_bytes(broker):
    lines = key_service(broker, b"ADMIT " + b"x" * 180 + b" " + b"a" * 64 + b"\n")  # the reply quotes the ID
    assert len(lines) == 1 and lines[0].startswith(b"ERR bad_frame "), lines
    assert lines[0].endswith(b"\n") and len(lines[0]) <= 256, lines


def test_s10_1_the_connection_closes_after_its_fourth_answer(broker):
    assert key_service(broker, b"KEY\n" * 5) == key_service(broker, b"KEY\n", 1) * 4


def test_s10_1_too_many_admits_from_one_address_get_err_rate_limited(tmp_path):
    broker = BrokerProcess.launch(tmp_path / "b", ["--admit-rate", "0.001", "--admit-burst", "1"])
    try:
        requests = b"".join(f"ADMIT {uid('r')} {Keys().raw.hex()}\n".encode() for _ in range(2))
        lines = key_service(broker, requests, 2)
        assert lines[0] == b"OK\n" and lines[1].startswith(b"ERR rate_limited "), lines
    finally:
        broker.stop()


def test_s10_1_admit_beyond_10000_pending_tickets_gets_err_admission_full(tmp_path):
    broker = BrokerProcess.launch(tmp_path / "b", OPEN_ADMISSIONS)
    try:
        for _ in range(2500):  # four requests per connection: 10,000 tickets
            requests = b"".join(b"ADMIT t %s\n" % os.urandom(32).hex().encode() for _ in range(4))
            assert key_service(broker, requests, 4) == [b"OK\n"] * 4
        lines = key_service(broker, b"ADMIT t %s\n" % os.urandom(32).hex().encode(), 1)
        assert lines[0].startswith(b"ERR admission_full "), lines
    finally:
        broker.stop()


# --- §10.2 recovery: a binding moved by the proof of its recovery key ---------------------------------------------------
class Recovery:
    """An Ed25519 recovery key (§10.2: any will do on the wire; a client derives its own from a phrase)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def proof(self, broker_key: bytes, user: str, generation: int, new_key: bytes) -> bytes:
        """The signature over §10.2's statement, built from its text."""
        statement = (b"p2pchat recover v1" + b"\x00" + broker_key + user.encode() + b"\x00"
                     + generation.to_bytes(8, "big") + new_key)
        return self.private.sign(statement)


def recover_line(user: str, new_key: bytes, proof: bytes) -> bytes:
    return f"RECOVER {user} {new_key.hex()} {proof.hex()}\n".encode()


def recoverable(net: Net) -> tuple[Dealer, Recovery]:
    """A user registered with a recovery key, online."""
    recovery, user = Recovery(), uid("rec")
    dealer = net.dealer(user)
    dealer.register(user, recovery=recovery.raw)
    return dealer, recovery


def test_s10_2_recovery_gets_the_generation_of_a_binding_with_a_recovery_key(net):
    owner, _ = recoverable(net)
    assert key_service(net.broker, f"RECOVERY {owner.user}\n".encode(), 1) == [b"RECOVERY 0\n"]


def test_s10_2_recovery_of_an_unbound_id_or_one_without_a_recovery_key_gets_err_recovery_refused(net):
    legacy = net.client()  # registered without a recovery key
    lines = key_service(net.broker, f"RECOVERY {uid('free')}\nRECOVERY {legacy.user}\n".encode(), 2)
    assert all(line.startswith(b"ERR recovery_refused ") for line in lines), lines


def test_s10_2_recover_moves_the_id_signs_the_old_key_out_and_tells_the_others(net):
    owner, recovery = recoverable(net)
    contact = net.client()
    new = Keys()
    lines = key_service(net.broker, recover_line(owner.user, new.raw, recovery.proof(net.server_key, owner.user, 0,
                                                                                    new.raw)), 1)
    assert lines == [b"OK\n"]
    owner.expect_error("session_replaced", None)
    owner.request("heartbeat")
    owner.expect("error", code="not_registered")
    told = contact.expect("key_changed", user=owner.user, key=new.raw, how="recovered")
    assert set(told) == {"v", "t", "id", "ts", "user", "key", "how"}
    assert key_service(net.broker, f"ADMIT {owner.user} {owner.keys.raw.hex()}\n".encode(), 1)[0].startswith(
        b"ERR id_taken ")
    net.dealer(keys=new, admit=False).register(owner.user)  # bound: admitted without a ticket
    assert key_service(net.broker, f"RECOVERY {owner.user}\n".encode(), 1) == [b"RECOVERY 1\n"]


def test_s10_2_a_proof_is_good_once_and_cannot_move_the_id_back(net):
    owner, recovery = recoverable(net)
    first, second = Keys(), Keys()
    replayed = recover_line(owner.user, first.raw, recovery.proof(net.server_key, owner.user, 0, first.raw))
    assert key_service(net.broker, replayed, 1) == [b"OK\n"]
    moved_on = recover_line(owner.user, second.raw, recovery.proof(net.server_key, owner.user, 1, second.raw))
    assert key_service(net.broker, moved_on + replayed, 2)[1].startswith(b"ERR recovery_refused ")
    assert key_service(net.broker, f"ADMIT {owner.user} {second.raw.hex()}\n".encode(), 1) == [b"OK\n"]


def test_s10_2_recover_with_a_proof_for_another_key_broker_or_id_gets_err_recovery_refused(net):
    owner, recovery = recoverable(net)
    new, other = Keys(), Keys()
    wrong = [recovery.proof(net.server_key, owner.user, 0, other.raw),  # signed for another key
             recovery.proof(Keys().raw, owner.user, 0, new.raw),  # for another broker
             recovery.proof(net.server_key, uid("else"), 0, new.raw),  # for another ID
             Recovery().proof(net.server_key, owner.user, 0, new.raw)]  # by another recovery key
    lines = key_service(net.broker, b"".join(recover_line(owner.user, new.raw, proof) for proof in wrong), 4)
    assert all(line.startswith(b"ERR recovery_refused ") for line in lines), lines
    owner.quiet()  # still signed in


def test_s10_2_a_register_cannot_replace_the_recovery_key_of_a_binding(net):
    owner, recovery = recoverable(net)
    owner.register(owner.user, recovery=Recovery().raw)  # the same key again, another recovery key: ignored
    new = Keys()
    assert key_service(net.broker, recover_line(owner.user, new.raw, recovery.proof(net.server_key, owner.user, 0,
                                                                                    new.raw)), 1) == [b"OK\n"]


def test_s10_2_recover_attempts_per_id_are_bounded_whatever_the_proof(net):
    owner, recovery = recoverable(net)
    new = Keys()
    junk = recover_line(owner.user, new.raw, bytes(64))
    replies = [key_service(net.broker, junk * 3, 3) for _ in range(2)]  # six attempts
    assert [line[:21] for line in replies[0] + replies[1][:2]] == [b"ERR recovery_refused "] * 5
    assert replies[1][2].startswith(b"ERR rate_limited ")
    good = recover_line(owner.user, new.raw, recovery.proof(net.server_key, owner.user, 0, new.raw))
    assert key_service(net.broker, good, 1)[0].startswith(b"ERR rate_limited ")


@pytest.mark.parametrize("line", [b"RECOVERY\n", b"RECOVERY a b\n", b"RECOVER a " + b"a" * 64 + b"\n",
                                  b"RECOVER a " + b"a" * 64 + b" " + b"a" * 127 + b"\n",
                                  b"RECOVER a " + b"a" * 64 + b" " + b"A" * 128 + b"\n",
                                  b"RECOVER bad! " + b"a" * 64 + b" " + b"a" * 128 + b"\n"])
def test_s10_2_malformed_recovery_lines_get_err_bad_frame_and_the_connection_closes(broker, line):
    lines = key_service(broker, line + b"KEY\n")
    assert len(lines) == 1 and lines[0].startswith(b"ERR bad_frame "), lines


def test_s10_2_a_longest_recover_line_fits_256_bytes():
    assert len(recover_line("u" * 32, bytes(32), bytes(64))) <= 256


def test_s5_1_a_register_with_a_recovery_key_hears_id_online_when_the_id_is_online_elsewhere(net):
    keys, recovery = Keys(), Recovery()
    first = net.dealer(uid("twice"), keys)
    user = uid("twice")
    first.register(user, recovery=recovery.raw)
    second = net.dealer(keys=keys, admit=False)
    msg_id = second.request("register", user=user, token=os.urandom(32), key=keys.raw, recovery=recovery.raw)
    second.expect_error("id_online", msg_id)


# --- §10.5 abuse limits ------------------------------------------------------------------------------------------------
def test_s10_5_frames_over_the_rate_are_dropped_and_told_rate_limited_without_ref(tmp_path):
    broker = BrokerProcess.launch(tmp_path / "b", OPEN_ADMISSIONS + ["--rate-limit", "5"])
    net = Net(broker)
    try:
        dealer = net.client()
        for _ in range(40):
            dealer.request("heartbeat")
        replies = []
        while dealer.sock.poll(int(HEARTBEAT * 1000)):
            replies.append(dealer.next())
        kinds = [h["t"] for h in replies]
        assert kinds.count("error") == 1 and kinds.count("heartbeat") < 39, kinds  # one answer per 10 s of drops
        for h in replies:
            if h["t"] == "error":
                assert h["code"] == "rate_limited" and "ref" not in h, h
    finally:
        net.close()
        broker.stop()


# --- §11 delivery guarantees -----------------------------------------------------------------------------------------
def offline_user(net: Net) -> Dealer:
    """A user whose ID is bound and who is offline; returns its (closed-session) connection."""
    dealer = net.client(uid("away"))
    dealer.request("unregister")
    return dealer


def test_s11_durable_frames_to_an_offline_user_are_acked_stored_and_delivered_in_order_on_register(net):
    bob = offline_user(net)
    alice = net.client()
    sent = []
    for i in range(3):
        h = header("message", sender=alice.user, to=bob.user, body=b"m%d" % i)
        alice.send(packed(h))
        alice.expect("ack", ref=h["id"], status="stored")
        sent.append([packed(h)])
    receipt = header("receipt", sender=alice.user, to=bob.user, ref=os.urandom(16), status="read")
    alice.send(packed(receipt))
    alice.quiet()  # a receipt is never acknowledged
    back = net.dealer(keys=bob.keys, admit=False)
    back.register(bob.user)
    assert [back.raw_next() for _ in range(4)] == sent + [[packed(receipt)]]  # oldest first, unchanged


def test_s11_a_queued_frame_stays_until_consumed(net):
    bob = offline_user(net)
    alice = net.client()
    kept, gone = (header("message", sender=alice.user, to=bob.user, body=b) for b in (b"kept", b"gone"))
    for h in (kept, gone):
        alice.send(packed(h))
        alice.expect("ack", ref=h["id"], status="stored")
    session = net.dealer(keys=bob.keys, admit=False)
    session.register(bob.user)
    assert [session.next()["id"] for _ in range(2)] == [kept["id"], gone["id"]]
    session.request("consume", ref=gone["id"])
    session.request("unregister")
    again = net.dealer(keys=bob.keys, admit=False)
    again.register(bob.user)
    assert again.next()["id"] == kept["id"]  # not consumed: delivered again, and only it
    again.quiet()


def test_s11_one_consume_releases_ref_and_every_id_of_refs(net):
    bob = offline_user(net)
    alice = net.client()
    sent = [header("message", sender=alice.user, to=bob.user, body=b"%d" % i) for i in range(5)]
    for h in sent:
        alice.send(packed(h))
        alice.expect("ack", ref=h["id"], status="stored")
    session = net.dealer(keys=bob.keys, admit=False)
    session.register(bob.user)
    assert [session.next()["id"] for _ in sent] == [h["id"] for h in sent]
    unknown = os.urandom(16)  # ignored, like a single consume of it
    session.request("consume", ref=sent[0]["id"], refs=[sent[1]["id"], unknown, sent[3]["id"], sent[1]["id"]])
    session.quiet()  # no reply
    session.request("unregister")
    again = net.dealer(keys=bob.keys, admit=False)
    again.register(bob.user)
    assert [again.next()["id"] for _ in range(2)] == [sent[2]["id"], sent[4]["id"]]  # only those stayed
    again.quiet()


@pytest.mark.parametrize("refs", [[], [b"short"], [ID] * 256], ids=["empty", "not_a_msg_id", "over_the_limit"])
def test_s2_a_consume_with_a_bad_refs_list_is_refused_whole(net, refs):
    bob = offline_user(net)
    alice = net.client()
    h = header("message", sender=alice.user, to=bob.user, body=b"kept")
    alice.send(packed(h))
    alice.expect("ack", ref=h["id"], status="stored")
    session = net.dealer(keys=bob.keys, admit=False)
    session.register(bob.user)
    assert session.next()["id"] == h["id"]
    msg_id = session.request("consume", ref=h["id"], refs=refs)
    session.expect_error("bad_frame", msg_id)
    session.request("unregister")
    again = net.dealer(keys=bob.keys, admit=False)
    again.register(bob.user)
    assert again.next()["id"] == h["id"]  # the bad consume released nothing
    again.quiet()


def test_s11_queue_full_for_a_senders_share_and_for_the_recipient(tight_net):
    bob = offline_user(tight_net)
    alice, carol = tight_net.client(), tight_net.client()
    for _ in range(2):  # --queue-sender-max 2
        msg_id = alice.relay("message", bob.user, body=b"x")
        alice.expect("ack", ref=msg_id, status="stored")
    msg_id = alice.relay("message", bob.user, body=b"x")
    alice.expect_error("queue_full", msg_id)
    msg_id = carol.relay("message", bob.user, body=b"x")
    carol.expect("ack", ref=msg_id, status="stored")
    msg_id = carol.relay("receipt", bob.user, ref=os.urandom(16), status="read")  # --queue-max 3
    carol.expect_error("queue_full", msg_id)


def test_s11_durable_frame_the_store_cannot_take_gets_storage_full(small_disk, tmp_path):
    from tests.broker.test_limits import fill

    broker = BrokerProcess.launch(tmp_path / "b", OPEN_ADMISSIONS + ["--data-dir", str(small_disk / "broker")])
    net = Net(broker)
    try:
        bob = offline_user(net)
        alice = net.client()
        fill(small_disk)
        for i in range(500):  # the WAL may hold a few pages: write until the disk says no
            msg_id = alice.relay("message", bob.user, body=b"%04d" % i + b"x" * 4000)
            h = alice.next()
            if h["t"] == "error":
                assert (h["code"], h["ref"]) == ("storage_full", msg_id), h
                break
            assert (h["t"], h["ref"]) == ("ack", msg_id), h
        else:
            raise AssertionError("a full disk never refused a frame")
    finally:
        net.close()
        broker.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_s6_1_shared_store_unreachable_gets_storage_unavailable(tmp_path):
    from tests.broker.test_cluster import RedisProcess

    redis_server = RedisProcess(tmp_path / "redis").start()
    broker = BrokerProcess.launch(tmp_path / "b", OPEN_ADMISSIONS + ["--cluster", redis_server.url])
    net = Net(broker)
    try:
        alice = net.client()
        redis_server.stop()
        msg_id = alice.request("key_req", user=uid("unseen"))  # a key this broker has never seen
        alice.expect_error("storage_unavailable", msg_id)
        lines = key_service(broker, f"ADMIT {uid('new')} {Keys().raw.hex()}\n".encode(), 1)
        assert lines[0].startswith(b"ERR storage_unavailable "), lines
    finally:
        net.close()
        broker.stop()
        redis_server.stop()



# --- registry_full: the broker's core and key service in-process, the same raw bytes -------------------------------
def test_s10_2_register_beyond_the_brokers_bindings_gets_registry_full(tmp_path):
    from p2pchat.broker.backends.sqlite_keys import KeyLimits, SqliteKeyRegistry
    from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink, NoStore
    from p2pchat.broker.core.routing import BrokerCore

    keys = SqliteKeyRegistry(tmp_path / "keys.sqlite", KeyLimits(bound_ids=1))
    core = BrokerCore(LocalDirectory(b"epoch"), broker_id=b"b", heartbeat_ivl=HEARTBEAT, liveness=LIVENESS,
                      wall_ms=lambda: 0, new_id=lambda: bytes(16), keys=keys, store=NoStore(), link=LocalLink(),
                      require_key=False)
    try:
        replies = []
        for conn, user in ((b"c1", "first"), (b"c2", "second")):
            h = header("register", user=user, token=b"t", key=Keys().raw)
            (send,) = core.on_frames(conn, [packed(h)], 0.0)[:1]
            replies.append((check_broker_frame(list(send.frames)), h["id"]))
        assert replies[0][0]["t"] == "registered"
        (refusal, msg_id) = replies[1]
        assert (refusal["t"], refusal["code"], refusal["ref"]) == ("error", "registry_full", msg_id)
    finally:
        keys.close()


def test_s10_1_admit_beyond_the_brokers_bindings_gets_err_registry_full(tmp_path):
    from p2pchat.broker.backends.sqlite_keys import KeyLimits, SqliteKeyRegistry
    from p2pchat.broker.shell.keyservice import KeyServiceConnection, KeyServiceCore

    keys = SqliteKeyRegistry(tmp_path / "keys.sqlite", KeyLimits(bound_ids=1))
    try:
        assert keys.bind("first", Keys().raw) is None
        service = KeyServiceCore(Keys().raw, keys)
        reply, closed = KeyServiceConnection("127.0.0.1", 0.0).receive(
            f"ADMIT second {Keys().raw.hex()}\n".encode(), service, 0.0)
        assert reply.startswith(b"ERR registry_full ") and reply.endswith(b"\n") and not closed, reply
    finally:
        keys.close()


# --- §5.5 sessions per device, seen by a client that knows no devices: the core in-process over a registry that
# holds two devices of one ID (linking is not on the wire yet) ---------------------------------------------------
def test_s5_5_an_old_client_sees_an_id_with_two_devices_online_as_one_user_with_version_1_frames():
    from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink, NoStore
    from p2pchat.broker.core.routing import BrokerCore
    from tests.cores import KeyBook

    keys, alice, desktop, laptop = KeyBook(), Keys(), Keys(), Keys()
    core = BrokerCore(LocalDirectory(b"epoch"), broker_id=b"b", heartbeat_ivl=HEARTBEAT, liveness=LIVENESS,
                      wall_ms=lambda: 0, new_id=lambda: os.urandom(16), keys=keys, store=NoStore(), link=LocalLink(),
                      require_key=False)
    published: list[dict] = []

    def send(conn: bytes, h: dict) -> list[dict]:
        replies = []
        for action in core.on_frames(conn, [packed(h)], 0.0):
            frame = check_broker_frame([bytes(f) for f in action.frames])
            (replies if getattr(action, "conn", None) == conn else published).append(frame)
        return replies

    assert send(b"a", header("register", user="alice", token=b"a", key=alice.raw))[0]["t"] == "registered"
    assert send(b"d", header("register", user="bob", token=b"d", key=desktop.raw))[0]["t"] == "registered"
    keys.add_device("bob", laptop.raw)
    registered = send(b"l", header("register", user="bob", token=b"l", key=laptop.raw))
    assert [set(r) for r in registered] == [{"v", "t", "id", "ts", "user", "epoch", "heartbeat_ms"}]  # §5.1's only
    [snapshot] = send(b"a", header("snapshot_req"))
    assert sorted(snapshot["peers"]) == ["alice", "bob"] and snapshot["seq"] == 2
    send(b"d", header("unregister"))
    assert [(p["user"], p["online"]) for p in published if p["t"] == "peer_update"] == [("alice", True), ("bob", True)]
    send(b"l", header("unregister"))
    assert [(p["user"], p["online"]) for p in published if p["t"] == "peer_update"][2:] == [("bob", False)]


# --- §10.3 fingerprints ---------------------------------------------------------------------------------------------
def test_s10_3_the_broker_logs_its_fingerprint_in_the_canonical_form(broker):
    logged = f"broker key fingerprint {fingerprint(broker_key(broker))} "
    assert any(logged in line for line in broker.lines), broker.lines[:5]


@pytest.mark.parametrize("spelling", [str.upper, lambda fp: fp.replace(" ", ""), lambda fp: fp.replace(" ", "\t  ")])
def test_s10_3_a_pinned_fingerprint_is_accepted_in_either_case_and_any_spacing(broker, make_client, spelling):
    key = broker_key(broker)
    client = make_client(uid("pin"), server_key=spelling(fingerprint(key)))
    assert client.broker_key == key


# --- §8, §10.4, §11 at a client: the test is the peer, with raw frames; a ChatClient is the one under test ---------
def seal(keys: Keys, peer_key: bytes, h: dict, plaintext: bytes) -> bytes:
    """§10.4, from its text: X25519, HKDF-SHA256 salted by the id, AES-256-GCM under a zero nonce."""
    shared = X25519PrivateKey.from_private_bytes(z85.decode(keys.secret)).exchange(
        X25519PublicKey.from_public_bytes(peer_key))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=h["id"], info=b"p2pchat v1 message").derive(shared)
    aad = b"\0".join((h["from"].encode("ascii"), h["to"].encode("ascii"), h["id"], h["ts"].to_bytes(8, "big")))
    return b"\x01" + keys.raw + AESGCM(k).encrypt(bytes(12), plaintext, aad)


def seal_chunk(file_key: bytes, xfer: bytes, index: int, final: bool, data: bytes) -> bytes:
    nonce = index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
    return AESGCM(file_key).encrypt(nonce, data, b"p2pchat v1 file" + xfer)


@pytest.fixture
def peer_of(net, make_client, tmp_path):
    """(raw peer, ChatClient under test): the raw peer knows the client's key from ``key_info``."""
    def make():
        client = make_client(uid("sut"), received_dir=tmp_path / "received")
        raw = net.client(uid("raw"))
        raw.request("key_req", user=client.user)
        raw.peer_key = raw.expect("key_info", user=client.user)["key"]
        return raw, client
    return make


def offer(raw: Dealer, to: str, size: int, chunk_size: int, meta: dict | bytes) -> tuple[dict, bytes]:
    xfer = os.urandom(16)
    h = header("file_offer", xfer[:10] + os.urandom(6), sender=raw.user, to=to, xfer=xfer, size=size,
               chunk_size=chunk_size, body=b"")
    plain = meta if type(meta) is bytes else packed(meta)
    h["body"] = seal(raw.keys, raw.peer_key, h, plain) if type(meta) is dict else plain
    raw.send(packed(h))
    raw.expect("ack", ref=h["id"], status="stored")
    return h, xfer


def test_s10_4_a_body_sealed_from_the_spec_opens_and_is_receipted_after_it_is_kept(peer_of):
    raw, client = peer_of()
    h = header("message", sender=raw.user, to=client.user, body=b"")
    h["body"] = seal(raw.keys, raw.peer_key, h, "grüße".encode())
    raw.send(packed(h))
    raw.expect("ack", ref=h["id"], status="stored")
    got = wait_for(client, lambda e: isinstance(e, ev.MessageReceived))
    assert (got.sender, got.text, got.msg_id) == (raw.user, "grüße", h["id"])
    receipt = raw.expect("receipt", sender=client.user, ref=h["id"], status="delivered")
    assert len(receipt["id"]) == 16 and receipt["id"] != h["id"]


def test_s10_4_a_body_that_does_not_open_is_refused_and_its_sender_told_with_the_key_to_seal_to(peer_of):
    raw, client = peer_of()
    h = header("message", sender=raw.user, to=client.user, body=b"")
    h["body"] = seal(raw.keys, raw.peer_key, {**h, "ts": h["ts"] + 1}, b"sealed for another ts")
    raw.send(packed(h))
    raw.expect("ack", ref=h["id"], status="stored")
    refused = wait_for(client, lambda e: isinstance(e, ev.ErrorReported))
    assert refused.error.code.value == "integrity"
    receipt = raw.expect("receipt", sender=client.user, ref=h["id"], status="undecryptable")
    assert receipt["key"] == raw.peer_key  # the recipient's own key: what to seal to
    raw.quiet()


def test_s4_a_receipt_undecryptable_with_its_key_is_relayed(relay_net):
    alice, bob = relay_net.client(), relay_net.client()
    key = os.urandom(32)
    alice.relay("receipt", bob.user, ref=os.urandom(16), status="undecryptable", key=key)
    assert bob.expect("receipt", sender=alice.user, status="undecryptable", key=key)


def test_s8_first_credit_restarts_and_a_credit_comes_again_at_half_a_window_outstanding(peer_of, tmp_path):
    raw, client = peer_of()
    file_key, data = os.urandom(32), os.urandom(17)
    h, xfer = offer(raw, client.user, len(data), 1, {"name": "seventeen.bin", "key": file_key, "session": 1})
    first = raw.expect("file_credit", xfer=xfer, next=0, restart=True)
    assert first["upto"] == 32  # next + window (32 chunks): more than the file's 17 chunks (§8: not capped)
    assert first["id"][:10] == xfer[:10]  # the receiver's transfer frames follow the id rule too
    for i in range(16):
        raw.relay("file_chunk", client.user, seal_chunk(file_key, xfer, i, False, data[i:i + 1]),
                  xfer[:10] + os.urandom(6), xfer=xfer, index=i, final=False)
    again = raw.expect("file_credit", xfer=xfer, next=16, restart=False)  # 32 - 16 outstanding: half a window
    assert 16 + 16 <= again["upto"] <= 16 + 32
    raw.relay("file_chunk", client.user, seal_chunk(file_key, xfer, 16, True, data[16:]),
              xfer[:10] + os.urandom(6), xfer=xfer, index=16, final=True)
    raw.expect("file_done", xfer=xfer)
    saved = wait_for(client, lambda e: isinstance(e, ev.FileReceived))
    assert saved.path.read_bytes() == data and saved.name == "seventeen.bin"


def test_s8_a_repeated_offer_is_answered_with_a_credit_that_does_not_restart(peer_of):
    raw, client = peer_of()
    h, xfer = offer(raw, client.user, 8, 1, {"name": "again.bin", "key": os.urandom(32), "session": 1})
    raw.expect("file_credit", xfer=xfer, next=0, restart=True)
    raw.send(packed(h))  # the identical frame, as the sender's stall timer re-sends it
    raw.expect("ack", ref=h["id"], status="stored")
    raw.expect("file_credit", xfer=xfer, next=0, restart=False)


@pytest.mark.parametrize("meta", [
    {"name": "x", "key": b"k" * 32, "session": 1, "extra": 1},  # no other key may be in the map
    {"name": "x", "session": 1},  # sealed, but without a file key
    b"\x81\xa4name\xa1x",  # unsealed (an unencrypted transfer) to a client that seals
], ids=["extra-key", "no-key", "unsealed"])
def test_s8_an_offer_the_receiver_cannot_take_gets_file_cancel_integrity(peer_of, meta):
    raw, client = peer_of()
    h, xfer = offer(raw, client.user, 1, 1, meta)
    raw.expect("file_cancel", xfer=xfer, code="integrity")
