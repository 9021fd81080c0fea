"""Folders through two clients' transfer managers (docs/PROTOCOL.md §8.3), sans I/O: real folders and records in a
temporary directory, every frame one manager sends handed to the other, restarts as new managers on the same
directories. A folder is one transfer: its stream goes in shared chunks, resumes from the ``.part`` and is
extracted once verified; a hostile sender's manifest is neutralised or refused and never escapes."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
from collections import deque
from pathlib import Path

import msgpack
import pytest

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.manifest import FILE, Entry, Manifest
from p2pchat.client.core.ports import Source
from p2pchat.client.core.transfer import CHUNK_SIZE, Phase, TransferConfig, TransferManager
from p2pchat.client.e2e import NO_SEALING, EndToEnd, MemoryKeys
from p2pchat.client.storage.folders import FolderWalk, walk_folder
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import FileChunk, FileOffer, decode, pack
from tests.client import test_room_files as rooms
from tests.client.test_folders import open_fds, snapshot
from tests.cores import id_source, identity

CHUNK, WINDOW, STALL = 4096, 4, 3.0
USERS = ("alice", "bob")


def e2e(user: str, sealed: bool):
    if not sealed:
        return NO_SEALING
    keys = EndToEnd(user, identity(user), MemoryKeys(), MemoryKeys())
    for other in USERS:
        keys.learn(other, identity(other).public)
    return keys


class Pair:
    """alice and bob's managers, the frames between them, and what each saw."""

    def __init__(self, root: Path, sealed: bool = True, chunk: int = CHUNK) -> None:
        self.root, self.sealed, self.chunk = root, sealed, chunk
        self.runs = {user: 0 for user in USERS}
        self.files = LocalFiles()
        self.m: dict[str, TransferManager] = {}
        self.events: dict[str, list[ev.Event]] = {user: [] for user in USERS}
        self.wire: deque[tuple[str, Transmit]] = deque()
        self.now = 0.0
        self.chunks = 0  # file_chunk frames sent, resends included
        for user in USERS:
            self.start(user)

    @property
    def inbox(self) -> Path:
        return self.root / "bob" / "inbox"

    def start(self, user: str) -> None:
        """(Re)start ``user``'s client: a new manager on the same directories takes up what is unfinished."""
        self.runs[user] += 1
        config = TransferConfig(received_dir=self.root / user / "inbox", chunk_size=self.chunk, window=WINDOW,
                                stall_timeout=STALL)
        self.m[user] = TransferManager(user, config, e2e(user, self.sealed), wall_ms=lambda: 1_700_000_000_000,
                                       wall_time=lambda: 1_700_000_000.0,
                                       new_id=id_source(f"{user} run {self.runs[user]}"), files=self.files,
                                       records=RecordDir(self.root / user / "state", user))
        self.take(user, self.m[user].on_peers(frozenset(USERS), self.now))
        self.take(user, self.m[user].resume_all(self.now))

    def crash(self, user: str) -> None:
        """``user``'s client dies: its frames in flight (both ways) are lost with it."""
        self.m[user].close()
        self.wire.clear()
        self.start(user)

    def take(self, user: str, actions: list) -> None:
        for action in actions:
            if type(action) is Transmit:
                self.wire.append(("bob" if user == "alice" else "alice", action))
            elif type(action) is Emit:
                self.events[user].append(action.event)

    def send(self, path: Path | Source) -> bytes:
        xfer, actions = self.m["alice"].send_file("bob", path, self.now)
        self.take("alice", actions)
        return xfer

    def run(self, until=lambda: False, probe=lambda: None) -> None:
        """Deliver frames, and tick a manager whose deadline is due (a folder being made), until neither is left
        (or ``until()``), calling ``probe()`` after each."""
        for _ in range(100_000):
            due = [user for user in USERS if self.m[user].next_deadline() <= self.now]
            if until() or not (self.wire or due):
                return
            self.now += 0.001
            if self.wire:
                to, action = self.wire.popleft()
                env = decode(action.frames)
                self.chunks += type(env.message) is FileChunk
                self.take(to, self.m[to].on_message(env, self.now))
            else:
                for user in due:
                    self.take(user, self.m[user].on_tick(self.now))
            probe()
        raise AssertionError("frames forever")

    def last(self, user: str, kind: type) -> ev.Event:
        found = [e for e in self.events[user] if type(e) is kind]
        assert found, f"no {kind.__name__} for {user}: {self.events[user][-5:]}"
        return found[-1]

    def part_size(self) -> int:
        return sum(p.stat().st_size for p in self.inbox.glob(".*.part")) if self.inbox.exists() else 0


