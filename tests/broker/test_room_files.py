"""Files sent to a room (docs/ROOMS-DESIGN.md §5): the broker keeps the sealed chunks on a disk its cluster shares.

The core (broker/core/room_files.py) runs over the real disk store (broker/backends/room_files.py) in a temporary
directory, with chunks sealed as a client seals them (common/crypto.py ``FileCipher``): the uploader is credited
like §8's sender, a member's device fetches under its own credit like §8's receiver, and two cores over one
directory stand for two brokers of a cluster (or one broker before and after a restart).

(Over 500 lines: one behaviour per test of the core and of its disk store, sharing the helpers at the top.)
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pchat.broker.backends.room_files import DiskRoomFileStore
from p2pchat.broker.core.actions import FrameMaker, Send
from p2pchat.broker.core.ports import RoomFile
from p2pchat.broker.core.room_files import MAX_CHUNK, MIN_CHUNK, RoomFileLimits, RoomFiles
from p2pchat.common.crypto import FileCipher
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Error, decode
from p2pchat.common.protocol_rooms import RoomChunk, RoomCredit, RoomFetch, RoomUpload
from tests.broker.test_limits import fill
from tests.cores import id_source

RID, OTHER_RID = b"r" * 16, b"o" * 16
X, Y = bytes(range(16)), b"y" * 16
A, B, C = b"conn-a", b"conn-b", b"conn-c"
CS = MIN_CHUNK
T0 = 1_700_000_000_000  # wall clock, ms
HOUR = 3600 * 1000
KEY = b"k" * 32
MSG = b"m" * 16


def sealed(plain: bytes, chunk_size: int = CS, xfer: bytes = X) -> list[bytes]:
    """The file's chunks as a client seals them (§10.4): 16 bytes longer each, the last under the final nonce."""
    pieces = [plain[i:i + chunk_size] for i in range(0, len(plain), chunk_size)] or [b""]
    cipher = FileCipher(KEY, xfer)
    return [cipher.seal(i, i == len(pieces) - 1, piece) for i, piece in enumerate(pieces)]


def opened(chunks: list[bytes], xfer: bytes = X) -> bytes:
    cipher = FileCipher(KEY, xfer)
    out = bytearray()
    for i, chunk in enumerate(chunks):
        piece = memoryview(bytearray(len(chunk) - 16))
        cipher.open_into(i, i == len(chunks) - 1, chunk, piece)
        out += piece
    return bytes(out)


PLAIN = os.urandom(40 * CS + 100)  # 41 chunks: more than a window
CHUNKS = sealed(PLAIN)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "room-files"


@pytest.fixture
def stores(root: Path) -> Iterator:
    """``open()`` a store on ``root`` (each one a broker of the cluster); all closed after."""
    opened_stores: list[DiskRoomFileStore] = []

    def open_(path: Path = root, fsync: bool = False) -> DiskRoomFileStore:
        opened_stores.append(DiskRoomFileStore(path, fsync=fsync))
        return opened_stores[-1]

    yield open_
    for store in opened_stores:
        store.close()


@pytest.fixture
def broker(stores) -> RoomFiles:
    return make(stores())


def make(store: DiskRoomFileStore, **limits) -> RoomFiles:
    return RoomFiles(store, RoomFileLimits(**limits), FrameMaker(id_source(), lambda: T0))


def replies(actions: list) -> list:
    """The messages the broker sends, as (conn, message, payload)."""
    assert all(type(action) is Send for action in actions)
    return [(action.conn, decode(action.frames).message, decode(action.frames).payload) for action in actions]


def messages(actions: list) -> list:
    return [message for _, message, _ in replies(actions)]


def codes(actions: list) -> list[ErrorCode]:
    return [message.code for message in messages(actions) if type(message) is Error]


def credit(next_: int, upto: int, restart: bool, rid: bytes = RID, xfer: bytes = X) -> RoomCredit:
    return RoomCredit(room=rid, xfer=xfer, next=next_, upto=upto, restart=restart)


