"""Malformed frames against a live broker: each gets an ERROR, the broker stays up.

Raw DEALER sockets talk to the ``broker`` subprocess. Every malformed frame the
broker can receive must be answered, in order, with an ERROR whose code and ref
are the codec's verdict; after the abuse, alice and bob must still register and chat.
The last test sends 100,000 hostile frames from one registered CURVE user, valid
frames in the wrong order among them, while bystanders watch what reaches them.

(Over 500 lines: hostile frames against one broker process, sharing its raw-connection helpers.)
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from p2pchat.client import events as ev
from p2pchat.client.broker_trust import admit, fetch_broker_key
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_INT, MAX_PAYLOAD_BYTES, MAX_PEERS, MAX_TEXT_CHARS, USER_ID_MAX, Ack, AckStatus, ChatMessage, Consume, Envelope, Error, FileCancel, FileChunk, FileCredit, FileDone, FileOffer, Heartbeat, KeyInfo, KeyRequest, Message, PeerSync, PeerUpdate, Receipt, ReceiptStatus, Register, Registered, Snapshot, SnapshotRequest, Unregister, decode, encode, new_msg_id, pack
from tests.conftest import BrokerProcess, wait_for
from tests.common.test_protocol import (
    ALL_TYPES,
    EXAMPLE,
    INVALID,
    any_envelope,
    example_message,
    fields_of,
    header_of,
    msgpack_values,
)

Frames = list[bytes]
BEYOND_MAXMSGSIZE = 4 * 1024 * 1024  # the broker caps frames near 1 MiB; ZeroMQ drops the peer
# A value of every kind the codec knows (each valid somewhere, so wrong almost everywhere), plus values valid nowhere:
# out-of-range integers, floats, over-long strings and bytes, containers, an ExtType, keys msgpack refuses.
TYPE_CONFUSED = [*dict.fromkeys(EXAMPLE.values()), "relayed", "delivered", "bad_frame",
                 None, True, False, 0, -1, -(2**63), MAX_INT + 1, 2**64 - 1, 1.5, float("nan"), float("-inf"),
                 "", "x" * (USER_ID_MAX + 1), ".bad", "al ice", "é" * (MAX_TEXT_CHARS + 1),
                 b"", b"\x00" * 15, b"\x00" * 17, b"k" * 31, b"k" * 33, b"t" * 65, b"b" * (MAX_BODY_BYTES + 1),
                 [], ["alice", 3], [b"x"] * 3, [[[[]]]], {}, {"k": 1}, {1: 2}, msgpack.ExtType(1, b"x")]


# --- sockets that fail instead of hanging, and always close --------------------------
class Dealers:
    """Raw DEALER sockets to the broker, each with its own CURVE keypair unless the broker is --insecure."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.keys: dict[zmq.Socket, bytes] = {}  # each socket's public key, raw 32 bytes
        self.server_key = None if "--insecure" in broker.extra else self._broker_key()

    def open(self, keypair: tuple[bytes, bytes] | None = None) -> zmq.Socket:
        """A CURVE DEALER to the ROUTER (``keypair``: z85 public and secret, fresh if None), not registered."""
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)  # a batch may be queued before the connection is up
        sock.setsockopt(zmq.RCVHWM, 0)  # the broker must never see us at a high-water mark: we count every reply
        public, secret = keypair or zmq.curve_keypair()
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


def register_frames(user: str, key: bytes) -> Frames:
    return pack(Register(user, b"fuzz-token-" + user.encode(), key), 0)


def register(dealers: Dealers, sock: zmq.Socket, user: str) -> None:
    """Register an open connection as ``user`` and wait for the broker's answer."""
    sock.send_multipart(register_frames(user, dealers.keys[sock]))
    reply = decode(recv(sock, dealers.broker)).message
    assert type(reply) is Registered and reply.user == user, reply


