"""Several devices per user (issue 15, point 3; docs/PROTOCOL.md §5.6), end to end: a real broker process, bob
on two installations linked with his recovery phrase, and alice writing to him. Every message reaches each of
bob's devices once, in order; what one of his devices sends shows on the other, and so does what he read; a
file goes to the device that takes it first; an unlinked device gets nothing more."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient
from p2pchat.common.errors import ErrorCode, ExitCode, P2PChatError
from tests.client.test_recovery import cli, machine  # noqa: F401 - a fixture
from tests.conftest import BrokerProcess, wait_for, wait_until


def texts(client: ChatClient, count: int, sender: str = "alice") -> list[str]:
    return [wait_for(client, lambda e: isinstance(e, ev.MessageReceived) and e.sender == sender, 20).text
            for _ in range(count)]


def history(client: ChatClient, peer: str) -> list[tuple[str, bool, str]]:
    opened = client.open_history()
    try:
        return [(e.text, e.outgoing, e.state) for e in opened.conversation(peer)]
    finally:
        opened.close()


@pytest.fixture
def bob_twice(broker: BrokerProcess, machine: Callable[..., ChatClient], tmp_path: Path):  # noqa: F811
    """alice, and bob on a desktop and (linked with his phrase) a laptop, all online."""
    alice = machine("a", "alice", broker.address)
    desk = machine("desk", "bob", broker.address)
    linked = cli(tmp_path / "laptop", "link", "--user", "bob", "--server", f"127.0.0.1:{broker.port}",
                 "--recovery", "--name", "laptop", stdin=desk.recovery_phrase + "\n")
    assert linked.returncode == ExitCode.OK, linked.stderr
    laptop = machine("laptop", "bob", broker.address)
    return alice, desk, laptop


def test_every_message_reaches_each_device_once_in_order_and_alice_sees_one_bob(bob_twice, machine, broker):  # noqa: F811
    alice, desk, laptop = bob_twice
    for i in range(20):
        alice.send("bob", f"m{i}")
    expected = [f"m{i}" for i in range(20)]
    assert texts(desk, 20) == expected and texts(laptop, 20) == expected
    assert sorted(alice.peers()) == ["alice", "bob"]
    laptop.close()  # offline: its copies wait for it
    wait_until(lambda: "bob" in alice.peers(), what="bob still online (his desktop is)")
    for i in range(20, 30):
        alice.send("bob", f"m{i}")
    assert texts(desk, 10) == [f"m{i}" for i in range(20, 30)]
    back = machine("laptop", "bob", broker.address)
    assert texts(back, 10) == [f"m{i}" for i in range(20, 30)]  # only what it had not taken yet, once
    wait_until(lambda: all(state == "delivered" for _, out, state in history(alice, "bob") if out),
               what="alice's messages delivered")
    assert len(history(alice, "bob")) == 30  # one bob in alice's history, each message once


def test_what_one_device_sends_and_reads_shows_on_the_other(bob_twice):
    alice, desk, laptop = bob_twice
    desk.send("alice", "sent from my desktop")
    assert texts(alice, 1, "bob") == ["sent from my desktop"]
    echoed = wait_for(laptop, lambda e: isinstance(e, ev.MessageEchoed))
    assert (echoed.peer, echoed.text) == ("alice", "sent from my desktop")
    wait_until(lambda: history(laptop, "alice") == [("sent from my desktop", True, "delivered")],
               what="the laptop's copy delivered (alice's receipt reached both of bob's devices)")
    alice.send("bob", "read me")
    assert texts(desk, 1) == ["read me"] and texts(laptop, 1) == ["read me"]
    desk.mark_read("alice")
    read = wait_for(laptop, lambda e: isinstance(e, ev.ReadElsewhere))
    assert read.peer == "alice"
    assert ("read me", False, "read") in history(laptop, "alice")


def test_a_file_goes_to_the_device_that_takes_it_and_the_other_shows_it_taken(bob_twice, tmp_path):
    alice, desk, laptop = bob_twice
    src = tmp_path / "photo.bin"
    src.write_bytes(os.urandom(300_000))
    _, done = alice.send_file("bob", src)
    done.result(30)
    outcomes = {}
    for name, device in (("desk", desk), ("laptop", laptop)):
        outcomes[name] = wait_for(device, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), 20)
    received = [o for o in outcomes.values() if isinstance(o, ev.FileReceived)]
    taken = [o for o in outcomes.values() if isinstance(o, ev.FileFailed)]
    assert len(received) == 1 and len(taken) == 1, outcomes
    assert received[0].path.read_bytes() == src.read_bytes()
    assert taken[0].error.code is ErrorCode.TAKEN and "took this file" in taken[0].error.message


def test_an_unlinked_device_is_signed_out_and_gets_nothing_more(bob_twice, tmp_path):
    alice, desk, laptop = bob_twice
    alice.send("bob", "to both")
    assert texts(desk, 1) == texts(laptop, 1) == ["to both"]
    removed = cli(tmp_path / "desk", "unlink", "--user", "bob", "--server", f"127.0.0.1:{alice.config.server.port}",
                  "laptop", stdin="")
    assert removed.returncode == ExitCode.OK, removed.stderr
    stopped = wait_for(laptop, lambda e: isinstance(e, ev.Stopped))
    assert stopped.error.code is ErrorCode.SESSION_REPLACED and "unlinked" in stopped.error.message
    alice.send("bob", "to the desktop only")  # alice's copies for the old list are refused, then sent again
    assert texts(desk, 1) == ["to the desktop only"]
    with pytest.raises(P2PChatError):  # the laptop's key is no longer bound: it cannot come back
        again = ChatClient("bob", laptop.config)
        try:
            again.connect(timeout=10)
        finally:
            again.close()


def test_a_device_that_takes_no_files_leaves_them_to_the_other(bob_twice, tmp_path):
    alice, desk, laptop = bob_twice
    laptop.close()
    picky = ChatClient("bob", dataclasses.replace(laptop.config, accept_files=False))
    try:
        picky.connect(timeout=10)
        for n in range(4):  # whichever answers first, the desktop takes every file (by chance: 1 in 16)
            src = tmp_path / f"doc{n}.bin"
            src.write_bytes(os.urandom(50_000))
            _, done = alice.send_file("bob", src)
            done.result(30)
            assert wait_for(desk, lambda e: isinstance(e, ev.FileReceived), 20).path.read_bytes() == src.read_bytes()
        assert not any(isinstance(e, ev.FileReceived) for e in list(picky.events.queue))
        inbox = picky.config.received_dir
        assert not inbox.exists() or not any(inbox.iterdir())
    finally:
        picky.close()
