"""The peer directory port on both backends (in memory, and Redis with a real redis-server): sessions by
(user, device), presence by user (docs/PROTOCOL.md §5.5, §6.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from p2pchat.broker.backends.in_process import LocalDirectory
from p2pchat.broker.backends.redis_directory import RedisDirectory
from p2pchat.broker.backends.redis_health import RedisHealth
from p2pchat.broker.backends.redis_schema import RedisKeys
from p2pchat.broker.core.ports import Location, PeerDirectory, PresenceChange
from tests.broker.test_cluster import RedisProcess

ME = b"broker-1"
L1, L2, L3 = (Location(ME, conn) for conn in (b"c1", b"c2", b"c3"))
KEYS = RedisKeys()


class Feed:
    """A Redis directory with the presence stream read in the test (the link's reader thread does it in a broker)."""

    def __init__(self, r: redis.Redis, directory: RedisDirectory) -> None:
        self.r, self.directory, self.pos = r, directory, directory.stream_pos

    def __call__(self) -> list[PresenceChange]:
        for entry_id, fields in self.r.xrange(KEYS.presence, "(" + self.pos, "+"):
            self.directory.feed.put(fields)
            self.pos = entry_id.decode()
        return self.directory.changes()


@pytest.fixture
def redis_client(tmp_path: Path) -> Iterator[redis.Redis]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server.client()
    server.stop()


@pytest.fixture(params=["local", "redis"])
def backend(request, tmp_path) -> tuple[PeerDirectory, Callable[[], list[PresenceChange]]]:
    """A directory, and how to get its changes once they are visible to it."""
    if request.param == "local":
        directory = LocalDirectory(b"epoch")
        return directory, directory.changes
    r = request.getfixturevalue("redis_client")
    directory = RedisDirectory(r, ME, KEYS, RedisHealth(), settle=1.0)
    return directory, Feed(r, directory)


def test_a_user_is_online_from_its_first_devices_claim_to_its_last_devices_release(backend):
    directory, changes = backend
    assert directory.claim("bob", 1, L1, b"t1") and changes() == [PresenceChange(1, "bob", True)]
    assert directory.claim("bob", 3, L2, b"t3") and changes() == []  # another device: no presence change
    assert directory.locate("bob") == (L1, L2) and directory.online() == ["bob"] and directory.seq() == 1
    directory.release("bob", 1, L1)
    assert changes() == [] and directory.locate("bob") == (L2,) and directory.online() == ["bob"]
    directory.release("bob", 3, L2)
    assert changes() == [PresenceChange(2, "bob", False)]
    assert directory.locate("bob") == () and directory.online() == [] and directory.is_known("bob")


def test_a_device_holds_one_session_and_moves_between_connections_quietly(backend):
    directory, changes = backend
    assert directory.claim("bob", 1, L1, b"t1") and directory.claim("bob", 2, L2, b"t2")
    assert not directory.claim("bob", 1, L3, b"t1")  # device 1 is online on another connection
    assert directory.claim("bob", 1, L1, b"t1")  # its own connection, again
    directory.hand_over("bob", 1, L1, L3, b"t1")
    assert directory.locate("bob") == (L3, L2)
    directory.release("bob", 1, L1)  # no longer there: nothing
    assert directory.locate("bob") == (L3, L2)
    assert changes() == [PresenceChange(1, "bob", True)]


def test_a_dead_brokers_sessions_are_reaped_and_its_users_announced_offline_once(redis_client):
    dead = RedisDirectory(redis_client, b"broker-2", KEYS, RedisHealth(), settle=1.0)
    assert dead.claim("bob", 1, Location(b"broker-2", b"c1"), b"t1")
    assert dead.claim("bob", 2, Location(b"broker-2", b"c2"), b"t2")
    live = RedisDirectory(redis_client, ME, KEYS, RedisHealth(), settle=1.0)
    changes = Feed(redis_client, live)
    assert live.claim("carol", 1, L1, b"tc") and changes() == [PresenceChange(2, "carol", True)]
    assert live.locate("bob") == (Location(b"broker-2", b"c1"), Location(b"broker-2", b"c2"))
    redis_client.sadd(KEYS.brokers, b"broker-2".hex())  # and its liveness key is gone
    assert live.reap() == [b"broker-2".hex()]
    assert changes() == [PresenceChange(3, "bob", False)]
    assert live.locate("bob") == () and live.online() == ["carol"]
    assert redis_client.hkeys(KEYS.sessions) == [b"carol"]


def test_another_broker_follows_each_devices_session_through_the_presence_stream(redis_client):
    there = Location(b"broker-2", b"c1"), Location(b"broker-2", b"c2")
    other = RedisDirectory(redis_client, b"broker-2", KEYS, RedisHealth(), settle=1.0)
    live = RedisDirectory(redis_client, ME, KEYS, RedisHealth(), settle=1.0)
    changes = Feed(redis_client, live)
    assert other.claim("bob", 1, there[0], b"t1") and other.claim("bob", 2, there[1], b"t2")
    assert changes() == [PresenceChange(1, "bob", True)] and live.locate("bob") == there
    other.release("bob", 1, there[0])
    assert changes() == [] and live.locate("bob") == there[1:] and live.online() == ["bob"]
    other.release("bob", 2, there[1])
    assert changes() == [PresenceChange(2, "bob", False)] and live.locate("bob") == ()