def upload(files: RoomFiles, conn: bytes = A, user: str = "alice", size: int = len(PLAIN), chunk_size: int = CS,
           xfer: bytes = X, rid: bytes = RID, now: int = T0) -> list:
    return files.upload(conn, user, rid, RoomUpload(room=rid, xfer=xfer, size=size, chunk_size=chunk_size),
                        MSG, now)


def send(files: RoomFiles, index: int, payload=None, final: bool | None = None, conn: bytes = A, user: str = "alice",
         xfer: bytes = X, rid: bytes = RID, chunks: list[bytes] = CHUNKS, now: int = T0) -> list:
    payload = chunks[index] if payload is None else payload
    final = index == len(chunks) - 1 if final is None else final
    return files.chunk(conn, user, rid, RoomChunk(room=rid, xfer=xfer, index=index, final=final), payload, MSG,
                       now)


def upload_all(files: RoomFiles, chunks: list[bytes] = CHUNKS, conn: bytes = A, xfer: bytes = X,
               rid: bytes = RID, size: int | None = None, now: int = T0) -> list[RoomCredit]:
    """An uploader as §8's sender: each credit's window, until the broker holds every chunk; the credits it got."""
    size = len(opened(chunks, xfer)) if size is None else size
    got = messages(upload(files, conn, size=size, xfer=xfer, rid=rid, now=now))
    sent = got[0].next
    credits = list(got)
    while credits[-1].next < len(chunks):
        assert type(credits[-1]) is RoomCredit, credits[-1]
        upto = credits[-1].upto
        while sent < upto:
            credits += messages(send(files, sent, conn=conn, xfer=xfer, rid=rid, chunks=chunks, now=now))
            sent += 1
    return credits


def fetch(files: RoomFiles, next_: int, upto: int, restart: bool = False, conn: bytes = B, user: str = "bob",
          xfer: bytes = X, rid: bytes = RID, now: int = T0) -> list:
    return files.fetch(conn, user, rid, RoomFetch(room=rid, xfer=xfer, next=next_, upto=upto,
                                                         restart=restart), MSG, now)


def fetch_all(files: RoomFiles, conn: bytes = B, xfer: bytes = X, window: int = 32) -> list[bytes]:
    """A member's device as §8's receiver: a first credit with restart, then again at half a window."""
    held: list[bytes] = []
    pending = replies(fetch(files, 0, window, True, conn=conn, xfer=xfer))
    while pending:
        _, chunk, payload = pending.pop(0)
        assert type(chunk) is RoomChunk and chunk.index == len(held), chunk
        held.append(bytes(payload))
        if chunk.final:
            assert not fetch(files, len(held), len(held) + window, conn=conn, xfer=xfer)  # "done": nothing more
            return held
        if not pending:
            pending = replies(fetch(files, len(held), len(held) + window, conn=conn, xfer=xfer))
    raise AssertionError(f"the fetch stalled at chunk {len(held)}")


# --- the whole flow ----------------------------------------------------------------------------------------
def test_a_file_uploaded_once_is_fetched_whole_by_every_member_through_any_broker(stores):
    here, there = make(stores()), make(stores())  # two brokers sharing the directory
    credits = upload_all(here)
    assert credits[0] == credit(0, 32, True) and credits[-1] == credit(41, 41, False)
    assert [c.upto for c in credits[1:-1]] == [41]  # credited again after half a window, up to the end
    assert here.offer_ready(RID, X, "alice") is None and there.offer_ready(RID, X, "alice", len(PLAIN), CS) is None
    for files, conn in ((here, B), (there, C), (there, A)):  # bob here; carol and alice's other device there
        assert opened(fetch_all(files, conn)) == PLAIN


def test_a_zero_byte_file_is_one_empty_sealed_chunk(broker):
    chunks = sealed(b"")
    assert upload_all(broker, chunks) == [credit(0, 1, True), credit(1, 1, False)]
    assert opened(fetch_all(broker)) == b""


