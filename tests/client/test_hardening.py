"""Issue 13, client side: no peer can crash, flood or fool a client (real broker, real sockets, real files)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Transmit
from p2pchat.client.chat_client import ChatClient
from p2pchat.common.protocol import ChatMessage, new_msg_id, pack
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

    from p2pchat.client.chat_client import ClientConfig
    from p2pchat.common import crypto
    from p2pchat.common.errors import ErrorCode, P2PChatError
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
        bob.e2e.forget_devices()
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
    from p2pchat.client.storage.filenames import NAME_MAX, part_name, received_name

    for offered in ["b" * 300 + "." + "\N{GRINNING FACE}" * 16, "\N{GRINNING FACE}" * 300, "x." + "y" * 300,
                    "\u00e9" * 400 + ".tar.gz"]:
        final = received_name("a" * 32, offered, 0)
        assert len(f"{final} (9999)".encode()) <= NAME_MAX
        assert len(part_name(final, bytes(16)).encode()) <= NAME_MAX
        final.encode("utf-8")  # whole characters only


def _no_hard_links(monkeypatch, renameat2: bool) -> None:
    """Last resort, said plainly: this kernel has no vfat/SMB to mount, so os.link fails as it does there."""
    import errno

    from p2pchat.client.storage import filenames
    def link(src, dst, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(filenames.os, "link", link)
    if not renameat2:
        monkeypatch.setattr(filenames, "_renameat2", None)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2-noreplace", "exclusive-create"])
def test_publish_without_hard_links_never_overwrites(tmp_path, monkeypatch, renameat2):
    from p2pchat.client.storage.filenames import publish_atomically

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


# --- point 5: bounded incoming transfers, shared writers, credit clamp, give-up, cleanup ------------
def _offers(sender: ChatClient, recipient: str, count: int, size: int = 10_000_000) -> list[list[bytes]]:
    """Well-formed sealed offers, as a hostile peer's library can make any number of."""
    import time

    import msgpack

    from p2pchat.client.core.transfer import CHUNK_SIZE
    from p2pchat.common.protocol import FileOffer

    frames = []
    for i in range(count):
        xfer, ts = new_msg_id(), int(time.time() * 1000)
        meta = msgpack.packb({"name": f"flood-{i}.bin", "key": os.urandom(32)}, use_bin_type=True)
        body = sender.e2e.seal(recipient, xfer, ts, meta)
        frames.append(pack(FileOffer(sender.user, recipient, xfer, size, CHUNK_SIZE, body), ts, xfer))
    return frames


def _threads() -> int:
    import threading

    return threading.active_count()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thousand_offers_from_one_peer_keep_the_receiver_bounded_and_alive(make_client, tmp_path):
    from p2pchat.client.storage.partfile import WRITER_THREADS
    from p2pchat.client.core.transfer_machine import MAX_INCOMING_PER_PEER, MAX_QUEUED_PER_PEER

    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "hi")  # pins keys both ways
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    threads, fds = _threads(), _fds()
    offers = _offers(alice, "bob", 1000)
    for i in range(0, len(offers), 100):
        _transmit(alice, offers[i:i + 100])
    alice.send("bob", "marker")  # arrives after every offer (one conversation keeps its order)
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived), 60).text == "marker"
    assert bob._thread.is_alive()
    transfers = bob._session.transfers
    assert len(transfers.incoming) == MAX_INCOMING_PER_PEER
    assert len(transfers.queued) == MAX_QUEUED_PER_PEER
    parts = [p for p in (tmp_path / "inbox").iterdir() if p.name.endswith(".part")]
    assert len(parts) == MAX_INCOMING_PER_PEER
    assert _threads() <= threads + WRITER_THREADS  # the writer pool, shared by every transfer
    assert _fds() <= fds + MAX_INCOMING_PER_PEER + 2
    bob.send("alice", "still here")
    assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "still here"


