"""Security: CURVE transport, key-bound identities, end-to-end sealing, pinning, abuse limits."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import zmq
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pchat.broker.shell.server import BrokerConfig, BrokerServer
from p2pchat.client import events as ev
from p2pchat.client.broker_trust import admit
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.common import crypto
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import ErrorCode, P2PChatError, RemoteError
from p2pchat.common.protocol import ChatMessage, Error, Heartbeat, Register, decode, new_msg_id, pack
from tests.conftest import HEARTBEAT, free_port_pair, wait_for, wait_peers

# --- the encryption format's own test vectors ----------------------------------------------
ALICE = crypto.Identity.from_private_bytes(bytes(range(32)))
BOB = crypto.Identity.from_private_bytes(bytes(range(32, 64)))


def test_message_sealing_matches_its_test_vector():
    shared = ALICE.shared_secret(BOB.public)
    assert shared == BOB.shared_secret(ALICE.public)
    body = crypto.seal_message(ALICE, shared, "alice", "bob", bytes(16), 1_700_000_000_000, b"hello bob")
    assert body.hex() == (
        "018f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"
        "aefe077c3234e0ccc0119393ffa03180aeaded26aaffa0a2c0")


def test_message_sealing_follows_the_spec_written_independently():
    """docs/PROTOCOL.md §10.4, computed here with the primitives directly."""
    msg_id, ts = os.urandom(16), 1_234_567
    shared = ALICE.shared_secret(BOB.public)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=msg_id, info=b"p2pchat v1 message").derive(shared)
    aad = b"alice\0bob\0" + msg_id + b"\0" + ts.to_bytes(8, "big")
    expected = b"\x01" + ALICE.public + AESGCM(key).encrypt(bytes(12), b"hi", aad)
    assert crypto.seal_message(ALICE, shared, "alice", "bob", msg_id, ts, b"hi") == expected
    assert crypto.open_message(BOB.shared_secret(ALICE.public), "alice", "bob", msg_id, ts, expected) == b"hi"


def _open_chunk(cipher: crypto.FileCipher, index: int, final: bool, sealed: bytes) -> bytes:
    out = bytearray(len(sealed) - crypto.TAG_BYTES)
    cipher.open_into(index, final, sealed, memoryview(out))
    return bytes(out)


def test_file_chunk_sealing_matches_its_test_vectors():
    cipher = crypto.FileCipher(bytes(32), bytes(16))
    assert cipher.seal(0, False, b"chunk zero").hex() == "adcf35532640110b752196acc9e387b63c612fb778341654887c"
    assert cipher.seal(1, True, b"last").hex() == "63d8ec5832b26d38a8fa484295ebed63a1708d4a"
    assert _open_chunk(cipher, 1, True, bytes.fromhex("63d8ec5832b26d38a8fa484295ebed63a1708d4a")) == b"last"


def test_fingerprint_and_safety_number_vectors():
    assert crypto.fingerprint(ALICE.public) == "eedd 883d a0a9 4515 93dc"
    assert crypto.safety_number(ALICE.public, BOB.public) == "65939 30845 60137 34247 49715 83712"
    assert crypto.safety_number(BOB.public, ALICE.public) == crypto.safety_number(ALICE.public, BOB.public)


def test_account_safety_number_vector_is_symmetric_and_never_a_per_device_number():
    assert crypto.account_safety_number(ALICE.public, BOB.public) == "16203 43696 96707 64221 83433 56906"
    assert crypto.account_safety_number(BOB.public, ALICE.public) == crypto.account_safety_number(ALICE.public,
                                                                                                BOB.public)
    assert crypto.account_safety_number(ALICE.public, BOB.public) != crypto.safety_number(ALICE.public, BOB.public)


@pytest.mark.parametrize("damage", ["flip-ciphertext", "flip-tag", "truncate", "wrong-recipient", "wrong-ts",
                                    "new-id"])
def test_tampered_message_does_not_open(damage):
    shared = ALICE.shared_secret(BOB.public)
    msg_id, ts = os.urandom(16), 42
    body = bytearray(crypto.seal_message(ALICE, shared, "alice", "bob", msg_id, ts, b"secret"))
    recipient, when, ident = "bob", ts, msg_id
    if damage == "flip-ciphertext":
        body[40] ^= 1
    elif damage == "flip-tag":
        body[-1] ^= 1
    elif damage == "truncate":
        body = body[:-3]
    elif damage == "wrong-recipient":
        recipient = "carol"
    elif damage == "wrong-ts":
        when = ts + 1
    else:  # the same ciphertext replayed under a fresh message id
        ident = os.urandom(16)
    with pytest.raises(crypto.IntegrityError):
        crypto.open_message(shared, "alice", recipient, ident, when, bytes(body))


@pytest.mark.parametrize("damage", ["reorder", "truncate-before-final", "other-file", "flip"])
def test_tampered_file_chunk_does_not_open(damage):
    xfer = os.urandom(16)
    cipher = crypto.FileCipher(os.urandom(crypto.KEY_BYTES), xfer)
    chunk0, chunk1 = cipher.seal(0, False, b"a" * 100), cipher.seal(1, True, b"b" * 10)
    with pytest.raises(crypto.IntegrityError):
        if damage == "reorder":
            _open_chunk(cipher, 0, False, chunk1)
        elif damage == "truncate-before-final":
            _open_chunk(cipher, 0, True, chunk0)  # chunk 0 claimed as the last one
        elif damage == "other-file":
            _open_chunk(crypto.FileCipher(cipher.key, os.urandom(16)), 0, False, chunk0)
        else:
            _open_chunk(cipher, 0, False, bytes([chunk0[0] ^ 1]) + chunk0[1:])


# --- against a live broker -------------------------------------------------------------------
def _broker_key(broker) -> bytes:
    return crypto.Identity.load_or_create(broker.home / "broker" / "broker.key").public


def _curve_dealer(ctx: zmq.Context, port: int, identity: crypto.Identity, server_key: bytes,
                  user: str | None = None) -> zmq.Socket:
    """A raw CURVE DEALER; with ``user``, first admitted through the key service as a client would be."""
    from zmq.utils import z85

    if user is not None:
        admit(ServerAddress("127.0.0.1", port), port + 2, user, identity.public, 10.0)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = z85.encode(server_key)
    sock.curve_publickey = identity.curve_public
    sock.curve_secretkey = identity.curve_secret
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_impersonation_with_another_key_is_refused(make_client, broker, tmp_path):
    alice = make_client("alice")
    alice.close()  # even with alice offline, her ID stays bound to her key
    other_home = ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT, state_dir=tmp_path / "mallory")
    impostor = ChatClient("alice", other_home)
    with pytest.raises(RemoteError) as err:
        impostor.connect(timeout=10)
    assert err.value.code is ErrorCode.ID_TAKEN


def test_impersonation_survives_a_broker_restart(make_client, broker, tmp_path):
    make_client("alice").close()
    broker.stop()
    broker.start()
    impostor = ChatClient("alice", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT,
                                                state_dir=tmp_path / "mallory"))
    with pytest.raises(RemoteError) as err:
        impostor.connect(timeout=10)
    assert err.value.code is ErrorCode.ID_TAKEN


def test_register_with_a_key_other_than_the_connections_is_refused(broker):
    ctx = zmq.Context()
    me, claimed = crypto.Identity.generate(), crypto.Identity.generate()
    sock = _curve_dealer(ctx, broker.port, me, _broker_key(broker), user="carol")
    try:
        sock.send_multipart(pack(Register("carol", b"t" * 16, claimed.public), 0))
        assert sock.poll(10_000), "no answer"
        reply = decode(sock.recv_multipart()).message
        assert isinstance(reply, Error) and reply.code is ErrorCode.KEY_MISMATCH
    finally:
        sock.close(0)
        ctx.term()


def test_wrong_broker_key_is_refused(broker, home):
    config = ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT, server_key="0000 0000 0000 0000 0000")
    client = ChatClient("alice", config)
    with pytest.raises(RemoteError) as err:
        client.connect(timeout=10)
    assert err.value.code is ErrorCode.BROKER_KEY_CHANGED


def test_changed_broker_key_is_refused_after_first_use(broker, home, tmp_path):
    with ChatClient("alice", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT)) as first:
        first.connect(timeout=10)  # trusted on first use and remembered
    broker.stop()
    (broker.home / "broker" / "broker.key").unlink()  # the "broker" now has another key
    broker.start()
    client = ChatClient("alice", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT))
    with pytest.raises(RemoteError) as err:
        client.connect(timeout=10)
    assert err.value.code is ErrorCode.BROKER_KEY_CHANGED
    assert "CHANGED" in err.value.message


def test_matching_pinned_broker_key_is_accepted(broker, home):
    pinned = crypto.fingerprint(_broker_key(broker))
    with ChatClient("alice", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT,
                                          server_key=pinned)) as client:
        client.connect(timeout=10)
        assert client.broker_key == _broker_key(broker)


def test_unauthenticated_connections_cannot_register_or_subscribe(make_client, broker):
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    wrong_server = _curve_dealer(ctx, broker.port, crypto.Identity.generate(), crypto.Identity.generate().public)
    try:
        for sock in (plain, sub):
            sock.setsockopt(zmq.LINGER, 0)
        plain.connect(f"tcp://127.0.0.1:{broker.port}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{broker.port + 1}")
        for sock in (plain, wrong_server):
            sock.send_multipart(pack(Register("eve", b"t" * 16, crypto.Identity.generate().public), 0))
        alice = make_client("alice")
        make_client("bob")
        wait_peers(alice, {"alice", "bob"})  # presence was published meanwhile...
        assert not sub.poll(500)  # ...but never reached the unauthenticated subscriber
        assert not plain.poll(0) and not wrong_server.poll(0)
        assert "eve" not in alice.peers()
    finally:
        for sock in (plain, sub, wrong_server):
            sock.close(0)
        ctx.term()


@pytest.fixture
def recording_broker(tmp_path):
    """An in-process broker whose every received frame is recorded: the broker's view."""
    config = BrokerConfig(port=free_port_pair(), data_dir=tmp_path / "broker-data", heartbeat_ivl=HEARTBEAT)
    server = BrokerServer(config)
    seen: list[bytes] = []
    original = server.core.on_frames

    def record(conn, frames, now, peer_key=lambda: None):
        seen.extend(bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in frames)
        return original(conn, frames, now, peer_key)

    server.core.on_frames = record
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    yield server, seen, config
    server.stop()
    thread.join(10)


