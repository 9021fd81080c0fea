"""Sender keys on disk: the SQLite ``SenderKeyStore`` (client/storage/sender_keys.py), on real files."""

from __future__ import annotations

import pytest

from p2pchat.client.sender_keys import SenderKeys
from p2pchat.client.storage.sender_keys import SqliteSenderKeys
from p2pchat.common.crypto import IntegrityError
from p2pchat.common.errors import ErrorCode, StorageError
from p2pchat.common.room_crypto import parse_room_body

RID, TS = b"r" * 16, 1_700_000_000_000


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def path(tmp_path):
    return tmp_path / "sender_keys.sqlite"


def test_records_survive_a_reopen(path):
    store = SqliteSenderKeys(path)
    store.put("a", b"1")
    store.put("b", b"2")
    store.put("a", b"3")
    store.delete("b")
    store.delete("never there")
    store.close()
    assert SqliteSenderKeys(path).load_all() == {"a": b"3"}


def test_a_put_is_on_disk_when_it_returns(path):
    """Another connection (another process after a crash) sees it without a close or a commit."""
    store = SqliteSenderKeys(path)
    store.put("own:x", b"state")
    assert SqliteSenderKeys(path).load_all() == {"own:x": b"state"}
    store.close()


def test_sender_keys_continue_across_a_restart_on_disk(path):
    alice = SenderKeys("alice", 1, SqliteSenderKeys(path))
    bob = SenderKeys("bob", 1, SqliteSenderKeys(path.with_name("bob.sqlite")))
    bob.accept("alice", alice.distribution(RID))
    first = alice.seal(RID, mid(0), TS, b"before")
    alice.seal(RID, mid(1), TS, b"sealed, then killed before it was sent")
    alice = SenderKeys("alice", 1, SqliteSenderKeys(path))
    after = alice.seal(RID, mid(2), TS, b"after")
    assert parse_room_body(after) == (1, 1, 2)
    bob = SenderKeys("bob", 1, SqliteSenderKeys(path.with_name("bob.sqlite")))
    assert bob.open(RID, "alice", mid(2), TS, after) == b"after"
    assert bob.open(RID, "alice", mid(0), TS, first) == b"before"
    bob = SenderKeys("bob", 1, SqliteSenderKeys(path.with_name("bob.sqlite")))
    with pytest.raises(IntegrityError, match="replay"):
        bob.open(RID, "alice", mid(0), TS, first)


def test_a_file_that_cannot_be_opened_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="cannot open the sender keys") as caught:
        SqliteSenderKeys(tmp_path / "no such dir" / "keys.sqlite")
    assert caught.value.code is ErrorCode.UNWRITABLE


def test_a_full_database_is_a_storage_error_no_space(path):
    store = SqliteSenderKeys(path)
    alice = SenderKeys("alice", 1, store)
    alice.current(RID)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL, without filling a disk
    with pytest.raises(StorageError) as caught:
        for k in range(100):  # each state is a few bytes more: the file must grow within a few seals
            alice.distribution(RID)
            alice.mark_sent(RID, {(f"user{k:04d}" + "x" * 200, 1)})
    assert caught.value.code is ErrorCode.NO_SPACE