def test_queued_transfers_wait_without_the_sender_giving_up_then_all_arrive(make_client, tmp_path):
    from p2pchat.common.protocol import FileOffer

    alice = make_client("alice", transfer_limits={"give_up_after": 1.0})
    bob = make_client("bob", received_dir=tmp_path / "inbox", transfer_limits={"max_incoming_per_peer": 1})
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "hi")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    _transmit(alice, _offers(alice, "bob", 1))  # takes alice's one slot and never sends a chunk
    stuck = wait_for(bob, lambda e: isinstance(e, ev.FileIncoming)).xfer
    offers_seen: list[bytes] = []
    manager = bob._session.transfers
    original = manager.on_message

    def spy(env, now):
        if type(env.message) is FileOffer:
            offers_seen.append(env.message.xfer)
        return original(env, now)

    manager.on_message = spy
    sources, futures = [], []
    for i in range(2):
        src = tmp_path / f"file-{i}.bin"
        src.write_bytes(os.urandom(600_000 + i))
        sources.append(src)
        xfer, done = alice.send_file("bob", src)
        futures.append(done)
        assert wait_for(bob, lambda e: isinstance(e, ev.FileQueued)).xfer == xfer
    # Held for several of alice's stall periods, longer than her give-up time: the holds keep her waiting.
    wait_until(lambda: offers_seen.count(xfer) >= 4, 30, "alice's repeated offers, each answered by a hold")
    assert not any(f.done() for f in futures)
    bob.cancel_transfer(stuck)  # a slot frees: the queued ones start, one at a time
    got = {}
    while len(got) < 2:
        event = wait_for(bob, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)) and e.xfer != stuck, 30)
        assert isinstance(event, ev.FileReceived), event
        got[event.name] = event.path.read_bytes()
    for future in futures:
        future.result(10)
    assert got == {src.name: src.read_bytes() for src in sources}


def test_stalled_transfer_gives_up_with_timeout(make_client, tmp_path):
    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox", transfer_limits={"give_up_after": 1.0})
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "hi")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    _transmit(alice, _offers(alice, "bob", 1))  # offered, then never a chunk
    wait_for(bob, lambda e: isinstance(e, ev.FileIncoming))
    failed = wait_for(bob, lambda e: isinstance(e, ev.FileFailed), 15)
    assert failed.error.code.value == "timeout"
    assert not [p for p in (tmp_path / "inbox").iterdir() if p.name.endswith(".part")]


def test_a_frame_that_breaks_the_session_is_dropped_not_the_agent(make_client):
    alice, bob = make_client("alice"), make_client("bob")
    original = bob._session.on_frames
    broken = []

    def on_frames(frames, now):
        if not broken:
            broken.append(True)
            raise RuntimeError("a bug")
        return original(frames, now)

    bob._session.on_frames = on_frames
    alice.send("bob", "first")  # whichever frame hits the bug, the agent goes on
    alice.send("bob", "second")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived) and e.text == "second")
    assert broken and bob._thread.is_alive()


def test_sender_gives_up_on_a_silent_receiver_with_timeout(make_client, tmp_path):
    alice = make_client("alice", transfer_limits={"give_up_after": 1.0})
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    bob._session.transfers.on_message = lambda env, now: []  # bob's client ignores files: never a credit
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    _, done = alice.send_file("bob", src)
    failed = wait_for(alice, lambda e: isinstance(e, ev.FileFailed), 15)
    assert failed.error.code.value == "timeout"
    assert done.exception(5).code.value == "timeout"


def test_sender_clamps_a_huge_credit_to_its_own_window(make_client, tmp_path):
    from p2pchat.client.core.transfer import CHUNK_SIZE, WINDOW
    from p2pchat.common.protocol import FileChunk, FileCredit, FileOffer

    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox", transfer_limits={"max_incoming": 0})
    wait_peers(alice, {"alice", "bob"})
    seen: list = []
    manager = bob._session.transfers
    original = manager.on_message

    def spy(env, now):
        seen.append(type(env.message))
        return original(env, now)

    manager.on_message = spy  # bob only queues (no slot ever): we play a hostile receiver for him
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(4 * WINDOW * CHUNK_SIZE)
    xfer, _ = alice.send_file("bob", src)
    wait_for(bob, lambda e: isinstance(e, ev.FileQueued))
    credit = FileCredit("bob", "alice", xfer, 0, 2**62, True, alice._session.device, bob._session.device)
    _transmit(bob, [pack(credit, 1_700_000_000_000, new_msg_id())])
    # alice's stall timer re-offers once she has sent all she will: count the chunks before that
    wait_until(lambda: FileChunk in seen and seen[seen.index(FileChunk):].count(FileOffer) >= 1, 30,
               "alice's re-offer after the chunks")
    first = seen.index(FileChunk)
    chunks = seen[first:first + seen[first:].index(FileOffer)].count(FileChunk)
    assert chunks == WINDOW