def test_offer_ready_wants_the_whole_file_uploaded_by_that_user_to_that_room(broker):
    upload(broker)
    send(broker, 0)
    assert broker.offer_ready(RID, X, "alice") is ErrorCode.NOT_UPLOADED
    upload_all(broker)
    assert broker.offer_ready(RID, X, "alice") is None
    assert broker.offer_ready(RID, X, "bob") is ErrorCode.NOT_UPLOADED
    assert broker.offer_ready(RID, X, "alice", size=len(PLAIN) + 1) is ErrorCode.NOT_UPLOADED
    assert broker.offer_ready(RID, X, "alice", chunk_size=2 * CS) is ErrorCode.NOT_UPLOADED
    assert broker.offer_ready(OTHER_RID, X, "alice") is ErrorCode.UNKNOWN_TRANSFER
    assert broker.offer_ready(RID, Y, "alice") is ErrorCode.UNKNOWN_TRANSFER


# --- upload: the broker as receiver ------------------------------------------------------------------------
def test_a_repeated_upload_resumes_from_the_chunks_on_disk_also_after_a_broker_restart(stores, root):
    files = make(stores())
    upload(files)
    for index in range(5):
        send(files, index)
    assert messages(upload(files)) == [credit(5, 37, True)]  # a reconnect: same broker
    files.closed(A)
    restarted = make(stores())  # the broker restarted (or it is another one of the cluster)
    assert messages(upload(restarted, conn=B)) == [credit(5, 37, True)]
    assert upload_all(restarted, conn=B)[-1] == credit(41, 41, False)
    assert opened(fetch_all(restarted, C)) == PLAIN


def test_an_upload_asked_again_once_complete_is_credited_as_held_whole(broker):
    upload_all(broker)
    assert messages(upload(broker)) == [credit(41, 41, True)]


def test_chunks_outside_the_credit_get_one_credit_exceeded_per_run(broker):
    assert codes(send(broker, 0)) == [ErrorCode.CREDIT_EXCEEDED]  # no upload started
    assert send(broker, 1) == []  # the rest of the run is not answered
    upload(broker)
    send(broker, 0)  # accepted: the run ended
    assert codes(send(broker, 32)) == [ErrorCode.CREDIT_EXCEEDED]  # beyond upto = 32
    assert send(broker, 40) == [] and send(broker, 10**12, b"x") == []
    assert broker.store.get(RID, X).chunks == 1
    broker.closed(A)
    assert codes(send(broker, 1)) == [ErrorCode.CREDIT_EXCEEDED]  # a new connection's run


def test_a_chunk_held_already_is_dropped_without_a_word(broker):
    upload(broker)
    send(broker, 0)
    assert send(broker, 0) == [] and broker.store.get(RID, X).chunks == 1


def test_a_gap_is_answered_once_with_a_restart_credit_from_the_first_missing_chunk(broker):
    upload(broker)
    send(broker, 0)
    assert messages(send(broker, 2)) == [credit(1, 32, True)]
    assert send(broker, 3) == []
    assert send(broker, 1) == [] and broker.store.get(RID, X).chunks == 2


@pytest.mark.parametrize(("index", "payload", "final"), [
    (0, CHUNKS[0][:-1], False),  # short
    (0, CHUNKS[0] + b"x", False),  # long: the broker never holds more than the file it reserved
    (0, CHUNKS[0], True),  # final too early
    (40, CHUNKS[40], False),  # the last chunk without final
    (40, CHUNKS[39], True),  # the last chunk must make the total equal the size
], ids=["short", "long", "early-final", "last-not-final", "last-too-long"])
def test_a_chunk_of_the_wrong_length_or_final_flag_is_refused_once_and_not_stored(broker, index, payload, final):
    upload(broker)
    for i in range(index):
        send(broker, i)
    assert codes(send(broker, index, payload, final)) == [ErrorCode.BAD_FRAME]
    assert send(broker, index, payload, final) == []
    assert broker.store.get(RID, X).chunks == index
    send(broker, index)  # the right one is taken
    assert broker.store.get(RID, X).chunks == index + 1


def test_only_the_uploader_may_upload_to_its_transfer(broker):
    upload(broker)
    assert codes(upload(broker, conn=B, user="bob")) == [ErrorCode.NOT_ALLOWED]
    assert codes(send(broker, 0, conn=B, user="bob")) == [ErrorCode.CREDIT_EXCEEDED]
    assert broker.store.get(RID, X).chunks == 0


