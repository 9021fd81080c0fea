"""Folders end to end (docs/PROTOCOL.md §8.3): ``p2pchat send-file --to bob DIR`` and ``p2pchat listen --json`` as
processes, through a broker process; the receiver killed mid-folder and started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.client.core.transfer import CHUNK_SIZE, WINDOW
from tests.client.test_folder_transfers import folder
from tests.client.test_folders import snapshot
from tests.conftest import ROOT, wait_for, wait_peers, wait_until


def cli(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, P2PCHAT_HOME=str(home)))


def listen(tmp_path: Path, broker, inbox: Path) -> subprocess.Popen:
    return cli(tmp_path / "bob-home", "listen", "--server", f"127.0.0.1:{broker.port}", "--user", "bob", "--json",
               "--received-dir", str(inbox))


def file_event(proc: subprocess.Popen) -> dict:
    for line in proc.stdout:
        event = json.loads(line)
        if event["type"] in ("file", "file_failed"):
            return event
    raise AssertionError(f"listen ended without a file event: {proc.stderr.read()}")


def part_size(inbox: Path) -> int:
    return sum(p.stat().st_size for p in inbox.glob(".*.part")) if inbox.exists() else 0


def test_send_file_sends_a_folder_and_listen_reports_one_file_event_for_it(broker, tmp_path):
    src = folder(tmp_path / "holiday", files=500)
    (src / "zero-byte").write_bytes(b"")
    hostile = src / "hostile"  # names a receiver on another system could not take as they are
    hostile.mkdir()
    for name in ("back\\slash", "bell\x07", "CON", "Case", "case", "e\u0301", "\u00e9"):
        (hostile / name).write_bytes(name.encode())
    inbox = tmp_path / "inbox"
    bob = listen(tmp_path, broker, inbox)
    alice = None
    try:
        next(line for line in bob.stdout if json.loads(line)["type"] == "status")  # bob is there
        alice = cli(tmp_path / "alice-home", "send-file", "--server", f"127.0.0.1:{broker.port}", "--user", "alice",
                    "--to", "bob", "--quiet", str(src))
        event = file_event(bob)
        _, err = alice.communicate(timeout=60)
        assert alice.returncode == 0, err
    finally:
        for proc in (bob, alice):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    made = Path(event["path"])
    assert (event["type"], event["from"], event["name"], made.parent) == ("file", "alice", "holiday", inbox)
    expected = {k: v for k, v in snapshot(src).items() if not k.startswith("hostile/")}
    assert event["files"] == 501 + 7 and event["bytes"] == sum(len(v) for v in snapshot(src).values() if v)
    assert {k: v for k, v in snapshot(made).items() if not k.startswith("hostile/")} == expected
    assert {k: v for k, v in snapshot(made / "hostile").items()} == {
        "back": None, "back/slash": b"back\\slash", "bell": b"bell\x07", "_CON": b"CON", "Case": b"Case",
        "case (2)": b"case", "\u00e9": "e\u0301".encode(), "\u00e9 (2)": "\u00e9".encode()}
    assert sorted(os.listdir(inbox)) == [made.name]


def test_a_receiver_killed_mid_folder_resumes_and_sends_again_at_most_about_a_window(make_client, broker, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(24):  # 96 MiB in 24 files
        (src / f"part-{i:02}.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (src / "tiny").mkdir()
    for i in range(200):
        (src / "tiny" / f"{i}.txt").write_bytes(b"%d" % i * 10)
    alice = make_client("alice")
    inbox = tmp_path / "inbox"
    bob = listen(tmp_path, broker, inbox)
    try:
        wait_peers(alice, {"alice", "bob"})
        _, done = alice.send_file("bob", src)
        wait_until(lambda: part_size(inbox) > 48 * 1024 * 1024, timeout=60, what="half the folder to arrive")
        bob.kill()
        bob.wait()
        held = part_size(inbox)
        bob = listen(tmp_path, broker, inbox)
        done.result(120)
        sent = wait_for(alice, lambda e: isinstance(e, ev.FileSent))
        event = file_event(bob)
    finally:
        bob.kill()
        bob.wait()
    assert event["type"] == "file" and event["files"] == 224
    assert snapshot(Path(event["path"])) == snapshot(src)
    # Resumed: what the first run held is not sent again, bar what was in flight (a window, maybe re-asked once).
    resent = sent.bytes_sent - sent.size
    assert resent <= 2 * WINDOW * CHUNK_SIZE < held, (resent, held)


def test_a_sender_killed_mid_folder_takes_it_up_again_when_started_again(make_client, broker, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(24):
        (src / f"part-{i:02}.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    inbox = tmp_path / "inbox"
    send = ["send-file", "--server", f"127.0.0.1:{broker.port}", "--user", "alice", "--to", "bob", "--quiet",
            "--timeout", "10", str(src)]
    alice = cli(tmp_path / "alice-home", *send)
    try:
        wait_until(lambda: part_size(inbox) > 24 * 1024 * 1024, timeout=60, what="the folder to get going")
        alice.kill()
        alice.wait()
        wait_peers(bob, {"bob"})  # the broker noticed alice is gone
        alice = cli(tmp_path / "alice-home", *send)  # walks the folder again: the same manifest, the same transfer
        _, err = alice.communicate(timeout=120)
        assert alice.returncode == 0, err
        received = wait_for(bob, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), 60)
    finally:
        if alice.poll() is None:
            alice.kill()
            alice.wait()
    assert isinstance(received, ev.FileReceived) and received.files == 24, received
    # One transfer taken up again: a new one would have left the first one's .part behind.
    assert snapshot(received.path) == snapshot(src) and os.listdir(inbox) == [received.path.name]


def test_a_folder_for_someone_offline_is_left_at_the_broker_and_made_when_they_come(make_client, tmp_path):
    alice = make_client("alice")
    make_client("bob").close()
    wait_peers(alice, {"alice"})  # alice sees bob offline: the folder's stream goes to his inbox at the broker
    src = folder(tmp_path / "for-bob", files=50)
    xfer, done = alice.send_file("bob", src)
    done.result(30)
    assert wait_for(alice, lambda e: isinstance(e, ev.FileUploaded)).recipient == "bob"
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    received = wait_for(bob, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), 30)
    assert isinstance(received, ev.FileReceived) and received.files == 50, received
    assert snapshot(received.path) == snapshot(src) and received.path.name.endswith("_alice_for-bob")
    assert wait_for(alice, lambda e: isinstance(e, ev.FileSent)).xfer == xfer
