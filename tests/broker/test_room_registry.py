"""Rooms at the broker (docs/ROOMS-DESIGN.md §2): the rule table of who may do what, checked on plain values
(broker/core/rooms.py), then the registries that store it (SQLite, and a real Redis): bounds, the membership
epoch, durability."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.broker.backends.sqlite_rooms import SqliteRoomRegistry
from p2pchat.broker.core import rooms as rules
from p2pchat.broker.core.ports import Role, Room, RoomEntry, RoomRefusal
from p2pchat.broker.core.rooms import RoomLimits
from tests.broker.test_cluster import RedisProcess

RID = b"r" * 16
LIMITS = RoomLimits()
NOBODY = lambda user: 0  # noqa: E731 - nobody has pending invitations


def team() -> Room:
    """owner alice, admin bob, member carol, invitee dave."""
    room = rules.create(RID, "team", "alice", "", 1, 0, 0, LIMITS)
    room = rules.invite(room, "alice", ["bob", "carol", "dave"], 2, NOBODY, LIMITS)
    room = rules.join(rules.join(room, "bob", 3, 0, LIMITS), "carol", 4, 0, LIMITS)
    return rules.role(room, "alice", "bob", True, LIMITS)


# --- the rule table (§2.1), on plain values -----------------------------------------------------------
ALLOWED, REFUSED = None, RoomRefusal.NOT_ALLOWED
ROLE_TABLE = [  # (actor, action, target, expected): every role against every action of §2.1
    ("alice", "invite", "erin", ALLOWED), ("bob", "invite", "erin", ALLOWED),
    ("carol", "invite", "erin", REFUSED), ("dave", "invite", "erin", REFUSED),
    ("alice", "remove", "bob", ALLOWED), ("alice", "remove", "carol", ALLOWED), ("alice", "remove", "dave", ALLOWED),
    ("alice", "remove", "alice", REFUSED),
    ("bob", "remove", "carol", ALLOWED), ("bob", "remove", "dave", ALLOWED),
    ("bob", "remove", "alice", REFUSED), ("bob", "remove", "bob", REFUSED),
    ("carol", "remove", "dave", REFUSED), ("dave", "remove", "carol", REFUSED),
    ("alice", "set", None, ALLOWED), ("bob", "set", None, ALLOWED),
    ("carol", "set", None, REFUSED), ("dave", "set", None, REFUSED),
    ("alice", "admin", "carol", ALLOWED), ("bob", "admin", "carol", REFUSED), ("carol", "admin", "carol", REFUSED),
    ("alice", "admin", "alice", REFUSED),
    ("erin", "invite", "frank", RoomRefusal.UNKNOWN_ROOM), ("erin", "remove", "carol", RoomRefusal.UNKNOWN_ROOM),
    ("erin", "set", None, RoomRefusal.UNKNOWN_ROOM), ("erin", "admin", "carol", RoomRefusal.UNKNOWN_ROOM),
]


def act(room: Room | None, actor: str, action: str, target: str | None):
    if action == "invite":
        return rules.invite(room, actor, [target], 5, NOBODY, LIMITS)
    if action == "remove":
        return rules.remove(room, actor, target)
    if action == "set":
        return rules.set_(room, actor, None, "a topic")
    return rules.role(room, actor, target, True, LIMITS)


@pytest.mark.parametrize(("actor", "action", "target", "expected"), ROLE_TABLE)
def test_who_may_do_what(actor, action, target, expected):
    result = act(team(), actor, action, target)
    assert (result if isinstance(result, RoomRefusal) else None) is expected


@pytest.mark.parametrize(("actor", "action", "target", "expected"), ROLE_TABLE)
def test_a_room_that_does_not_exist_answers_as_one_the_actor_is_not_in(actor, action, target, expected):
    assert act(None, actor, action, target) is RoomRefusal.UNKNOWN_ROOM


def test_joins_leaves_and_removals_of_joined_members_raise_the_epoch_and_nothing_else_does():
    room = team()
    assert room.epoch == 3  # created (1), bob joined, carol joined
    assert rules.invite(room, "alice", ["erin"], 5, NOBODY, LIMITS).epoch == 3
    assert rules.set_(room, "bob", "crew", "topic").epoch == 3
    assert rules.role(room, "alice", "carol", True, LIMITS).epoch == 3
    assert rules.leave(room, "dave").epoch == 3  # declining an invitation
    assert rules.remove(room, "bob", "dave").epoch == 3
    assert rules.join(room, "dave", 5, 0, LIMITS).epoch == 4
    assert rules.leave(room, "carol").epoch == 4
    assert rules.remove(room, "alice", "bob").epoch == 4
    assert rules.bump(room, "carol").epoch == 4
    assert rules.bump(room, "dave") is room and rules.bump(None, "dave") is None  # not joined: nothing to re-key


def test_only_an_invited_user_may_join_and_joining_twice_changes_nothing():
    room = team()
    assert rules.join(room, "erin", 5, 0, LIMITS) is RoomRefusal.UNKNOWN_ROOM
    assert rules.join(room, "carol", 5, 0, LIMITS) is room


def test_the_owner_leaving_hands_the_room_to_the_oldest_admin_else_the_oldest_member():
    room = rules.leave(team(), "alice")
    assert room.owner == "bob" and room.member("bob").role is Role.OWNER and room.member("alice") is None
    without_admin = rules.leave(rules.role(team(), "alice", "bob", False, LIMITS), "alice")
    assert without_admin.owner == "bob"  # bob joined before carol
    later = rules.join(rules.leave(rules.role(team(), "alice", "bob", False, LIMITS), "bob"), "dave", 9, 0, LIMITS)
    assert rules.leave(later, "alice").owner == "carol"


def test_the_last_joined_member_leaving_deletes_the_room_with_its_invitations():
    room = rules.invite(rules.create(RID, "solo", "alice", "", 1, 0, 0, LIMITS), "alice", ["bob"], 2, NOBODY, LIMITS)
    assert rules.leave(room, "alice") is None


def test_names_and_topics_follow_the_user_id_rules():
    assert rules.create(RID, "bad name", "alice", "", 1, 0, 0, LIMITS) is RoomRefusal.BAD_NAME
    assert rules.create(RID, "x" * 33, "alice", "", 1, 0, 0, LIMITS) is RoomRefusal.BAD_NAME
    assert rules.create(RID, "ok", "alice", "t" * (rules.ROOM_TOPIC_CHARS + 1), 1, 0, 0, LIMITS) is RoomRefusal.BAD_NAME
    assert rules.set_(team(), "alice", "-bad", None) is RoomRefusal.BAD_NAME
    assert rules.invite(team(), "alice", ["no way"], 5, NOBODY, LIMITS) is RoomRefusal.BAD_NAME


def test_the_bounds_on_plain_values():
    small = RoomLimits(members=5, rooms_per_user=2, pending_invites=1, invite_batch=3, admins=1, rooms=10)
    room = team()
    assert rules.create(RID, "x", "alice", "", 1, 2, 0, small) is RoomRefusal.TOO_MANY_ROOMS
    assert rules.create(RID, "x", "alice", "", 1, 0, 10, small) is RoomRefusal.TOO_MANY_ROOMS
    assert rules.invite(room, "alice", ["e", "f"], 5, NOBODY, small) is RoomRefusal.TOO_MANY_MEMBERS
    assert rules.invite(room, "alice", ["e", "f", "g", "h"], 5, NOBODY, small) is RoomRefusal.TOO_MANY_INVITATIONS
    assert rules.invite(room, "alice", ["e"], 5, lambda user: 1, small) is RoomRefusal.TOO_MANY_INVITATIONS
    assert rules.join(room, "dave", 5, 2, small) is RoomRefusal.TOO_MANY_ROOMS
    assert rules.role(room, "alice", "carol", True, small) is RoomRefusal.TOO_MANY_ADMINS
    assert rules.invite(room, "alice", ["bob", "dave", "e"], 5, NOBODY, small).member("e")  # members: not counted twice


# --- the registries (SQLite for one broker, a real Redis for a cluster) ---------------------------------
def sqlite_registries(tmp_path: Path) -> Iterator[Callable[[RoomLimits], object]]:
    yield lambda limits: SqliteRoomRegistry(tmp_path / "rooms.sqlite", limits)


def redis_registries(tmp_path: Path) -> Iterator[Callable[[RoomLimits], object]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from p2pchat.broker.backends.redis_health import connect
    from p2pchat.broker.backends.redis_rooms import RedisRoomRegistry
    from p2pchat.broker.backends.redis_schema import RedisKeys

    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield lambda limits: RedisRoomRegistry(connect(server.url, 1.0), RedisKeys(), limits)
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def open_registry(request, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Opens a registry on the test's storage; each call sees what the earlier ones stored (a restart, or
    another broker of the cluster)."""
    opened = []
    source = sqlite_registries if request.param == "sqlite" else redis_registries
    for factory in source(tmp_path):
        def make(limits: RoomLimits = LIMITS):
            if opened:
                opened[-1].close()
            opened.append(factory(limits))
            return opened[-1]

        yield make
        opened[-1].close()