@pytest.mark.parametrize(("size", "chunk_size"), [(100, MIN_CHUNK - 1), (100, MAX_CHUNK + 1), (100, 0)])
def test_a_chunk_size_out_of_bounds_is_a_bad_frame(broker, size, chunk_size):
    assert codes(upload(broker, size=size, chunk_size=chunk_size)) == [ErrorCode.BAD_FRAME]
    assert broker.store.get(RID, X) is None


def test_a_resumed_upload_must_keep_its_size_and_chunk_size(broker):
    upload(broker)
    assert codes(upload(broker, size=len(PLAIN) + 1)) == [ErrorCode.BAD_FRAME]
    assert codes(upload(broker, chunk_size=2 * CS)) == [ErrorCode.BAD_FRAME]


def test_a_new_connection_takes_an_upload_over(broker):
    upload(broker)
    send(broker, 0)
    assert messages(upload(broker, conn=C)) == [credit(1, 33, True)]
    assert codes(send(broker, 1)) == [ErrorCode.CREDIT_EXCEEDED]  # the old connection's chunks
    assert send(broker, 1, conn=C) == [] and broker.store.get(RID, X).chunks == 2


def test_a_file_larger_than_the_room_quota_is_refused_before_the_disk(stores, root):
    files = make(stores(), room_quota=10 * CS)
    assert codes(upload(files, size=2**62)) == [ErrorCode.ROOM_QUOTA]
    assert codes(upload(files, size=10 * CS)) == [ErrorCode.ROOM_QUOTA]  # the tags count too
    assert sorted(os.listdir(root)) == [".lock", "usage.json"]


def test_a_file_of_one_gib_fits_the_default_quota_at_the_smallest_chunks(stores):
    files = make(stores())  # its seal tags take 16 bytes a chunk more than the file: 1.6% at 1 KiB chunks
    assert codes(upload(files, size=1 << 30, chunk_size=1024)) == []


def test_the_room_quota_and_the_store_total_bound_what_is_kept(stores):
    files = make(stores(), room_quota=3 * (CS + 16), total_quota=5 * (CS + 16))
    assert messages(upload(files, size=2 * CS))[0] == credit(0, 2, True)
    assert codes(upload(files, size=2 * CS, xfer=Y)) == [ErrorCode.ROOM_QUOTA]
    assert messages(upload(files, size=CS, xfer=Y))[0] == credit(0, 1, True, xfer=Y)
    assert messages(upload(files, size=2 * CS, rid=OTHER_RID))[0] == credit(0, 2, True, OTHER_RID)
    assert codes(upload(files, size=CS, rid=OTHER_RID, xfer=Y)) == [ErrorCode.STORAGE_FULL]


def test_files_are_bounded_per_room_and_in_all(stores):
    files = make(stores(), files_per_room=1, files_total=2)
    upload_all(files, sealed(b""))
    assert codes(upload(files, size=0, xfer=Y)) == [ErrorCode.ROOM_QUOTA]
    upload_all(files, sealed(b""), rid=OTHER_RID)
    assert codes(upload(files, size=0, xfer=Y, rid=b"t" * 16)) == [ErrorCode.STORAGE_FULL]


def test_unfinished_uploads_are_bounded_per_user_and_per_room(stores):
    files = make(stores(), uploads_per_user=2, uploads_per_room=3)
    xfers = [bytes([i]) * 16 for i in range(4)]
    upload(files, size=0, xfer=xfers[0])
    upload(files, xfer=xfers[1])
    assert codes(upload(files, xfer=xfers[2])) == [ErrorCode.RATE_LIMITED]  # alice has 2 unfinished
    assert not codes(upload(files, size=0, xfer=xfers[0]))  # resuming one is no new upload
    assert not codes(upload(files, conn=B, user="bob", xfer=xfers[2]))
    assert codes(upload(files, conn=C, user="carol", xfer=xfers[3])) == [ErrorCode.RATE_LIMITED]  # the room has 3
    upload_all(files, sealed(b"", xfer=xfers[0]), xfer=xfers[0])  # finishing one frees a place
    assert not codes(upload(files, conn=C, user="carol", xfer=xfers[3]))


