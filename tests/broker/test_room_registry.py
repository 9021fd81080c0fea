"""Rooms at the broker (docs/ROOMS-DESIGN.md §2): the rule table of who may do what, checked on plain values
(broker/core/rooms.py), then the registries that store it (SQLite, and a real Redis): bounds, the membership
epoch, durability."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.broker.backends.sqlite_rooms import SEQ_BLOCK, SqliteRoomRegistry
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


def test_an_invitation_expires_after_its_ttl_and_then_counts_for_nothing():
    room, ttl = team(), LIMITS.invite_ttl_ms  # dave was invited at 2
    assert rules.expire(room, 2 + ttl - 1, LIMITS) is room
    expired = rules.expire(room, 2 + ttl, LIMITS)
    assert expired.member("dave") is None and expired.epoch == room.epoch  # no joined member changed
    assert rules.join(room, "dave", 2 + ttl - 1, 0, LIMITS).member("dave").joined
    assert rules.join(room, "dave", 2 + ttl, 0, LIMITS) is RoomRefusal.UNKNOWN_ROOM
    assert rules.invite(room, "alice", ["dave"], 2 + ttl, NOBODY, LIMITS).member("dave").since_ms == 2 + ttl
    full = RoomLimits(members=5)  # alice, bob, carol, dave: one place left, two once dave's invitation expired
    assert rules.invite(room, "alice", ["e", "f"], 2 + ttl - 1, NOBODY, full) is RoomRefusal.TOO_MANY_MEMBERS
    assert rules.invite(room, "alice", ["e", "f"], 2 + ttl, NOBODY, full).member("f")


def test_marks_only_go_up_and_never_past_the_last_number_handed_out():
    assert rules.raised((5, 3), 4, None, 10) == (5, 3)  # a device that is behind the user's others
    assert rules.raised((5, 3), 6, 4, 10) == (6, 4)
    assert rules.raised((5, 3), 99, 99, 10) == (10, 10)  # nobody has read the future


# --- the registries (SQLite for one broker, a real Redis for a cluster) ---------------------------------
def sqlite_registries(tmp_path: Path) -> Iterator[Callable[[RoomLimits], object]]:
    yield lambda limits: SqliteRoomRegistry(tmp_path / "rooms.sqlite", limits)


def redis_servers(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def redis_registries(tmp_path: Path) -> Iterator[Callable[[RoomLimits], object]]:
    from p2pchat.broker.backends.redis_health import connect
    from p2pchat.broker.backends.redis_rooms import RedisRoomRegistry
    from p2pchat.broker.backends.redis_schema import RedisKeys

    for server in redis_servers(tmp_path):
        yield lambda limits: RedisRoomRegistry(connect(server.url, 1.0), RedisKeys(), limits)


@pytest.fixture(params=["sqlite", "redis"])
def open_registry(request, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Opens a registry on the test's storage; each call sees what the earlier ones stored (a restart, or
    another broker of the cluster). ``crash``: the registry open until then is dropped without being closed,
    as a killed broker's would be."""
    opened, crashed = [], []
    source = sqlite_registries if request.param == "sqlite" else redis_registries
    for factory in source(tmp_path):
        def make(limits: RoomLimits = LIMITS, crash: bool = False):
            if opened:
                previous = opened.pop()
                if crash:
                    crashed.append(previous)  # closed once the test is over
                else:
                    previous.close()
            opened.append(factory(limits))
            return opened[-1]

        make.backend = request.param
        yield make
        for registry in opened + crashed:
            registry.close()


def build_team(registry) -> Room:
    room = registry.create("Team", "alice", "our room", 1)
    registry.invite(room.rid, "alice", ["bob", "carol", "dave"], 2)
    registry.join(room.rid, "bob", 3)
    registry.join(room.rid, "carol", 4)
    return registry.role(room.rid, "alice", "bob", True)


def team_after(registry, messages: int) -> tuple[object, Room]:
    """``build_team``, and ``messages`` numbers handed out."""
    room = build_team(registry)
    for _ in range(messages):
        registry.next_seq(room.rid)
    return registry, room


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


def test_message_numbers_go_up_and_never_repeat_across_a_restart_or_a_crash(open_registry):
    registry = open_registry()
    room = build_team(registry)
    numbers = [registry.next_seq(room.rid) for _ in range(SEQ_BLOCK + 2)]  # beyond one SQLite reservation
    assert numbers == list(range(1, SEQ_BLOCK + 3)) and registry.get(room.rid).seq == numbers[-1]
    numbers.append(open_registry(crash=True).next_seq(room.rid))
    restarted = open_registry()
    numbers += [restarted.next_seq(room.rid) for _ in range(3)]
    assert numbers == sorted(set(numbers))  # gaps, never a repeat
    assert restarted.get(room.rid).seq >= numbers[-1]


def test_a_room_that_is_gone_hands_out_no_numbers_and_keeps_no_marks(open_registry):
    registry = open_registry()
    assert registry.next_seq(RID) is None and registry.marks(RID) == {}
    room = registry.create("solo", "alice", "", 1)
    assert registry.next_seq(room.rid) == 1
    registry.mark(room.rid, "alice", 1, 1)
    registry.leave(room.rid, "alice")
    registry.mark(room.rid, "alice", 1, 1)
    assert registry.next_seq(room.rid) is None and registry.marks(room.rid) == {}


