"""Room files through the client's transfer machines (docs/PROTOCOL.md §8.1), sans I/O: real files and records
in a temporary directory, the broker's side played by the test.

The uploader's manager sends ``room_upload`` and chunks within the broker's ``room_credit``; a member's manager
fetches an opened ``room_offer`` with ``room_fetch`` credits, and the test answers them with ``room_chunk``s
sealed under the file key, as the broker's store would from what the uploader sent. At the end, the transfer
state machine of test_state_machines with room transfers among its one-to-one ones.
(Over 500 lines: the plain tests and the state machine share the broker's side played here.)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict, deque
from pathlib import Path

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.transfer import MAX_CHUNK_BYTES, Phase, TransferConfig, TransferManager, frame_id
from p2pchat.client.e2e import NO_SEALING, EndToEnd, MemoryKeys
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.common.crypto import TAG_BYTES, FileCipher
from p2pchat.common.errors import ErrorCode, RemoteError, TransferError
from p2pchat.common.protocol import Envelope, FileCancel, FileChunk, FileCredit, FileDone, decode
from p2pchat.common.protocol_rooms import ROOM_TYPES, RoomChunk, RoomCredit, RoomFetch, RoomUpload
from tests.client.test_state_machines import (
    CHUNK as MACHINE_CHUNK,
    MACHINE,
    MAX_FILE as MACHINE_MAX_FILE,
    PEERS,
    WINDOW as MACHINE_WINDOW,
    SealedTransferMachine,
    codes,
    contents,
    counts,
    emitted,
    file_key,
    transmitted,
)
from tests.cores import id_source, identity

ME, ALICE = "me", "alice"
RID, OTHER_ROOM = bytes(range(16)), bytes(range(1, 17))
CHUNK, WINDOW, STALL = 16, 4, 3.0
MAX_FILE = 1000
assert (CHUNK, WINDOW) == (MACHINE_CHUNK, MACHINE_WINDOW)  # the machine at the end mixes both tests' frames


def manager(root: Path, run: int = 1, sealed: bool = True, **config) -> TransferManager:
    """Our client's transfers; ``run``: a restart is a new run on the same directory (other ids)."""
    e2e = EndToEnd(ME, identity(ME), MemoryKeys(), MemoryKeys()) if sealed else NO_SEALING
    cfg = TransferConfig(received_dir=root / "inbox", max_file_size=MAX_FILE, chunk_size=CHUNK, window=WINDOW,
                         stall_timeout=STALL, **config)
    return TransferManager(ME, cfg, e2e, wall_ms=lambda: 0, wall_time=lambda: 1_700_000_000.0,
                           new_id=id_source(f"run {run}"), files=LocalFiles(), records=RecordDir(root / "state", ME))


def sent(actions) -> list[Envelope]:
    return [decode(a.frames) for a in actions if type(a) is Transmit]


def events(actions, kind=None) -> list[ev.Event]:
    return [a.event for a in actions if type(a) is Emit and (kind is None or type(a.event) is kind)]


def chunks_of(actions) -> dict[int, bytes]:
    """The room chunks sent, by index (each must name our room)."""
    found = {}
    for env in sent(actions):
        assert type(env.message) is RoomChunk and env.message.room == RID, env
        found[env.message.index] = bytes(env.payload)
    return found


def open_chunk(key: bytes, xfer: bytes, index: int, final: bool, sealed: bytes) -> bytes:
    out = bytearray(len(sealed) - TAG_BYTES)
    FileCipher(key, xfer).open_into(index, final, sealed, memoryview(out))
    return bytes(out)


def credit(xfer: bytes, next_: int, upto: int, restart: bool = False, room: bytes = RID) -> Envelope:
    return Envelope(frame_id(xfer), 0, RoomCredit(room, xfer, next_, upto, restart))


def records(root: Path, direction: str) -> list[str]:
    return sorted(p.name for p in (root / "state" / direction).iterdir())


def visible(inbox: Path) -> list[str]:
    return sorted(p.name for p in inbox.iterdir() if not p.name.startswith(".")) if inbox.exists() else []


def source(root: Path, size: int, name: str = "report.bin") -> tuple[Path, bytes]:
    content = os.urandom(size)
    path = root / name
    path.write_bytes(content)
    return path, content