def test_a_flood_of_upload_requests_takes_only_the_bounded_places(stores, root):
    files = make(stores())
    for i in range(50):
        upload(files, xfer=i.to_bytes(16, "big"))
    assert len([name for name in os.listdir(root / RID.hex()) if name.endswith(".meta")]) == 4
    assert files.store.usage(RID, "alice").user_unfinished == 4


def test_a_broker_stopped_between_the_last_chunk_and_completion_completes_on_the_next_upload(broker):
    upload(broker)
    file = broker.store.get(RID, X)
    for index, chunk in enumerate(CHUNKS):  # what the disk has when the broker stops just before completing
        broker.store.write_chunk(file, index, chunk, T0)
    assert broker.offer_ready(RID, X, "alice") is ErrorCode.NOT_UPLOADED
    assert messages(upload(broker)) == [credit(41, 41, True)]
    assert broker.offer_ready(RID, X, "alice") is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 45), st.sampled_from(["right", "short", "long", "flag"])), max_size=80))
def test_whatever_chunks_arrive_the_disk_holds_a_true_prefix_and_replies_never_outnumber_them(tmp_path_factory,
                                                                                             frames):
    root = tmp_path_factory.mktemp("rf")
    store = DiskRoomFileStore(root, fsync=False)
    try:
        files = make(store)
        upload(files)
        in_run = False  # refused since the last chunk taken: answered already
        for index, shape in frames:
            payload = CHUNKS[min(index, 40)]
            payload = {"right": payload, "short": payload[:-1], "long": payload + b"!", "flag": payload}[shape]
            before = store.get(RID, X).chunks
            answers = messages(send(files, index, payload, (index == 40) != (shape == "flag")))
            if store.get(RID, X).chunks > before:
                in_run = False
            elif answers:
                assert not in_run, answers  # one answer per run of refused chunks
                in_run = True
        assert (root / RID.hex() / (X.hex() + ".chunks")).read_bytes() == b"".join(CHUNKS[:store.get(RID, X).chunks])
    finally:
        store.close()


# --- fetch: the broker as sender ----------------------------------------------------------------------------
def test_a_fetch_sends_at_most_a_window_and_a_higher_upto_releases_more(broker):
    upload_all(broker)
    first = replies(fetch(broker, 0, 1000, True))
    assert [m.index for _, m, _ in first] == list(range(32))  # clamped to 32 beyond next
    assert all(conn == B and type(m) is RoomChunk and not m.final for conn, m, _ in first)
    assert [bytes(p) for _, _, p in first] == CHUNKS[:32]
    assert fetch(broker, 0, 1000) == []  # nothing new is covered
    assert [m.index for m in messages(fetch(broker, 16, 48))] == list(range(32, 41))
    assert fetch(broker, 16, 48) == [] and broker.fetch_count == 1


def test_a_restart_resends_from_next_at_most_once_per_rewind_interval(broker):
    upload_all(broker)
    fetch(broker, 0, 4, True)
    assert fetch(broker, 2, 4, True, now=T0 + 100) == []  # too soon after the start: only raises the limit
    assert [m.index for m in messages(fetch(broker, 2, 6, True, now=T0 + 600))] == [2, 3, 4, 5]
    assert [m.index for m in messages(fetch(broker, 2, 7, True, now=T0 + 700))] == [6]


def test_fetching_what_is_not_there_or_not_whole(broker):
    assert codes(fetch(broker, 0, 32)) == [ErrorCode.UNKNOWN_TRANSFER]
    upload(broker)
    send(broker, 0)
    assert codes(fetch(broker, 0, 32)) == [ErrorCode.NOT_UPLOADED]
    upload_all(broker)
    assert codes(fetch(broker, 0, 32, rid=OTHER_RID)) == [ErrorCode.UNKNOWN_TRANSFER]  # another room's xfer
    assert codes(fetch(broker, 42, 50)) == [ErrorCode.BAD_FRAME]
    assert fetch(broker, 41, 50) == [] and fetch(broker, 5, 3) == []  # the end; a credit granting nothing


