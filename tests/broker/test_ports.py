"""One core, two backends: the routing core run on the single broker's ports (SQLite, in process) and
on the cluster's (a real Redis) answers the same inputs with the same actions, byte for byte.

The core has no cluster code paths; the backends differ only in *when* the directory reports a
presence change (at once, or when the presence stream brings it back), so each step below ends the
way the shell's loop goes on: commit, the core's answers to the commit, then a tick.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from p2pchat.broker.backends.redis_cluster import ClusterBackend
from p2pchat.broker.backends.single import SingleBackend
from p2pchat.broker.core.actions import Publish, Relay, Send
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, ChatMessage, Consume, Error, FileCredit, KeyRequest, PeerSync, PeerUpdate, Register, Registered, Snapshot, SnapshotRequest, Unregister, decode, pack
from tests.broker.test_cluster import RedisProcess
from tests.broker.test_routing import EPOCH, IVL, LIVENESS, key_of
from tests.conftest import wait_until
from tests.cores import id_source

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

BROKER = b"broker-1"


class Run:
    """A core on one backend, driven like the shell drives it; every action it asked for, in order."""

    def __init__(self, backend, settle: Callable[[], None] = lambda: None, broker_id: bytes = BROKER) -> None:
        self.backend, self._settle = backend, settle
        self.core = BrokerCore(backend.directory, broker_id=broker_id, heartbeat_ivl=IVL, liveness=LIVENESS,
                               wall_ms=lambda: 0, new_id=id_source(), keys=backend.keys, store=backend.store,
                               link=backend.link, require_key=False)
        self.actions: list = []
        self.ids = id_source()  # for the clients' frames
        self.sent: list[bytes] = []

    def tick(self, now: float) -> None:
        self._settle()
        self._carry_out(self.core.on_tick(now))

    def send(self, conn: bytes, message, now: float) -> None:
        self.sent.append(self.ids())
        self._carry_out(self.core.on_frames(conn, pack(message, 0, self.sent[-1]), now))
        self.tick(now)

    def _carry_out(self, actions: list) -> None:
        self.backend.commit()
        self.actions += actions + self.core.on_commit()


def register(run: Run, conn: bytes, user: str, now: float, token: bytes | None = None) -> None:
    run.send(conn, Register(user, token or b"token-of-" + conn, key_of(user)), now)


def sent_to(run: Run, user: str) -> list[bytes]:
    """Ids of the frames relayed or delivered to ``user`` so far."""
    envelopes = [decode(a.frames) for a in run.actions if type(a) in (Send, Relay)]
    return [env.msg_id for env in envelopes if env.message.RELAYED and env.message.recipient == user]


def scenario(run: Run) -> None:
    """Registration, presence, relay, store-and-forward with paging and consumes, a hand-over, leaving."""
    run.tick(0.0)
    register(run, b"alice-1", "alice", 0.1, token=b"alice-install")
    register(run, b"bob", "bob", 0.1)
    run.send(b"alice-1", ChatMessage("alice", "bob", b"online"), 0.2)
    run.send(b"bob", Consume(sent_to(run, "bob")[0]), 0.2)
    register(run, b"carol-1", "carol", 0.3)
    run.send(b"carol-1", Unregister(), 0.3)
    for n in range(3):  # carol is offline: queued
        run.send(b"alice-1", ChatMessage("alice", "carol", b"queued %d" % n), 0.4)
    run.send(b"alice-1", ChatMessage("alice", "nobody", b"?"), 0.4)
    run.send(b"alice-1", SnapshotRequest(), 0.5)
    run.send(b"alice-1", KeyRequest("carol"), 0.5)
    register(run, b"carol-2", "carol", 0.6)  # her queue, as one page
    for msg_id in sent_to(run, "carol"):
        run.send(b"carol-2", Consume(msg_id), 0.6)
    run.send(b"bob", FileCredit("bob", "alice", b"x" * 16, 0, 8, True), 0.7)
    register(run, b"alice-2", "alice", 0.8, token=b"alice-install")  # the same installation, reconnected
    run.send(b"bob", Unregister(), 0.9)
    run.tick(1.0)


def recorded(actions: list) -> list[tuple]:
    """The actions as the shell would carry them out (a relay's failure answer is built only on failure)."""
    out = []
    for a in actions:
        frames = [bytes(f) for f in a.frames]
        if type(a) is Send:
            out.append(("send", a.conn, frames, a.queued_for))
        elif type(a) is Relay:
            out.append(("relay", a.conn, frames, a.sender, a.on_success and [bytes(f) for f in a.on_success]))
        else:
            assert type(a) is Publish
            out.append(("publish", frames))
    return out


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    server.client().set("{p2p}:epoch", EPOCH)  # the cluster's epoch, as if another broker had made it
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    return redis_server.url


def cluster_runs(tmp_path: Path, url: str, count: int, liveness: int = LIVENESS) -> list[Run]:
    """``count`` cores, each on its own cluster backend on ``url`` (closed by the caller)."""
    runs = []
    for n in range(1, count + 1):
        (tmp_path / f"b{n}").mkdir()
        backend = ClusterBackend(url, b"broker-%d" % n, tmp_path / f"b{n}", heartbeat_ivl=IVL, liveness=liveness,
                                 wake=lambda: None)
        backend.start()
        runs.append(Run(backend, broker_id=b"broker-%d" % n))
    return runs


def received(run: Run, kind: type, conn: bytes) -> list:
    return [decode(a.frames).message for a in run.actions
            if type(a) is Send and a.conn == conn and type(decode(a.frames).message) is kind]


def until(run: Run, done: Callable[[], bool], what: str, now: Callable[[], float] = lambda: 0.5) -> None:
    def ticked() -> bool:
        run.tick(now())
        return done()
    wait_until(ticked, 10, what)


def test_the_same_scenario_gives_the_same_actions_on_the_single_and_the_cluster_backends(tmp_path, redis_url):
    for name in ("single", "cluster"):
        (tmp_path / name).mkdir()
    single = SingleBackend(tmp_path / "single", EPOCH)
    cluster = ClusterBackend(redis_url, BROKER, tmp_path / "cluster", heartbeat_ivl=IVL, liveness=LIVENESS,
                             wake=lambda: None)
    cluster.start()
    r = redis.Redis.from_url(redis_url)

    def presence_arrived() -> None:  # the cluster's changes come back through the presence stream
        wait_until(lambda: cluster.directory.seq() + cluster.directory.feed.qsize() == int(r.get("{p2p}:seq") or 0),
                   10, "the presence stream to catch up")

    try:
        local, shared = Run(single), Run(cluster, presence_arrived)
        scenario(local)
        scenario(shared)
    finally:
        single.close()
        cluster.close()
    assert recorded(shared.actions) == recorded(local.actions)
    # And the scenario did what it says: each kind of answer is among them.
    messages = [decode(a.frames).message for a in local.actions]
    assert [m.online for m in messages if type(m) is PeerUpdate] == [True, True, True, False, True, False]
    assert [type(m) for m in messages if type(m) in (Registered, Snapshot, PeerSync)].count(Registered) == 5
    assert Snapshot(EPOCH, 4, ("alice", "bob")) in messages
    assert [a.queued_for for a in local.actions if type(a) is Send and a.queued_for] == ["bob", "carol", "carol",
                                                                                           "carol"]
    codes = [m.code for m in messages if type(m) is Error]
    assert codes == [ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.SESSION_REPLACED]
    assert sum(type(a) is Relay for a in local.actions) == 1


def test_two_cores_on_one_redis_forward_a_frame_and_hand_a_session_over(tmp_path, redis_url):
    """What the shell used to do for the cluster, now between the core and its link: frames for a user on
    another broker go through that broker's inbox, and a session taken over there is ended here."""
    runs = one, two = cluster_runs(tmp_path, redis_url, 2)
    try:
        register(one, b"alice", "alice", 0.1)
        register(two, b"bob-1", "bob", 0.1, token=b"bob-install")
        until(one, lambda: one.core.directory.locate("bob") != (), "broker 1 to see bob on broker 2")
        one.send(b"alice", ChatMessage("alice", "bob", b"across"), 0.2)
        assert received(one, Ack, b"alice") == [Ack(one.sent[-1], AckStatus.STORED)]
        until(two, lambda: received(two, ChatMessage, b"bob-1"), "the frame to reach bob through broker 2's inbox")
        assert [m.body for m in received(two, ChatMessage, b"bob-1")] == [b"across"]

        register(one, b"bob-2", "bob", 0.3, token=b"bob-install")  # bob's installation, now on broker 1
        assert received(one, Registered, b"bob-2")
        assert [m.body for m in received(one, ChatMessage, b"bob-2")] == [b"across"]  # not consumed: paged again
        until(two, lambda: received(two, Error, b"bob-1"), "broker 2 to end bob's old session")
        assert [e.code for e in received(two, Error, b"bob-1")] == [ErrorCode.SESSION_REPLACED]
        assert two.core.user_of(b"bob-1") is None and one.core.user_of(b"bob-2") == "bob"
    finally:
        for run in runs:
            run.backend.close()


def test_a_session_taken_over_during_a_redis_outage_is_ended_on_its_old_broker_once_redis_is_back(
        tmp_path, redis_server):
    """Broker 2 takes bob's ID while Redis is away (his installation reconnected there); when Redis is
    back, its reconciling tells broker 1, which still holds bob's old session."""
    runs = one, two = cluster_runs(tmp_path, redis_server.url, 2, liveness=60)  # no reaping meanwhile
    clock = time.monotonic  # the link's upkeep probes Redis on the real clock
    try:
        register(one, b"bob-1", "bob", clock(), token=b"bob-install")
        until(two, lambda: two.core.directory.locate("bob") != (), "broker 2 to see bob on broker 1", clock)
        assert two.backend.keys.lookup("bob")  # broker 2 has bob's key cached: it may register him without Redis
        redis_server.stop()
        register(two, b"bob-2", "bob", clock(), token=b"bob-install")
        assert received(two, Registered, b"bob-2") and not two.backend.health.available
        redis_server.start()
        until(two, lambda: two.backend.health.available, "broker 2 to find Redis again", clock)
        until(one, lambda: received(one, Error, b"bob-1"), "broker 1 to hear of the take-over", clock)
        assert [e.code for e in received(one, Error, b"bob-1")] == [ErrorCode.SESSION_REPLACED]
        assert one.core.user_of(b"bob-1") is None and two.core.user_of(b"bob-2") == "bob"
    finally:
        for run in runs:
            run.backend.close()