def test_broker_sees_no_plaintext_of_messages_or_files(recording_broker, home, tmp_path):
    server, seen, config = recording_broker
    address = ServerAddress("127.0.0.1", config.port)
    marker = b"TOP-SECRET-" + os.urandom(6).hex().encode()
    src = tmp_path / "secret.txt"
    src.write_bytes((marker + b"\n") * 20_000)
    cfg = dict(server=address, heartbeat_ivl=HEARTBEAT)
    with ChatClient("alice", ClientConfig(**cfg)) as alice, \
            ChatClient("bob", ClientConfig(**cfg, received_dir=tmp_path / "inbox")) as bob:
        alice.connect(10)
        bob.connect(10)
        alice.send("bob", marker.decode() + " in a chat message")
        wait_for(bob, lambda e: isinstance(e, ev.MessageReceived) and marker.decode() in e.text)
        _, done = alice.send_file("bob", src)
        done.result(30)
        got = wait_for(bob, lambda e: isinstance(e, ev.FileReceived))
        assert got.path.read_bytes() == src.read_bytes()
    relayed = b"".join(seen)
    assert len(relayed) > src.stat().st_size  # we did see the file go through, sealed
    assert marker not in relayed
    assert b"secret.txt" not in relayed  # the file name travels sealed too
    for path in Path(config.data_dir).rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path


