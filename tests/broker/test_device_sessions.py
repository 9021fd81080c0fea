"""Several devices of one user ID at the broker core (docs/PROTOCOL.md §5.5): a session per device, the ID
online once. Linking is not on the wire yet, so the second device is added through the registry
(``KeyBook.add_device``); the core runs with the in-memory ports of test_routing.py."""

from __future__ import annotations

import pytest

from p2pchat.broker.core.actions import Relay
from p2pchat.broker.core.ports import Location
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Error, PeerUpdate, Registered, Snapshot, SnapshotRequest, Unregister, pack
from tests.broker.test_routing import (A, B, BROKER, C, EPOCH, IVL, chat, key_of, make_core, published, register,
                                       replies)

LAPTOP = key_of("bob-laptop")


@pytest.fixture
def core():
    core = make_core()
    register(core, A, "bob")  # device 1, online
    assert core.keys.add_device("bob", LAPTOP) == 2
    return core


def test_a_second_device_of_an_online_id_is_another_session_and_announces_nothing(core):
    actions = register(core, B, "bob", key=LAPTOP)
    assert replies(actions, B) == [Registered("bob", EPOCH, int(IVL * 1000))]
    assert replies(actions, A) == [] and published(actions) == []  # bob was online already
    assert (core.user_of(A), core.user_of(B), core.session_count) == ("bob", "bob", 2)
    assert core.directory.locate("bob") == (Location(BROKER, A), Location(BROKER, B))
    register(core, C, "alice")
    assert replies(core.on_frames(C, pack(SnapshotRequest(), 0), 0.1), C) == [Snapshot(EPOCH, 2, ("alice", "bob"))]


def test_the_id_goes_offline_after_its_last_device_only(core):
    register(core, B, "bob", key=LAPTOP)
    assert published(core.on_frames(A, pack(Unregister(), 0), 1.0)) == []
    assert core.directory.online() == ["bob"] and core.directory.locate("bob") == (Location(BROKER, B),)
    assert published(core.on_frames(B, pack(Unregister(), 0), 2.0)) == [PeerUpdate(EPOCH, 2, "bob", False)]
    assert core.directory.online() == [] and core.directory.locate("bob") == ()


def test_a_device_reconnecting_with_its_token_takes_over_its_own_session_not_the_other_devices(core):
    register(core, B, "bob", key=LAPTOP, token=b"laptop-install")
    actions = register(core, C, "bob", now=1.0, key=LAPTOP, token=b"laptop-install")
    [replaced] = replies(actions, B)
    assert replaced.code is ErrorCode.SESSION_REPLACED and published(actions) == []
    assert (core.user_of(A), core.user_of(B), core.user_of(C)) == ("bob", None, "bob")
    assert core.directory.locate("bob") == (Location(BROKER, A), Location(BROKER, C))


def test_a_device_with_another_devices_token_is_still_its_own_session(core):
    actions = register(core, B, "bob", key=LAPTOP, token=b"token-of-" + A)  # device 1's token
    assert replies(actions, A) == [] and core.session_count == 2


def test_frames_to_the_id_go_to_its_lowest_numbered_device_online(core):
    register(core, B, "bob", key=LAPTOP)
    register(core, C, "alice")
    [relay] = chat(core, C, "alice", "bob", 1.0)
    assert type(relay) is Relay and relay.conn == A
    core.on_frames(A, pack(Unregister(), 0), 1.5)
    [relay] = chat(core, C, "alice", "bob", 2.0, msg_id=b"n" * 16)
    assert type(relay) is Relay and relay.conn == B


def test_a_moved_id_ends_the_session_of_every_device_it_left(core):
    register(core, B, "bob", key=LAPTOP)
    core.keys.move("bob", key_of("bob-new"))
    actions = core.on_tick(0.1)
    for conn in (A, B):
        [error] = [m for m in replies(actions, conn) if type(m) is Error]
        assert error.code is ErrorCode.SESSION_REPLACED
    assert [m for m in published(actions) if type(m) is PeerUpdate] == [PeerUpdate(EPOCH, 2, "bob", False)]
    assert core.session_count == 0 and core.directory.online() == []
