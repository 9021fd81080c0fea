"""Broker resource bounds against real broker processes: file credit, full disk, queue shares.

Raw DEALER sockets (tests/broker/test_fuzz.py's ``Dealers``) play the misbehaving clients; real
``ChatClient``s check that honest users are still served afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.common.errors import ErrorCode, RemoteError
from p2pchat.common.protocol import ChatMessage, Error, FileChunk, FileCredit, Heartbeat, decode, new_msg_id, pack
from tests.conftest import HEARTBEAT, BrokerProcess, wait_for
from tests.broker.test_fuzz import Dealers, dealers, recv, register  # noqa: F401  (fixtures)
from tests.broker.test_cluster import redis_server  # noqa: F401

MIB = 1024 * 1024
CHUNK = b"\xa5" * MIB


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def drain_until(sock: zmq.Socket, broker, kind: type, timeout: float = 30.0) -> list:
    """Messages from ``sock`` up to and including the first of type ``kind``."""
    seen = []
    while True:
        msg = decode(recv(sock, broker, timeout)).message
        seen.append(msg)
        if type(msg) is kind:
            return seen


def flood_chunks(mallory: zmq.Socket, bob: zmq.Socket, broker, xfer: bytes, count: int) -> list:
    """``count`` 1-MiB chunks from mallory to bob, who keeps his session but reads nothing; mallory's replies."""
    replies = []
    for index in range(count):
        mallory.send_multipart(pack(FileChunk("mallory", "bob", xfer, index, index == count - 1), 0, payload=CHUNK),
                               copy=False)
        if index % 20 == 19:  # bob stays registered; round trips pace the flood so the broker's input
            bob.send_multipart(pack(Heartbeat(), 0))  # queue is not what we measure
        if index % 100 == 99:
            mallory.send_multipart(pack(Heartbeat(), 0))
            replies += drain_until(mallory, broker, Heartbeat)
    mallory.send_multipart(pack(Heartbeat(), 0))
    return replies + drain_until(mallory, broker, Heartbeat)


def assert_refused_with_credit_exceeded(replies: list) -> None:
    codes = [m.code for m in replies if type(m) is Error]
    assert ErrorCode.CREDIT_EXCEEDED in codes
    assert set(codes) <= {ErrorCode.CREDIT_EXCEEDED, ErrorCode.RATE_LIMITED}, codes
    assert codes.count(ErrorCode.CREDIT_EXCEEDED) < 10  # aggregated, not one per chunk


def assert_others_still_chat(make_client) -> None:
    alice, carol = make_client("alice"), make_client("carol")
    alice.send("carol", "still standing?")
    assert wait_for(carol, lambda e: isinstance(e, ev.MessageReceived)).text == "still standing?"


@pytest.mark.broker_args("--heartbeat", "1.0")  # bob's heartbeats queue behind the flood in our process
def test_chunks_without_credit_are_dropped_and_broker_memory_stays_flat(broker, dealers, make_client):
    """3,000 1-MiB chunks at a recipient that never granted credit (and never reads)."""
    mallory, bob = dealers.open(), dealers.open()
    register(dealers, mallory, "mallory")
    register(dealers, bob, "bob")
    bob.setsockopt(zmq.RCVHWM, 1)
    before = rss_mib(broker.proc.pid)
    replies = flood_chunks(mallory, bob, broker, new_msg_id(), 3000)
    growth = rss_mib(broker.proc.pid) - before
    print(f"broker RSS growth after 3,000 chunks without credit: {growth:.1f} MiB")
    assert broker.alive()
    assert growth < 64, growth
    assert_refused_with_credit_exceeded(replies)
    assert_others_still_chat(make_client)


@pytest.mark.broker_args("--heartbeat", "1.0")
def test_a_huge_credit_is_clamped_and_inflight_bytes_are_capped(broker, dealers, make_client):
    """bob grants mallory ``upto = 2**62`` and then reads nothing: the broker holds at most its cap."""
    mallory, bob = dealers.open(), dealers.open()
    register(dealers, mallory, "mallory")
    register(dealers, bob, "bob")
    xfer = new_msg_id()
    bob.send_multipart(pack(FileCredit("bob", "mallory", xfer, 0, 2**62, True), 0))
    assert type(decode(recv(mallory, broker)).message) is FileCredit
    bob.setsockopt(zmq.RCVHWM, 1)
    before = rss_mib(broker.proc.pid)
    replies = flood_chunks(mallory, bob, broker, xfer, 3000)
    growth = rss_mib(broker.proc.pid) - before
    print(f"broker RSS growth after 3,000 chunks under a 2**62 credit: {growth:.1f} MiB")
    assert broker.alive()
    assert growth < 64 + 32, growth  # the 64-chunk window, at most the 64 MiB per-recipient cap, plus slack
    assert_refused_with_credit_exceeded(replies)
    assert_others_still_chat(make_client)


# --- full disk ------------------------------------------------------------------------
def fill(directory, name: str = "filler") -> None:
    """Take every free byte of ``directory``'s file system."""
    with open(directory / name, "wb", buffering=0) as filler:  # unbuffered: nothing left to fail at close
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


@contextlib.contextmanager
def broker_and_clients(tmp_path: Path, args: list[str]) -> Iterator[tuple[BrokerProcess, Callable[[str], ChatClient]]]:
    """A broker process of our own (``args``) and a factory of connected clients; all stopped after."""
    broker = BrokerProcess.launch(tmp_path / "broker-home", args)
    clients: list[ChatClient] = []

    def client(user: str) -> ChatClient:
        made = ChatClient(user, ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT))
        clients.append(made)
        made.connect(timeout=10)
        return made

    try:
        yield broker, client
    finally:
        for made in clients:
            made.close()
        broker.stop()


