"""The link slots (docs/PROTOCOL.md §10.2.1): the single broker's table with time in, and the cluster's in a real
Redis under the same rules (its clock is Redis's: expiry there is waited for, with a short TTL)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.broker.core.pake_slots import MAX_MESSAGES, PakeSlots, SlotRefused
from p2pchat.common.errors import ErrorCode
from tests.broker.test_cluster import RedisProcess
from tests.conftest import wait_until

A0, B0, B1 = b"a" * 33, b"b" * 33, b"sealed"


@pytest.fixture(params=["memory", "redis"])
def open_slots(request, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """``open_slots(ttl=..., max_slots=...)``: a slot table; for Redis, each call is another broker's view."""
    if request.param == "memory":
        yield PakeSlots
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from p2pchat.broker.backends.redis_health import connect
    from p2pchat.broker.backends.redis_pake import RedisPakeSlots
    from p2pchat.broker.backends.redis_schema import RedisKeys

    server = RedisProcess(tmp_path / "redis").start()
    made = []

    def make(**limits) -> RedisPakeSlots:
        made.append(connect(server.url, 1.0))
        return RedisPakeSlots(made[-1], RedisKeys(), **limits)

    try:
        yield make
    finally:
        for r in made:
            r.close()
        server.stop()


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(SlotRefused) as err:
        call()
    assert err.value.code is ErrorCode.LINK_FAILED
    return err.value.message


def test_slots_take_the_smallest_free_numbers(open_slots):
    slots = open_slots()
    assert [slots.open(0.0) for _ in range(3)] == [1, 2, 3]
    slots.close(2, 0.0)  # a closed slot keeps its number until it expires
    assert slots.open(0.0) == 4


def test_the_two_sides_read_each_others_messages_in_order(open_slots):
    here = open_slots()
    there = here if isinstance(here, PakeSlots) else open_slots()  # in a cluster: another broker
    slot = here.open(0.0)
    here.put(slot, "A", 0, A0, 0.0)
    assert there.get(slot, "A", 0, 1.0) == A0 and there.get(slot, "B", 0, 1.0) is None
    there.put(slot, "B", 0, B0, 1.0)
    there.put(slot, "B", 1, B1, 1.0)
    there.put(slot, "B", 1, B1, 1.0)  # a repeat (its reply was lost) is accepted
    assert [here.get(slot, "B", n, 2.0) for n in range(3)] == [B0, B1, None]


def test_a_slot_takes_one_join(open_slots):
    slots = open_slots()
    slot = slots.open(0.0)
    slots.put(slot, "B", 0, B0, 0.0)
    assert "someone else joined link slot 1 first" in refused(lambda: slots.put(slot, "B", 0, b"guess", 0.0))


def test_messages_are_posted_in_order_and_at_most_max_messages_per_side(open_slots):
    slots = open_slots()
    slot = slots.open(0.0)
    assert "comes before message 1" in refused(lambda: slots.put(slot, "A", 2, A0, 0.0))
    for n in range(MAX_MESSAGES):
        slots.put(slot, "A", n, bytes([n]), 0.0)
    assert slots.get(slot, "A", MAX_MESSAGES - 1, 0.0) == bytes([MAX_MESSAGES - 1])


def test_a_closed_slot_refuses_everything_until_it_expires(open_slots):
    slots = open_slots()
    slot = slots.open(0.0)
    slots.put(slot, "A", 0, A0, 0.0)
    slots.close(slot, 1.0)
    assert "link slot 1 was closed" in refused(lambda: slots.get(slot, "A", 0, 1.0))
    assert "was closed" in refused(lambda: slots.put(slot, "B", 0, B0, 1.0))
    slots.close(slot, 1.0)  # closing twice, or a slot that is not open, does nothing
    slots.close(7, 1.0)
    assert "no link slot 7 is open" in refused(lambda: slots.get(7, "A", 0, 1.0))


def test_a_slot_expires_its_ttl_after_opening_and_its_number_is_free_again(open_slots):
    slots = open_slots(ttl=0.2)
    first = slots.open(0.0)
    slots.put(first, "A", 0, A0, 0.0)

    def expired(now: float) -> bool:
        try:
            slots.get(first, "A", 0, now)
        except SlotRefused as exc:
            assert "no link slot 1 is open" in exc.message
            return True
        return False

    assert not expired(0.1)
    if isinstance(slots, PakeSlots):
        assert expired(0.2)
    else:  # Redis's clock
        wait_until(lambda: expired(0.0), what="the slot to expire")
    assert slots.open(1.0) == first


def test_the_table_holds_at_most_max_slots(open_slots):
    slots = open_slots(max_slots=3, ttl=0.2)
    for _ in range(3):
        slots.open(0.0)
    assert "too many links in progress" in refused(lambda: slots.open(0.1))
    if isinstance(slots, PakeSlots):
        assert slots.open(0.2) == 1
    else:
        wait_until(lambda: not _full(slots), what="slots to expire")


def _full(slots) -> bool:
    try:
        slots.open(0.0)
    except SlotRefused:
        return True
    return False