def connect_as(dealers: Dealers, user: str, keypair: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    """An authenticated connection registered as ``user``: the one place tests get one (admission goes here)."""
    sock = dealers.open(keypair)
    register(dealers, sock, user)
    return sock


def assert_broker_still_serves(broker: BrokerProcess, make_client) -> None:
    assert broker.alive()
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "still standing?")
    event = wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert (event.sender, event.text) == ("alice", "still standing?")


# --- generators of malformed messages ------------------------------------------------------
def random_bytes(rng: random.Random, count: int) -> list[Frames]:
    return [[rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 300, 2000]))] for _ in range(count)]


def type_confusions() -> Iterator[Frames]:
    """For every message type in MESSAGE_TYPES and every key of its header (``v``, ``t``, ``id``, ``ts`` and each
    field spec): the key dropped, the key given each wrong value, and unknown keys added."""
    for cls in ALL_TYPES:
        env = Envelope(b"i" * 16, 0, example_message(cls), b"p" if cls.HAS_PAYLOAD else None)
        valid = header_of(env)
        tail = [env.payload] if cls.HAS_PAYLOAD else []
        for key in valid:
            yield [msgpack.packb({k: v for k, v in valid.items() if k != key}), *tail]
            for value in TYPE_CONFUSED:
                yield [msgpack.packb({**valid, key: value}), *tail]
        for extra in ("extra", "From", b"to", "payload", 7):
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
    bystander = connect_as(dealers, "bystander")
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


# --- 100,000 hostile frames through one authenticated, registered connection ----------------------
# mallory floods; sam and olga stay online and must receive only what is addressed to them; vera is offline
# with a message from sam queued, which mallory must neither consume nor see.
FLOOD_FRAMES = 100_000  # malformed ones; valid frames in the wrong order come on top
MALFORMED_BURST = 300
WRONG_ORDER_BURST = 150
WRONG_ORDER_EVERY = 4  # one burst of valid frames in the wrong order after this many malformed bursts
# Frames sent but not known answered, a burst included, plus a page of her own queue that a REGISTER
# re-sends: below the broker's send high-water mark (1,000 messages per connection), where it drops what
# a flooder does not read, replies to it included. She consumes what she gets, so the page stays short.
IN_FLIGHT = 300
OVERSIZED_EVERY = 3_000  # one of the ~1 MiB frames among this many random ones
RSS_GROWTH_BOUND = 64 * 1024 * 1024
NO_PROGRESS = 30.0  # seconds without any frame from the broker: it is stuck
BEAT = 0.3  # the bystanders' heartbeat (the flood broker expires sessions after 3 s)
USERS = ("mallory", "sam", "olga", "vera")
SERVER_ONLY = [Registered, Ack, Error, KeyInfo, Snapshot, PeerUpdate, PeerSync]  # a client may not send them
WIRE_KEYS = sorted({"v", "t", "id", "ts", *(wire for cls in ALL_TYPES for _, wire, _, _ in fields_of(cls))})


def junk_value(rng: random.Random, depth: int = 0) -> object:
    """Anything msgpack can carry, cheaply (100,000 frames are too many to draw with hypothesis)."""
    roll = rng.randrange(10 if depth < 3 else 8)
    if roll == 0:
        return rng.choice((None, True, False, 1.5, float("nan")))
    if roll == 1:
        return rng.choice((0, 1, -1, MAX_INT, MAX_INT + 1, 2**32, 2**64 - 1, -(2**63)))
    if roll == 2:
        return rng.randint(-(2**63), 2**64 - 1)
    if roll == 3:
        return "".join(rng.choice("aZ09_.-é😀 \x00") for _ in range(rng.choice((0, 1, 5, 32, 33, 200))))
    if roll == 4:
        return rng.randbytes(rng.choice((0, 1, 15, 16, 17, 32, 33, 64, 65, 300)))
    if roll == 5:
        return rng.choice(USERS + ("relayed", "bad_frame", "file_chunk"))
    if roll == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(8)))
    if roll == 7:
        return rng.choice(list(EXAMPLE.values()))
    if roll == 8:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(WIRE_KEYS): junk_value(rng, depth + 1) for _ in range(rng.randrange(5))}


