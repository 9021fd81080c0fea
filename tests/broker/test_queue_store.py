"""The store-and-forward queues on real SQLite: bounds, expiry through its index, paged delivery,
and the core's answers once the shell reports whether the batch committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink
from p2pchat.broker.backends.sqlite_store import SqliteMessageStore
from p2pchat.broker.core.actions import Relay, Send
from p2pchat.broker.core.ports import QueueLimits, Refusal
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Consume, Error, Register, decode, new_msg_id, pack
from tests.broker.test_routing import BROKER, EPOCH, IVL, LIVENESS
from tests.cores import KeyBook, id_source

LIMITS = QueueLimits(max_per_user=100, max_bytes_per_user=10_000, max_per_sender=60, max_bytes_per_sender=6_000,
                     max_total_bytes=25_000, max_recipients=3, page=8, expire_batch=5)


@pytest.fixture
def store(tmp_path: Path) -> SqliteMessageStore:
    made = SqliteMessageStore(tmp_path / "queue.sqlite", LIMITS)
    yield made
    made.close()


def fill(store: SqliteMessageStore, sender: str, recipient: str, count: int, size: int = 100,
         expires_ms: int = 10**12) -> list[Refusal | None]:
    return [store.append(new_msg_id(), sender, recipient, b"x" * size, expires_ms) for _ in range(count)]


def test_a_recipients_queue_is_bounded_in_bytes_and_each_sender_to_a_share(store):
    assert fill(store, "mallory", "bob", 61) == [None] * 60 + [Refusal.SHARE_FULL]
    assert fill(store, "alice", "bob", 1) == [None]
    assert fill(store, "carol", "bob", 1, size=6_000) == [Refusal.QUEUE_FULL]  # 10,000 bytes per recipient
    assert fill(store, "carol", "bob", 1, size=3_000) == [None]


def test_the_store_as_a_whole_is_bounded_in_bytes_and_recipients(store):
    for user in ("u1", "u2"):
        assert fill(store, "a", user, 1, size=5_000) + fill(store, "b", user, 1, size=5_000) == [None, None]
    assert fill(store, "a", "u3", 1, size=5_000) + fill(store, "b", "u3", 1, size=5_000) == [
        None, Refusal.STORE_FULL]  # 25,000 bytes in all
    store.commit()
    assert fill(store, "a", "u4", 1, size=1) == [Refusal.STORE_FULL]  # a fourth recipient


def test_a_rolled_back_batch_gives_its_room_back(store):
    fill(store, "mallory", "bob", 60)
    store.rollback()
    assert store.queued("bob") == 0
    assert fill(store, "mallory", "bob", 1) == [None]
    store.commit()
    store.rollback()  # nothing open: harmless
    assert store.queued("bob") == 1


def test_expiry_walks_the_expiry_index_in_bounded_steps(store):
    fill(store, "a", "bob", 12, expires_ms=1_000)
    fill(store, "a", "bob", 3, expires_ms=10**12)
    store.commit()
    plan = " ".join(str(row) for row in store._db.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM queue WHERE expires_ms <= ? ORDER BY expires_ms LIMIT ?", (0, 5)))
    assert "queue_by_expiry" in plan, plan
    assert [store.expire(2_000) for _ in range(4)] == [5, 5, 2, 0]
    assert store.queued("bob") == 3


def test_pending_pages_by_sequence_and_skips_expired(store):
    fill(store, "a", "bob", 5, expires_ms=1_000)
    fill(store, "a", "bob", 20)
    first = store.pending("bob", 2_000, 0, 8)
    second = store.pending("bob", 2_000, first[-1][0], 8)
    assert len(first) == len(second) == 8 and first[-1][0] < second[0][0]


# --- the core over a real store ------------------------------------------------------
def core_with(store: SqliteMessageStore) -> BrokerCore:
    return BrokerCore(LocalDirectory(EPOCH), broker_id=BROKER, heartbeat_ivl=IVL, liveness=LIVENESS, wall_ms=lambda: 0,
                      new_id=id_source(), keys=KeyBook(), store=store, link=LocalLink(), queue_limits=LIMITS,
                      require_key=False)


def register(core: BrokerCore, conn: bytes, user: str) -> list:
    return core.on_frames(conn, pack(Register(user, b"t" * 16, b"k" * 32), 0), 0.0)


def sends_to(actions: list, conn: bytes) -> list:
    return [decode(a.frames).message for a in actions if type(a) is Send and a.conn == conn]


def test_register_delivers_one_page_and_consuming_brings_the_next(store):
    core = core_with(store)
    register(core, b"alice", "alice")
    register(core, b"bob", "bob")
    ids = [new_msg_id() for _ in range(20)]
    for i, msg_id in enumerate(ids):
        store.append(msg_id, "alice", "carol", pack(ChatMessage("alice", "carol", b"%d" % i), 0, msg_id)[0], 10**12)
    store.commit()
    first = sends_to(register(core, b"carol", "carol"), b"carol")
    assert [m.body for m in first if type(m) is ChatMessage] == [b"%d" % i for i in range(8)]
    actions = []
    for msg_id in ids[:4]:
        actions += core.on_frames(b"carol", pack(Consume(msg_id), 0), 0.0)
    assert [m.body for m in sends_to(actions, b"carol")] == [b"%d" % i for i in range(8, 16)]


def test_a_failed_commit_relays_to_online_recipients_and_answers_storage_full_for_the_rest(store):
    core = core_with(store)
    for user in ("alice", "bob", "carol"):
        register(core, user.encode(), user)
    core._drop(b"carol")  # carol goes offline
    to_bob = pack(ChatMessage("alice", "bob", b"hi"), 0)
    to_carol = pack(ChatMessage("alice", "carol", b"hi"), 0)
    assert core.on_frames(b"alice", to_bob, 0.0) == [] and core.on_frames(b"alice", to_carol, 0.0) == []
    store.rollback()
    actions = core.on_commit(ErrorCode.STORAGE_FULL)
    relay = next(a for a in actions if type(a) is Relay)
    assert relay.conn == b"bob" and decode(relay.on_success).message == Ack(decode(to_bob).msg_id, AckStatus.RELAYED)
    error = sends_to(actions, b"alice")[0]
    assert type(error) is Error and error.code is ErrorCode.STORAGE_FULL and error.ref == decode(to_carol).msg_id
    assert store.queued("bob") == store.queued("carol") == 0


def test_consumes_of_a_batch_are_forgotten_at_its_commit_and_undone_by_a_rollback(tmp_path):
    """Consumes are deleted in one statement at commit; a rolled-back batch consumed nothing."""
    store = SqliteMessageStore(tmp_path / "q.sqlite")
    ids = [bytes([i]) * 16 for i in range(5)]
    for msg_id in ids:
        assert store.append(msg_id, "alice", "bob", b"frame", 2**40) is None
    store.commit()
    for msg_id in ids[:3]:
        store.consume("bob", msg_id)
    store.rollback()
    assert store.queued("bob") == 5
    for msg_id in ids[:3]:
        store.consume("bob", msg_id)
    store.commit()
    assert store.queued("bob") == 2
    assert [frame for _, frame in store.pending("bob", 0, 0, 10)] == [b"frame", b"frame"]
    reopened = SqliteMessageStore(tmp_path / "q.sqlite")  # what the disk holds, counted afresh
    assert reopened.queued("bob") == 2


def test_a_frame_the_full_store_refused_is_answered_storage_full_when_its_recipient_is_offline(store):
    core = core_with(store)
    for user in ("alice", "carol"):
        register(core, user.encode(), user)
    core._drop(b"carol")  # carol goes offline: her frames need the store
    for recipient in ("u1", "u2"):  # with alice and carol's queues, the store holds as many recipients as it may
        fill(store, "a", recipient, 1)
    fill(store, "a", "alice", 1)
    store.commit()
    to_carol = pack(ChatMessage("alice", "carol", b"hi"), 0)
    assert core.on_frames(b"alice", to_carol, 0.0) == []
    store.commit()
    error = sends_to(core.on_commit(), b"alice")[-1]
    assert type(error) is Error and (error.code, error.ref) == (ErrorCode.STORAGE_FULL, decode(to_carol).msg_id)


# --- queues per device (docs/PROTOCOL.md §5.5): the primary's is the ID's, another device's "user/dev" ---------
def test_each_device_is_handed_its_own_queue_and_frames_to_the_id_go_to_the_primarys(store):
    core = core_with(store)
    register(core, b"alice", "alice")
    register(core, b"bob-desktop", "bob")
    core.keys.add_device("bob", b"l" * 32)  # linking is not on the wire yet
    queued = new_msg_id()
    store.append(queued, "alice", "bob/2", pack(ChatMessage("alice", "bob", b"for the laptop"), 0, queued)[0], 10**12)
    store.commit()
    laptop = core.on_frames(b"bob-laptop", pack(Register("bob", b"l" * 16, b"l" * 32), 0), 0.0)
    assert [m.body for m in sends_to(laptop, b"bob-laptop") if type(m) is ChatMessage] == [b"for the laptop"]
    to_bob = pack(ChatMessage("alice", "bob", b"to bob"), 0)
    assert core.on_frames(b"alice", to_bob, 0.0) == []
    store.commit()
    actions = core.on_commit()
    assert [m.body for m in sends_to(actions, b"bob-desktop")] == [b"to bob"] and sends_to(actions, b"bob-laptop") == []
    assert [a.queued_for for a in actions if type(a) is Send and a.conn == b"bob-desktop"] == ["bob"]
    assert [a.queued_for for a in laptop if type(a) is Send and a.queued_for] == ["bob/2"]
    core.on_frames(b"bob-laptop", pack(Consume(queued), 0), 0.1)
    store.commit()
    assert store.pending("bob/2", 0, 0, 10) == [] and len(store.pending("bob", 0, 0, 10)) == 1