def test_marks_only_go_up_and_are_bounded_by_the_numbers_handed_out(open_registry):
    registry, room = team_after(open_registry(), 10)
    registry.mark(room.rid, "bob", 5, 3)
    registry.mark(room.rid, "bob", 4, None)  # bob's slower device
    registry.mark(room.rid, "carol", 7, None)
    registry.mark(room.rid, "carol", 6, 2)
    registry.mark(room.rid, "alice", 99, 99)
    assert registry.marks(room.rid) == {"alice": (10, 10), "bob": (5, 3), "carol": (7, 2)}


def test_only_joined_members_have_marks_and_one_who_leaves_starts_again_from_zero(open_registry):
    registry, room = team_after(open_registry(), 5)  # dave is only invited
    for user in ("dave", "erin", "carol"):
        registry.mark(room.rid, user, 5, 5)
    registry.mark(RID, "alice", 5, 5)
    assert registry.marks(room.rid) == {"alice": (0, 0), "bob": (0, 0), "carol": (5, 5)}
    registry.leave(room.rid, "carol")
    registry.invite(room.rid, "alice", ["carol"], 6)
    registry.join(room.rid, "carol", 7)
    assert registry.marks(room.rid)["carol"] == (0, 0)
    assert open_registry().marks(room.rid)["carol"] == (0, 0)


def test_marks_and_numbers_outlive_membership_changes_and_a_restart(open_registry):
    registry, room = team_after(open_registry(), 5)
    registry.mark(room.rid, "bob", 5, 4)
    assert registry.bump_user("bob") == [room.rid]
    registry.invite(room.rid, "alice", ["erin"], 6)
    registry.join(room.rid, "dave", 7)
    assert registry.marks(room.rid)["bob"] == (5, 4) and registry.get(room.rid).seq == 5
    registry.mark(room.rid, "bob", 5, 5)
    reopened = open_registry()
    assert reopened.marks(room.rid) == {"alice": (0, 0), "bob": (5, 5), "carol": (0, 0), "dave": (0, 0)}
    assert reopened.next_seq(room.rid) > 5


def test_a_crash_loses_at_most_the_marks_since_the_last_housekeeping(open_registry):
    """SQLite writes marks with ``expire_invitations`` (about once a second), not one by one; Redis at once."""
    registry, room = team_after(open_registry(), 5)
    registry.mark(room.rid, "bob", 3, 3)
    registry.expire_invitations(10)
    registry.mark(room.rid, "bob", 5, 5)
    kept = open_registry(crash=True).marks(room.rid)["bob"]
    assert kept == ((5, 5) if open_registry.backend == "redis" else (3, 3))


def test_expired_invitations_are_swept_in_bounded_steps(open_registry):
    limits = RoomLimits(invite_ttl_ms=100, expire_batch=2)
    registry = open_registry(limits)
    rids = [registry.create(f"r{n}", "alice", "", 1).rid for n in range(3)]
    for n, rid in enumerate(rids):
        registry.invite(rid, "alice", ["bob", "carol"], 10 + n)
    registry.invite(rids[0], "alice", ["dave"], 50)
    registry.invite(rids[0], "alice", ["erin"], 61)
    assert registry.expire_invitations(109) == []
    gone = []
    while step := registry.expire_invitations(160):
        assert len({rid for rid, _ in step}) <= 2
        gone += step
    assert sorted(gone) == sorted([(rid, user) for rid in rids for user in ("bob", "carol")] + [(rids[0], "dave")])
    reopened = open_registry(limits)
    assert reopened.of_user("bob") == [] and reopened.of_user("dave") == []
    assert [entry.name for entry in reopened.of_user("erin")] == ["r0"] and reopened.get(rids[0]).epoch == 1
    assert reopened.expire_invitations(160) == [] and reopened.expire_invitations(161) == [(rids[0], "erin")]


def test_an_expired_invitation_no_longer_blocks_new_ones_even_before_the_sweep(open_registry):
    registry = open_registry(RoomLimits(pending_invites=1, invite_ttl_ms=100))
    first, second = registry.create("first", "alice", "", 1), registry.create("second", "erin", "", 1)
    registry.invite(first.rid, "alice", ["dave"], 10)
    assert registry.invite(second.rid, "erin", ["dave"], 109) is RoomRefusal.TOO_MANY_INVITATIONS
    assert registry.invite(second.rid, "erin", ["dave"], 110).member("dave")
    assert registry.join(first.rid, "dave", 111) is RoomRefusal.UNKNOWN_ROOM
    assert registry.invite(first.rid, "alice", ["dave"], 112) is RoomRefusal.TOO_MANY_INVITATIONS  # second's


def test_reading_a_room_costs_one_redis_command(tmp_path: Path):
    """The message path reads the room once per message: one round trip, whatever the cluster does."""
    from p2pchat.broker.backends.redis_health import connect
    from p2pchat.broker.backends.redis_rooms import RedisRoomRegistry
    from p2pchat.broker.backends.redis_schema import RedisKeys

    for server in redis_servers(tmp_path):
        registry, probe = RedisRoomRegistry(connect(server.url, 1.0), RedisKeys()), server.client()
        room = build_team(registry)
        registry.next_seq(room.rid)
        before = probe.info("stats")["total_commands_processed"]
        assert registry.get(room.rid).seq == 1
        assert probe.info("stats")["total_commands_processed"] - before == 2  # the GET, and the first INFO
        registry.close()
        probe.close()