def test_tampered_message_is_rejected_and_nothing_is_shown(make_client, broker):
    from p2pchat.client.core.session import ClientSession

    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "genuine")  # pins keys both ways
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    session: ClientSession = alice._session
    forged = []

    def tamper(frames):  # re-pack a sealed message with one ciphertext byte flipped
        env = decode(frames)
        body = bytearray(env.message.body)
        body[-5] ^= 0x40
        return pack(ChatMessage("alice", "bob", bytes(body)), env.ts, env.msg_id)

    original = session.send_text

    def send_and_tamper(*args, **kwargs):
        actions = original(*args, **kwargs)
        for action in actions:
            if hasattr(action, "frames") and not forged:
                action.frames[:] = tamper(action.frames)
                forged.append(True)
        return actions

    session.send_text = send_and_tamper
    alice.send("bob", "this will be tampered with")
    error = wait_for(bob, lambda e: isinstance(e, (ev.ErrorReported, ev.MessageReceived)))
    assert isinstance(error, ev.ErrorReported) and error.error.code is ErrorCode.INTEGRITY
    session._flush = original
    alice.send("bob", "after")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "after"


def _inject(client: ChatClient, frames: list[bytes]) -> None:
    """Deliver frames to a client's session on its own agent thread, as if from the broker."""
    client._call(lambda now: client._execute(client._session.on_frames(frames, now))).result(10)


