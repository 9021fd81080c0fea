"""Recovery without an operator, and the operator's own commands, end to end: real broker processes (one, or a
cluster on a real Redis), real clients, and the command line as users and operators run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.client.recovery import recover_user
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ErrorCode, ExitCode, RemoteError
from p2pchat.common.recovery import new_phrase
from tests.conftest import ROOT, BrokerProcess, clients, free_ports, wait_for, wait_until

MOVED = "was moved to another key with its recovery phrase"


def cli(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """``p2pchat ARGS`` with ``P2PCHAT_HOME=home``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "p2pchat.client.cli", *args], cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=60, env=dict(os.environ, P2PCHAT_HOME=str(home)))


@pytest.fixture
def machine(home: Path, tmp_path: Path) -> Iterator[Callable[..., ChatClient]]:
    """``machine(name, user, server)``: a client of ``user`` on the machine ``name`` (its own user directory)."""
    for make in clients():
        yield lambda name, user, server, connect=True: make(
            user, connect, server=server, state_dir=tmp_path / name / "users" / user,
            received_dir=tmp_path / name / "received")


def pinned(alice: ChatClient, bob: ChatClient) -> None:
    """Alice has bob's key pinned: bob has written to her."""
    bob.send("alice", "hello")
    wait_for(alice, lambda e: isinstance(e, ev.MessageReceived) and e.text == "hello")


def signed_out(client: ChatClient, why: str) -> None:
    event = wait_for(client, lambda e: isinstance(e, ev.Stopped))
    assert event.error.code is ErrorCode.SESSION_REPLACED and why in event.error.message, event.error


def key_change_held(alice: ChatClient, user: str, old: bytes, new: bytes, how: str = "recovered") -> None:
    """Alice was told ``user``'s key changed, and how, and holds the new key as pending: never accepted silently."""
    event = wait_for(alice, lambda e: isinstance(e, ev.PeerKeyChanged) and e.user == user)
    assert (event.old, event.new, event.how) == (old, new, how)
    assert alice.pending_key_change(user) == (old, new) and alice.e2e.pinned_key(user) == old


# --- one broker ----------------------------------------------------------------------------------------------------
def test_reinstall_then_recovery_keeps_the_id_warns_contacts_and_signs_the_old_key_out(broker, machine, tmp_path):
    alice = machine("a", "alice", broker.address)
    bob = machine("old", "bob", broker.address)
    pinned(alice, bob)
    old_key = bob.identity.public

    fresh = tmp_path / "new-machine"  # bob reinstalls: a fresh P2PCHAT_HOME, so a fresh key
    refused = cli(fresh, "send", "--user", "bob", "--server", f"127.0.0.1:{broker.port}", "--to", "alice", "hi")
    assert refused.returncode == ExitCode.REFUSED
    assert "bob is registered with another key; use your recovery phrase (p2pchat recover --user bob) or ask " \
           "the broker's operator" in refused.stderr
    recovered = cli(fresh, "recover", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                    stdin=bob.recovery_phrase + "\n")
    assert recovered.returncode == ExitCode.OK, recovered.stderr
    new_key = Identity.load_or_create(fresh / "users" / "bob" / "identity.key").public
    assert new_key != old_key

    signed_out(bob, MOVED)
    key_change_held(alice, "bob", old_key, new_key)
    # The phrase came along: the new installation keeps the ID's recovery key, and prints the same phrase.
    assert cli(fresh, "recovery-phrase", "--user", "bob").stdout.strip() == bob.recovery_phrase
    sent = cli(fresh, "send", "--user", "bob", "--server", f"127.0.0.1:{broker.port}", "--to", "alice", "it's me")
    assert sent.returncode == ExitCode.OK, sent.stderr
    assert "new key" not in sent.stderr  # no new phrase to show: this installation has bob's

    old_again = machine("old", "bob", broker.address, connect=False)  # the old key stops working
    with pytest.raises(RemoteError) as err:
        old_again.connect(timeout=10)
    assert err.value.code is ErrorCode.ID_TAKEN and "use your recovery phrase" in err.value.message

    assert alice.accept_peer_key("bob")  # once alice has checked it: her messages reach the new key
    listener = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", "bob", "--server",
                                 f"127.0.0.1:{broker.port}", "--json", "--count", "1"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, P2PCHAT_HOME=str(fresh)))
    try:
        alice.send("bob", "welcome back")
        out, _ = listener.communicate(timeout=30)
    finally:
        listener.kill()
    # Queued for bob since alice accepted his key: it may come before the listener says it is connected.
    assert [r["text"] for r in map(json.loads, out.splitlines()) if r["type"] == "message"] == ["welcome back"], out


