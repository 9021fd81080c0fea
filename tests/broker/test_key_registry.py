"""The two key registries (SQLite for one broker, a real Redis for a cluster) behave alike: a binding keeps its
first recovery key, a move needs the binding's current generation, a release forgets the recovery key but
never the generation, every change is in a durable audit, and another registry on the same storage (another
broker, or the operator's ``p2pchat broker admin``) hears of it through ``changes``."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.broker.backends.audit import Change, RecoveryState
from p2pchat.broker.backends.sqlite_keys import SqliteKeyRegistry
from p2pchat.broker.backends.tickets import KeyLimits
from p2pchat.broker.core.ports import DEVICE_CAPS, BindingChange
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import MAX_DEVICES
from tests.broker.test_cluster import RedisProcess

OLD, NEW, OTHER = b"o" * 32, b"n" * 32, b"x" * 32
RECOVERY, OTHER_RECOVERY = b"r" * 32, b"s" * 32
LATER = 10.0  # a ``now`` past any poll interval


def sqlite_registries(tmp_path: Path) -> Iterator[Callable[..., object]]:
    yield lambda limits=KeyLimits(): SqliteKeyRegistry(tmp_path / "keys.sqlite", limits)


def redis_registries(tmp_path: Path) -> Iterator[Callable[..., object]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from p2pchat.broker.backends.redis_health import connect
    from p2pchat.broker.backends.redis_keys import RedisKeyRegistry
    from p2pchat.broker.backends.redis_schema import RedisKeys

    server = RedisProcess(tmp_path / "redis").start()

    def make(limits: KeyLimits = KeyLimits()) -> RedisKeyRegistry:
        return RedisKeyRegistry(connect(server.url, 1.0), RedisKeys(), limits)

    make.url = server.url  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def open_registry(request, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Opens a registry on the test's storage; each call is another process's view of the same bindings."""
    opened = []
    source = sqlite_registries if request.param == "sqlite" else redis_registries
    for factory in source(tmp_path):
        def make(limits: KeyLimits = KeyLimits()):
            opened.append(factory(limits))
            return opened[-1]

        yield make
        for registry in opened:
            registry.close()


def test_a_new_binding_keeps_its_recovery_key_and_starts_at_generation_zero(open_registry):
    keys = open_registry()
    assert keys.recovery_state("bob") is None
    assert keys.bind("bob", OLD, RECOVERY) is None
    assert keys.recovery_state("bob") == RecoveryState(RECOVERY, 0)