def test_bytes_in_flight_are_bounded_per_connection_and_released_by_credits(stores):
    files = make(stores(), inflight_per_conn=3 * (CS + 16))
    upload_all(files)
    assert [m.index for m in messages(fetch(files, 0, 32, True))] == [0, 1, 2]
    assert fetch(files, 0, 32, True, now=T0 + 100) == []
    assert [m.index for m in messages(fetch(files, 2, 32))] == [3, 4]  # it holds 0 and 1
    assert [m.index for m in messages(fetch(files, 2, 32, True, now=T0 + 600))] == [2, 3, 4]  # they were lost
    assert [m.index for m in messages(fetch(files, 0, 32, conn=C))] == [0, 1, 2]  # another connection's own
    files.closed(B)
    assert files.inflight_total == 3 * (CS + 16)


def test_fetches_per_connection_are_bounded_and_end_with_the_connection(stores):
    files = make(stores(), fetches_per_conn=1)
    upload_all(files)
    upload_all(files, sealed(PLAIN, xfer=Y), xfer=Y)
    fetch(files, 0, 1, True)
    assert codes(fetch(files, 0, 1, True, xfer=Y)) == [ErrorCode.RATE_LIMITED]
    fetch(files, 41, 41)  # the first is done
    assert [m.index for m in messages(fetch(files, 0, 1, True, xfer=Y))] == [0]
    files.closed(B)
    assert files.fetch_count == 0 and files.inflight_total == 0
    assert [m.index for m in messages(fetch(files, 0, 1, True))] == [0]


def test_idle_fetches_are_forgotten(stores):
    files = make(stores(), fetch_idle_ms=1000)
    upload_all(files)
    fetch(files, 0, 2, True)
    files.on_tick(T0 + 1000)
    assert files.fetch_count == 1
    files.on_tick(T0 + 1001)
    assert files.fetch_count == 0 and files.inflight_total == 0


# --- lifetime ------------------------------------------------------------------------------------------------
def test_complete_files_expire_7_days_after_completion_and_unfinished_ones_an_hour_after_their_last_chunk(broker,
                                                                                                         root):
    upload_all(broker, now=T0)
    upload(broker, xfer=Y, now=T0)
    send(broker, 0, xfer=Y, chunks=sealed(PLAIN, xfer=Y), now=T0 + HOUR)
    broker.on_tick(T0 + 2 * HOUR)
    assert broker.store.get(RID, Y) is not None  # its last chunk is an hour old, not more
    broker.on_tick(T0 + 2 * HOUR + 5001)
    assert broker.store.get(RID, Y) is None
    assert codes(send(broker, 1, xfer=Y, chunks=sealed(PLAIN, xfer=Y))) == [ErrorCode.CREDIT_EXCEEDED]
    broker.on_tick(T0 + 7 * 24 * HOUR)
    assert broker.offer_ready(RID, X, "alice") is None
    broker.on_tick(T0 + 7 * 24 * HOUR + 10_000)
    assert broker.offer_ready(RID, X, "alice") is ErrorCode.UNKNOWN_TRANSFER
    assert broker.store.usage(RID, "alice").total_files == 0 and not (root / RID.hex()).exists()


def test_expiry_runs_in_bounded_steps(stores):
    files = make(stores(), sweep_batch=2, sweep_every_ms=1, uploads_per_user=5)
    for i in range(5):
        upload(files, size=0, xfer=bytes([i]) * 16, rid=bytes([i]) * 16)
    late = T0 + 2 * HOUR
    remaining = []
    for step in range(4):
        files.on_tick(late + step * 10)
        remaining.append(files.store.usage(RID, "alice").total_files)
    assert remaining == [3, 1, 0, 0]


