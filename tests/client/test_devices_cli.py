"""Several devices of one account from the command line (issue 15, points 3 and 4): one safety number for the
account in ``p2pchat verify`` and ``keys``, with the peer's devices under it, that stays verified while the peer
links and unlinks devices; and ``p2pchat listen --json`` telling what another device of ours sent and read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.common.crypto import account_safety_number, fingerprint, safety_number
from p2pchat.common.errors import ExitCode
from tests.client.test_devices import bob_twice, texts  # noqa: F401 - a fixture
from tests.client.test_recovery import cli, machine  # noqa: F401 - a fixture
from tests.conftest import ROOT, wait_for


def alice_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return cli(tmp_path / "a", *args, "--user", "alice")


def test_verify_shows_one_number_for_bobs_account_and_it_outlives_his_devices(bob_twice, tmp_path):  # noqa: F811
    alice, desk, laptop = bob_twice
    alice.send("bob", "hello both of you")  # alice fetches bob's devices: his account key is pinned
    assert texts(desk, 1) == texts(laptop, 1) == ["hello both of you"]
    server = f"127.0.0.1:{alice.config.server.port}"
    number = account_safety_number(alice.account_of("alice"), desk.account_of("bob"))
    assert alice.account_of("bob") == desk.account_of("bob") and alice.account_safety_number("bob") == number
    assert desk.account_safety_number("alice") == number  # the same digits on bob's side

    shown = alice_cli(tmp_path, "verify", "--peer", "bob", "--server", server, "--yes")
    assert shown.returncode == ExitCode.OK, shown.stderr
    assert f"Safety number with bob: {number}" in shown.stdout and "one for bob's account" in shown.stdout
    assert "laptop" in shown.stdout and fingerprint(laptop.identity.public) in shown.stdout
    assert "bob's account is verified" in shown.stdout

    listed = json.loads(alice_cli(tmp_path, "keys", "--json", "--server", server).stdout)
    bob = next(peer for peer in listed["peers"] if peer["user"] == "bob")
    assert bob["verified"] and bob["account_safety_number"] == number
    assert bob["safety_number"] == safety_number(alice.identity.public, desk.identity.public)  # kept as it was
    assert [(d["id"], d["name"], d["key"]) for d in bob["devices"]] == [
        (1, socket.gethostname()[:32], desk.identity.public.hex()),
        (2, "laptop", laptop.identity.public.hex())]

    removed = cli(tmp_path / "desk", "unlink", "--user", "bob", "--server", server, "laptop")
    assert removed.returncode == ExitCode.OK, removed.stderr
    again = json.loads(alice_cli(tmp_path, "verify", "--peer", "bob", "--server", server, "--yes", "--json").stdout)
    assert again["account_safety_number"] == number
    assert [d["key"] for d in again["devices"]] == [desk.identity.public.hex()]
    assert alice.is_verified("bob")  # the account verified: the window says so too


def test_listen_json_tells_what_another_device_sent_and_read(bob_twice, tmp_path):  # noqa: F811
    alice, desk, laptop = bob_twice
    laptop.close()  # its installation listens from the command line instead
    server = f"127.0.0.1:{alice.config.server.port}"
    listener = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", "bob", "--server",
                                 server, "--json"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "laptop")))
    try:
        def next_of(kind: str) -> dict:
            while True:
                line = listener.stdout.readline()
                assert line, listener.stderr.read()
                record = json.loads(line)
                if record["type"] == kind:
                    return record

        next_of("status")  # listening
        msg_id = desk.send("alice", "from my desktop")
        sent = next_of("sent_elsewhere")
        assert sent == {"type": "sent_elsewhere", "from": "bob", "to": "alice", "text": "from my desktop",
                        "id": msg_id.hex(), "ts": sent["ts"]}
        alice.send("bob", "read this")
        assert texts(desk, 1) == ["read this"]
        received = next_of("message")
        desk.mark_read("alice")
        assert next_of("read_elsewhere") == {"type": "read_elsewhere", "peer": "alice", "id": received["id"]}
        wait_for(alice, lambda e: isinstance(e, ev.MessageReceived) and e.text == "from my desktop")
    finally:
        listener.terminate()
        listener.communicate(timeout=30)


def test_listen_no_files_leaves_files_to_the_other_device(bob_twice, tmp_path):  # noqa: F811
    alice, desk, laptop = bob_twice
    laptop.close()
    server = f"127.0.0.1:{alice.config.server.port}"
    inbox = tmp_path / "laptop-inbox"
    listener = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", "bob", "--server",
                                 server, "--json", "--no-files", "--received-dir", str(inbox)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "laptop")))
    try:
        assert json.loads(listener.stdout.readline())["type"] == "status"  # listening
        for n in range(4):  # whichever answers first, the desktop takes every file (by chance: 1 in 16)
            src = tmp_path / f"f{n}.bin"
            src.write_bytes(os.urandom(20_000))
            _, done = alice.send_file("bob", src)
            done.result(30)
            assert wait_for(desk, lambda e: isinstance(e, ev.FileReceived), 20).path.read_bytes() == src.read_bytes()
        assert not inbox.exists() or not any(inbox.iterdir())
    finally:
        listener.terminate()
        listener.communicate(timeout=30)
