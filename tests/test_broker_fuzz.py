"""Thousands of malformed frames against a live broker: each gets an ERROR, the broker stays up.

Raw DEALER sockets talk to the ``broker`` subprocess. Every malformed frame the
broker can receive must be answered, in order, with an ERROR whose code and ref
are the codec's verdict; after the abuse, alice and bob must still register and chat.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from client import events as ev
from client.broker_trust import admit, fetch_broker_key
from common.errors import ErrorCode, ProtocolError
from common.protocol import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    Envelope,
    Error,
    Heartbeat,
    Register,
    Registered,
    decode,
    encode,
    pack,
)
from tests.conftest import BrokerProcess, wait_for
from tests.test_protocol import (
    ALL_TYPES,
    INVALID,
    any_envelope,
    example_message,
    fields_of,
    header_of,
    msgpack_values,
)

Frames = list[bytes]
BEYOND_MAXMSGSIZE = 4 * 1024 * 1024  # the broker caps frames near 1 MiB; ZeroMQ drops the peer
WRONG_VALUES = [None, True, False, -1, 2**64 - 1, 1.5, "", "x" * 40, ".bad", b"", b"\x00" * 17,
                [], ["alice", 3], {"k": 1}]


# --- sockets that fail instead of hanging, and always close --------------------------
class Dealers:
    """Raw DEALER sockets to the broker, each with its own CURVE keypair unless the broker is --insecure."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.keys: dict[zmq.Socket, bytes] = {}  # each socket's public key, raw 32 bytes
        self.server_key = None if "--insecure" in broker.extra else self._broker_key()

    def open(self) -> zmq.Socket:
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)  # a batch may be queued before the connection is up
        public, secret = zmq.curve_keypair()
        if self.server_key is not None:  # the broker lets in only keys it admitted (§10.1)
            admit(self.broker.address, self.broker.port + 2, f"t{os.urandom(4).hex()}", z85.decode(public), 10.0)
            sock.curve_serverkey = z85.encode(self.server_key)
            sock.curve_publickey, sock.curve_secretkey = public, secret
        self.keys[sock] = z85.decode(public)
        sock.connect(f"tcp://127.0.0.1:{self.broker.port}")
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        return sock

    def _broker_key(self) -> bytes:
        """Ask the key service, as a client does on first use."""
        key = fetch_broker_key(self.broker.address, self.broker.port + 2, 10.0)
        assert key is not None
        return key


@pytest.fixture
def dealers(broker: BrokerProcess) -> Iterator[Dealers]:
    pool = Dealers(broker)
    try:
        yield pool
    finally:
        pool.close()


def recv(sock: zmq.Socket, broker: BrokerProcess, timeout: float = 5.0) -> Frames:
    """The next message on ``sock``; fail fast if the broker died, fail on timeout."""
    for _ in range(int(timeout / 0.05)):
        if sock.poll(50, zmq.POLLIN):
            return sock.recv_multipart()
        if not broker.alive():
            raise AssertionError("broker died:\n" + "".join(broker.lines[-20:]))
    raise AssertionError(f"no reply within {timeout}s")


def verdict(frames: Frames) -> tuple[ErrorCode, bytes | None] | None:
    """The codec's (code, ref) for ``frames``; None if they are a valid message."""
    try:
        decode(frames)
    except ProtocolError as exc:
        return exc.code, exc.ref
    return None


def exchange(sock: zmq.Socket, broker: BrokerProcess, batch: list[Frames], heartbeat: bool = False) -> int:
    """Send malformed ``batch``; check one ERROR per message, in order, with the codec's code and ref."""
    batch = [f for f in batch if verdict(f) is not None]
    if heartbeat:  # a registered sender: garbage must not cost it the session
        sock.send_multipart(pack(Heartbeat(), 0))
    for frames in batch:
        sock.send_multipart(frames)
    if heartbeat:
        assert type(decode(recv(sock, broker)).message) is Heartbeat
    for i, frames in enumerate(batch):
        reply = decode(recv(sock, broker)).message
        assert type(reply) is Error, (i, frames, reply)
        assert (reply.code, reply.ref) == verdict(frames), (i, frames, reply)
    return len(batch)


