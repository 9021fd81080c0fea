"""The rendezvous of device linking: numbered slots where two processes that talk only to the key service
leave each other the messages of a PAKE (docs/PROTOCOL.md §10.2.1), like magic-wormhole's nameplates.

A slot lives ``SLOT_TTL`` seconds from its opening, whatever happens in it. Side A (the device that opened it)
and side B (the one joining) each post at most ``MAX_MESSAGES`` messages, numbered from 0 and in order; the
first B message is the join, and a slot takes one join only (so a code can be guessed once per slot). A closed
slot answers ``link_failed`` until it expires; only then is its number free again, and a new slot always takes
the smallest free number (short codes). ``PakeSlots`` is the single broker's table, in memory (sans-I/O: time
in); a cluster shares its slots in Redis (broker/backends/redis_pake.py) under the same rules.
"""

from __future__ import annotations

import enum
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from p2pchat.common.errors import ErrorCode, P2PChatError

SLOT_TTL = 300.0  # seconds a slot lives from its opening
MAX_SLOTS = 10_000  # open (or closed but not yet expired) slots per broker, or per cluster
MAX_MESSAGES = 4  # per side of a slot
MAX_DATA = 256  # bytes of one message
SIDES = ("A", "B")


class SlotVerdict(enum.IntEnum):
    """Why a slot request was refused (the Redis scripts answer these numbers)."""

    NO_SLOT = 1
    CLOSED = 2
    TAKEN = 3
    OUT_OF_ORDER = 4
    FULL = 5

    def refusal(self, slot: int, side: str = "", n: int = 0) -> SlotRefused:
        if self is SlotVerdict.TAKEN:
            text = (f"someone else joined link slot {slot} first" if (side, n) == ("B", 0)
                    else f"message {n} of side {side} of link slot {slot} was posted already, with other data")
        else:
            text = {SlotVerdict.NO_SLOT: f"no link slot {slot} is open (it expired, or never was)",
                    SlotVerdict.CLOSED: f"link slot {slot} was closed",
                    SlotVerdict.OUT_OF_ORDER: f"message {n} of side {side} of link slot {slot} comes before "
                                              f"message {n - 1}",
                    SlotVerdict.FULL: "the broker has too many links in progress; retry later"}[self]
        return SlotRefused(text)


class SlotRefused(P2PChatError):
    default_code = ErrorCode.LINK_FAILED


class PakeRendezvous(Protocol):
    """What the key service asks of a slot table; each call raises ``SlotRefused`` when it cannot be done."""

    ttl: float

    def open(self, now: float) -> int:
        """A new slot's number."""

    def put(self, slot: int, side: str, n: int, data: bytes, now: float) -> None:
        """Post message ``n`` of ``side`` (a repeat of what was posted is accepted: a reply may be lost)."""

    def get(self, slot: int, side: str, n: int, now: float) -> bytes | None:
        """Message ``n`` of ``side``, or None while it has not been posted."""

    def close(self, slot: int, now: float) -> None:
        """End the slot early (a wrong code, or done); closing a slot that is not open does nothing."""


@dataclass(slots=True)
class _Slot:
    expires: float
    posted: dict[str, list[bytes]] = field(default_factory=lambda: {side: [] for side in SIDES})
    closed: bool = False


class PakeSlots:
    """The slot table of one broker (single mode)."""

    def __init__(self, ttl: float = SLOT_TTL, max_slots: int = MAX_SLOTS) -> None:
        self.ttl, self.max_slots = ttl, max_slots
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # opening order, which is expiry order
        self._freed: list[int] = []  # a heap of numbers below ``_top`` that are free again
        self._top = 0  # every number above it is free

    def open(self, now: float) -> int:
        self._expire(now)
        if len(self._slots) >= self.max_slots:
            raise SlotVerdict.FULL.refusal(0)
        if self._freed:
            slot = heapq.heappop(self._freed)
        else:
            self._top += 1
            slot = self._top
        self._slots[slot] = _Slot(now + self.ttl)
        return slot

    def put(self, slot: int, side: str, n: int, data: bytes, now: float) -> None:
        posted = self._live(slot, now).posted[side]
        if n < len(posted):
            if posted[n] != data:
                raise SlotVerdict.TAKEN.refusal(slot, side, n)
        elif n > len(posted):
            raise SlotVerdict.OUT_OF_ORDER.refusal(slot, side, n)
        else:
            posted.append(data)

    def get(self, slot: int, side: str, n: int, now: float) -> bytes | None:
        posted = self._live(slot, now).posted[side]
        return posted[n] if n < len(posted) else None

    def close(self, slot: int, now: float) -> None:
        self._expire(now)
        found = self._slots.get(slot)
        if found is not None:
            found.closed = True
            found.posted = {side: [] for side in SIDES}  # nothing in it is read again

    def __len__(self) -> int:
        return len(self._slots)

    def _live(self, slot: int, now: float) -> _Slot:
        self._expire(now)
        found = self._slots.get(slot)
        if found is None:
            raise SlotVerdict.NO_SLOT.refusal(slot)
        if found.closed:
            raise SlotVerdict.CLOSED.refusal(slot)
        return found

    def _expire(self, now: float) -> None:
        while self._slots:
            slot, oldest = next(iter(self._slots.items()))
            if oldest.expires > now:
                return
            del self._slots[slot]
            heapq.heappush(self._freed, slot)
