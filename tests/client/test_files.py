"""File transfer over a real broker: sizes, integrity, hostile names, errors, resume, concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.core.transfer import CHUNK_SIZE, MAX_CHUNK_BYTES, WINDOW
from p2pchat.common.errors import ErrorCode, P2PChatError, TransferError
from p2pchat.common.protocol import decode
from tests.conftest import ROOT, wait_for, wait_peers, wait_until


def make_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def received(client, timeout: float = 30.0) -> ev.FileReceived:
    return wait_for(client, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), timeout)


def files_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def pair(make_client, tmp_path):
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    return alice, bob, tmp_path / "inbox"


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * 1024 * 1024 + 17])
def test_file_arrives_byte_identical(pair, tmp_path, size):
    alice, bob, inbox = pair
    src = make_file(tmp_path / f"data-{size}.bin", size)
    _, done = alice.send_file("bob", src)
    event = received(bob)
    assert isinstance(event, ev.FileReceived), event
    done.result(30)
    assert event.path.read_bytes() == src.read_bytes()
    assert event.path.parent == inbox
    assert event.path.name.endswith(f"_alice_data-{size}.bin")
    assert [p.name for p in files_in(inbox)] == [event.path.name]  # no .part left behind


def test_existing_file_is_never_overwritten(pair, tmp_path):
    alice, bob, inbox = pair
    src = make_file(tmp_path / "same.txt", 100)
    _, first = alice.send_file("bob", src)
    a = received(bob)
    first.result(30)
    os.utime(src, ns=(1, 1))  # a "different" file by the same name, sent in the same second
    _, second = alice.send_file("bob", src)
    b = received(bob)
    second.result(30)
    assert a.path != b.path and a.path.exists() and b.path.exists()


@pytest.mark.parametrize("hostile", ["..\\..\\evil.txt", "a\nb\x07c.txt", "CON.txt", ".hidden", "x" * 250 + ".txt"])
def test_hostile_names_are_neutralised(pair, tmp_path, hostile):
    alice, bob, inbox = pair
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make_file(src_dir / hostile, 10)
    alice.send_file("bob", src)
    event = received(bob)
    assert isinstance(event, ev.FileReceived), event
    assert event.path.parent == inbox
    name = event.path.name
    assert "/" not in name and "\\" not in name and not any(ord(c) < 32 for c in name)
    assert not name.startswith(".") and len(name.encode()) <= 255
    assert "_alice_" in name and not name.split("_alice_", 1)[1].upper().startswith("CON.")


def test_unwritable_directory_is_a_clear_error(make_client, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the inbox should be")
    alice = make_client("alice")
    bob = make_client("bob", received_dir=blocker / "inbox")
    wait_peers(alice, {"alice", "bob"})
    _, done = alice.send_file("bob", make_file(tmp_path / "f.bin", 1000))
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.UNWRITABLE
    failed = wait_for(bob, lambda e: isinstance(e, ev.FileFailed))
    assert failed.error.code is ErrorCode.UNWRITABLE


def test_file_over_receivers_limit_is_refused(make_client, tmp_path):
    alice = make_client("alice")
    make_client("bob", received_dir=tmp_path / "inbox", max_file_size=1000)
    wait_peers(alice, {"alice", "bob"})
    _, done = alice.send_file("bob", make_file(tmp_path / "big.bin", 1001))
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.TOO_LARGE
    assert files_in(tmp_path / "inbox") == []


def test_a_one_chunk_window_streams_without_waiting_for_stall_timers(make_client, tmp_path):
    # Each credit must grant something even while the writer thread still holds a chunk.
    alice = make_client("alice", chunk_size=16 * 1024)
    bob = make_client("bob", received_dir=tmp_path / "inbox", window=1)
    wait_peers(alice, {"alice", "bob"})
    src = make_file(tmp_path / "f.bin", 64 * 16 * 1024 + 5)
    _, done = alice.send_file("bob", src)
    done.result(5)  # 65 chunks; a stall-driven transfer would need 65 x 0.6 s
    assert received(bob).path.read_bytes() == src.read_bytes()


def test_chunk_size_the_receiver_would_refuse_is_refused_at_once(make_client, tmp_path):
    alice = make_client("alice", chunk_size=MAX_CHUNK_BYTES + 1)  # a sealed chunk would exceed the frame limit
    with pytest.raises(TransferError, match="chunk size"):
        alice.send_file("bob", make_file(tmp_path / "f.bin", 10))


def test_a_file_to_an_offline_recipient_is_left_at_the_broker_and_delivered_when_they_come(make_client, tmp_path):
    alice = make_client("alice")
    make_client("bob").close()
    wait_peers(alice, {"alice"})  # alice sees bob offline
    src = make_file(tmp_path / "f.bin", 300_000)
    xfer, done = alice.send_file("bob", src)
    done.result(30)  # the broker holds it for bob: alice could go now (docs/PROTOCOL.md §8.2)
    assert wait_for(alice, lambda e: isinstance(e, ev.FileUploaded)).recipient == "bob"
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    event = received(bob)
    assert event.path.read_bytes() == src.read_bytes()
    assert wait_for(alice, lambda e: isinstance(e, ev.FileSent)).xfer == xfer  # and alice hears it was delivered


def test_offer_to_an_unknown_user_is_a_clear_error(make_client, tmp_path):
    alice = make_client("alice")
    _, done = alice.send_file("nobody", make_file(tmp_path / "f.bin", 10))
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.UNKNOWN_RECIPIENT


def test_file_larger_than_free_space_is_refused_up_front(make_client, tmp_path, small_disk):
    alice = make_client("alice")
    make_client("bob", received_dir=small_disk)
    wait_peers(alice, {"alice", "bob"})
    _, done = alice.send_file("bob", make_file(tmp_path / "f.bin", 6 * 1024 * 1024))
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.NO_SPACE


def test_disk_filling_up_mid_transfer_fails_cleanly(make_client, tmp_path, small_disk, home):
    from p2pchat.client.chat_client import ChatClient, ClientConfig

    alice = make_client("alice")

    def fill_disk_on_offer(event: ev.Event) -> None:  # runs on bob's agent, before the first credit
        if isinstance(event, ev.FileIncoming):
            (small_disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024))
        bob.events.put(event)

    bob = ChatClient("bob", ClientConfig(server=alice.config.server, heartbeat_ivl=0.2, received_dir=small_disk),
                     on_event=fill_disk_on_offer)
    try:
        bob.connect(10)
        wait_peers(alice, {"alice", "bob"})
        _, done = alice.send_file("bob", make_file(tmp_path / "f.bin", 3 * 1024 * 1024))
        with pytest.raises(P2PChatError) as err:
            done.result(30)
        assert err.value.code is ErrorCode.NO_SPACE
        assert [p.name for p in files_in(small_disk)] == ["filler"]  # the .part is gone
    finally:
        bob.close()


def test_cancel_by_sender_leaves_nothing(pair, tmp_path):
    alice, bob, inbox = pair
    xfer, done = alice.send_file("bob", make_file(tmp_path / "f.bin", 64 * 1024 * 1024))
    wait_for(bob, lambda e: isinstance(e, ev.FileIncoming))
    alice.cancel_transfer(xfer)
    failed = wait_for(bob, lambda e: isinstance(e, ev.FileFailed))
    assert failed.error.code is ErrorCode.CANCELLED
    with pytest.raises(P2PChatError):
        done.result(30)
    assert files_in(inbox) == []


def test_cancel_by_receiver_stops_the_sender(pair, tmp_path):
    alice, bob, inbox = pair
    _, done = alice.send_file("bob", make_file(tmp_path / "f.bin", 64 * 1024 * 1024))
    incoming = wait_for(bob, lambda e: isinstance(e, ev.FileIncoming))
    bob.cancel_transfer(incoming.xfer)
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.CANCELLED
    assert files_in(inbox) == []


def test_source_changed_mid_transfer_is_detected(pair, tmp_path):
    alice, bob, inbox = pair
    src = make_file(tmp_path / "f.bin", 64 * 1024 * 1024)
    _, done = alice.send_file("bob", src)
    wait_for(bob, lambda e: isinstance(e, ev.FileIncoming))
    with open(src, "ab") as f:
        f.write(b"more")
    with pytest.raises(P2PChatError) as err:
        done.result(30)
    assert err.value.code is ErrorCode.SOURCE_CHANGED
    failed = wait_for(bob, lambda e: isinstance(e, ev.FileFailed))
    assert failed.error.code is ErrorCode.SOURCE_CHANGED
    assert files_in(inbox) == []


@pytest.mark.parametrize("io_threads", [1, pytest.param(2, marks=pytest.mark.broker_args("--io-threads", "2"))])
def test_two_transfers_both_ways_while_chatting(make_client, broker, tmp_path, io_threads):
    # With two, the broker's connections (and their CURVE work) are spread over two libzmq I/O threads.
    def threads() -> set[str]:
        return {(p / "comm").read_text().strip() for p in Path(f"/proc/{broker.proc.pid}/task").iterdir()}

    # libzmq names its I/O threads once they run, which may be a moment after the broker says it listens.
    wait_until(lambda: {f"ZMQbg/IO/{i}" for i in range(io_threads)} <= threads(), what="the broker's I/O threads")
    assert f"ZMQbg/IO/{io_threads}" not in threads()
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    a_src = make_file(tmp_path / "from-alice.bin", 8 * 1024 * 1024)
    b_src = make_file(tmp_path / "from-bob.bin", 8 * 1024 * 1024)
    _, a_done = alice.send_file("bob", a_src)
    _, b_done = bob.send_file("alice", b_src)
    for i in range(20):
        alice.send("bob", f"chat {i}")
    a_done.result(60)
    b_done.result(60)
    texts, files = [], []
    while len(texts) < 20 or len(files) < 1:
        event = wait_for(bob, lambda e: isinstance(e, (ev.MessageReceived, ev.FileReceived)))
        (texts if isinstance(event, ev.MessageReceived) else files).append(event)
    assert [e.text for e in texts] == [f"chat {i}" for i in range(20)]
    assert files[0].path.read_bytes() == a_src.read_bytes()
    got = wait_for(alice, lambda e: isinstance(e, ev.FileReceived))
    assert got.path.read_bytes() == b_src.read_bytes()


# --- resume: kill a party mid-transfer, bring it back, compare bytes ----------------------
BIG = 192 * 1024 * 1024
# A restart loses at most the window in flight (measured: 4-14 chunks of 16). A receiver's stall timer,
# 0.6 s at the tests' heartbeat, may fire once more while a slow machine settles and re-ask a window.
RESENT_BOUND = 2 * WINDOW * CHUNK_SIZE


def _part_size(inbox: Path) -> int:
    return sum(p.stat().st_size for p in inbox.glob(".*.part")) if inbox.exists() else 0


def test_transfer_resumes_after_broker_restart(pair, tmp_path, broker):
    alice, bob, inbox = pair
    src = make_file(tmp_path / "big.bin", BIG)
    _, done = alice.send_file("bob", src)
    wait_until(lambda: _part_size(inbox) > BIG // 8, what="the transfer to get going")
    broker.kill()
    broker.start()
    done.result(120)
    sent = wait_for(alice, lambda e: isinstance(e, ev.FileSent))
    event = received(bob, 60)
    assert event.path.read_bytes() == src.read_bytes()
    assert sent.bytes_sent <= BIG + RESENT_BOUND  # resumed: not from zero, about a window sent twice


def _cli(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, P2PCHAT_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_transfer_resumes_after_receiver_restart(make_client, broker, tmp_path):
    alice = make_client("alice")
    inbox = tmp_path / "inbox"
    server = f"127.0.0.1:{broker.port}"
    listen = ["listen", "--server", server, "--user", "bob", "--json", "--received-dir", str(inbox)]
    bob = _cli(tmp_path / "bob-home", *listen)
    try:
        wait_peers(alice, {"alice", "bob"})
        src = make_file(tmp_path / "big.bin", BIG)
        _, done = alice.send_file("bob", src)
        wait_until(lambda: _part_size(inbox) > BIG // 8, what="the transfer to get going")
        bob.kill()
        bob.wait()
        before = _part_size(inbox)
        bob = _cli(tmp_path / "bob-home", *listen)
        done.result(120)
        sent = wait_for(alice, lambda e: isinstance(e, ev.FileSent))
        assert before > 0
        assert sent.bytes_sent <= BIG + RESENT_BOUND  # resumed: not from zero, about a window sent twice
        saved = [p for p in inbox.iterdir() if not p.name.startswith(".")]
        assert len(saved) == 1 and saved[0].read_bytes() == src.read_bytes()
    finally:
        bob.kill()
        bob.wait()


def test_transfer_resumes_after_sender_restart(make_client, broker, tmp_path):
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    inbox = tmp_path / "inbox"
    src = make_file(tmp_path / "big.bin", BIG)
    cmd = ["send-file", "--server", f"127.0.0.1:{broker.port}", "--user", "alice", "--to", "bob", "--quiet",
           "--timeout", "10", str(src)]
    alice = _cli(tmp_path / "alice-home", *cmd)
    try:
        wait_until(lambda: _part_size(inbox) > BIG // 8, what="the transfer to get going")
        alice.kill()
        alice.wait()
        wait_peers(bob, {"bob"})  # the broker noticed alice is gone
        alice = _cli(tmp_path / "alice-home", *cmd)
        out, err = alice.communicate(timeout=120)
        assert alice.returncode == 0, err
        event = received(bob, 60)
        assert isinstance(event, ev.FileReceived), event
        assert event.path.read_bytes() == src.read_bytes()
        assert len(files_in(inbox)) == 1
    finally:
        if alice.poll() is None:
            alice.kill()
            alice.wait()


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "plaintext"])
def test_chunk_corrupted_in_flight_is_never_saved(make_client, tmp_path, encrypt):
    # Sealed chunks: the GCM tag fails and the chunk is asked for again; plaintext ones: the CRC.
    alice = make_client("alice", encrypt=encrypt)
    bob = make_client("bob", received_dir=tmp_path / "inbox", encrypt=encrypt)
    wait_peers(alice, {"alice", "bob"})
    src = make_file(tmp_path / "f.bin", 3 * CHUNK_SIZE)
    transfers = alice._session.transfers
    original = transfers.on_message
    lock = threading.Lock()
    damaged = []

    def corrupt_once(env, now):  # flip a byte in chunk 1 on its first sending, header untouched
        actions = original(env, now)
        with lock:
            for action in actions:
                if len(getattr(action, "frames", ())) == 2 and decode(action.frames).message.index == 1 \
                        and not damaged:
                    damaged.append(1)
                    payload = bytearray(action.frames[1])
                    payload[0] ^= 0xFF
                    action.frames[1] = bytes(payload)
        return actions

    transfers.on_message = corrupt_once  # alice's answers to bob's credits
    _, done = alice.send_file("bob", src)
    event = received(bob)
    done.result(30)
    assert damaged == [1]
    assert event.path.read_bytes() == src.read_bytes()  # the damaged chunk was asked for again