def test_room_gone_deletes_every_file_of_that_room_and_only_those(broker, root):
    upload_all(broker)
    upload(broker, xfer=Y)
    upload_all(broker, rid=OTHER_RID)
    fetch(broker, 0, 2, True)
    (root / RID.hex() / ((b"q" * 16).hex() + ".meta.tmp")).write_text("{")  # a crash's leftover
    broker.room_gone(RID)
    assert not (root / RID.hex()).exists() and broker.fetch_count == 0
    assert broker.offer_ready(RID, X, "alice") is ErrorCode.UNKNOWN_TRANSFER
    assert broker.offer_ready(OTHER_RID, X, "alice") is None
    usage = broker.store.usage(OTHER_RID, "alice")
    assert (usage.total_files, usage.user_unfinished) == (1, 0)


def test_a_transfer_deleted_by_another_broker_is_unknown_to_its_uploader_and_fetchers(stores, root):
    here, there = make(stores()), make(stores())
    upload(here, xfer=Y)
    upload_all(here)
    fetch(here, 0, 2, True)
    assert there.store.delete(RID, Y)  # its expiry sweep, say
    assert codes(send(here, 0, xfer=Y, chunks=sealed(PLAIN, xfer=Y))) == [ErrorCode.UNKNOWN_TRANSFER]
    assert sorted(os.listdir(root / RID.hex())) == [X.hex() + ".chunks", X.hex() + ".meta", "usage.json"]  # not again
    there.room_gone(RID)
    assert codes(fetch(here, 2, 4)) == [ErrorCode.UNKNOWN_TRANSFER]
    assert here.fetch_count == 0


# --- the disk ------------------------------------------------------------------------------------------------
def test_a_full_disk_answers_storage_full_once_and_the_upload_resumes_when_space_is_freed(small_disk):
    store = DiskRoomFileStore(small_disk / "room-files", fsync=True)
    try:
        files = make(store)
        upload(files)
        for index in range(3):  # 3 * 1040 bytes: chunk 3 crosses into a page the full disk has no room for
            send(files, index)
        fill(small_disk)
        assert codes(send(files, 3)) == [ErrorCode.STORAGE_FULL]
        assert all(send(files, i) == [] for i in range(4, 10))  # no reply per chunk in flight
        assert store.get(RID, X).chunks == 3
        assert (small_disk / "room-files" / RID.hex() / (X.hex() + ".chunks")).stat().st_size == 3 * (CS + 16)
        (small_disk / "filler").unlink()
        assert upload_all(files)[0] == credit(3, 35, True)
        assert opened(fetch_all(files)) == PLAIN
        fill(small_disk)
        assert codes(upload(files, xfer=Y)) == [ErrorCode.STORAGE_FULL]  # no room for a new record
    finally:
        store.close()


def test_the_totals_are_shared_by_brokers_and_recounted_when_a_store_opens(stores, root):
    here, there = make(stores(), total_quota=3 * (CS + 16)), make(stores(), total_quota=3 * (CS + 16))
    upload_all(here, sealed(os.urandom(2 * CS)), size=2 * CS)
    assert codes(upload(there, size=2 * CS, xfer=Y, rid=OTHER_RID)) == [ErrorCode.STORAGE_FULL]
    for totals in (root / "usage.json", root / RID.hex() / "usage.json"):  # what a crash may leave
        totals.write_text(json.dumps({"bytes": 0, "files": 0, "unfinished": {}}))
    reopened = stores()
    usage = reopened.usage(RID, "alice")
    assert (usage.total_bytes, usage.total_files, usage.room_bytes, usage.room_files) == (2 * (CS + 16), 1) * 2
    (root / "usage.json").write_text("{not json")
    (root / RID.hex() / "usage.json").write_text('{"bytes": "many"}')
    usage = there.store.usage(RID, "alice")
    assert (usage.total_files, usage.room_files) == (1, 1)