def register(dealers: Dealers, sock: zmq.Socket, user: str) -> None:
    register_msg = example_message(Register, user=user, token=b"fuzz-token-" + user.encode(), key=dealers.keys[sock])
    sock.send_multipart(pack(register_msg, 0))
    broker = dealers.broker
    reply = decode(recv(sock, broker)).message
    assert type(reply) is Registered and reply.user == user, reply


def assert_broker_still_serves(broker: BrokerProcess, make_client) -> None:
    assert broker.alive()
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "still standing?")
    event = wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert (event.sender, event.text) == ("alice", "still standing?")


# --- generators of malformed messages ------------------------------------------------------
def random_bytes(rng: random.Random, count: int) -> list[Frames]:
    return [[rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 300, 2000]))] for _ in range(count)]


def field_mutations() -> Iterator[Frames]:
    """For every message type: each key dropped, each key given each wrong value, one unknown key."""
    for cls in ALL_TYPES:
        env = Envelope(b"i" * 16, 0, example_message(cls), b"p" if cls.HAS_PAYLOAD else None)
        valid = header_of(env)
        tail = [env.payload] if cls.HAS_PAYLOAD else []
        for key in valid:
            yield [msgpack.packb({k: v for k, v in valid.items() if k != key}), *tail]
            for value in WRONG_VALUES:
                yield [msgpack.packb({**valid, key: value}), *tail]
        for extra in ("extra", "From", b"to", "payload"):
            yield [msgpack.packb({**valid, extra: 1}), *tail]


@st.composite
def near_valid(draw) -> Frames:
    """A valid message with one thing wrong: a key gone, a bad value, an extra key, bad frames."""
    env = draw(any_envelope)
    header = header_of(env)
    frames_after = [env.payload] if env.payload is not None else []
    how = draw(st.sampled_from(["drop", "retype", "extra", "frames"]))
    if how == "drop":
        del header[draw(st.sampled_from(sorted(header)))]
    elif how == "retype":
        fields = fields_of(type(env.message))
        if fields:
            _, wire, kind, _ = draw(st.sampled_from(fields))
            header[wire] = draw(INVALID[kind])
        else:
            header["id"] = draw(INVALID["MsgId"])
    elif how == "extra":
        header[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in header))] = draw(msgpack_values)
    else:
        frames_after = draw(st.lists(st.binary(max_size=32), min_size=1, max_size=6).filter(
            lambda extra: len(extra) + 1 != (2 if env.payload is not None else 1)))
    return [msgpack.packb(header, use_bin_type=True), *frames_after]


garbage = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),
    msgpack_values.map(lambda v: [msgpack.packb(v, use_bin_type=True)]),
    near_valid(),
)


# --- the tests --------------------------------------------------------------------------------
def test_broker_answers_random_bytes_with_errors(broker, dealers, make_client):
    rng = random.Random(20240601)
    sock = dealers.open()
    sent = sum(exchange(sock, broker, random_bytes(rng, 250)) for _ in range(4))
    assert sent >= 990  # a random frame is (almost) never a valid message
    assert_broker_still_serves(broker, make_client)


def test_broker_answers_hypothesis_garbage_with_errors(broker, dealers, make_client):
    sock = dealers.open()
    sent = []

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(garbage, min_size=40, max_size=40))
    def batch_is_answered(batch):
        sent.append(exchange(sock, broker, batch))

    batch_is_answered()
    assert sum(sent) >= 800
    assert_broker_still_serves(broker, make_client)


def test_registered_sender_gets_errors_for_wrong_types_missing_and_unknown_fields(broker, dealers, make_client):
    sock = dealers.open()
    register(dealers, sock, "mallory")
    batch = list(field_mutations())
    sent = sum(exchange(sock, broker, batch[i:i + 200], heartbeat=True) for i in range(0, len(batch), 200))
    assert sent >= 1000
    assert_broker_still_serves(broker, make_client)