def test_a_wrong_phrase_is_refused_with_exit_status_4_and_moves_nothing(broker, machine, tmp_path):
    bob = machine("old", "bob", broker.address)
    server = f"127.0.0.1:{broker.port}"
    wrong = cli(tmp_path / "thief", "recover", "--user", "bob", "--server", server, stdin=new_phrase())
    assert wrong.returncode == ExitCode.REFUSED and "that is not the recovery phrase of 'bob'" in wrong.stderr
    junk = cli(tmp_path / "thief", "recover", "--user", "bob", "--server", server, stdin="let me in please\n")
    assert junk.returncode == ExitCode.REFUSED and "a recovery phrase is 12 words" in junk.stderr
    bob.send("bob", "still mine")  # the session goes on
    assert not (tmp_path / "thief" / "users" / "bob" / "recovery.phrase").exists()


def test_recovery_attempts_are_bounded_and_then_refused_even_with_the_right_phrase(broker, machine, tmp_path):
    bob = machine("old", "bob", broker.address)
    config = ClientConfig(server=broker.address, state_dir=tmp_path / "thief")
    codes = []
    while not codes or codes[-1] is ErrorCode.RECOVERY_REFUSED:
        with pytest.raises(RemoteError) as err:
            recover_user("bob", new_phrase(), config)
        codes.append(err.value.code)
        assert len(codes) <= 6, codes  # 5 attempts per ID (and 10 requests per address) at once, then a wait
    assert codes[-1] is ErrorCode.RATE_LIMITED
    with pytest.raises(RemoteError) as err:
        recover_user("bob", bob.recovery_phrase, config)
    assert err.value.code is ErrorCode.RATE_LIMITED


def test_the_recovery_phrase_is_shown_at_the_first_run_and_printed_again_on_request(broker, tmp_path):
    home = tmp_path / "home"
    first = cli(home, "send", "--user", "carol", "--server", f"127.0.0.1:{broker.port}", "--to", "carol", "hi")
    assert first.returncode == ExitCode.OK, first.stderr
    printed = cli(home, "recovery-phrase", "--user", "carol")
    phrase = printed.stdout.strip()
    assert printed.returncode == ExitCode.OK and len(phrase.split(" ")) == 12 and phrase in first.stderr
    assert oct((home / "users" / "carol" / "recovery.phrase").stat().st_mode & 0o777) == "0o600"
    again = cli(home, "send", "--user", "carol", "--server", f"127.0.0.1:{broker.port}", "--to", "carol", "hi")
    assert again.returncode == ExitCode.OK and phrase not in again.stderr  # once