def test_stray_and_hostile_entries_in_the_directory_are_no_transfers(broker, root, stores):
    upload_all(broker)
    room = root / RID.hex()
    (root / "not-a-room").mkdir()
    (root / ("cd" * 16)).mkdir()  # a room left empty by a failed creation
    (root / OTHER_RID.hex()).write_text("a file where a room would be")
    (room / ("zz" * 16 + ".meta")).write_text("{}")
    for xfer, record in ((Y, '{"uploader": "alice", "size": -5, "chunk_size": 0, "created_ms": 1, '
                             '"completed_ms": 2}'), (b"z" * 16, "garbage"), (b"w" * 16, "[]")):
        (room / (xfer.hex() + ".meta")).write_text(record)
        (room / (xfer.hex() + ".chunks")).write_bytes(b"")
        assert broker.store.get(RID, xfer) is None
        assert codes(fetch(broker, 0, 2, xfer=xfer)) == [ErrorCode.UNKNOWN_TRANSFER]
    assert [file.xfer for file in broker.store.sweep(100)] == [X]
    assert not (root / ("cd" * 16)).exists() and (root / "not-a-room").exists()
    assert stores().usage(RID, "alice").total_files == 1


def test_racing_brokers_create_and_complete_a_transfer_once(stores):
    here, there = stores(), stores()
    file = RoomFile(RID, X, "alice", 0, CS, T0, T0)
    assert here.create(file, lambda usage: None) == file
    assert there.create(RoomFile(RID, X, "alice", 5, CS, T0 + 1, T0 + 1), lambda usage: None) == file  # lost the race
    there.create(RoomFile(RID, Y, "alice", 0, CS, T0, T0), lambda usage: None)
    assert here.write_chunk(file, 0, sealed(b"")[0], T0)
    done = here.complete(file, T0 + 5)
    assert there.complete(file, T0 + 9) == done and done.completed_ms == T0 + 5
    usage = there.usage(RID, "alice")
    assert (usage.total_files, usage.room_unfinished, usage.user_unfinished) == (2, 1, 1)


def _upload_many(root: Path, worker: int) -> int:
    """One broker process: 40 uploads of one chunk each, to rooms of its own; how many were taken."""
    store = DiskRoomFileStore(root, fsync=False)
    files = make(store, total_quota=50 * (CS + 16), uploads_per_user=1000, uploads_per_room=1000)
    taken = 0
    for i in range(40):
        rid = bytes([worker, i]) * 8
        taken += not codes(upload(files, size=CS, xfer=bytes([worker, i]) * 8, rid=rid))
    store.close()
    return taken


def test_brokers_in_other_processes_never_reserve_more_than_the_total_between_them(stores, root):
    stores()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        taken = list(pool.map(_upload_many, [root, root], [1, 2]))
    assert sum(taken) == 50
    assert json.loads((root / "usage.json").read_text())["files"] == 50  # the shared counter
    usage = stores().usage(RID, "alice")  # recounted from the records on open
    assert (usage.total_files, usage.total_bytes, usage.user_unfinished) == (50, 50 * (CS + 16), 50)


def test_a_transfer_the_disk_cannot_record_is_not_counted(broker, root):
    upload_all(broker)
    (root / RID.hex() / (Y.hex() + ".meta.tmp")).mkdir()  # where its record would be written
    assert codes(upload(broker, xfer=Y)) == [ErrorCode.STORAGE_UNAVAILABLE]
    usage = broker.store.usage(RID, "alice")
    assert (usage.total_files, usage.room_files, usage.user_unfinished) == (1, 1, 0)
    assert broker.store.get(RID, Y) is None and not (root / RID.hex() / (Y.hex() + ".chunks")).exists()


def test_a_chunk_is_written_from_a_zmq_frame_as_the_shell_receives_it(broker):
    upload(broker, size=3)
    assert messages(send(broker, 0, zmq.Frame(sealed(b"abc")[0]), chunks=sealed(b"abc")))[0].next == 1
    assert opened(fetch_all(broker)) == b"abc"


def test_completion_writes_a_record_any_broker_can_read(broker, root):
    upload_all(broker)
    record = json.loads((root / RID.hex() / (X.hex() + ".meta")).read_text())
    assert record == {"rid": RID.hex(), "xfer": X.hex(), "uploader": "alice", "size": len(PLAIN), "chunk_size": CS,
                      "chunks": 41, "created_ms": T0, "completed_ms": T0, "state": "complete"}
    assert broker.store.get(RID, X) == RoomFile(RID, X, "alice", len(PLAIN), CS, T0, T0, 41, T0)
