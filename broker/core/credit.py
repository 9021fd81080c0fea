"""Broker-side credit flow: a file chunk is relayed only inside the window its recipient granted.

The Guide's ``fileio3`` credit runs end to end (docs/PROTOCOL.md §8); this ledger makes the broker
enforce it, so a sender that ignores credit cannot park chunks in the broker's outbound queues.
Sans-I/O: the routing core reports each ``file_credit`` delivered to a sender on this broker, asks
before relaying a ``file_chunk``, and says when a transfer ends or a recipient's connection goes.

Bytes *in flight* to a recipient are the chunks relayed at indices its latest credit does not yet
cover (``index >= next``): what may still sit in a queue between the broker and the recipient. They
are bounded per recipient and in total; the number of transfers tracked is bounded too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MIB = 1024 * 1024
Key = tuple[str, str, bytes]  # (sender, recipient, xfer)


@dataclass(frozen=True, slots=True)
class CreditLimits:
    max_window: int = 64  # chunks one credit may open beyond its ``next`` (the client asks for 32)
    inflight_per_recipient: int = 64 * MIB  # four default windows (32 x 512 KiB) at once
    inflight_total: int = 512 * MIB
    transfers_per_recipient: int = 64
    transfers_total: int = 100_000
    idle_seconds: float = 600.0  # a transfer with no credit or chunk for this long is forgotten


@dataclass(slots=True)
class _Transfer:
    next: int
    upto: int
    last_active: float
    inflight: dict[int, int] = field(default_factory=dict)  # index -> bytes relayed there, not yet credited


class CreditLedger:
    def __init__(self, limits: CreditLimits = CreditLimits()) -> None:
        self.limits = limits
        self._transfers: OrderedDict[Key, _Transfer] = OrderedDict()  # least recently active first
        self._of_recipient: dict[str, dict[Key, None]] = {}
        self._inflight: dict[str, int] = {}  # recipient -> bytes in flight
        self.inflight_total = 0

    def on_credit(self, sender: str, recipient: str, xfer: bytes, next_: int, upto: int, now: float) -> None:
        """``recipient`` granted ``sender`` chunks ``[next_, upto)`` of ``xfer``."""
        key = (sender, recipient, xfer)
        transfer = self._transfers.get(key)
        if transfer is None:
            mine = self._of_recipient.setdefault(recipient, {})
            if len(mine) >= self.limits.transfers_per_recipient or len(self._transfers) >= self.limits.transfers_total:
                if not mine:
                    del self._of_recipient[recipient]
                log.warning("user=%s xfer=%s credit ignored: too many transfers tracked", recipient, xfer.hex())
                return  # its chunks are refused until one of the others ends or goes idle
            transfer = self._transfers[key] = _Transfer(next_, next_, now)
            mine[key] = None
        else:
            self._transfers.move_to_end(key)
            transfer.last_active = now
            covered = [i for i in transfer.inflight if i < next_]
            if covered:  # the recipient holds them: they left the broker
                self._release(recipient, sum(transfer.inflight.pop(i) for i in covered))
        transfer.next = next_
        transfer.upto = min(upto, next_ + self.limits.max_window)

    def admit(self, sender: str, recipient: str, xfer: bytes, index: int, size: int, now: float) -> bool:
        """May chunk ``index`` (``size`` bytes) go to ``recipient``? If so it is counted in flight."""
        transfer = self._transfers.get((sender, recipient, xfer))
        if transfer is None or not transfer.next <= index < transfer.upto:
            return False
        held = self._inflight.get(recipient, 0)
        if held + size > self.limits.inflight_per_recipient or self.inflight_total + size > self.limits.inflight_total:
            return False
        transfer.inflight[index] = transfer.inflight.get(index, 0) + size
        self._inflight[recipient] = held + size
        self.inflight_total += size
        transfer.last_active = now
        return True

    def unadmit(self, sender: str, recipient: str, xfer: bytes, index: int, size: int) -> None:
        """The shell could not hand an admitted chunk over: it is not in flight after all."""
        transfer = self._transfers.get((sender, recipient, xfer))
        if transfer is not None and transfer.inflight.get(index, 0) >= size:
            transfer.inflight[index] -= size
            if not transfer.inflight[index]:
                del transfer.inflight[index]
            self._release(recipient, size)

    def forget(self, sender: str, recipient: str, xfer: bytes) -> None:
        """The transfer ended (done or cancelled)."""
        transfer = self._transfers.pop((sender, recipient, xfer), None)
        if transfer is None:
            return
        self._release(recipient, sum(transfer.inflight.values()))
        mine = self._of_recipient[recipient]
        del mine[(sender, recipient, xfer)]
        if not mine:
            del self._of_recipient[recipient]

    def recipient_gone(self, recipient: str) -> None:
        """``recipient``'s connection here closed, and its queue with it; its windows stay for a reconnect."""
        for key in self._of_recipient.get(recipient, ()):
            self._transfers[key].inflight.clear()
        self._release(recipient, self._inflight.get(recipient, 0))

    def expire(self, now: float) -> int:
        """Forget transfers idle for ``idle_seconds``; returns how many."""
        idle = [key for key, t in self._transfers.items() if now - t.last_active > self.limits.idle_seconds]
        for key in idle:
            self.forget(*key)
        return len(idle)

    def inflight_to(self, recipient: str) -> int:
        return self._inflight.get(recipient, 0)

    @property
    def transfer_count(self) -> int:
        return len(self._transfers)

    def _release(self, recipient: str, size: int) -> None:
        if not size:
            return
        left = self._inflight[recipient] - size
        if left:
            self._inflight[recipient] = left
        else:
            del self._inflight[recipient]
        self.inflight_total -= size