# --- the operator ----------------------------------------------------------------------------------------------------
def admin(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess:
    return cli(broker.home, "broker", "admin", *args, "--data-dir", str(broker.home / "broker"))


def test_operator_release_on_a_running_broker_signs_the_old_key_out_and_the_next_key_gets_the_id(broker, machine):
    bob = machine("old", "bob", broker.address)
    released = admin(broker, "release", "bob")
    assert released.returncode == ExitCode.OK and "released bob" in released.stdout, released.stderr
    signed_out(bob, "was released by the broker's operator")
    newcomer = machine("new", "bob", broker.address)  # the next key to register gets it
    assert newcomer.identity.public != bob.identity.public
    wait_until(lambda: any("binding changed: user=bob released by operator" in line for line in broker.lines), 10,
               "the broker to log the release")
    [record] = [json.loads(line) for line in admin(broker, "audit", "bob", "--json").stdout.splitlines()]
    assert (record["change"], record["old_key"], record["new_key"]) == ("released", bob.identity.public.hex(), None)
    assert record["origin"].startswith("operator ")
    assert admin(broker, "release", "nobody").returncode == ExitCode.ERROR


def test_operator_move_on_a_stopped_broker_binds_the_id_to_the_key_given(broker, machine, tmp_path):
    alice = machine("a", "alice", broker.address)
    bob = machine("old", "bob", broker.address)
    old_key = bob.identity.public
    bob.close()
    alice.close()
    broker.stop()
    (tmp_path / "new" / "users" / "bob").mkdir(parents=True)
    new_key = Identity.load_or_create(tmp_path / "new" / "users" / "bob" / "identity.key").public
    moved = admin(broker, "move", "bob", "--key", new_key.hex())
    assert moved.returncode == ExitCode.OK and "moved bob" in moved.stdout, moved.stderr
    broker.start()
    assert machine("new", "bob", broker.address).identity.public == new_key
    with pytest.raises(RemoteError) as err:
        machine("old", "bob", broker.address)
    assert err.value.code is ErrorCode.ID_TAKEN
    [record] = [json.loads(line) for line in admin(broker, "audit", "--json").stdout.splitlines()]
    assert (record["change"], record["old_key"], record["new_key"]) == ("moved", old_key.hex(), new_key.hex())


# --- a cluster on Redis ------------------------------------------------------------------------------------------------
@pytest.fixture
def two_brokers(tmp_path: Path) -> Iterator[tuple[BrokerProcess, BrokerProcess, str]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from tests.broker.test_cluster import RedisProcess

    redis_server = RedisProcess(tmp_path / "redis").start()
    brokers = [BrokerProcess(tmp_path / f"b{n}", free_ports(3), ["--cluster", redis_server.url]).start(timeout=20)
               for n in (1, 2)]
    try:
        yield brokers[0], brokers[1], redis_server.url
    finally:
        for broker in brokers:
            broker.stop()
        redis_server.stop()


def test_a_recovery_through_one_broker_signs_the_old_key_out_on_another_and_warns_contacts_there(two_brokers,
                                                                                                machine):
    one, two, _ = two_brokers
    bob = machine("old", "bob", one.address)
    alice = machine("a", "alice", two.address)
    pinned(alice, bob)
    new = machine("new", "bob", two.address, connect=False)
    recover_user("bob", bob.recovery_phrase, new.config)  # through broker two's key service
    signed_out(bob, MOVED)  # by broker one, which read the change from Redis
    key_change_held(alice, "bob", bob.identity.public, new.identity.public)  # told by broker two
    new.close()
    machine("new", "bob", one.address)  # the new key registers anywhere
    with pytest.raises(RemoteError) as err:
        machine("old", "bob", two.address)
    assert err.value.code is ErrorCode.ID_TAKEN


def test_operator_release_in_a_cluster_goes_through_redis(two_brokers, machine, tmp_path):
    one, two, url = two_brokers
    bob = machine("old", "bob", two.address)
    released = cli(tmp_path, "broker", "admin", "release", "bob", "--cluster", url)
    assert released.returncode == ExitCode.OK, released.stderr
    signed_out(bob, "was released by the broker's operator")
    machine("new", "bob", one.address)
    audit = cli(tmp_path, "broker", "admin", "audit", "--redis", url).stdout
    assert "user=bob released by operator" in audit


def test_messages_in_flight_both_ways_across_a_recovery_each_arrive_once_in_order(broker, machine, tmp_path):
    """Issue 15's check: bob recovers onto a new machine while alice keeps writing and bob's new device writes
    too; once alice has accepted bob's new key, every message has arrived exactly once, in order per sender,
    and alice's history says what became of each."""
    alice = machine("a", "alice", broker.address)
    bob = machine("old", "bob", broker.address)
    pinned(alice, bob)
    for i in range(5):  # delivered to bob's old machine
        alice.send("bob", f"a{i}")
    got_old = [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived) and e.sender == "alice").text
               for _ in range(5)]
    phrase = bob.recovery_phrase
    bob.close()
    for i in range(5, 10):  # queued for bob, sealed to his old key
        alice.send("bob", f"a{i}")
    new_home = tmp_path / "new" / "users" / "bob"
    recover_user("bob", phrase, ClientConfig(server=broker.address, state_dir=new_home), timeout=10)
    key_change_held(alice, "bob", bob.identity.public, Identity.load_or_create(new_home / "identity.key").public)
    held = []
    for i in range(10, 15):  # written after the change: they wait for alice's decision
        try:
            alice.send("bob", f"a{i}")
        except Exception as exc:  # noqa: BLE001 - the caller is told it waits
            held.append(exc)
    assert len(held) == 5 and all("waits in your outbox" in str(exc) for exc in held)
    new_bob = machine("new", "bob", broker.address)
    for i in range(3):
        new_bob.send("alice", f"b{i}")  # held at alice until she accepts
    assert alice.accept_peer_key("bob")
    got_new = [wait_for(new_bob, lambda e: isinstance(e, ev.MessageReceived), timeout=20).text for _ in range(10)]
    got_alice = [wait_for(alice, lambda e: isinstance(e, ev.MessageReceived) and e.sender == "bob").text
                 for _ in range(3)]
    assert got_old + got_new == [f"a{i}" for i in range(15)]  # each once, in order
    assert got_alice == ["b0", "b1", "b2"]
    wait_until(lambda: set(outgoing_states(alice, "bob").values()) <= {"delivered", "read"}, 20,
               "every message of alice's delivered")
    assert len(outgoing_states(alice, "bob")) == 15


def outgoing_states(client: ChatClient, peer: str) -> dict[str, str]:
    history = client.open_history()
    try:
        return {e.text: e.state for e in history.conversation(peer) if e.outgoing}
    finally:
        history.close()