# --- uploading ----------------------------------------------------------------------------------------
def test_an_upload_goes_in_the_brokers_windows_and_ends_when_it_holds_every_chunk(tmp_path):
    uploader = manager(tmp_path)
    path, content = source(tmp_path, 7 * CHUNK - 3)  # 7 chunks
    xfer, actions = uploader.send_room_file(RID, path, 0.0)
    assert [env.message for env in sent(actions)] == [RoomUpload(RID, xfer, len(content), CHUNK)]
    held = chunks_of(uploader.on_message(credit(xfer, 0, WINDOW, restart=True), 0.1))
    assert sorted(held) == [0, 1, 2, 3]
    held |= chunks_of(uploader.on_message(credit(xfer, 2, 2 + WINDOW), 0.2))  # chunks 0, 1 durable
    held |= chunks_of(uploader.on_message(credit(xfer, 6, 6 + WINDOW), 0.3))
    assert sorted(held) == list(range(7))
    assert uploader.take_room_uploads() == []  # the final chunk is sent, not yet held by the broker
    last = uploader.on_message(credit(xfer, 7, 7 + WINDOW), 0.4)
    assert sent(last) == []
    [done] = uploader.take_room_uploads()
    assert (done.xfer, done.room, done.name, done.size, done.chunk_size) == (xfer, RID, "report.bin", len(content),
                                                                            CHUNK)
    assert b"".join(open_chunk(done.key, xfer, i, i == 6, held[i]) for i in range(7)) == content
    assert done.bytes_sent == len(content)
    [progress] = events(last)
    assert (type(progress), progress.room, progress.done, progress.peer) == (ev.FileProgress, RID, len(content), ME)
    assert uploader.take_room_uploads() == [] and uploader.outgoing == {} and records(tmp_path, "outgoing") == []


def test_an_empty_file_is_one_sealed_final_chunk(tmp_path):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 0)
    xfer, _ = uploader.send_room_file(RID, path, 0.0)
    [(index, payload)] = chunks_of(uploader.on_message(credit(xfer, 0, WINDOW, restart=True), 0.1)).items()
    uploader.on_message(credit(xfer, 1, 1 + WINDOW), 0.2)
    [done] = uploader.take_room_uploads()
    assert index == 0 and open_chunk(done.key, xfer, 0, True, payload) == b""


def test_the_same_file_already_uploading_to_the_room_is_that_upload(tmp_path):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 3 * CHUNK)
    xfer, _ = uploader.send_room_file(RID, path, 0.0)
    assert uploader.send_room_file(RID, path, 0.1) == (xfer, [])
    other, actions = uploader.send_room_file(OTHER_ROOM, path, 0.2)
    assert other != xfer and [type(env.message) for env in sent(actions)] == [RoomUpload]
    peer_xfer, _ = uploader.send_file(ALICE, path, 0.3)  # one-to-one stays apart
    assert peer_xfer not in (xfer, other)


def test_an_upload_resumes_where_the_broker_stands_after_a_reconnect(tmp_path):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 7 * CHUNK)
    xfer, _ = uploader.send_room_file(RID, path, 0.0)
    uploader.on_message(credit(xfer, 0, WINDOW, restart=True), 0.1)  # chunks 0-3 sent; the connection drops
    [again] = sent(uploader.on_reconnected(1.0))
    assert again.message == RoomUpload(RID, xfer, 7 * CHUNK, CHUNK)
    # The broker has 3 chunks on disk: the uploader goes on from there, whatever the credit's flag.
    assert sorted(chunks_of(uploader.on_message(credit(xfer, 3, 3 + WINDOW), 1.1))) == [3, 4, 5, 6]
    uploader.on_message(credit(xfer, 7, 7 + WINDOW), 1.2)
    assert [u.xfer for u in uploader.take_room_uploads()] == [xfer]


def test_a_quiet_upload_is_asked_for_again(tmp_path):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 2 * CHUNK)
    xfer, _ = uploader.send_room_file(RID, path, 0.0)
    assert sent(uploader.on_tick(STALL / 2)) == []
    assert [env.message for env in sent(uploader.on_tick(STALL + 0.1))] == [RoomUpload(RID, xfer, 2 * CHUNK, CHUNK)]


