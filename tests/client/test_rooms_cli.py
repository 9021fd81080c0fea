"""Rooms from the command line, as acceptance checks drive them (issue 16's contract): ``p2pchat room
create|invite|join|members|list|leave|remove``, ``send --room``, and ``listen --json`` message events that carry
``"room"`` beside ``from``; ``history --room`` finds them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pchat.common.errors import ExitCode
from tests.client.test_recovery import cli
from tests.conftest import ROOT, BrokerProcess


def run(tmp_path: Path, broker: BrokerProcess, user: str, *args: str) -> subprocess.CompletedProcess:
    """``p2pchat ARGS --user USER --server …`` on ``user``'s own machine (its own P2PCHAT_HOME)."""
    return cli(tmp_path / user, *args, "--user", user, "--server", f"127.0.0.1:{broker.port}")


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == ExitCode.OK, done.stderr
    return done.stdout


def test_rooms_from_the_command_line(broker, tmp_path):
    ok(run(tmp_path, broker, "alice", "room", "create", "team", "--topic", "plans"))
    ok(run(tmp_path, broker, "bob", "send", "--to", "alice", "bob exists"))  # bob's ID is bound
    ok(run(tmp_path, broker, "carol", "send", "--to", "alice", "carol exists"))
    ok(run(tmp_path, broker, "alice", "room", "invite", "team", "bob", "carol"))
    assert json.loads(ok(run(tmp_path, broker, "bob", "room", "list", "--json"))) == [
        {"room": "team", "role": "member", "invited": True}]
    ok(run(tmp_path, broker, "bob", "room", "join", "team"))
    ok(run(tmp_path, broker, "carol", "room", "join", "TEAM"))  # names are case-insensitive
    members = json.loads(ok(run(tmp_path, broker, "alice", "room", "members", "team", "--json")))
    assert members["room"] == "team" and members["topic"] == "plans"
    assert [(m["user"], m["role"], m["invited"]) for m in members["members"]] == [
        ("alice", "owner", False), ("bob", "member", False), ("carol", "member", False)]

    listener = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", "bob", "--server",
                                 f"127.0.0.1:{broker.port}", "--json", "--count", "2"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "bob")))
    try:
        ok(run(tmp_path, broker, "alice", "send", "--room", "team", "hello team"))
        ok(run(tmp_path, broker, "carol", "send", "--room", "team", "hi all"))
        out, err = listener.communicate(timeout=60)
    finally:
        listener.kill()
    events = [json.loads(line) for line in out.splitlines()]
    messages = [{k: e[k] for k in ("from", "room", "text")} for e in events if e["type"] == "message"]
    assert messages == [{"from": "alice", "room": "team", "text": "hello team"},
                        {"from": "carol", "room": "team", "text": "hi all"}], err
    assert all("to" not in e for e in events if e["type"] == "message")
    history = [json.loads(line) for line in ok(cli(tmp_path / "bob", "history", "--user", "bob", "--room", "team",
                                                   "--json")).splitlines()]
    assert [(h["from"], h["room"], h["text"]) for h in history] == [("alice", "team", "hello team"),
                                                                   ("carol", "team", "hi all")]

    refused = run(tmp_path, broker, "bob", "room", "remove", "team", "carol")  # a member may not
    assert refused.returncode == ExitCode.REFUSED and "not_allowed" in refused.stderr
    ok(run(tmp_path, broker, "alice", "room", "remove", "team", "carol"))
    gone = run(tmp_path, broker, "carol", "send", "--room", "team", "still here?")
    assert gone.returncode == ExitCode.REFUSED and "unknown_room" in gone.stderr
    ok(run(tmp_path, broker, "bob", "room", "leave", "team"))
    assert json.loads(ok(run(tmp_path, broker, "bob", "room", "list", "--json"))) == []


def bobs_first_file(broker: BrokerProcess, tmp_path: Path) -> dict:
    """bob's ``listen --json`` until its first file event: that event."""
    proc = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", "bob", "--server",
                             f"127.0.0.1:{broker.port}", "--json", "--received-dir", str(tmp_path / "in")],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, P2PCHAT_HOME=str(tmp_path / "bob")))
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["type"] in ("file", "file_failed"):
                return event
    finally:
        proc.kill()
        proc.wait()
    raise AssertionError("bob's listen ended without a file event")


def test_send_file_to_a_room_and_listen_reports_it_with_the_room(broker, tmp_path):
    ok(run(tmp_path, broker, "alice", "room", "create", "team"))
    ok(run(tmp_path, broker, "bob", "send", "--to", "alice", "bob exists"))
    ok(run(tmp_path, broker, "alice", "room", "invite", "team", "bob"))
    ok(run(tmp_path, broker, "bob", "room", "join", "team"))
    source = tmp_path / "notes.txt"
    source.write_bytes(os.urandom(200_000))
    ok(run(tmp_path, broker, "alice", "send-file", "--room", "team", "--quiet", str(source)))  # alice may go now
    event = bobs_first_file(broker, tmp_path)
    assert (event["type"], event["from"], event["room"], event["name"]) == ("file", "alice", "team", "notes.txt")
    assert Path(event["path"]).read_bytes() == source.read_bytes()


def test_send_file_to_someone_offline_exits_once_uploaded_and_they_get_it_later(broker, tmp_path):
    ok(run(tmp_path, broker, "bob", "room", "list"))  # bob's ID is bound; bob goes away
    source = tmp_path / "report.pdf"
    source.write_bytes(os.urandom(1_500_000))
    sent = ok(run(tmp_path, broker, "alice", "send-file", "--to", "bob", "--quiet", str(source)))
    assert "uploaded report.pdf" in sent and "bob" in sent  # alice is gone now; bob was offline all along
    broker.stop()  # what the broker holds survives a restart
    broker.start()
    event = bobs_first_file(broker, tmp_path)
    assert (event["type"], event["from"], event["name"]) == ("file", "alice", "report.pdf")
    assert "room" not in event and Path(event["path"]).read_bytes() == source.read_bytes()


@pytest.mark.broker_args("--room-quota", "1000000")
def test_a_file_over_the_brokers_quota_is_refused_in_words(broker, tmp_path):
    ok(run(tmp_path, broker, "bob", "room", "list"))
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(1_200_000))
    refused = run(tmp_path, broker, "alice", "send-file", "--to", "bob", "--later", "--quiet", str(source))
    assert refused.returncode == ExitCode.REFUSED
    assert "exceed the 1000000 bytes the broker keeps for one room (or one recipient)" in refused.stderr
    assert "Traceback" not in refused.stderr