def build_team(registry) -> Room:
    room = registry.create("Team", "alice", "our room", 1)
    registry.invite(room.rid, "alice", ["bob", "carol", "dave"], 2)
    registry.join(room.rid, "bob", 3)
    registry.join(room.rid, "carol", 4)
    return registry.role(room.rid, "alice", "bob", True)


def test_a_room_and_its_members_survive_reopening_the_storage(open_registry):
    stored = build_team(open_registry())
    reopened = open_registry()
    assert reopened.get(stored.rid) == stored
    assert [m.user for m in stored.members] == ["alice", "dave", "bob", "carol"]  # joining moves a member last
    assert reopened.of_user("dave") == [RoomEntry(stored.rid, "Team", 3, Role.MEMBER, True)]
    assert reopened.of_user("bob") == [RoomEntry(stored.rid, "Team", 3, Role.ADMIN, False)]
    assert reopened.join(stored.rid, "dave", 5).epoch == 4  # and it goes on from there


def test_names_are_unique_case_insensitively_and_free_again_once_the_room_is_gone(open_registry):
    registry = open_registry()
    room = build_team(registry)
    assert registry.create("team", "erin", "", 5) is RoomRefusal.ROOM_EXISTS
    other = registry.create("other", "erin", "", 5)
    assert registry.set(other.rid, "erin", "TEAM", None) is RoomRefusal.ROOM_EXISTS
    assert registry.set(room.rid, "alice", "team", None).name == "team"  # its own name, another case
    registry = open_registry()
    for user in ("carol", "bob", "alice"):
        registry.leave(room.rid, user)
    assert registry.get(room.rid) is None and registry.of_user("dave") == []
    again = open_registry().create("Team", "erin", "", 6)
    assert again.rid != room.rid