def test_an_upload_cut_by_a_restart_starts_over_with_a_new_xfer_and_key(tmp_path):
    first = manager(tmp_path, run=1)
    path, content = source(tmp_path, 7 * CHUNK)
    old, _ = first.send_room_file(RID, path, 0.0)
    old_key = first.outgoing[old].cipher.key
    first.on_message(credit(old, 0, WINDOW, restart=True), 0.1)
    first.close()  # the client stops; its file key for ``old`` is gone with it
    second = manager(tmp_path, run=2)
    [upload] = [env.message for env in sent(second.resume_all(10.0))]
    xfer = upload.xfer
    assert upload == RoomUpload(RID, xfer, len(content), CHUNK) and xfer != old
    assert records(tmp_path, "outgoing") == [f"{xfer.hex()}.json"]
    held = chunks_of(second.on_message(credit(xfer, 0, WINDOW, restart=True), 10.1))
    held |= chunks_of(second.on_message(credit(xfer, 4, 4 + WINDOW), 10.2))
    second.on_message(credit(xfer, 7, 7 + WINDOW), 10.3)
    [done] = second.take_room_uploads()
    assert done.key != old_key
    assert b"".join(open_chunk(done.key, xfer, i, i == 6, held[i]) for i in range(7)) == content


def test_room_files_are_sealed_or_not_sent(tmp_path):
    uploader = manager(tmp_path, sealed=False)
    path, _ = source(tmp_path, CHUNK)
    with pytest.raises(TransferError, match="sealed"):
        uploader.send_room_file(RID, path, 0.0)
    assert uploader.outgoing == {}


@pytest.mark.parametrize("code", [ErrorCode.ROOM_QUOTA, ErrorCode.NOT_MEMBER, ErrorCode.UNKNOWN_ROOM,
                                  ErrorCode.STORAGE_FULL])
def test_an_upload_the_broker_refuses_fails_with_its_room(tmp_path, code):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 3 * CHUNK)
    xfer, actions = uploader.send_room_file(RID, path, 0.0)
    [upload] = sent(actions)
    failed = uploader.on_error(upload.msg_id, RemoteError("no", code), 0.1)
    assert sent(failed) == []  # nothing to tell the broker: an unfinished upload expires there
    [event] = events(failed)
    assert (type(event), event.xfer, event.room, event.direction, event.error.code) == (ev.FileFailed, xfer, RID,
                                                                                        "out", code)
    assert uploader.outgoing == {} and records(tmp_path, "outgoing") == []


def test_an_upload_waits_while_the_store_is_out_of_reach_and_asks_again(tmp_path):
    uploader = manager(tmp_path)
    path, _ = source(tmp_path, 7 * CHUNK)
    xfer, _ = uploader.send_room_file(RID, path, 0.0)
    [chunk, *_] = sent(uploader.on_message(credit(xfer, 0, WINDOW, restart=True), 0.1))
    assert uploader.on_error(chunk.msg_id, RemoteError("later", ErrorCode.STORAGE_UNAVAILABLE), 0.2) == []
    assert uploader.outgoing[xfer].phase is Phase.WAITING
    assert [type(env.message) for env in sent(uploader.on_tick(0.2 + STALL + 0.1))] == [RoomUpload]