def test_full_disk_broker_keeps_relaying_answers_storage_full_and_recovers(small_disk, tmp_path, home):
    with broker_and_clients(tmp_path, ["--data-dir", str(small_disk / "broker")]) as (broker, client):
        alice, bob = client("alice"), client("bob")
        client("carol").close()  # carol is known, and offline: her messages must be stored
        before = [alice.send_async("carol", f"before {i}")[1].result(10) for i in range(3)]
        assert before == ["stored"] * 3
        fill(small_disk)
        refused = None
        for i in range(200):  # the WAL may still hold a few pages: write until the disk says no
            status = alice.send_async("carol", f"{i:04d} " + "x" * 2000)[1]
            try:
                status.result(10)
            except RemoteError as exc:
                refused = exc
                break
        assert refused is not None and refused.code is ErrorCode.STORAGE_FULL, refused
        assert broker.alive()
        # Online delivery and heartbeats go on while nothing can be stored.
        assert alice.send_async("bob", "through a full disk")[1].result(10) == "relayed"
        assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "through a full disk"
        assert bob.send_async("alice", "and back")[1].result(10) == "relayed"
        assert wait_for(alice, lambda e: isinstance(e, ev.MessageReceived)).text == "and back"
        # Space returns: storing works again by itself.
        (small_disk / "filler").unlink()
        assert alice.send_async("carol", "after the disk was freed")[1].result(10) == "stored"
        assert broker.alive()
        carol = client("carol")
        texts = [wait_for(carol, lambda e: isinstance(e, ev.MessageReceived)).text for _ in range(i + 4)]
        assert texts[:3] == ["before 0", "before 1", "before 2"] and texts[-1] == "after the disk was freed"


# --- queue shares and paged delivery ------------------------------------------------------
def assert_one_sender_cannot_fill_another_users_queue(broker: BrokerProcess, make_client) -> None:
    """mallory floods offline bob with junk; alice can still reach him, and bob gets her message."""
    make_client("bob").close()
    pool = Dealers(broker)
    try:
        mallory = pool.open()
        register(pool, mallory, "mallory")
        for i in range(60):
            mallory.send_multipart(pack(ChatMessage("mallory", "bob", b"junk %d" % i), 0))
        replies = [decode(recv(mallory, broker)).message for _ in range(60)]
    finally:
        pool.close()
    codes = [getattr(r, "code", None) or r.status for r in replies]
    assert codes.count("stored") == 50 and codes.count(ErrorCode.QUEUE_FULL) == 10, codes
    alice = make_client("alice")
    assert alice.send_async("bob", "hello despite mallory")[1].result(10) == "stored"
    bob = make_client("bob")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "hello despite mallory"


@pytest.mark.broker_args("--queue-max", "100", "--queue-sender-max", "50")
def test_one_sender_cannot_fill_another_users_queue(broker, make_client):
    assert_one_sender_cannot_fill_another_users_queue(broker, make_client)


def test_one_sender_cannot_fill_another_users_queue_in_redis(redis_server, tmp_path, home):
    args = ["--cluster", redis_server.url, "--queue-max", "100", "--queue-sender-max", "50"]
    with broker_and_clients(tmp_path, args) as (broker, make_client):
        assert_one_sender_cannot_fill_another_users_queue(broker, make_client)


def test_a_long_queue_is_delivered_in_pages_in_order_exactly_once(make_client):
    """More than a page (256) of queued messages: all arrive, in order, once."""
    total = 700
    alice = make_client("alice")
    make_client("bob").close()
    statuses = [alice.send_async("bob", f"m{i:04d}")[1] for i in range(total)]
    assert {s.result(30) for s in statuses} == {"stored"}
    bob = make_client("bob")
    got = [wait_for(bob, lambda e: isinstance(e, ev.MessageReceived), 30).text for _ in range(total)]
    assert got == [f"m{i:04d}" for i in range(total)]
    alice.send("bob", "live after the backlog")
    assert wait_for(bob, lambda e: isinstance(e, ev.MessageReceived)).text == "live after the backlog"


def test_a_cluster_broker_forwards_no_chunk_beyond_credit_to_another_broker(redis_server, tmp_path):
    """mallory on one broker, bob on another: chunks without credit never reach Redis's inbox streams."""
    extra = ["--cluster", redis_server.url, "--heartbeat", "1.0"]
    near = BrokerProcess.launch(tmp_path / "near", extra)
    far = BrokerProcess.launch(tmp_path / "far", extra)
    near_pool, far_pool = Dealers(near), Dealers(far)
    try:
        mallory, bob = near_pool.open(), far_pool.open()
        register(near_pool, mallory, "mallory")
        register(far_pool, bob, "bob")
        used = redis_server.client().info("memory")["used_memory"]
        replies = flood_chunks(mallory, bob, near, new_msg_id(), 300)
        growth = (redis_server.client().info("memory")["used_memory"] - used) / MIB
        print(f"redis memory growth after 300 chunks without credit: {growth:.1f} MiB")
        assert growth < 16, growth
        assert_refused_with_credit_exceeded(replies)
        assert near.alive() and far.alive()
    finally:
        near_pool.close()
        far_pool.close()
        near.stop()
        far.stop()
