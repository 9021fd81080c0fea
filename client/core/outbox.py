"""Messages sent and not yet acknowledged by the broker (the session's at-least-once half).

Each is sealed and packed once its recipient's key is known, then kept as frames until the broker
acknowledges it: sent again after ``RESEND_AFTER`` without any acknowledgement, and after every
re-registration; receivers drop the duplicates by message id. The outbox of an earlier run comes
back with its ids, so a restarted client re-sends rather than duplicates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from p2pchat.client.e2e import PeerKeyChanged, Sealing
from p2pchat.common.protocol import ChatMessage, pack

RESEND_AFTER = 5.0  # seconds without any acknowledgement before pending messages are sent again
# A message refused this often for device lists that changed fails: a broker that always says so must not keep
# us sealing and sending it in a loop (legitimately the lists settle in a round or two).
MAX_RESEALS = 3


@dataclass(slots=True)
class _Pending:
    recipient: str
    text: bytes
    ts: int  # fixed when queued: it is bound into the seal, so a re-send re-seals identically
    frames: list[bytes] | None = None  # sealed and packed once the recipient's key is known
    reseals: int = 0  # refused for changed device lists so far


class Outbox:
    __slots__ = ("user", "resend_at", "_pending", "_unsealed")

    def __init__(self, user: str) -> None:
        self.user = user
        self.resend_at = 0.0  # when unacknowledged messages are sent again
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._unsealed: OrderedDict[bytes, None] = OrderedDict()  # pending ids still waiting for a key

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._pending))

    def add(self, msg_id: bytes, recipient: str, text: bytes, ts: int, now: float) -> None:
        self._pending[msg_id] = _Pending(recipient, text, ts)
        self._unsealed[msg_id] = None
        if len(self._pending) == 1:
            self.resend_at = now + RESEND_AFTER

    def seal(self, e2e: Sealing) -> Iterator[tuple[bytes, list[bytes] | PeerKeyChanged | str]]:
        """Seal what waited for a key: per message in order, its frames, or what it still waits for: the
        recipient's key change the user has not accepted yet, or the recipient whose key is missing."""
        for msg_id in list(self._unsealed):  # only these: a long outbox must not make each send O(n)
            pending = self._pending.get(msg_id)
            if pending is None:
                del self._unsealed[msg_id]
                continue
            yield msg_id, self._seal(msg_id, pending, e2e)

    def put_first(self, msg_ids: list[bytes]) -> None:
        """Move these (in this order) ahead of the rest: messages sealed again go before newer ones."""
        for msg_id in reversed(msg_ids):
            for queue in (self._pending, self._unsealed):
                if msg_id in queue:
                    queue.move_to_end(msg_id, last=False)

    def add_sealed(self, msg_id: bytes, recipient: str, text: bytes, ts: int, now: float,
                   e2e: Sealing) -> list[bytes] | PeerKeyChanged | str:
        """``add`` and ``seal`` for a message sent while nothing else waits for a key (nearly every one): what
        ``seal`` would yield for it, without a pass over the outbox."""
        assert not self._unsealed
        self.add(msg_id, recipient, text, ts, now)
        return self._seal(msg_id, self._pending[msg_id], e2e)

    def unsealed_to(self, user: str) -> list[bytes]:
        """The ids of our messages to ``user`` that wait for their key."""
        return [msg_id for msg_id in self._unsealed if msg_id in self._pending and
                self._pending[msg_id].recipient == user]

    @property
    def waiting(self) -> bool:
        """Some message waits for its recipient's key."""
        return bool(self._unsealed)

    def _seal(self, msg_id: bytes, pending: _Pending, e2e: Sealing) -> list[bytes] | PeerKeyChanged | str:
        try:
            key = e2e.key_of(pending.recipient) if e2e.enabled else b""
        except PeerKeyChanged as exc:  # waits for the user's decision, like a missing key
            return exc
        if key is None:
            return pending.recipient
        sealed = e2e.seal_copies(pending.recipient, msg_id, pending.ts, pending.text)
        if type(sealed) is str:  # a device list to fetch first
            return sealed
        del self._unsealed[msg_id]
        body, copies, echo = sealed
        pending.frames = pack(ChatMessage(self.user, pending.recipient, body, copies, echo), pending.ts, msg_id)
        return pending.frames

    def unseal(self, msg_id: bytes) -> str | None:
        """The broker refused ``msg_id``'s copies (a device list changed): seal it again once the lists are
        fetched; its recipient, or None if it is not ours or was refused ``MAX_RESEALS`` times already."""
        pending = self._pending.get(msg_id)
        if pending is None or pending.reseals >= MAX_RESEALS:
            return None
        pending.reseals += 1
        pending.frames = None
        self._unsealed[msg_id] = None
        # In the outbox's order (rare: one pass per refusal), so several refused messages go again in order.
        self._unsealed = OrderedDict((k, None) for k in self._pending if k in self._unsealed)
        return pending.recipient

    def sealed(self) -> list[list[bytes]]:
        """The frames of every sealed message still unacknowledged, oldest first."""
        return [p.frames for p in self._pending.values() if p.frames is not None]

    def resend(self, now: float) -> list[list[bytes]]:
        """No acknowledgement for a while (frames dropped on the way): what to send again."""
        self.resend_at = now + RESEND_AFTER
        return self.sealed()

    def acked(self, msg_id: bytes, now: float) -> bool:
        """The broker took ``msg_id``; False if it was not ours (or already acknowledged)."""
        if self._pending.pop(msg_id, None) is None:
            return False
        self.resend_at = now + RESEND_AFTER  # progress: whatever is still pending is in flight
        return True

    def drop(self, msg_id: bytes | None) -> bool:
        """``msg_id`` failed for good; False if it was not ours."""
        return msg_id is not None and self._pending.pop(msg_id, None) is not None

    def drop_unsealed_to(self, user: str) -> list[bytes]:
        """No usable key for ``user``: the messages that waited for it leave the outbox."""
        dropped = []
        for msg_id in list(self._unsealed):
            pending = self._pending.get(msg_id)
            if pending is not None and pending.recipient == user:
                del self._pending[msg_id], self._unsealed[msg_id]
                dropped.append(msg_id)
        return dropped
