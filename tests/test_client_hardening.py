"""Issue 13, client side: no peer can crash, flood or fool a client (real broker, real sockets, real files)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from client import events as ev
from client.actions import Transmit
from client.client import ChatClient
from common.protocol import ChatMessage, new_msg_id, pack
from tests.conftest import BrokerProcess, wait_for, wait_peers, wait_until


def _transmit(client: ChatClient, frames_list: list[list[bytes]]) -> None:
    """Send raw frames through a client's own connection, on its agent thread (a hostile peer's library)."""
    client._call(lambda now: client._execute([Transmit(f) for f in frames_list])).result(10)


def _queued_for(broker: BrokerProcess, user: str) -> int:
    with sqlite3.connect(broker.home / "broker" / "queue.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM queue WHERE recipient = ?", (user,)).fetchone()[0]


def _junk_for(recipient: str) -> list[bytes]:
    """A sealed-looking body claiming a fresh random sender key: it cannot open."""
    body = b"\x01" + os.urandom(32) + os.urandom(48)
    return pack(ChatMessage("alice", recipient, body), 1_700_000_000_000, new_msg_id())


# --- point 6 (client side) and point 9: what does not open is consumed, and pins nothing ---------------
def test_junk_messages_are_consumed_and_leave_bob_usable(make_client, broker):
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "genuine")  # pins keys both ways
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "genuine"
    _transmit(alice, [_junk_for("bob") for _ in range(300)])
    report = wait_for(bob, lambda e: isinstance(e, ev.ErrorReported))
    assert report.error.code.value == "integrity"
    wait_until(lambda: _queued_for(broker, "bob") == 0, what="bob's queue to empty")
    alice.send("bob", "after the junk")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "after the junk"
    seen = []
    while not bob.events.empty():
        seen.append(bob.events.get())
    assert not any(isinstance(e, ev.ErrorReported) for e in seen), "refusals are reported once, not per message"


def test_forged_message_does_not_raise_a_key_change(make_client, broker):
    alice, bob = make_client("alice"), make_client("bob")
    alice.send("bob", "genuine")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    pinned = bob.fingerprint_of("alice")
    _transmit(alice, [_junk_for("bob")])  # claims another key for alice, but does not authenticate
    event = wait_for(bob, lambda e: isinstance(e, (ev.ErrorReported, ev.PeerKeyChanged)))
    assert isinstance(event, ev.ErrorReported), event
    assert bob.pending_key_change("alice") is None
    assert bob.fingerprint_of("alice") == pinned
    bob.send("alice", "still trusted")  # not blocked by a key change
    assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "still trusted"


# --- point 5: an event callback may call back into the client ---------------------------------------
def test_callback_that_cancels_and_accepts_keys_does_not_deadlock(make_client, broker, home, tmp_path):
    import queue

    from client.client import ClientConfig
    from common import crypto
    from common.errors import ErrorCode, P2PChatError
    from tests.conftest import HEARTBEAT

    seen: queue.Queue = queue.Queue()

    def on_event(event) -> None:  # runs on bob's agent thread
        if isinstance(event, ev.FileIncoming):
            bob.cancel_transfer(event.xfer)
            seen.put(("cancelled", event.xfer))
        elif isinstance(event, ev.PeerKeyChanged):
            seen.put(("accepted", bob.accept_peer_key(event.user)))
            bob.send(event.user, "key accepted from a callback")

    alice = make_client("alice")
    bob = ChatClient("bob", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT,
                                         received_dir=tmp_path / "inbox"), on_event=on_event)
    try:
        bob.connect(timeout=10)
        wait_peers(alice, {"alice", "bob"})
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(1000))
        xfer, done = alice.send_file("bob", src)
        assert seen.get(timeout=10) == ("cancelled", xfer)
        try:
            done.result(10)
            raise AssertionError("the transfer should have been cancelled")
        except P2PChatError as exc:
            assert exc.code is ErrorCode.CANCELLED
        bob.e2e._pinned.put("alice", crypto.Identity.generate().public)  # alice's key "changes" in bob's eyes
        bob.e2e._shared.clear()
        alice.send("bob", "with my real key")
        assert seen.get(timeout=10) == ("accepted", True)
        assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "key accepted from a callback"
        assert bob.pending_key_change("alice") is None
    finally:
        bob.close()


# --- point 9: names budgeted in bytes; publishing without hard links ------------------------------
def test_long_multibyte_name_is_shortened_at_offer_time_and_arrives(make_client, tmp_path):
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    name = "b" * 190 + "." + "\N{GRINNING FACE}" * 16  # 255 bytes: the longest name the sender's disk allows
    src = tmp_path / name
    src.write_bytes(os.urandom(70_000))
    _, done = alice.send_file("bob", src)
    event = wait_for(bob, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), 30)
    assert isinstance(event, ev.FileReceived), event
    done.result(10)
    assert event.path.read_bytes() == src.read_bytes()
    assert len(event.path.name.encode()) <= 255 and event.path.name.endswith("\N{GRINNING FACE}" * 4)
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == [event.path.name]


def test_part_and_final_names_fit_the_byte_limit_for_any_offered_name():
    from client.filenames import NAME_MAX, part_name, received_name

    for offered in ["b" * 300 + "." + "\N{GRINNING FACE}" * 16, "\N{GRINNING FACE}" * 300, "x." + "y" * 300,
                    "\u00e9" * 400 + ".tar.gz"]:
        final = received_name("a" * 32, offered, 0)
        assert len(f"{final} (9999)".encode()) <= NAME_MAX
        assert len(part_name(final, bytes(16)).encode()) <= NAME_MAX
        final.encode("utf-8")  # whole characters only


def _no_hard_links(monkeypatch, renameat2: bool) -> None:
    """Last resort, said plainly: this kernel has no vfat/SMB to mount, so os.link fails as it does there."""
    import errno

    from client import filenames

    def link(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(filenames.os, "link", link)
    if not renameat2:
        monkeypatch.setattr(filenames, "_renameat2", None)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2-noreplace", "exclusive-create"])
def test_publish_without_hard_links_never_overwrites(tmp_path, monkeypatch, renameat2):
    from client.filenames import publish_atomically

    _no_hard_links(monkeypatch, renameat2)
    (tmp_path / "report.pdf").write_bytes(b"precious")
    paths = []
    for content in (b"one", b"two"):
        part = tmp_path / f".report.pdf.{content.hex()}.part"
        part.write_bytes(content)
        paths.append(publish_atomically(part, tmp_path, "report.pdf"))
        assert not part.exists()
    assert [p.name for p in paths] == ["report (1).pdf", "report (2).pdf"]
    assert [p.read_bytes() for p in paths] == [b"one", b"two"]
    assert (tmp_path / "report.pdf").read_bytes() == b"precious"


def test_transfer_saves_on_a_file_system_without_hard_links(make_client, tmp_path, monkeypatch):
    _no_hard_links(monkeypatch, renameat2=True)
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    src = tmp_path / "same.txt"
    paths = []
    for content in (b"first", b"second"):
        src.write_bytes(content)
        _, done = alice.send_file("bob", src)
        event = wait_for(bob, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), 30)
        assert isinstance(event, ev.FileReceived), event
        done.result(10)
        paths.append(event.path)
    assert [p.read_bytes() for p in paths] == [b"first", b"second"]