# --- fetching -----------------------------------------------------------------------------------------
class Store:
    """The broker's store of one room file, answering fetches: from ``next`` on a restart, else from where it
    stopped, up to the credit's ``upto``."""

    def __init__(self, content: bytes, size: int | None = None, xfer: bytes = b"room file xfer!!", room: bytes = RID):
        self.xfer, self.room, self.key = xfer, room, os.urandom(32)
        self.size = len(content) if size is None else size  # what the offer claims
        count = max(1, -(-len(content) // CHUNK))
        cipher = FileCipher(self.key, xfer)
        self.payloads = [cipher.seal(i, i == count - 1, content[i * CHUNK:(i + 1) * CHUNK]) for i in range(count)]
        self.finals = [i == count - 1 for i in range(count)]
        self.sent = 0

    def offer(self, member: TransferManager, now: float = 0.0, name: str = "report.bin", **changes) -> list:
        args = dict(rid=self.room, sender=ALICE, xfer=self.xfer, size=self.size, chunk_size=CHUNK, name=name,
                    key=self.key) | changes
        return member.on_room_offer(**args, now=now)

    def chunk(self, index: int) -> Envelope:
        return Envelope(frame_id(self.xfer), 0, RoomChunk(self.room, self.xfer, index, self.finals[index]),
                        self.payloads[index])

    def answer(self, fetch: RoomFetch) -> list[Envelope]:
        if (fetch.room, fetch.xfer) != (self.room, self.xfer):
            return []  # another file's
        assert fetch.next <= fetch.upto
        start = fetch.next if fetch.restart else max(self.sent, fetch.next)
        end = min(fetch.upto, len(self.payloads))
        self.sent = max(start, end)
        return [self.chunk(i) for i in range(start, end)]

    def serve(self, member: TransferManager, actions: list, now: float, chunks: int | None = None) -> list:
        """Deliver what ``actions`` fetch, and what the member fetches next, until it asks for nothing more (or
        ``chunks`` were delivered); every action of the member, in order."""
        seen = list(actions)
        waiting = deque(env for fetch in sent(actions) for env in self.answer(fetch.message))
        delivered = 0
        while waiting and chunks != delivered:
            assert delivered < 1000, "fetching forever"
            step = member.on_message(waiting.popleft(), now)
            seen += step
            delivered += 1
            for env in sent(step):
                assert type(env.message) is RoomFetch, f"a member sends only fetches: {env.message}"
                waiting += self.answer(env.message)
        return seen


def test_a_room_file_is_fetched_in_windows_verified_and_published(tmp_path):
    member = manager(tmp_path)
    content = os.urandom(9 * CHUNK + 5)
    store = Store(content)
    first = store.offer(member)
    [fetch] = [env.message for env in sent(first)]
    assert fetch == RoomFetch(RID, store.xfer, 0, WINDOW, True)
    [incoming] = events(first)
    assert incoming == ev.FileIncoming(store.xfer, ALICE, "report.bin", len(content), RID)
    actions = store.serve(member, first, 1.0)
    fetches = [env.message for env in sent(actions)]
    assert all(f.next <= f.upto <= f.next + WINDOW for f in fetches) and fetches[-1].upto >= 10
    [received] = events(actions, ev.FileReceived)
    assert (received.xfer, received.sender, received.room, received.size) == (store.xfer, ALICE, RID, len(content))
    assert received.path.read_bytes() == content and received.path.parent == tmp_path / "inbox"
    assert re.fullmatch(r"\d{8}_\d{6}_alice_report\.bin", received.path.name)
    assert all(e.room == RID for e in events(actions) if type(e) is ev.FileProgress)
    assert member.incoming == {} and records(tmp_path, "incoming") == []
    assert visible(tmp_path / "inbox") == [received.path.name]  # and no .part left
    assert store.offer(member, 2.0) == []  # the offer again (another delivery): done already


def test_a_fetch_resumes_from_its_last_chunk_after_a_reconnect(tmp_path):
    member = manager(tmp_path)
    content = os.urandom(9 * CHUNK)
    store = Store(content)
    store.serve(member, store.offer(member), 1.0, chunks=3)  # then the connection drops, and what was in flight
    resumed = member.on_reconnected(2.0)
    [again] = [env.message for env in sent(resumed)]
    assert (again.next, again.restart) == (3, True)
    [received] = events(store.serve(member, resumed, 2.1), ev.FileReceived)
    assert received.path.read_bytes() == content


def test_a_fetch_resumes_after_a_restart_of_the_client(tmp_path):
    content = os.urandom(9 * CHUNK)
    store = Store(content)
    first = manager(tmp_path, run=1)
    store.serve(first, store.offer(first), 1.0, chunks=5)
    first.close()
    second = manager(tmp_path, run=2)
    resumed = second.resume_all(5.0)
    [fetch] = [env.message for env in sent(resumed)]
    assert fetch == RoomFetch(RID, store.xfer, 5, 5 + WINDOW, True)  # its room and key came from the record
    [received] = events(store.serve(second, resumed, 5.1), ev.FileReceived)
    assert (received.room, received.sender, received.path.read_bytes()) == (RID, ALICE, content)


def test_a_tampered_chunk_is_asked_for_again_then_fails_the_fetch(tmp_path):
    member = manager(tmp_path)
    store = Store(os.urandom(5 * CHUNK))
    bad = store.payloads[2]
    store.payloads[2] = bad[:-1] + bytes([bad[-1] ^ 1])  # changed in the broker's store: it sends it so each time
    actions = store.serve(member, store.offer(member), 1.0)
    restarts = [f.message for f in sent(actions) if f.message.restart and f.message.next == 2]
    assert len(restarts) == 2  # asked twice more, then given up
    [failed] = events(actions, ev.FileFailed)
    assert (failed.room, failed.direction, failed.error.code) == (RID, "in", ErrorCode.INTEGRITY)
    assert member.incoming == {} and records(tmp_path, "incoming") == [] and visible(tmp_path / "inbox") == []
    assert list((tmp_path / "inbox").iterdir()) == []  # its .part deleted
    assert store.offer(member, 2.0) == []  # refused for good: the same offer again starts nothing


@pytest.mark.parametrize("claimed", [3 * CHUNK, 7 * CHUNK], ids=["smaller", "larger"])
def test_an_offer_whose_size_lies_fails_without_asking_forever(tmp_path, claimed):
    member = manager(tmp_path)
    store = Store(os.urandom(5 * CHUNK), size=claimed)
    actions = store.serve(member, store.offer(member), 1.0)
    [failed] = events(actions, ev.FileFailed)
    assert (failed.room, failed.error.code) == (RID, ErrorCode.INTEGRITY)
    assert len(sent(actions)) < 10 and visible(tmp_path / "inbox") == []


@pytest.mark.parametrize("name,expected", [("../../etc/passwd", "passwd"), ("a\\b\\c.txt", "c.txt"),
                                           ("CON", "_CON"), (". hidden .", "hidden"), ("\x1b[31mred", "[31mred")])
def test_a_room_file_with_a_tricky_name_lands_under_a_safe_one_in_the_inbox(tmp_path, name, expected):
    member = manager(tmp_path)
    store = Store(b"x" * 20)
    [received] = events(store.serve(member, store.offer(member, name=name), 1.0), ev.FileReceived)
    assert received.name == name and received.path.parent == tmp_path / "inbox"
    assert received.path.name.endswith(f"_alice_{expected}")


@pytest.mark.parametrize("change,code", [
    ({"size": MAX_FILE + 1}, ErrorCode.TOO_LARGE),
    ({"chunk_size": 0}, ErrorCode.TRANSFER_FAILED),
    ({"chunk_size": MAX_CHUNK_BYTES + 1}, ErrorCode.TRANSFER_FAILED),
    ({"key": bytes(31)}, ErrorCode.INTEGRITY),
], ids=["too-large", "chunk-size-0", "chunk-size-huge", "short-key"])
def test_an_unacceptable_room_offer_is_reported_and_remembered_but_never_answered(tmp_path, change, code):
    member = manager(tmp_path)
    store = Store(b"x" * 40)
    actions = store.offer(member, **change)
    assert sent(actions) == []  # the store keeps the file for the other members: nobody to refuse it to
    [failed] = events(actions)
    assert (type(failed), failed.room, failed.peer, failed.error.code) == (ev.FileFailed, RID, ALICE, code)
    assert member.incoming == {} and member.queued == {}
    assert store.offer(member, 1.0) == []  # the same offer delivered again is not taken up


def test_a_device_that_takes_no_files_does_not_fetch(tmp_path):
    member = manager(tmp_path, accept_files=False)
    assert Store(b"x" * 40).offer(member) == [] and member.incoming == {}


def test_room_files_share_the_incoming_bounds_and_wait_for_a_slot_without_a_word(tmp_path):
    member = manager(tmp_path, max_incoming=1)
    first, second = Store(os.urandom(3 * CHUNK), xfer=b"first room file!"), Store(b"y" * 20, xfer=b"second roomfile!")
    started = first.offer(member)
    queued = second.offer(member, 0.1)
    assert sent(queued) == []  # no hold: the broker keeps the file however long we wait
    [event] = events(queued)
    assert event == ev.FileQueued(second.xfer, ALICE, "report.bin", 20, 1, RID)
    actions = first.serve(member, started, 1.0)
    [promoted] = [env.message for env in sent(actions) if env.message.xfer == second.xfer]
    assert promoted == RoomFetch(RID, second.xfer, 0, WINDOW, True)  # started as soon as the slot freed
    rest = second.serve(member, actions, 1.1)[len(actions):]
    assert [e.xfer for e in events(rest, ev.FileReceived)] == [second.xfer]


@pytest.mark.parametrize("code", [ErrorCode.UNKNOWN_TRANSFER, ErrorCode.NOT_MEMBER, ErrorCode.UNKNOWN_ROOM])
def test_a_fetch_the_broker_refuses_fails_with_its_room(tmp_path, code):
    member = manager(tmp_path)
    store = Store(os.urandom(3 * CHUNK))
    [fetch] = sent(store.offer(member))
    actions = member.on_error(fetch.msg_id, RemoteError("no", code), 0.1)
    assert sent(actions) == []
    [failed] = events(actions)
    assert (type(failed), failed.room, failed.error.code) == (ev.FileFailed, RID, code)
    assert member.incoming == {} and list((tmp_path / "inbox").iterdir()) == []


def test_a_file_not_uploaded_yet_is_fetched_again_later(tmp_path):
    member = manager(tmp_path)
    store = Store(os.urandom(3 * CHUNK))
    [fetch] = sent(store.offer(member))
    assert member.on_error(fetch.msg_id, RemoteError("not yet", ErrorCode.NOT_UPLOADED), 0.1) == []
    assert member.incoming[store.xfer].phase is Phase.WAITING
    assert member.on_tick(STALL) == []  # not before the stall timer
    later = member.on_tick(0.1 + STALL + 0.1)
    assert [env.message for env in sent(later)] == [RoomFetch(RID, store.xfer, 0, WINDOW, True)]
    assert len(events(store.serve(member, later, 4.0), ev.FileReceived)) == 1


def test_a_fetch_the_store_leaves_silent_is_given_up_but_one_told_to_wait_is_not(tmp_path):
    member = manager(tmp_path, give_up_after=60.0)
    silent, waiting = Store(b"s" * 40, xfer=b"silent, this one"), Store(b"w" * 40, xfer=b"waiting, the one")
    silent.offer(member)
    [fetch] = sent(waiting.offer(member))
    member.on_error(fetch.msg_id, RemoteError("not yet", ErrorCode.NOT_UPLOADED), 0.0)
    actions = []
    for now in range(1, 100):
        step = member.on_tick(float(now))
        actions += step
        for env in sent(step):  # every fetch of the waiting one is told: not yet
            if env.message.xfer == waiting.xfer:
                member.on_error(env.msg_id, RemoteError("not yet", ErrorCode.NOT_UPLOADED), float(now))
    [failed] = events(actions, ev.FileFailed)
    assert (failed.xfer, failed.room, failed.error.code) == (silent.xfer, RID, ErrorCode.TIMEOUT)
    assert "the broker's file store silent" in failed.error.message
    assert member.incoming[waiting.xfer].phase is Phase.WAITING


def test_only_the_brokers_frames_about_that_room_touch_a_room_transfer(tmp_path):
    member = manager(tmp_path)
    store = Store(os.urandom(3 * CHUNK))
    store.offer(member)
    xfer = store.xfer
    strangers = [Envelope(frame_id(xfer), 0, FileChunk(ALICE, ME, xfer, 0, False), store.payloads[0]),
                 Envelope(frame_id(xfer), 0, FileDone(ALICE, ME, xfer)),
                 Envelope(frame_id(xfer), 0, FileCancel(ALICE, ME, xfer, ErrorCode.CANCELLED, "no")),
                 Envelope(frame_id(xfer), 0, FileCredit(ALICE, ME, xfer, 0, 4, True)),
                 Envelope(frame_id(xfer), 0, RoomChunk(OTHER_ROOM, xfer, 0, False), store.payloads[0]),
                 credit(xfer, 0, WINDOW, room=OTHER_ROOM)]
    for env in strangers:
        assert member.on_message(env, 0.5) == [], env.message
    assert member.incoming[xfer].next == 0
    wrong_way = member.on_message(credit(xfer, 0, WINDOW), 0.6)  # the broker sends chunks of a fetch, not credit
    [failed] = events(wrong_way)
    assert (failed.error.code, sent(wrong_way)) == (ErrorCode.BAD_FRAME, [])


def test_a_room_chunk_never_reaches_a_transfer_between_two_users(tmp_path):
    sender = manager(tmp_path)
    path, _ = source(tmp_path, 3 * CHUNK)
    xfer, _ = sender.send_file(ALICE, path, 0.0)
    phase = sender.outgoing[xfer].phase
    assert sender.on_message(credit(xfer, 0, WINDOW, restart=True), 0.1) == []
    assert sender.outgoing[xfer].phase is phase and sender.outgoing[xfer].send_next == 0


# --- room transfers among one-to-one ones, under any input (test_state_machines' machine, extended) -----------
class RoomTransferMachine(SealedTransferMachine):
    """The sealed transfer machine, with room uploads and room fetches beside the one-to-one transfers: the
    broker's frames (honest, hostile or stray), its errors, restarts. Besides the one-to-one promises: a room
    transfer sends only room frames, chunks within the broker's credit, every chunk sealed under the key its
    upload hands the session, and a fetched file is published only if it is the uploaded one."""

    def __init__(self) -> None:
        super().__init__()
        self.room_sources: dict[Path, bytes] = {}  # files uploaded to the room
        self.room_out: dict[bytes, bytes] = {}  # uploads ever started (restarts' included): content
        self.room_granted: dict[bytes, int] = defaultdict(int)  # highest upto the broker granted an upload
        self.room_in: dict[bytes, bytes] = {}  # room files ever offered: content

    def apply(self, actions, credit=None) -> None:
        ours = set(self.room_out) | set(self.room_in)
        for env in transmitted(actions):
            msg = env.message
            if type(msg) is RoomUpload:  # a new upload, or (after a restart) one started over
                assert msg.room == RID and (msg.xfer, "out") not in self.finished, msg
                self.room_out.setdefault(msg.xfer, self.room_sources[self.manager.outgoing[msg.xfer].path])
                ours.add(msg.xfer)
            elif type(msg) is RoomChunk:
                assert msg.room == RID and credit is not None and credit[0] == msg.xfer, f"chunk without credit {msg}"
                assert msg.index < self.room_granted[msg.xfer], f"chunk {msg.index} beyond the broker's credit"
                assert (msg.xfer, "out") not in self.finished, f"room chunk after the upload ended: {msg}"
                key = self.manager.outgoing[msg.xfer].cipher.key
                final = msg.index == max(1, -(-len(self.room_out[msg.xfer]) // CHUNK)) - 1
                assert open_chunk(key, msg.xfer, msg.index, final, bytes(env.payload)) == (
                    self.room_out[msg.xfer][msg.index * CHUNK:(msg.index + 1) * CHUNK])
            elif type(msg) is RoomFetch:
                assert msg.room == RID and msg.xfer in self.room_in, msg
                assert (msg.xfer, "in") not in self.finished, f"fetch after the transfer ended: {msg}"
                assert msg.next <= msg.upto <= msg.next + WINDOW, msg
            else:
                assert msg.xfer not in ours, f"a room transfer sent {msg}"
        for event in emitted(actions):
            if getattr(event, "xfer", None) in ours:
                assert event.room == RID, event
                direction = "out" if event.xfer in self.room_out else "in"
                assert (event.xfer, direction) not in self.finished, f"{event} after the transfer ended"
                if type(event) in (ev.FileReceived, ev.FileFailed):
                    self.finished.add((event.xfer, direction))
                if type(event) is ev.FileReceived:
                    assert event.path.read_bytes() == self.room_in[event.xfer], "the fetched file differs"
                    self.received.add(event.path)
        for upload in self.manager.take_room_uploads():
            assert (upload.xfer, "out") not in self.finished and upload.room == RID
            self.finished.add((upload.xfer, "out"))
        super().apply([a for a in actions if getattr(getattr(a, "event", None), "xfer", None) not in ours
                       and not (type(a) is Transmit and type(decode(a.frames).message) in ROOM_TYPES)], credit)

    # The base rule samples one-to-one transfers, live ones: not only room uploads may be live for it to run.
    @precondition(lambda self: any(x in self.manager.outgoing for x in self.out_peer))
    @rule(data=st.data(), restart=st.booleans())
    def honest_receiver(self, data, restart):
        SealedTransferMachine.honest_receiver(self, data, restart)

    # --- uploading ------------------------------------------------------------------------------------
    @rule(content=contents)
    def room_upload(self, content):
        path = self.sources / f"room-file-{len(self.room_sources)}"
        path.write_bytes(content)
        self.room_sources[self.manager.files.inspect(path).path] = content
        self.apply(self.manager.send_room_file(RID, path, self.now)[1])

    def _upload(self, data) -> bytes:
        known = list(self.room_out)
        return data.draw(st.sampled_from(known) if known and data.draw(st.booleans())
                         else st.binary(min_size=16, max_size=16))

    @rule(data=st.data(), room=st.sampled_from([RID, RID, RID, OTHER_ROOM]), next_=counts, upto=counts,
          restart=st.booleans())
    def room_credit(self, data, room, next_, upto, restart):
        xfer = self._upload(data)
        if room == RID:
            self.room_granted[xfer] = max(self.room_granted[xfer], upto)
        self.apply(self.manager.on_message(credit(xfer, next_, upto, restart, room), self.now), credit=(xfer, None))

    @precondition(lambda self: any(x in self.manager.outgoing for x in self.room_out))
    @rule(data=st.data(), restart=st.booleans())
    def honest_store(self, data, restart):
        """The broker holds what it was sent and grants the next window."""
        xfer = data.draw(st.sampled_from([x for x in self.room_out if x in self.manager.outgoing]))
        out = self.manager.outgoing[xfer]
        held = min(out.send_next, out.chunks)
        self.room_granted[xfer] = max(self.room_granted[xfer], held + WINDOW)
        self.apply(self.manager.on_message(credit(xfer, held, held + WINDOW, restart), self.now), credit=(xfer, None))

    # --- fetching -------------------------------------------------------------------------------------
    @rule(data=st.data(), sender=st.sampled_from(PEERS), content=contents, repeat=st.booleans(),
          name=st.sampled_from(["a.txt", "../../etc/passwd", "", "CON", "x" * 300]),
          chunk_size=st.sampled_from([CHUNK, CHUNK, CHUNK, 0, 2**31]),
          claimed_size=st.sampled_from([None, None, None, 0, CHUNK, MACHINE_MAX_FILE + 1]), short_key=st.booleans())
    def room_offer(self, data, sender, content, repeat, name, chunk_size, claimed_size, short_key):
        if repeat and self.room_in:  # delivered again, maybe after it finished or failed
            xfer = data.draw(st.sampled_from(list(self.room_in)))
        else:
            xfer = hashlib.sha256(b"room offer %d" % len(self.room_in)).digest()[:16]
            self.room_in[xfer] = content
        size = len(self.room_in[xfer]) if claimed_size is None else claimed_size
        key = file_key(xfer)[:31] if short_key and not repeat else file_key(xfer)
        self.apply(self.manager.on_room_offer(RID, sender, xfer, size, chunk_size, name, key, self.now))

    def _room_chunk(self, xfer: bytes, index: int, damage: str) -> None:
        content = self.room_in.get(xfer, b"")
        final = index == max(1, -(-len(content) // CHUNK)) - 1
        payload = FileCipher(file_key(xfer), xfer).seal(index, final, content[index * CHUNK:(index + 1) * CHUNK])
        room, flag = (OTHER_ROOM if damage == "room" else RID), (not final if damage == "final" else final)
        if damage == "data":
            payload = payload[:-1] + bytes([payload[-1] ^ 1])
        elif damage == "size":
            payload += b"!"
        msg = RoomChunk(room, xfer, index, flag)
        if damage == "peer":  # a user's frame naming the room transfer
            msg = FileChunk(PEERS[0], ME, xfer, index, flag)
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, msg, payload), self.now))

    @rule(data=st.data(), which=st.sampled_from(["next", "next", "other"]),
          damage=st.sampled_from(["none", "none", "none", "data", "size", "final", "room", "peer"]))
    def room_chunk(self, data, which, damage):
        known = list(self.room_in)
        xfer = data.draw(st.sampled_from(known)) if known else data.draw(st.binary(min_size=16, max_size=16))
        inc = self.manager.incoming.get(xfer)
        index = inc.next if inc is not None and which == "next" else data.draw(counts)
        self._room_chunk(xfer, index, damage)

    @precondition(lambda self: any(x in self.manager.incoming for x in self.room_in))
    @rule(data=st.data())
    def honest_fetch(self, data):
        """The store sends the rest of a live fetch, as granted."""
        xfer = data.draw(st.sampled_from([x for x in self.room_in if x in self.manager.incoming]))
        while xfer in self.manager.incoming and self.manager.incoming[xfer].next < self.manager.incoming[xfer].granted:
            held = self.manager.incoming[xfer].next
            self._room_chunk(xfer, held, "none")
            if xfer in self.manager.incoming and self.manager.incoming[xfer].next == held:
                break  # refused: the offer did not describe this content

    @rule(data=st.data(), code=codes)
    def room_error(self, data, code):
        xfers = list(self.room_out) + list(self.room_in)
        xfer = data.draw(st.sampled_from(xfers)) if xfers else bytes(16)
        self.apply(self.manager.on_error(frame_id(xfer), RemoteError("broker says no", code), self.now) or [])


RoomTransferMachine.TestCase.settings = MACHINE
test_room_transfers_keep_their_promises_under_any_input = RoomTransferMachine.TestCase