def test_a_register_cannot_replace_a_recovery_key_but_gives_one_to_a_binding_without(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.bind("bob", OLD, OTHER_RECOVERY)  # the key's holder cannot swap it (a stolen key must not lock bob out)
    keys.bind("carol", OTHER)  # an older client: no recovery key
    keys.bind("carol", OTHER, OTHER_RECOVERY)  # its next register with one: kept
    fresh = open_registry()  # as stored, not as cached
    assert fresh.recovery_state("bob") == RecoveryState(RECOVERY, 0)
    assert fresh.recovery_state("carol") == RecoveryState(OTHER_RECOVERY, 0)


def test_a_move_at_the_current_generation_rebinds_the_id_and_raises_the_generation(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    assert keys.move("bob", NEW, Change.RECOVERED, "test", generation=0) is None
    assert keys.lookup("bob") == NEW and keys.recovery_state("bob") == RecoveryState(RECOVERY, 1)
    assert keys.can_bind("bob", OLD) is ErrorCode.ID_TAKEN and keys.can_bind("bob", NEW) is None
    assert not keys.admits(OLD, 0.0) and keys.admits(NEW, 0.0)


def test_the_operators_move_forgets_the_recovery_key_and_the_new_keys_next_register_gives_one(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)  # a phrase that may be lost, or known to a thief: it stops working
    assert keys.move("bob", NEW, Change.MOVED, "operator") is None
    assert keys.recovery_state("bob") == RecoveryState(None, 1)
    keys.bind("bob", NEW, OTHER_RECOVERY)
    assert open_registry().recovery_state("bob") == RecoveryState(OTHER_RECOVERY, 1)


def test_a_move_naming_an_older_generation_is_refused(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.move("bob", NEW, Change.RECOVERED, "test", generation=0)
    assert keys.move("bob", OLD, Change.RECOVERED, "replay", generation=0) is ErrorCode.RECOVERY_REFUSED
    assert keys.lookup("bob") == NEW


def test_a_move_respects_the_ids_a_key_may_hold(open_registry):
    keys = open_registry(KeyLimits(ids_per_key=1))
    keys.bind("bob", OLD)
    keys.bind("carol", NEW)
    assert keys.move("bob", NEW, Change.MOVED, "test") is ErrorCode.TOO_MANY_IDS
    assert keys.lookup("bob") == OLD


def test_a_release_unbinds_forgets_the_recovery_key_and_keeps_counting_generations(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    assert keys.release("bob", "test") and not keys.release("bob", "test")
    assert keys.lookup("bob") is None and keys.recovery_state("bob") is None and not keys.admits(OLD, 0.0)
    assert keys.bind("bob", NEW, OTHER_RECOVERY) is None  # the next key to register gets it
    # A proof made for generation 0 (the first binding) is stale for ever.
    assert keys.recovery_state("bob") == RecoveryState(OTHER_RECOVERY, 1)


def test_every_change_is_in_a_durable_audit(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.move("bob", NEW, Change.RECOVERED, "key service 192.0.2.7", generation=0)
    keys.release("bob", "operator root@host")
    records = open_registry().audit("bob")
    assert [(r.change, r.old_key, r.new_key, r.generation, r.origin) for r in records] == [
        (Change.RECOVERED, OLD, NEW, 1, "key service 192.0.2.7"), (Change.RELEASED, NEW, None, 2, "operator root@host")]


def test_another_registry_on_the_same_storage_hears_of_a_change_and_forgets_the_old_key(open_registry):
    broker, admin = open_registry(), open_registry()
    broker.bind("bob", OLD, RECOVERY)
    assert broker.admits(OLD, 0.0) and broker.changes(LATER) == []
    admin.move("bob", NEW, Change.MOVED, "operator")
    assert broker.changes(2 * LATER) == [BindingChange("bob", NEW, "moved")]
    assert broker.lookup("bob") == NEW and not broker.admits(OLD, 0.0)
    assert broker.changes(3 * LATER) == []  # each change once
    admin.release("bob", "operator")
    assert broker.changes(4 * LATER) == [BindingChange("bob", None, "released")]


def test_a_registry_reports_its_own_changes_at_once(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.changes(LATER)
    keys.move("bob", NEW, Change.RECOVERED, "test", generation=0)
    assert keys.changes(LATER) == [BindingChange("bob", NEW, "recovered")]  # no wait for the next poll


# --- devices ------------------------------------------------------------------------------------------
def numbered(devices) -> tuple[int, list[tuple[int, bytes]]]:
    """A device list as (version, [(number, key)]): the parts the tests pin."""
    return devices.ver, [(d.id, d.key) for d in devices.devices]


def test_a_first_binding_is_the_ids_device_1_at_list_version_1(open_registry):
    keys = open_registry()
    assert keys.devices("bob") is None
    keys.bind("bob", OLD, RECOVERY)
    assert numbered(keys.devices("bob")) == (1, [(1, OLD)])
    assert numbered(open_registry().devices("bob")) == (1, [(1, OLD)])  # as stored
    assert keys.lookup("bob") == OLD and keys.admits(OLD, 0.0)


def test_a_move_makes_the_new_key_the_only_device_under_a_number_never_used_before(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.move("bob", NEW, Change.RECOVERED, "test", generation=0)
    assert numbered(keys.devices("bob")) == (2, [(2, NEW)])
    keys.move("bob", NEW, Change.MOVED, "operator")  # already its only device: nothing changes
    assert numbered(open_registry().devices("bob")) == (2, [(2, NEW)])


def test_after_a_release_the_next_binding_numbers_its_device_after_the_last_one(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.release("bob", "operator")
    assert keys.devices("bob") is None
    keys.bind("bob", NEW)
    assert numbered(open_registry().devices("bob")) == (2, [(2, NEW)])


def test_a_device_keeps_its_flags_and_its_first_name(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD)
    keys.describe_device("bob", 1, DEVICE_CAPS, "laptop")
    keys.describe_device("bob", 1, 0, "desk")  # a later name does not rename it; flags are kept
    keys.describe_device("bob", 9, DEVICE_CAPS, "ghost")  # no such device: nothing happens
    device = open_registry().devices("bob").primary  # as stored
    assert (device.id, device.flags, device.name) == (1, DEVICE_CAPS, "laptop")
    assert numbered(keys.devices("bob")) == (1, [(1, OLD)])


def test_another_broker_of_a_cluster_sees_a_device_described_when_it_asks_fresh(tmp_path):
    for factory in redis_registries(tmp_path):
        here, there = factory(), factory()
        here.bind("bob", OLD)
        assert there.devices("bob").primary.name == ""  # cached there now
        here.describe_device("bob", 1, DEVICE_CAPS, "laptop")
        device = there.devices("bob", fresh=True).primary
        assert (device.flags, device.name) == (DEVICE_CAPS, "laptop")
        here.close()
        there.close()


# Made by main's code (ca177b8, one key per ID) and dumped with sqlite3's iterdump: bob bound with a recovery
# key, carol without one, dave recovered to another key (generation 1), erin bound then released.
LEGACY_SQLITE = Path(__file__).parent / "data" / "keys-one-key-per-id.sql"
BOB, CAROL, DAVE_OLD, DAVE, ERIN = (bytes([n]) * 32 for n in range(1, 6))


def test_a_keys_sqlite_of_one_key_per_id_becomes_device_1_of_each_id(tmp_path):
    path = tmp_path / "keys.sqlite"
    legacy = sqlite3.connect(path)
    legacy.executescript(LEGACY_SQLITE.read_text())
    legacy.close()
    keys = SqliteKeyRegistry(path)
    assert [numbered(keys.devices(user)) for user in ("bob", "carol", "dave")] == [
        (1, [(1, BOB)]), (1, [(1, CAROL)]), (1, [(1, DAVE)])]
    assert keys.devices("erin") is None
    assert keys.recovery_state("bob") == RecoveryState(RECOVERY, 0)
    assert keys.recovery_state("carol") == RecoveryState(None, 0)
    assert keys.recovery_state("dave") == RecoveryState(RECOVERY, 1)
    assert [(r.user, r.change) for r in keys.audit()] == [("dave", Change.RECOVERED), ("erin", Change.RELEASED)]
    assert keys.admits(DAVE, 0.0) and not keys.admits(DAVE_OLD, 0.0) and not keys.admits(ERIN, 0.0)
    assert keys.move("dave", NEW, Change.RECOVERED, "test", generation=1) is None
    keys.close()
    again = SqliteKeyRegistry(path)  # migrated once: opening it again changes nothing
    assert numbered(again.devices("dave")) == (2, [(2, NEW)]) and numbered(again.devices("bob")) == (1, [(1, BOB)])
    again.close()


def test_redis_bindings_of_one_key_per_id_become_device_1_of_each_id(tmp_path):
    for factory in redis_registries(tmp_path):
        from p2pchat.broker.backends.redis_health import connect
        from p2pchat.broker.backends.redis_schema import RedisKeys

        names = RedisKeys()
        r = connect(factory.url, 1.0)  # the layout main's code (ca177b8) wrote, one key per ID
        r.hset(names.keys, mapping={"bob": BOB, "carol": CAROL})
        r.hset(names.key_ids, mapping={BOB: 1, CAROL: 1})
        r.hset(names.recovery, "bob", RECOVERY)
        keys, again = factory(), factory()
        assert [numbered(keys.devices(user)) for user in ("bob", "carol")] == [(1, [(1, BOB)]), (1, [(1, CAROL)])]
        assert not r.exists(names.keys)
        assert keys.recovery_state("bob") == RecoveryState(RECOVERY, 0)
        assert keys.admits(BOB, 0.0) and keys.can_bind("bob", NEW) is ErrorCode.ID_TAKEN
        assert keys.move("bob", NEW, Change.MOVED, "operator") is None
        assert numbered(again.devices("bob")) == (2, [(2, NEW)]) and not keys.admits(BOB, 0.0)
        for closing in (keys, again, r):
            closing.close()


# --- linking and unlinking devices (docs/PROTOCOL.md §10.2.1) ---------------------------------------------
THIRD, PROOF = b"t" * 32, b"p" * 64


def test_a_link_adds_a_device_numbered_by_the_next_list_version_and_raises_the_generation(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    assert keys.link_device("bob", NEW, 0, PROOF, "key service 192.0.2.7", name="laptop") is None
    assert numbered(keys.devices("bob")) == (2, [(1, OLD), (2, NEW)])
    assert keys.recovery_state("bob") == RecoveryState(RECOVERY, 1)  # the account key stays
    stored = open_registry().devices("bob").devices[1]
    assert (stored.name, stored.gen, stored.proof) == ("laptop", 0, PROOF)  # the proof names the generation it had
    assert keys.lookup("bob") == OLD and keys.admits(NEW, 0.0) and keys.can_bind("bob", NEW) is None
    assert keys.link_device("bob", NEW, 1, PROOF, "again") is None  # a device already: nothing changes
    assert numbered(open_registry().devices("bob")) == (2, [(1, OLD), (2, NEW)])


def test_a_link_needs_the_current_generation_and_an_account_key(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.link_device("bob", NEW, 0, PROOF, "test")
    assert keys.link_device("bob", THIRD, 0, PROOF, "replay") is ErrorCode.RECOVERY_REFUSED
    keys.bind("carol", OTHER)  # an older client's binding: no account key to sign a link
    assert keys.link_device("carol", THIRD, 0, PROOF, "test") is ErrorCode.RECOVERY_REFUSED
    assert keys.link_device("dave", THIRD, 0, PROOF, "test") is ErrorCode.RECOVERY_REFUSED  # not bound
    assert not keys.admits(THIRD, 0.0)


def test_an_id_has_at_most_max_devices_and_a_key_its_share_of_ids(open_registry):
    keys = open_registry(KeyLimits(ids_per_key=1))
    keys.bind("bob", OLD, RECOVERY)
    keys.bind("carol", OTHER, RECOVERY)
    assert keys.link_device("bob", OTHER, 0, PROOF, "test") is ErrorCode.TOO_MANY_IDS
    for n in range(1, MAX_DEVICES):
        assert keys.link_device("bob", bytes([n]) * 32, n - 1, PROOF, "test") is None
    assert keys.link_device("bob", THIRD, MAX_DEVICES - 1, PROOF, "test") is ErrorCode.TOO_MANY_DEVICES
    assert len(open_registry().devices("bob").devices) == MAX_DEVICES


def test_an_unlink_removes_the_device_and_its_admission_at_once_and_never_the_last_device(open_registry):
    keys = open_registry()
    keys.bind("bob", OLD, RECOVERY)
    keys.link_device("bob", NEW, 0, PROOF, "test")
    keys.issue_ticket(NEW, 0.0)  # a ticket of the key's own does not keep it in either
    assert keys.unlink_device("bob", NEW, 0, "stale") is ErrorCode.RECOVERY_REFUSED
    assert keys.unlink_device("bob", THIRD, 1, "test") is ErrorCode.DEVICES_CHANGED
    assert keys.unlink_device("bob", NEW, 1, "key service 192.0.2.7") is None
    assert numbered(keys.devices("bob")) == (3, [(1, OLD)]) and not keys.admits(NEW, 0.0)
    assert keys.can_bind("bob", NEW) is ErrorCode.ID_TAKEN
    assert keys.recovery_state("bob") == RecoveryState(RECOVERY, 2)
    assert keys.unlink_device("bob", OLD, 2, "test") is ErrorCode.LINK_FAILED  # the operator releases an ID
    assert keys.link_device("bob", NEW, 2, PROOF, "test") is None  # linked again: under a new number
    assert numbered(open_registry().devices("bob")) == (4, [(1, OLD), (4, NEW)])


def test_links_and_unlinks_are_audited_and_reported_to_other_registries_with_the_devices_key(open_registry):
    broker = open_registry()
    broker.bind("bob", OLD, RECOVERY)
    elsewhere = open_registry()  # another broker of a cluster, or the operator's admin command on SQLite
    assert elsewhere.admits(OLD, 0.0) and elsewhere.changes(LATER) == []
    broker.link_device("bob", NEW, 0, PROOF, "key service 192.0.2.7")
    assert broker.changes(LATER) == [BindingChange("bob", NEW, "linked")]
    assert elsewhere.changes(2 * LATER) == [BindingChange("bob", NEW, "linked")]
    assert elsewhere.admits(NEW, 0.0) and numbered(elsewhere.devices("bob")) == (2, [(1, OLD), (2, NEW)])
    broker.unlink_device("bob", NEW, 1, "key service 192.0.2.8")
    assert elsewhere.changes(3 * LATER) == [BindingChange("bob", NEW, "unlinked")]
    assert not elsewhere.admits(NEW, 0.0) and numbered(elsewhere.devices("bob")) == (3, [(1, OLD)])
    assert [(r.change, r.old_key, r.new_key, r.generation, r.origin) for r in elsewhere.audit("bob")] == [
        (Change.LINKED, None, NEW, 1, "key service 192.0.2.7"), (Change.UNLINKED, NEW, None, 2, "key service 192.0.2.8")]


# Made by the code of schema 1 (devices without link proofs): bob bound with a recovery key.
SCHEMA_1 = """
CREATE TABLE user_recovery (user TEXT PRIMARY KEY, recovery BLOB, generation INTEGER NOT NULL DEFAULT 0,
    ver INTEGER NOT NULL DEFAULT 0);
CREATE TABLE devices (user TEXT NOT NULL, id INTEGER NOT NULL, key BLOB NOT NULL, name TEXT NOT NULL DEFAULT '',
    flags INTEGER NOT NULL DEFAULT 0, added_ms INTEGER NOT NULL, PRIMARY KEY (user, id), UNIQUE (user, key));
CREATE TABLE key_audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, user TEXT NOT NULL,
    change TEXT NOT NULL, old_key BLOB, new_key BLOB, generation INTEGER NOT NULL, origin TEXT NOT NULL);
INSERT INTO user_recovery VALUES ('bob', x'7272727272727272727272727272727272727272727272727272727272727272', 0, 1);
INSERT INTO devices VALUES ('bob', 1, x'0101010101010101010101010101010101010101010101010101010101010101', 'desk', 1, 5);
PRAGMA user_version = 1;
"""


def test_a_keys_sqlite_of_schema_1_gets_empty_link_proofs_and_can_link(tmp_path):
    path = tmp_path / "keys.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_1)
    old.close()
    keys = SqliteKeyRegistry(path)
    device = keys.devices("bob").primary
    assert (device.key, device.name, device.gen, device.proof) == (BOB, "desk", 0, b"")
    assert keys.link_device("bob", NEW, 0, PROOF, "test") is None
    keys.close()
    again = SqliteKeyRegistry(path)
    assert numbered(again.devices("bob")) == (2, [(1, BOB), (2, NEW)]) and again.devices("bob").devices[1].proof == PROOF
    again.close()


def test_redis_devices_stored_before_link_proofs_read_with_empty_ones(tmp_path):
    for factory in redis_registries(tmp_path):
        import msgpack

        from p2pchat.broker.backends.redis_health import connect
        from p2pchat.broker.backends.redis_schema import RedisKeys

        names = RedisKeys()
        r = connect(factory.url, 1.0)
        r.hset(names.devices, "bob", msgpack.packb([1, [[1, BOB, "desk", 1, 5]]], use_bin_type=False))  # as cmsgpack
        r.hset(names.ver, "bob", 1)
        r.hset(names.recovery, "bob", RECOVERY)
        keys = factory()
        device = keys.devices("bob").primary
        assert (device.key, device.name, device.gen, device.proof) == (BOB, "desk", 0, b"")
        assert keys.link_device("bob", NEW, 0, PROOF, "test") is None
        assert numbered(factory().devices("bob")) == (2, [(1, BOB), (2, NEW)])
        keys.close()
        r.close()