def test_broker_answers_bad_frame_counts_and_stray_payloads(broker, dealers, make_client):
    sock = dealers.open()
    heartbeat = pack(Heartbeat(), 0)[0]
    batch: list[Frames] = [[heartbeat] * n for n in range(3, 65)]
    batch += [[*encode(Envelope(b"i" * 16, 0, example_message(cls))), b"stray"]
              for cls in ALL_TYPES if not cls.HAS_PAYLOAD]
    batch += [encode(Envelope(b"i" * 16, 0, example_message(cls)))[:1] for cls in ALL_TYPES if cls.HAS_PAYLOAD]
    batch.append([b""])
    big = b"\x00" * (MAX_HEADER_BYTES // 2 + 1)
    batch.append([heartbeat, big, big, big])  # each frame under MAXMSGSIZE, the total far over it
    assert exchange(sock, broker, batch) == len(batch)
    assert_broker_still_serves(broker, make_client)


def test_oversized_but_receivable_frames_get_too_large(broker, dealers, make_client):
    sock = dealers.open()
    batch = [[b"\x80" * (MAX_HEADER_BYTES + 1)]]
    for cls in ALL_TYPES:
        if cls.HAS_PAYLOAD:
            header = encode(Envelope(b"i" * 16, 0, example_message(cls)))[0]
            batch.append([header, b"p" * (MAX_PAYLOAD_BYTES + 1)])
    assert [verdict(frames)[0] for frames in batch] == [ErrorCode.TOO_LARGE] * len(batch)
    assert exchange(sock, broker, batch) == len(batch)
    assert_broker_still_serves(broker, make_client)


def test_frame_beyond_maxmsgsize_disconnects_only_its_sender(broker, dealers, make_client):
    bystander = dealers.open()
    register(dealers, bystander, "bystander")
    abuser = dealers.open()
    monitor = abuser.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        abuser.send_multipart([b"\x80" * BEYOND_MAXMSGSIZE])
        deadline = time.monotonic() + 5
        while not monitor.poll(50):  # the bystander keeps talking (and stays registered) meanwhile
            assert time.monotonic() < deadline, "the broker kept a peer that sent an over-long frame"
            assert exchange(bystander, broker, [[b"\xc1"]], heartbeat=True) == 1
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        abuser.disable_monitor()
        monitor.close(linger=0)
    assert exchange(bystander, broker, [[b"\xc1"]], heartbeat=True) == 1  # still registered, still answered
    assert_broker_still_serves(broker, make_client)


def test_broker_survives_a_map_as_the_message_type(broker, dealers, make_client):
    # Regression: decode() once did MESSAGE_TYPES.get(t) with an unhashable t; the TypeError killed the broker.
    sock = dealers.open()
    sock.send_multipart([msgpack.packb({"v": 1, "t": {}})])
    reply = decode(recv(sock, broker)).message
    assert type(reply) is Error and reply.code is ErrorCode.BAD_FRAME
    assert_broker_still_serves(broker, make_client)


def test_key_service_answers_junk_with_an_error_and_keeps_serving(broker, dealers, make_client):
    if dealers.server_key is None:
        pytest.skip("an --insecure broker has no key service")
    rng = random.Random(7)
    for _ in range(300):
        junk = rng.randbytes(rng.randint(1, 500)).replace(b"\n", b"") + b"\n"
        with socket.create_connection(("127.0.0.1", broker.port + 2), timeout=10.0) as sock:
            sock.sendall(junk)
            reply = sock.makefile("rb").readline()
        assert reply.startswith(b"ERR bad_frame ") or reply.startswith(b"ERR too_large "), reply
    assert fetch_broker_key(broker.address, broker.port + 2, 10.0) == dealers.server_key
    assert_broker_still_serves(broker, make_client)