def folder(root: Path, files: int = 500, seed: int = 1) -> Path:
    """``files`` files of 0 to 3 KiB (one zero-byte) in nested directories, and an empty directory."""
    rng = random.Random(seed)
    (root / "empty" / "deeper").mkdir(parents=True)
    for i in range(files):
        sub = root / f"d{i % 7}" / f"e{i % 3}" if i % 2 else root / f"d{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file-{i}.bin").write_bytes(rng.randbytes(0 if i == 0 else rng.randrange(3072)))
    return root


def received_folder(pair: Pair) -> ev.FileReceived:
    received = pair.last("bob", ev.FileReceived)
    assert received.path.is_dir()
    return received


# --- a folder arrives ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sealed", [True, False])
def test_a_folder_of_500_files_arrives_identical_as_one_transfer(tmp_path, sealed):
    pair = Pair(tmp_path, sealed)
    src = folder(tmp_path / "photos")
    xfer = pair.send(src)
    [offer] = [decode(a.frames).message for _, a in pair.wire]
    assert type(offer) is FileOffer and offer.size == walk_folder(src).manifest.stream_size
    pair.run()
    received = received_folder(pair)
    assert re.fullmatch(r"\d{8}_\d{6}_alice_photos", received.path.name) and received.path.parent == pair.inbox
    assert snapshot(received.path) == snapshot(src)
    assert (received.xfer, received.files, received.size) == (xfer, 500, offer.size)
    assert received.content_bytes == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    [incoming] = [e for e in pair.events["bob"] if type(e) is ev.FileIncoming]
    assert incoming.folder and incoming.name == "photos"
    sent = pair.last("alice", ev.FileSent)
    assert (sent.files, sent.skipped, sent.bytes_sent) == (500, (), offer.size)
    assert sorted(os.listdir(pair.inbox)) == [received.path.name]  # no .part, no staging folder
    assert pair.m["alice"].outgoing == {} and pair.m["bob"].incoming == {}
    assert pair.chunks == -(-offer.size // CHUNK) < 500 // 2  # small files share chunks, each sent once


def test_the_offer_says_folder_and_a_file_offer_is_as_it_always_was(tmp_path):
    pair = Pair(tmp_path)
    src = folder(tmp_path / "f", files=3)
    (tmp_path / "single.txt").write_bytes(b"one")
    metas = []
    for path in (src, tmp_path / "single.txt"):
        pair.send(path)
        _, action = pair.wire.pop()
        env = decode(action.frames)
        metas.append(msgpack.unpackb(e2e("bob", True).open("alice", env.msg_id, env.ts, env.message.body)))
    assert [sorted(m) for m in metas] == [["key", "kind", "name", "session"], ["key", "name", "session"]]
    assert metas[0]["kind"] == "folder" and metas[0]["name"] == "f"


def test_skipped_entries_are_reported_in_the_result(tmp_path):
    pair = Pair(tmp_path)
    src = folder(tmp_path / "f", files=3)
    (src / "link").symlink_to(tmp_path)
    os.mkfifo(src / "pipe")
    pair.send(src)
    pair.run()
    assert pair.last("alice", ev.FileSent).skipped == ("link", "pipe")
    assert sorted(os.listdir(received_folder(pair).path)) == ["d0", "d1", "d2", "empty"]


def test_an_offer_of_another_kind_is_refused_as_malformed(tmp_path):
    pair = Pair(tmp_path)
    pair.send(folder(tmp_path / "f", files=3))
    _, action = pair.wire.pop()
    env = decode(action.frames)
    body = msgpack.unpackb(e2e("bob", True).open("alice", env.msg_id, env.ts, env.message.body))
    sealed = e2e("alice", True).seal_each("bob", env.msg_id, env.ts, msgpack.packb(body | {"kind": "tarball"}))
    offer = FileOffer("alice", "bob", env.message.xfer, env.message.size, env.message.chunk_size, *sealed)
    pair.take("bob", pair.m["bob"].on_message(decode(pack(offer, env.ts, env.msg_id)), 0.0))
    [(to, cancel)] = list(pair.wire)
    assert to == "alice" and decode(cancel.frames).message.code is ErrorCode.INTEGRITY


# --- restarts ------------------------------------------------------------------------------------------
def half_sent(tmp_path: Path, files: int) -> tuple[Pair, Path, int, bytes]:
    """alice sending bob a folder, stopped once bob holds half its stream: (pair, folder, stream size, xfer)."""
    pair = Pair(tmp_path)
    src = folder(tmp_path / "f", files=files)
    size = walk_folder(src).manifest.stream_size
    xfer = pair.send(src)
    pair.run(until=lambda: pair.part_size() >= size // 2)
    return pair, src, size, xfer


def test_a_receiver_restarted_mid_folder_resumes_and_at_most_a_window_is_sent_again(tmp_path):
    pair, src, size, _ = half_sent(tmp_path, 500)
    held = pair.part_size()
    pair.crash("bob")
    pair.run()  # its restart credit asks from the chunks it holds
    assert snapshot(received_folder(pair).path) == snapshot(src)
    resent = pair.last("alice", ev.FileSent).bytes_sent - size
    assert 0 <= resent <= WINDOW * CHUNK, f"{resent} bytes sent twice, after {held} held"


def test_a_sender_restarted_mid_folder_walks_it_again_and_goes_on(tmp_path):
    pair, src, size, xfer = half_sent(tmp_path, 500)
    held = pair.part_size()
    pair.crash("alice")  # resume_all walks the folder again: the same manifest, so the same transfer
    pair.run()
    received = received_folder(pair)
    assert received.xfer == xfer and snapshot(received.path) == snapshot(src)
    assert pair.last("alice", ev.FileSent).bytes_sent <= size - held + WINDOW * CHUNK


def test_a_folder_changed_while_its_sender_was_down_is_not_resumed(tmp_path):
    pair, src, _, _ = half_sent(tmp_path, 50)
    (src / "d0" / "file-0.bin").write_bytes(b"new")
    pair.crash("alice")
    pair.run()
    failed = pair.last("alice", ev.FileFailed)
    assert failed.error.code is ErrorCode.SOURCE_CHANGED and "changed since the transfer began" in failed.error.message
    assert pair.last("bob", ev.FileFailed).error.code is ErrorCode.SOURCE_CHANGED
    assert os.listdir(pair.inbox) == []  # the .part went with the transfer
    pair.send(src)  # sending again is a new transfer, and arrives
    pair.run()
    assert snapshot(received_folder(pair).path) == snapshot(src)


def extracting(pair: Pair) -> bool:
    return any(i.phase is Phase.EXTRACTING for i in pair.m["bob"].incoming.values())


@pytest.mark.parametrize("whole_chunks", [False, True])
def test_a_receiver_restarted_while_making_the_folder_makes_it_again(tmp_path, whole_chunks):
    """Its .part is whole: cut back to its last whole chunk, the sender sends the last one again; or, when the
    stream ends on a chunk boundary, nothing is missing and the folder is made at once."""
    src = folder(tmp_path / "f", files=400)
    if whole_chunks:  # a last file that brings the stream to a whole number of chunks
        pad = src / "pad"
        pad.write_bytes(b"")
        while (size := walk_folder(src).manifest.stream_size) % CHUNK:
            pad.write_bytes(b"p" * (len(pad.read_bytes()) + CHUNK - size % CHUNK))
    size = walk_folder(src).manifest.stream_size
    pair = Pair(tmp_path)
    pair.send(src)
    pair.run(until=lambda: extracting(pair))
    assert list(pair.inbox.glob(".*.tree"))  # some of it made
    pair.m["bob"].close()
    assert not list(pair.inbox.glob(".*.tree")) and list(pair.inbox.glob(".*.part"))  # the .part alone is kept
    pair.wire.clear()
    pair.start("bob")
    pair.run()
    received = received_folder(pair)
    assert snapshot(received.path) == snapshot(src) and os.listdir(pair.inbox) == [received.path.name]
    assert pair.last("alice", ev.FileSent).xfer == received.xfer
    assert pair.chunks == -(-size // CHUNK) + (0 if whole_chunks else 1)  # the last chunk again, if cut


# --- a hostile sender ---------------------------------------------------------------------------------------
def lying_folder(tmp_path: Path, paths: list[str]) -> Source:
    """A folder as a hostile sender's shell would hand it to its manager: a manifest that says ``paths``, with the
    bytes of real files behind it (``send_file`` takes a ``Source`` its shell inspected already)."""
    contents = tmp_path / "contents"
    contents.mkdir()
    for i, _ in enumerate(paths):
        (contents / f"{i:03}").write_bytes(b"hostile %d" % i)
    files = sorted(contents.iterdir())
    entries = tuple(Entry(p, FILE, f.stat().st_size, 0o644, hashlib.sha256(f.read_bytes()).digest())
                    for p, f in zip(paths, files, strict=True))
    header = Manifest(entries).header()
    stats = tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()])
    walk = FolderWalk(contents, Manifest(entries, len(header)), header, stats, ())
    return Source(tmp_path / "evil", walk.manifest.stream_size, 0, 0, walk.folder())


def test_a_hostile_manifest_is_neutralised_inside_the_new_folder(tmp_path):
    paths = ["../../outside", "/etc/cron.d/x", "C:\\evil.bat", "NUL", "a\x1b[2Jb", "Same", "same", "d", "d/x"]
    evil = lying_folder(tmp_path, paths)
    pair = Pair(tmp_path)
    before = sorted(os.listdir(tmp_path))
    pair.send(evil)
    pair.run()
    made = received_folder(pair).path
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(pair.inbox) == [made.name]
    assert snapshot(made) == {"outside": b"hostile 0", "etc": None, "etc/cron.d": None, "etc/cron.d/x": b"hostile 1",
                              "evil.bat": b"hostile 2", "_NUL": b"hostile 3", "a[2Jb": b"hostile 4",
                              "Same": b"hostile 5", "same (2)": b"hostile 6", "d": b"hostile 7", "d (2)": None,
                              "d (2)/x": b"hostile 8"}


def test_a_manifest_that_lies_about_a_file_fails_the_transfer_and_leaves_nothing(tmp_path):
    evil = lying_folder(tmp_path, ["a", "b"])
    pair = Pair(tmp_path)
    xfer = pair.send(evil)
    _, _, mtime_ns, _ = evil.folder.walk.files[1]
    (tmp_path / "contents" / "001").write_bytes(b"hostile 9")  # other bytes, same size and mtime: not seen sending
    os.utime(tmp_path / "contents" / "001", ns=(mtime_ns, mtime_ns))
    pair.run()
    failed = pair.last("bob", ev.FileFailed)
    assert failed.error.code is ErrorCode.INTEGRITY and "b failed its SHA-256 check" in failed.error.message
    assert pair.last("alice", ev.FileFailed).error.code is ErrorCode.INTEGRITY  # the sender is told
    assert os.listdir(pair.inbox) == []


# --- many small files ----------------------------------------------------------------------------------------
def test_ten_thousand_small_files_need_no_more_descriptors_or_threads_than_one(tmp_path):
    src = tmp_path / "many"
    for i in range(10_000):
        sub = src / f"{i // 1000}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.txt").write_bytes(os.urandom(1024))
    pair = Pair(tmp_path, chunk=CHUNK_SIZE)
    threads, before = threading.active_count(), open_fds()
    most = 0

    def probe() -> None:
        nonlocal most
        most = max(most, len(open_fds() - before))

    pair.send(src)
    pair.run(probe=probe)
    received = received_folder(pair)
    assert received.files == 10_000 and received.content_bytes == 10_000 * 1024
    # The sender's one source file; the receiver's .part, then its stream, the staging folder and the file it makes.
    assert most <= 4, f"{most} descriptors open at once"
    assert open_fds() <= before and threading.active_count() == threads
    assert snapshot(received.path) == snapshot(src)


