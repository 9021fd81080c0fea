"""Key changes lose nothing (issue 15, point 1): a recipient that cannot open a message says so, the sender
seals it again to the recipient's new key once its user accepts that key, and every message arrives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.client.storage.history import History
from p2pchat.common.errors import ErrorCode, P2PChatError
from tests.conftest import HEARTBEAT, ROOT, BrokerProcess, wait_for, wait_until


@pytest.fixture
def reinstall(tmp_path, home, broker):
    """alice and bob chat on ``broker``; then bob reinstalls (a fresh home, so a fresh key) and both meet on a
    fresh broker: alice still has bob's old key pinned. Yields a factory of clients on the fresh broker."""
    clients: list[ChatClient] = []
    fresh = BrokerProcess.launch(tmp_path / "fresh-broker")

    def client(user: str, where: BrokerProcess = fresh, state_dir: Path | None = None, **config) -> ChatClient:
        c = ChatClient(user, ClientConfig(server=where.address, heartbeat_ivl=HEARTBEAT, state_dir=state_dir,
                                          **config))
        clients.append(c)
        c.connect(timeout=10)
        return c

    alice, bob = client("alice", broker), client("bob", broker)
    alice.send("bob", "before the reinstall")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    alice.close()
    bob.close()
    client.new_bob_home = tmp_path / "bob-reinstalled"
    try:
        yield client
    finally:
        for c in clients:
            c.close()
        fresh.stop()


def states(client: ChatClient) -> dict[str, str]:
    history = client.open_history()
    try:
        return {e.text: e.state for e in history.conversation("bob") if e.outgoing}
    finally:
        history.close()


def test_a_message_to_a_peer_whose_key_changed_waits_for_the_user_then_goes_once_accepted(reinstall):
    """The sender fetches bob's device list before sealing, so it sees the new key before anything is sealed to
    the old one (the in-flight case, refused as undecryptable and sealed again, is in test_recovery.py)."""
    alice = reinstall("alice")
    bob = reinstall("bob", state_dir=reinstall.new_bob_home)
    for text in ("written after bob reinstalled", "and another"):
        with pytest.raises(P2PChatError) as held:  # the caller is told it waits
            alice.send("bob", text)
        assert held.value.code is ErrorCode.PEER_KEY_CHANGED and "waits in your outbox" in str(held.value)
    change = wait_for(alice, lambda e: isinstance(e, ev.PeerKeyChanged))
    assert change.user == "bob" and change.new == bob.identity.public and not change.accepted
    assert states(alice)["written after bob reinstalled"] == states(alice)["and another"] == "queued"
    assert alice.accept_peer_key("bob")  # no reconnect: both go out now, in order
    got = [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(2)]
    assert got == ["written after bob reinstalled", "and another"]
    wait_until(lambda: [states(alice)[text] for text in got] == ["delivered"] * 2, what="both delivered")


def test_trusting_key_changes_sends_at_once_and_still_reports_the_change(reinstall):
    alice = reinstall("alice", trust_key_changes=True)
    bob = reinstall("bob", state_dir=reinstall.new_bob_home)
    msg_id = alice.send("bob", "hello again")
    change = wait_for(alice, lambda e: isinstance(e, ev.PeerKeyChanged))
    assert change.accepted and change.new == bob.identity.public
    received = wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    assert (received.msg_id, received.text) == (msg_id, "hello again")


def test_a_message_from_a_new_key_shows_as_soon_as_the_key_is_accepted(reinstall):
    alice = reinstall("alice")
    bob = reinstall("bob", state_dir=reinstall.new_bob_home)
    bob.send("alice", "my new key")
    change = wait_for(alice, lambda e: isinstance(e, (ev.PeerKeyChanged, ev.MessageReceived)))
    assert isinstance(change, ev.PeerKeyChanged)
    assert alice.accept_peer_key("bob")
    assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "my new key"


def test_accepting_with_the_cli_while_the_client_runs_lets_the_waiting_messages_go(reinstall, home):
    alice = reinstall("alice")
    bob = reinstall("bob", state_dir=reinstall.new_bob_home)
    with pytest.raises(P2PChatError):  # waits for the user's decision
        alice.send("bob", "waiting for p2pchat trust")
    wait_for(alice, lambda e: isinstance(e, ev.PeerKeyChanged))
    done = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "trust", "--user", "alice", "--peer", "bob"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "waiting for p2pchat trust"


