"""Delivery guarantees: store-and-forward, receipts, outbox and history across crashes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.client.storage.history import History
from p2pchat.common.errors import ErrorCode, RemoteError
from p2pchat.common.protocol import new_msg_id
from tests.conftest import HEARTBEAT, ROOT, BrokerProcess, free_port_pair, wait_for, wait_peers


def texts_received(client: ChatClient, count: int, timeout: float = 30.0) -> list[str]:
    return [wait_for(client, lambda e: isinstance(e, ev.MessageReceived), timeout).text for _ in range(count)]


def test_message_to_an_offline_user_is_delivered_when_they_register(make_client):
    alice = make_client("alice")
    make_client("bob").close()
    alice.send("bob", "while you were out")
    assert wait_for(alice, lambda e: isinstance(e, ev.Acked)).status == "stored"
    bob = make_client("bob")
    assert texts_received(bob, 1) == ["while you were out"]


def test_sender_sees_stored_then_delivered_then_read(make_client):
    alice, bob = make_client("alice"), make_client("bob")
    msg_id = alice.send("bob", "hello")
    assert wait_for(alice, lambda e: isinstance(e, ev.Acked)).status == "stored"
    delivered = wait_for(alice, lambda e: isinstance(e, ev.Receipt))
    assert (delivered.msg_id, delivered.peer, delivered.status) == (msg_id, "bob", "delivered")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    bob.mark_read("alice")
    read = wait_for(alice, lambda e: isinstance(e, ev.Receipt))
    assert (read.msg_id, read.status) == (msg_id, "read")
    history = alice.open_history()
    assert [e.state for e in history.conversation("bob")] == ["read"]
    history.close()


def test_read_receipts_can_be_turned_off_by_the_reader(make_client):
    alice, bob = make_client("alice"), make_client("bob", read_receipts=False)
    first = alice.send("bob", "one")
    wait_for(alice, lambda e: isinstance(e, ev.Receipt) and e.msg_id == first)
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    bob.mark_read("alice")
    second = alice.send("bob", "two")  # its delivery receipt comes after any read receipt bob might send
    receipt = wait_for(alice, lambda e: isinstance(e, ev.Receipt))
    assert (receipt.msg_id, receipt.status) == (second, "delivered")


@pytest.mark.broker_args("--queue-max", "3")
def test_queue_bound_is_a_clear_error_to_the_sender(make_client):
    alice = make_client("alice")
    make_client("bob").close()
    for i in range(3):
        alice.send("bob", f"m{i}")
    with pytest.raises(RemoteError) as err:
        alice.send("bob", "one too many")
    assert err.value.code is ErrorCode.QUEUE_FULL


TTL = 0.5


@pytest.mark.broker_args("--queue-ttl", str(TTL))
def test_expired_messages_are_not_delivered(make_client):
    alice = make_client("alice")
    make_client("bob").close()
    alice.send("bob", "stale soon")
    time.sleep(TTL + 0.2)  # the one thing to wait for here is the clock
    bob = make_client("bob")
    alice.send("bob", "fresh")
    assert texts_received(bob, 1) == ["fresh"]


def test_history_search_returns_the_oldest_or_the_newest_matches(tmp_path):
    history = History(tmp_path / "history.sqlite")
    try:
        for i in range(5):
            history.add_incoming(new_msg_id(), "alice", f"status report {i}", 1000 + i)
        history.add_outgoing(new_msg_id(), "bob", "unrelated", 2000)
        history.commit()
        assert [e.text for e in history.search("report", limit=2)] == ["status report 0", "status report 1"]
        newest = history.search("rep", limit=2, newest_first=True)
        assert [e.text for e in newest] == ["status report 4", "status report 3"]
        assert history.search("report", peer="bob") == []
    finally:
        history.close()


def test_history_survives_restart_and_search_finds_a_message(make_client, home):
    alice, bob = make_client("alice"), make_client("bob")
    for text in ("lunch at noon?", "the quarterly report is ready", "see you tomorrow"):
        alice.send("bob", text)
    texts_received(bob, 3)
    bob.close()
    history = History(home / "users" / "bob" / "history.sqlite")
    try:
        assert [e.text for e in history.conversation("alice")] == [
            "lunch at noon?", "the quarterly report is ready", "see you tomorrow"]
        found = history.search("quarter")
        assert [(e.peer, e.text, e.outgoing) for e in found] == [("alice", "the quarterly report is ready", False)]
    finally:
        history.close()
    env = dict(os.environ, P2PCHAT_HOME=str(home))
    out = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "history", "--user", "bob", "--search", "report",
                          "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"the quarterly report is ready"' in out.stdout and "lunch" not in out.stdout


def test_unsent_messages_go_out_after_the_client_is_killed_and_restarted(tmp_path, home):
    port = free_port_pair()
    broker = BrokerProcess(tmp_path / "b", port)
    script = textwrap.dedent(f"""
        from p2pchat.client.chat_client import ChatClient, ClientConfig
        from p2pchat.common.endpoints import ServerAddress
        import sys, time
        client = ChatClient("alice", ClientConfig(server=ServerAddress("127.0.0.1", {port})))
        client.start()  # the broker is down: nothing can be acknowledged
        for i in range(5):
            client.send_async("bob", f"queued {{i}}")
        history = client.open_history()
        while len(history.outbox()) < 5:  # committed to the outbox: now a kill cannot lose them
            time.sleep(0.01)
        print("queued", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, P2PCHAT_HOME=str(home))
    alice_proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  text=True)
    try:
        assert alice_proc.stdout.readline().strip() == "queued"
        alice_proc.kill()
        alice_proc.wait(10)
        broker.start()
        cfg = ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT)
        with ChatClient("bob", cfg) as bob, ChatClient("alice", cfg) as alice:
            bob.connect(10)
            alice.connect(10)
            assert texts_received(bob, 5) == [f"queued {i}" for i in range(5)]
    finally:
        if alice_proc.poll() is None:
            alice_proc.kill()
        broker.stop()


def test_ten_thousand_messages_survive_repeated_broker_sigkills(make_client, broker):
    """The broker is SIGKILLed at random moments mid-stream: exactly the 10,000 arrive, in order, once."""
    total = 10_000
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    alice, bob = make_client("alice"), make_client("bob")
    wait_peers(alice, {"alice", "bob"})
    got: list[str] = []
    done = threading.Event()

    def collect() -> None:
        while len(got) < total:
            got.append(wait_for(bob, lambda e: isinstance(e, ev.MessageReceived), timeout=120).text)
        done.set()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    kills = 0

    def killer() -> None:
        nonlocal kills
        while not done.is_set() and kills < 6:
            time.sleep(rng.uniform(0.2, 1.0))
            if done.is_set():
                return
            broker.kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 0.3))
            broker.start()

    chaos = threading.Thread(target=killer, daemon=True)
    chaos.start()
    for i in range(total):
        alice.send_async("bob", f"m{i:05d}")
        if i % 500 == 0:
            time.sleep(0.05)  # spread the stream over the kills
    chaos.join(120)
    collector.join(180)
    assert done.is_set(), f"seed {seed}: only {len(got)} of {total} arrived after {kills} kills"
    assert kills >= 1, f"seed {seed}: the stream finished before any kill"
    assert got == [f"m{i:05d}" for i in range(total)], f"seed {seed}: order or duplicates wrong"