@functools.cache  # example_message reads type hints: far too slow for 100,000 frames
def example_from_mallory(cls: type[Message], recipient: str, user: str) -> Message:
    return example_message(cls, sender="mallory", recipient=recipient, user=user)


def plausible(rng: random.Random, cls: type[Message]) -> Frames:
    """A valid ``cls`` from mallory to one of the users."""
    msg = example_from_mallory(cls, rng.choice(USERS), rng.choice(USERS))
    payload = rng.randbytes(64) if cls.HAS_PAYLOAD else None
    return encode(Envelope(rng.randbytes(16), rng.randrange(2**41), msg, payload))


def truncations(rng: random.Random) -> Iterator[Frames]:
    """Every message type cut short at every byte."""
    for cls in ALL_TYPES:
        header, *tail = plausible(rng, cls)
        for end in range(len(header)):
            yield [header[:end], *tail]


def mutated(rng: random.Random) -> Frames:
    """A plausible message with one random thing wrong (it may still be valid: the caller checks)."""
    header, *tail = plausible(rng, rng.choice(ALL_TYPES))
    fields = msgpack.unpackb(header, raw=False)
    how = rng.randrange(9)
    if how == 0:
        header = header[:rng.randrange(len(header))]
    elif how == 1:
        flipped = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        header = bytes(flipped)
    elif how == 2:
        at = rng.randrange(len(header) + 1)
        header = header[:at] + rng.randbytes(rng.randint(1, 8)) + header[at:]
    elif how == 3:
        fields[rng.choice(list(fields))] = junk_value(rng)
        header = msgpack.packb(fields)
    elif how == 4:
        del fields[rng.choice(list(fields))]
        header = msgpack.packb(fields)
    elif how == 5:
        fields[rng.choice(WIRE_KEYS + ["extra", "", "\x00"])] = junk_value(rng)
        header = msgpack.packb(fields)
    elif how == 6:
        header += rng.randbytes(rng.randint(1, 8))  # trailing bytes after the map
    elif how == 7:
        tail = tail[:0] if tail and rng.random() < 0.3 else [*tail, *[rng.randbytes(8)] * rng.randint(1, 4)]
    else:
        header = rng.randbytes(rng.randrange(64)) if rng.random() < 0.5 else msgpack.packb(junk_value(rng))
    return [header, *tail]