def test_replayed_message_is_shown_once_and_a_rewrapped_replay_is_rejected(make_client, broker):
    alice, bob = make_client("alice"), make_client("bob")
    sent: list[list[bytes]] = []
    original = alice._session._flush

    def capture(now):
        actions = original(now)
        sent.extend(list(a.frames) for a in actions if hasattr(a, "frames"))
        return actions

    alice._session._flush = capture
    alice.send("bob", "only once")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "only once"
    (frames,) = [f for f in sent if isinstance(decode(f).message, ChatMessage)]
    _inject(bob, frames)  # the exact frames again: a duplicate, dropped
    env = decode(frames)
    _inject(bob, pack(env.message, env.ts, new_msg_id()))  # same ciphertext, new id: does not open
    error = wait_for(bob, lambda e: isinstance(e, (ev.ErrorReported, ev.MessageReceived)))
    assert isinstance(error, ev.ErrorReported) and error.error.code is ErrorCode.INTEGRITY
    alice.send("bob", "next")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "next"


def test_peer_key_change_blocks_sending_until_accepted(make_client, broker, tmp_path, home):
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "hi")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert alice.fingerprint_of("bob") == crypto.fingerprint(bob.identity.public)
    # bob's key "changes" in alice's eyes: pin a different key for him.
    alice.e2e._pinned.put("bob", crypto.Identity.generate().public)
    alice.e2e._shared.clear()
    alice.e2e.forget_devices()  # else bob's list, fetched with his real key, vouches for it
    bob.send("alice", "it's me, with my real key")
    changed = wait_for(alice, lambda e: isinstance(e, (ev.PeerKeyChanged, ev.MessageReceived)))
    assert isinstance(changed, ev.PeerKeyChanged) and changed.user == "bob"
    with pytest.raises(P2PChatError) as err:  # the caller hears it at once; the message waits in the outbox
        alice.send("bob", "blocked")
    assert err.value.code is ErrorCode.PEER_KEY_CHANGED and "waits in your outbox" in err.value.message
    assert alice.accept_peer_key("bob")
    # Accepting lets through what waited, both ways, without a reconnect.
    assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "it's me, with my real key"
    alice.send("bob", "accepted")
    assert [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(2)] == \
        ["blocked", "accepted"]


def test_tampered_file_chunk_fails_the_transfer_with_integrity(make_client, broker, tmp_path):

    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    transfers = alice._session.transfers
    original = transfers.on_message

    def tamper(env, now):  # flip a byte of chunk 1 every time it is sent: only the AEAD can notice
        actions = original(env, now)
        for action in actions:
            if len(getattr(action, "frames", ())) == 2 and decode(action.frames).message.index == 1:
                payload = bytearray(action.frames[1])
                payload[3] ^= 1
                action.frames[1] = bytes(payload)
        return actions

    transfers.on_message = tamper  # alice's answers to bob's credits
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * 256 * 1024))
    _, done = alice.send_file("bob", src)
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.INTEGRITY
    failed = wait_for(bob, lambda e: isinstance(e, ev.FileFailed))
    assert failed.error.code is ErrorCode.INTEGRITY
    assert list((tmp_path / "inbox").iterdir()) == []


def test_flooder_is_limited_while_others_keep_chatting(make_client, broker):
    alice, bob = make_client("alice"), make_client("bob")
    ctx = zmq.Context()
    flooder_id = crypto.Identity.generate()
    sock = _curve_dealer(ctx, broker.port, flooder_id, _broker_key(broker), user="flooder")
    stop = threading.Event()
    errors: list[Error] = []

    def flood() -> None:
        sock.send_multipart(pack(Register("flood", b"t" * 16, flooder_id.public), 0))
        frames = pack(Heartbeat(), 0)
        while not stop.is_set():
            for _ in range(500):
                sock.send_multipart(frames)
            while sock.poll(0):
                msg = decode(sock.recv_multipart()).message
                if isinstance(msg, Error):
                    errors.append(msg)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        for i in range(100):
            alice.send("bob", f"still here {i}", timeout=10)
        texts = [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(100)]
        assert texts == [f"still here {i}" for i in range(100)]
        deadline = time.monotonic() + 10
        while not any(e.code is ErrorCode.RATE_LIMITED for e in errors) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(e.code is ErrorCode.RATE_LIMITED for e in errors)
    finally:
        stop.set()
        thread.join(10)
        sock.close(0)
        ctx.term()