def test_a_device_change_raises_the_epoch_of_the_rooms_the_user_has_joined_only(open_registry):
    registry = open_registry()
    room = build_team(registry)
    other = registry.create("other", "bob", "", 5)
    assert sorted(registry.bump_user("bob")) == sorted([room.rid, other.rid])
    assert registry.bump_user("dave") == []  # only invited
    reopened = open_registry()
    assert reopened.get(room.rid).epoch == 4 and reopened.get(other.rid).epoch == 2


def test_the_bounds_count_what_is_stored(open_registry):
    registry = open_registry(RoomLimits(members=4, rooms_per_user=2, pending_invites=1, rooms=3))
    room = build_team(registry)
    assert registry.invite(room.rid, "alice", ["erin", "frank"], 5) is RoomRefusal.TOO_MANY_MEMBERS
    registry.leave(room.rid, "dave")
    second = registry.create("second", "erin", "", 6)
    assert registry.invite(second.rid, "erin", ["dave"], 7).member("dave")
    assert registry.invite(room.rid, "alice", ["dave"], 8) is RoomRefusal.TOO_MANY_INVITATIONS  # one is pending
    registry.create("third", "alice", "", 9)
    assert registry.create("fourth", "frank", "", 9) is RoomRefusal.TOO_MANY_ROOMS  # three rooms in all
    assert registry.create("fourth", "alice", "", 9) is RoomRefusal.TOO_MANY_ROOMS  # alice is in two
    reopened = open_registry(RoomLimits(members=4, rooms_per_user=2, pending_invites=1, rooms=3))
    assert reopened.invite(room.rid, "alice", ["dave"], 8) is RoomRefusal.TOO_MANY_INVITATIONS


def test_a_refused_change_stores_nothing(open_registry):
    registry = open_registry()
    room = build_team(registry)
    assert registry.remove(room.rid, "carol", "dave") is RoomRefusal.NOT_ALLOWED
    assert registry.remove(RID, "alice", "bob") is RoomRefusal.UNKNOWN_ROOM
    assert open_registry().get(room.rid) == room


def test_brokers_of_a_cluster_changing_one_room_at_once_never_break_a_bound(tmp_path: Path):
    """Two brokers invite into one room at the same time: each change is computed on what is stored, so the
    member bound holds and no invitation is lost (Redis: the transaction is retried when it raced)."""
    import threading

    for factory in redis_registries(tmp_path):
        limits = RoomLimits(members=31, invite_batch=1)
        first, second = factory(limits), factory(limits)
        room = first.create("race", "alice", "", 1)
        answers: list[object] = []

        def invite(registry, prefix: str) -> None:
            for n in range(20):
                answers.append(registry.invite(room.rid, "alice", [f"{prefix}{n}"], 2))

        threads = [threading.Thread(target=invite, args=(r, p)) for r, p in ((first, "a"), (second, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = first.get(room.rid)
        assert len(stored.members) == 31 and answers.count(RoomRefusal.TOO_MANY_MEMBERS) == 10
        assert sum(len(second.of_user(m.user)) for m in stored.members) == 31
        first.close()
        second.close()