def test_abandoned_transfers_are_dropped_after_max_age_and_few_resume_at_once(make_client, tmp_path):
    import time

    from p2pchat.client.core.transfer import MAX_AGE

    alice = make_client("alice")
    bob = make_client("bob", received_dir=tmp_path / "inbox")
    wait_peers(alice, {"alice", "bob"})
    alice.send("bob", "hi")
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    _transmit(alice, _offers(alice, "bob", 4))
    for _ in range(4):
        wait_for(bob, lambda e: isinstance(e, ev.FileIncoming))
    records = bob.state_dir / "transfers" / "incoming"
    bob.close()
    parts = sorted(p for p in (tmp_path / "inbox").iterdir() if p.name.endswith(".part"))
    assert len(parts) == 4 and len(list(records.glob("*.json"))) == 4
    old = time.time() - MAX_AGE - 3600
    aged = {}
    for part in parts[:2]:  # untouched for over a week: abandoned
        record = next(r for r in records.glob("*.json") if part.name.split(".")[-2] == r.stem[:8])
        aged[part] = record
        for path in (part, record):
            os.utime(path, (old, old))
    bob = make_client("bob", received_dir=tmp_path / "inbox", transfer_limits={"max_incoming": 1})
    assert sorted(p for p in (tmp_path / "inbox").iterdir() if p.name.endswith(".part")) == parts[2:]
    assert not any(r.exists() for r in aged.values())
    transfers = bob._session.transfers
    assert len(transfers.incoming) == 1 and len(transfers.queued) == 1  # at most max_incoming reopened


# --- point 3, client side: a full disk loses nothing that was acknowledged ------------------------------
def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_history_on_a_full_disk_consumes_nothing_until_saved(make_client, broker, small_disk):
    from p2pchat.client.storage.history import History

    alice = make_client("alice")
    bob = make_client("bob", state_dir=small_disk / "bob")
    alice.send("bob", "before")  # pins keys both ways
    wait_for(bob, lambda e: isinstance(e, ev.MessageReceived))
    wait_until(lambda: _queued_for(broker, "bob") == 0, what="the first message consumed")
    filler = _fill(small_disk)
    texts = [f"{i:03d} " + "x" * 8000 for i in range(20)]
    for text in texts:
        alice.send("bob", text)
    received, reports = 0, []
    while received < len(texts) or not reports:
        event = wait_for(bob, lambda e: isinstance(e, (ev.MessageReceived, ev.ErrorReported)))
        if isinstance(event, ev.MessageReceived):
            received += 1
        else:
            reports.append(event.error.code.value)
    assert reports == ["no_space"]  # once, not per message
    assert bob._thread.is_alive()
    assert _queued_for(broker, "bob") == len(texts)  # nothing consumed that is not saved
    filler.unlink()  # space returns: the next commit saves the backlog, then consumes
    wait_until(lambda: _queued_for(broker, "bob") == 0, what="the backlog saved and consumed")
    history = History(small_disk / "bob" / "history.sqlite")
    try:
        assert [e.text for e in history.conversation("alice")] == ["before", *texts]
    finally:
        history.close()
    alice.send("bob", "after")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "after"