def test_a_message_refused_again_after_its_reseal_fails_instead_of_looping(tmp_path):
    history = History(tmp_path / "history.sqlite")
    try:
        history.add_outgoing(b"a" * 16, "bob", "one", 1)
        assert history.undecryptable(b"a" * 16, "bob") is None  # not acknowledged yet: not in flight to bob
        history.advance(b"a" * 16, "stored")
        assert history.undecryptable(b"a" * 16, "carol") is None  # only its recipient can refuse it
        assert history.undecryptable(b"a" * 16, "bob") == "undecryptable"
        assert history.undecryptable(b"a" * 16, "bob") is None  # already waiting
        assert [e.text for e in history.reseal("bob")] == ["one"]
        assert [e.state for e in history.outbox()] == ["resealed"]  # sent again after a restart too
        assert history.advance(b"a" * 16, "stored")
        assert history.undecryptable(b"a" * 16, "bob") == "failed"  # a liar gets one reseal, no loop
        history.add_outgoing(b"b" * 16, "bob", "two", 2)
        history.advance(b"b" * 16, "delivered")
        assert history.undecryptable(b"b" * 16, "bob") is None  # contradicts its own delivered receipt
    finally:
        history.close()


def test_history_cli_shows_the_new_states(tmp_path, monkeypatch):
    monkeypatch.setenv("P2PCHAT_HOME", str(tmp_path / "home"))
    from p2pchat.common.paths import ensure_private_dir, user_dir

    path = ensure_private_dir(user_dir("alice")) / "history.sqlite"
    history = History(path)
    history.add_outgoing(b"a" * 16, "bob", "one", 1)
    history.advance(b"a" * 16, "stored")
    assert history.undecryptable(b"a" * 16, "bob") == "undecryptable"
    history.commit()
    history.close()
    out = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "history", "--user", "alice", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert '"state": "undecryptable"' in out.stdout, out.stderr


def test_a_file_offer_sealed_to_an_old_key_goes_again_once_the_new_key_is_accepted(reinstall, tmp_path):
    alice = reinstall("alice")
    bob = reinstall("bob", state_dir=reinstall.new_bob_home, received_dir=tmp_path / "inbox")
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n" * 1000)
    _, done = alice.send_file("bob", source)
    change = wait_for(alice, lambda e: isinstance(e, (ev.PeerKeyChanged, ev.FileFailed)))  # bob's key, asked
    assert isinstance(change, ev.PeerKeyChanged) and change.new == bob.identity.public
    assert not done.done()  # the transfer waits for the decision instead of failing
    assert alice.accept_peer_key("bob")
    saved = wait_for(bob, lambda e: isinstance(e, ev.FileReceived))
    assert saved.path.read_bytes() == source.read_bytes()
    done.result(timeout=10)


def test_accepting_a_key_after_the_session_closed_pins_it_and_sends_or_shows_nothing():
    from p2pchat.client.core.session import ClientSession
    from p2pchat.client.e2e import EndToEnd, MemoryKeys
    from p2pchat.common.protocol import ChatMessage, Registered, pack
    from tests.cores import id_source, identity

    e2e = EndToEnd("me", identity("me"), MemoryKeys(), MemoryKeys())
    e2e.learn("bob", identity("bob-old").public)
    session = ClientSession("me", wall_ms=lambda: 0, e2e=e2e, token=b"t" * 32, new_id=id_source("me"))
    session.start(0.0)
    session.on_frames(pack(Registered("me", b"epoch", 1000), 0), 0.0)
    sealer = EndToEnd("bob", identity("bob"), MemoryKeys(), MemoryKeys())
    sealer.learn("me", identity("me").public)
    msg_id = b"m" * 16
    held = session.on_frames(pack(ChatMessage("bob", "me", sealer.seal("me", msg_id, 0, b"hi")), 0, msg_id), 0.1)
    assert [type(a.event) for a in held] == [ev.PeerKeyChanged]  # held: bob presents a new key
    session.close(0.2)
    assert session.accept_peer_key("bob", 0.3) == []  # closed: nothing shown, nothing sent
    assert e2e.pinned_key("bob") == identity("bob").public  # but the decision is kept for the next run