def oversized() -> list[Frames]:
    """Frames near ZMQ_MAXMSGSIZE, and small frames that unpack into something huge."""
    big = MAX_HEADER_BYTES
    heartbeat = pack(Heartbeat(), 0)[0]
    chunk = encode(Envelope(b"o" * 16, 0, example_message(FileChunk, sender="mallory", recipient="olga")))[0]
    base = {"v": 1, "id": b"o" * 16, "ts": 0}
    return [
        [b"\x80" * (big + 1)],  # over the header limit: too_large
        [chunk, b"p" * (MAX_PAYLOAD_BYTES + 1)],  # over the payload limit: too_large
        [b"\x91" * big],  # arrays nested a million deep
        [msgpack.packb({**base, "t": "message", "from": "mallory", "to": "vera", "body": b"b" * (big - 200)})],
        [msgpack.packb({**base, "t": "snapshot", "epoch": b"e", "seq": 1, "peers": ["a"] * (MAX_PEERS + 1)})],
        [msgpack.packb({str(i): i for i in range(20_000)})],
        [msgpack.packb("s" * (big - 16))],
        [b"\xdd\xff\xff\xff\xff"],  # an array header announcing 4 billion elements, and nothing after it
        [b"\xc6\xff\xff\xff\xff" + b"x" * 100],  # a 4 GiB bin, 100 bytes long
        [heartbeat, *[b"\x00" * (64 * 1024)] * 15],  # many parts, each small
        [heartbeat, b"x" * (big // 2), b"y" * (big // 2)],
    ]


def malformed_stream(rng: random.Random) -> Iterator[Frames]:
    """Systematic type confusion and truncation first, then random mutations with an oversized frame now and then."""
    yield from type_confusions()
    yield from truncations(rng)
    big = oversized()
    for i in itertools.count():
        if i % OVERSIZED_EVERY == 0:
            yield big[(i // OVERSIZED_EVERY) % len(big)]
        yield mutated(rng)


class WrongOrder:
    """Valid frames at the wrong moment or about things that are someone else's: chunks, credit, done and cancel
    for unknown transfers and for sam's transfer to olga, consumes of vera's queued message, spoofed senders,
    huge counts, server-only messages, REGISTER twice or as someone else, frames after UNREGISTER."""

    def __init__(self, rng: random.Random, keys: dict[str, bytes], queued: bytes, xfer: bytes) -> None:
        self.rng, self.keys, self.queued, self.xfer = rng, keys, queued, xfer

    def burst(self, size: int) -> list[Frames]:
        frames = self.session_abuse() if self.rng.random() < 0.25 else []
        while len(frames) < size:
            frames.append(self.frame())
        return frames

    def session_abuse(self) -> list[Frames]:
        """Leave, act, claim others' IDs and keys, come back (registered as mallory at the end)."""
        key = self.keys["mallory"]
        return [pack(Unregister(), 0), *(self.frame() for _ in range(20)), pack(Unregister(), 0),
                register_frames("vera", key), pack(Register("mallory", b"t", self.keys["vera"]), 0),
                register_frames("mallory", key), register_frames("mallory", key), register_frames("sam", key)]

    def frame(self) -> Frames:
        r = self.rng
        sender = "mallory" if r.random() < 0.85 else r.choice(("sam", "olga", "vera"))
        recipient = r.choice(("olga", "sam", "vera", "mallory", f"nobody{r.randrange(100)}"))
        xfer = r.choice((self.xfer, self.queued, r.randbytes(16)))
        msg_id = self.queued if r.random() < 0.02 else r.randbytes(16)

        def count() -> int:
            return r.choice((0, 1, 2, 31, 32, 33, 2**31, MAX_INT, r.randrange(MAX_INT)))

        roll = r.randrange(100)
        payload = None
        if roll < 25:
            msg = FileChunk(sender, recipient, xfer, count(), r.random() < 0.5,
                            r.choice((None, count() % 2**32)), r.choice((None, r.randbytes(32))))
            payload = r.randbytes(r.choice((0, 1, 512, 4096)))
        elif roll < 40:
            msg = FileCredit(sender, recipient, xfer, count(), count(), r.random() < 0.5)
        elif roll < 47:
            msg = FileDone(sender, recipient, xfer)
        elif roll < 54:
            msg = FileCancel(sender, recipient, xfer, r.choice(list(ErrorCode)), "not yours")
        elif roll < 58:  # durable: queued for the recipient, as a real offer would be
            msg = FileOffer(sender, recipient, xfer, count(), count(), r.randbytes(r.randrange(200)))
        elif roll < 62:
            msg = ChatMessage(sender, recipient, b"mallory was here")
        elif roll < 65:
            msg = Receipt(sender, recipient, r.choice((self.queued, r.randbytes(16))), r.choice(list(ReceiptStatus)))
        elif roll < 80:
            msg = Consume(r.choice((self.queued, self.queued, r.randbytes(16))))
        elif roll < 85:
            msg = KeyRequest(r.choice(USERS + ("nobody",)))
        elif roll < 88:
            msg = SnapshotRequest()
        elif roll < 91:
            msg = Heartbeat()
        else:
            msg = example_message(r.choice(SERVER_ONLY))
        return encode(Envelope(msg_id, r.randrange(2**41), msg, payload))


@dataclass(slots=True)
class Burst:
    frames: list[Frames]
    verdicts: list[tuple[ErrorCode, bytes | None]] | None  # malformed: the codec's answer to each; valid: None
    marker: bytes  # the id of the malformed frame that follows the burst: its ERROR closes the burst
    answered: int = 0


def marker_frames(marker: bytes) -> Frames:
    return [msgpack.packb({"v": 1, "t": "heartbeat", "id": marker, "ts": 0, "end_of_burst": True})]


def bursts(rng: random.Random, wrong_order: WrongOrder, malformed_total: int) -> Iterator[Burst]:
    """Malformed bursts until ``malformed_total``, with a burst of valid frames in the wrong order between them."""
    malformed = malformed_stream(rng)
    sent = 0
    for n in itertools.count():
        if sent >= malformed_total:
            return
        if n % (WRONG_ORDER_EVERY + 1) == WRONG_ORDER_EVERY:
            frames, verdicts = wrong_order.burst(WRONG_ORDER_BURST), None
        else:
            frames, verdicts = [], []
            while len(frames) < MALFORMED_BURST:
                candidate = next(malformed)
                answer = verdict(candidate)
                if answer is not None:  # a mutation can land on a valid message: those go in the other kind
                    frames.append(candidate)
                    verdicts.append(answer)
            sent += len(frames)
        yield Burst(frames, verdicts, b"end-of-burst" + n.to_bytes(4, "big"))


class Flood:
    """mallory's bursts go out without waiting; every answer and every frame the bystanders get is checked."""

    def __init__(self, broker: BrokerProcess, mallory: zmq.Socket, bystanders: dict[str, zmq.Socket]) -> None:
        self.broker, self.mallory, self.bystanders = broker, mallory, bystanders
        self.stats: Counter[str] = Counter()
        self._in_flight: deque[Burst] = deque()

    def run(self, source: Iterator[Burst]) -> Counter[str]:
        poller = zmq.Poller()
        for sock in (self.mallory, *self.bystanders.values()):
            poller.register(sock, zmq.POLLIN)
        outstanding, exhausted = 0, False
        last_heard = last_beat = time.monotonic()
        while True:
            while not exhausted and outstanding < IN_FLIGHT:
                burst = next(source, None)
                if burst is None:
                    exhausted = True
                    break
                for frames in [*burst.frames, marker_frames(burst.marker)]:
                    self.mallory.send_multipart(frames, zmq.DONTWAIT)  # SNDHWM 0: never Again
                self._in_flight.append(burst)
                outstanding += len(burst.frames)
                self.stats["sent"] += len(burst.frames)
                self.stats["sent malformed" if burst.verdicts is not None else "sent in the wrong order"] += len(
                    burst.frames)
            if not self._in_flight:
                return self.stats
            now = time.monotonic()
            if now - last_beat > BEAT:
                last_beat = now
                for sock in self.bystanders.values():
                    sock.send_multipart(pack(Heartbeat(), 0), zmq.DONTWAIT)
            for sock, _ in poller.poll(100):
                for _ in range(2_000):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = now
                    if sock is self.mallory:
                        outstanding -= self._to_mallory(frames)
                    else:
                        self._to_bystander(next(u for u, s in self.bystanders.items() if s is sock), frames)
            assert self.broker.alive(), "broker died:\n" + "".join(self.broker.lines[-20:])
            assert now - last_heard < NO_PROGRESS, f"the broker stopped answering; {self.stats}"

    def _to_mallory(self, frames: Frames) -> int:
        """Check one frame the broker sent mallory; the size of the burst it closed, if any."""
        env = decode(frames)
        msg = env.message
        if msg.RELAYED:  # her own durable frames to herself come back at every REGISTER until consumed
            assert msg.recipient == "mallory", f"mallory got someone else's frame: {msg}"
            self.stats["relayed to mallory from herself"] += 1
            self.mallory.send_multipart(pack(Consume(env.msg_id), 0), zmq.DONTWAIT)  # no answer: not counted
            return 0
        if type(msg) is Ack:  # answers a valid durable frame once its batch is committed: after the batch's
            self.stats["ack"] += 1  # other answers, so possibly after a later burst's marker
            return 0
        burst = self._in_flight[0]
        if type(msg) is Error and msg.ref == burst.marker:
            assert burst.verdicts is None or burst.answered == len(burst.verdicts), (burst.answered, msg)
            self._in_flight.popleft()
            return len(burst.frames)
        assert not (type(msg) is Error and msg.code is ErrorCode.RATE_LIMITED), "rate limited: frames never decoded"
        if burst.verdicts is not None:
            frames_sent = burst.frames[burst.answered]
            assert type(msg) is Error, (frames_sent, msg)
            assert (msg.code, msg.ref) == burst.verdicts[burst.answered], (frames_sent, msg)
            self.stats["refused by the decoder"] += 1
        else:
            self.stats[f"{msg.TYPE.value} {msg.code.value}" if type(msg) is Error else msg.TYPE.value] += 1
        burst.answered += 1
        return 0

    def _to_bystander(self, user: str, frames: Frames) -> None:
        msg = decode(frames).message
        if msg.RELAYED:
            assert msg.recipient == user, f"{user} got a frame for {msg.recipient}: {msg}"
        self.stats[f"to {user}: {msg.TYPE.value}"] += 1


def broker_memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of process ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.broker_args("--rate-limit", "1000000", "--heartbeat", "1")  # every frame must reach the decoder
def test_a_hundred_thousand_hostile_frames_from_a_registered_user_harm_nobody(broker, dealers, make_client):
    pid = broker.proc.pid
    keypairs = {user: zmq.curve_keypair() for user in USERS}
    keys = {user: z85.decode(public) for user, (public, _) in keypairs.items()}
    vera = connect_as(dealers, "vera", keypairs["vera"])
    vera.send_multipart(pack(Unregister(), 0))
    vera.send_multipart(pack(Heartbeat(), 0))
    assert decode(recv(vera, broker)).message.code is ErrorCode.NOT_REGISTERED  # offline from here on
    sam, olga = connect_as(dealers, "sam", keypairs["sam"]), connect_as(dealers, "olga", keypairs["olga"])
    queued, xfer = new_msg_id(), new_msg_id()
    sam.send_multipart(pack(ChatMessage("sam", "vera", b"for vera only"), 0, queued))
    assert decode(recv(sam, broker)).message == Ack(queued, AckStatus.STORED)
    sam.send_multipart(pack(FileOffer("sam", "olga", xfer, 100 << 20, 1 << 19, b"sealed"), 0, xfer))
    assert decode(recv(sam, broker)).message == Ack(xfer, AckStatus.STORED)
    assert decode(recv(olga, broker)).message.xfer == xfer
    mallory = connect_as(dealers, "mallory", keypairs["mallory"])
    rss_before, _ = broker_memory(pid)
    cpu_before = cpu_seconds(pid)

    rng = random.Random(20261129)
    started = time.monotonic()
    stats = Flood(broker, mallory, {"sam": sam, "olga": olga}).run(
        bursts(rng, WrongOrder(rng, keys, queued, xfer), FLOOD_FRAMES))
    elapsed = time.monotonic() - started
    rss_after, rss_peak = broker_memory(pid)
    print(f"\nflood: {stats['sent']} frames in {elapsed:.1f}s (broker CPU {cpu_seconds(pid) - cpu_before:.1f}s), "
          f"broker RSS {rss_before >> 20} -> {rss_after >> 20} MiB (peak {rss_peak >> 20} MiB); {dict(stats)}")

    assert stats["sent malformed"] >= FLOOD_FRAMES
    assert stats["refused by the decoder"] == stats["sent malformed"]  # each one decoded, refused, answered
    assert broker.alive() and broker.proc.pid == pid
    assert not [line for line in broker.lines if "Traceback" in line], "a frame raised inside the broker"
    assert rss_after - rss_before < RSS_GROWTH_BOUND
    vera = connect_as(dealers, "vera", keypairs["vera"])  # her queue is intact: sam's message comes first
    delivered = decode(recv(vera, broker))
    assert (delivered.msg_id, delivered.message) == (queued, ChatMessage("sam", "vera", b"for vera only"))
    assert_broker_still_serves(broker, make_client)