# --- point 9: a resumed sending session never reuses a (key, nonce) pair -------------------------------
def test_each_sending_session_seals_under_a_fresh_key(tmp_path, monkeypatch):
    """A file changed in place (size, mtime and inode kept) and sent again after a restart: no (key, nonce) twice."""
    import msgpack

    from p2pchat.client.e2e import EndToEnd
    from p2pchat.client.core.transfer import TransferConfig, TransferManager
    from p2pchat.client.storage.transfers import LocalFiles, RecordDir
    from p2pchat.client.storage.trust import KeyStore
    from p2pchat.common import crypto
    from p2pchat.common.protocol import FileCredit, FileOffer, decode

    ids = {name: crypto.Identity.generate() for name in ("alice", "bob")}
    e2e = {name: EndToEnd(name, ids[name], KeyStore(tmp_path / f"{name}-pins.json"),
                          KeyStore(tmp_path / f"{name}-pending.json")) for name in ids}
    e2e["alice"].learn("bob", ids["bob"].public)
    e2e["bob"].learn("alice", ids["alice"].public)
    used: list[tuple[bytes, bytes]] = []
    seal = crypto.FileCipher.seal

    def recording_seal(self, index, final, data):
        used.append((self.key, self.nonce(index, final)))
        return seal(self, index, final, data)

    monkeypatch.setattr(crypto.FileCipher, "seal", recording_seal)
    src = tmp_path / "doc.bin"
    src.write_bytes(b"A" * 4000)
    st = src.stat()
    config = TransferConfig(tmp_path / "inbox", chunk_size=1000)
    offers = []
    for session in (1, 2):
        if session == 2:  # changed in place, size and mtime put back: the resume check cannot see it
            with open(src, "r+b") as f:
                f.write(b"B" * 4000)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 1000))  # every offer would get its own ts
        manager = TransferManager("alice", config, e2e["alice"], wall_ms=lambda: next(clock),
                                  wall_time=lambda: 1_700_000_000.0, new_id=new_msg_id, files=LocalFiles(),
                                  records=RecordDir(tmp_path / "state", "alice"))
        actions = manager.resume_all(0.0) if session == 2 else manager.send_file("bob", src, 0.0)[1]
        offer_env = next(decode(a.frames) for a in actions if type(decode(a.frames).message) is FileOffer)
        offers.append(offer_env)
        credit = FileCredit("bob", "alice", offer_env.message.xfer, 0, 4, True)
        manager.on_message(decode(pack(credit, 1_700_000_000_000, new_msg_id())), 0.1)
        again = [a.frames for a in manager.on_tick(100.0) if type(decode(a.frames).message) is FileOffer]
        first = next(a.frames for a in actions if type(decode(a.frames).message) is FileOffer)
        assert [bytes(f) for f in again[0]] == [bytes(f) for f in first]  # a repeat is byte-identical
        manager.close()
    assert offers[0].message.xfer == offers[1].message.xfer  # the same transfer, resumed
    metas = [msgpack.unpackb(e2e["bob"].open("alice", env.msg_id, env.ts, env.message.body)) for env in offers]
    assert [m["session"] for m in metas] == [1, 2] and metas[0]["key"] != metas[1]["key"]
    assert len(used) == 8 and len(set(used)) == 8  # 4 chunks per session, no (key, nonce) pair twice
    assert offers[0].msg_id != offers[1].msg_id  # the offer's own seal: another id, so another message key
    assert offers[0].msg_id[:10] == offers[0].message.xfer[:10]  # errors about it still name the transfer
    # The receiver takes the newer session's key, and a stale offer (a stored copy) does not take it back.
    bob = TransferManager("bob", TransferConfig(tmp_path / "inbox", chunk_size=1000), e2e["bob"],
                          wall_ms=lambda: 1_700_000_000_000, wall_time=lambda: 1_700_000_000.0, new_id=new_msg_id,
                          files=LocalFiles(), records=RecordDir(tmp_path / "bob-state", "bob"))
    xfer = offers[0].message.xfer
    keys = []
    for env in (offers[0], offers[1], offers[0]):
        bob.on_message(env, 0.0)
        keys.append(bob.incoming[xfer].cipher.key)
    assert keys == [metas[0]["key"], metas[1]["key"], metas[1]["key"]]
    bob.close()