# --- rooms -------------------------------------------------------------------------------------------------
def test_a_folder_goes_to_a_room_and_a_member_fetches_and_extracts_it(tmp_path):
    uploader = rooms.manager(tmp_path / "up")
    src = tmp_path / "shared"
    (src / "notes" / "empty").mkdir(parents=True)
    for i in range(5):
        (src / "notes" / f"{i}.txt").write_bytes(b"note %d" % i * i)
    xfer, actions = uploader.send_room_file(rooms.RID, src, 0.0)
    held: dict[int, bytes] = {}
    while not (uploads := uploader.take_room_uploads()):
        nxt = len(held)
        held |= rooms.chunks_of(uploader.on_message(rooms.credit(xfer, nxt, nxt + rooms.WINDOW, nxt == 0), 0.1))
    [upload] = uploads
    assert upload.folder and msgpack.unpackb(upload.offer_body())["kind"] == "folder"
    count = len(held)
    stream = b"".join(rooms.open_chunk(upload.key, xfer, i, i == count - 1, held[i]) for i in range(count))
    member = rooms.manager(tmp_path / "member")
    store = rooms.Store(stream)
    got = store.serve(member, store.offer(member, name="shared", folder=True), 1.0)
    while member.next_deadline() <= 1.0:  # the folder being made, a step per tick
        got += member.on_tick(1.0)
    [received] = rooms.events(got, ev.FileReceived)
    assert received.room == rooms.RID and received.files == 5 and snapshot(received.path) == snapshot(src)
