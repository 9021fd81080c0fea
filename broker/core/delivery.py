"""Store-and-forward: durable frames wait in their recipient's queue until it consumes them.

Sans-I/O like the routing core that owns it: the queue is a ``QueueStore`` port, the time comes in.
A durable frame is appended in the shell's open batch and answered only once the shell reports the
batch's commit (``on_commit``): ``ack stored`` and delivery when it is durable. A recipient gets its
queue a page at a time, in order; the next page goes out when it has consumed half of the last one,
or a heartbeat later if it consumes nothing (docs/PROTOCOL.md §11).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from p2pchat.broker.core.actions import Action, FrameMaker, Relay, Send
from p2pchat.broker.core.ports import BrokerLink, Frames, Location, PeerDirectory, QueueLimits, QueueStore, Refusal
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import Ack, AckStatus, Envelope, Message

log = logging.getLogger(__name__)

EXPIRY_SWEEP = 60.0  # seconds between sweeps of expired queued frames


@dataclass(slots=True)
class _Pages:
    """One session's paged delivery of its queue."""

    queue: str  # its device's queue: ``user`` for the ID's primary device, ``user/dev`` for another (queue_name)
    cursor: int = 0  # the last seq sent
    draining: bool = True  # pages remain: frames queued meanwhile come with a later page, in order
    unconsumed: int = 0  # frames sent but not consumed


@dataclass(frozen=True, slots=True)
class _Appended:
    """A durable frame appended in the open batch: answered once the shell reports the commit."""

    sender: bytes
    msg_id: bytes
    acked: bool
    recipient: str
    frames: Frames
    queued: bool  # False: the store refused it for space (store bound or disk); relay it or say storage_full
    missed: int = 0  # a room message: members whose queue refused their copy (told in its ack)
    seq: int | None = None  # a room message: its number in the room (told in its ack)


def queue_name(user: str, dev: int, primary: int) -> str:
    """The queue of ``user``'s device ``dev``: the primary's is the ID's own, so recovery, moves and stores made
    before devices need nothing."""
    return user if dev == primary else f"{user}/{dev}"


class QueuedDelivery:
    def __init__(self, store: QueueStore, limits: QueueLimits, directory: PeerDirectory, link: BrokerLink,
                 frames: FrameMaker, wall_ms: Callable[[], int], broker_id: bytes, heartbeat_ivl: float) -> None:
        self.store, self.limits = store, limits
        self.durable = store.durable
        self._directory, self._link, self._frames, self._wall_ms = directory, link, frames, wall_ms
        self._broker_id, self._heartbeat_ivl = broker_id, heartbeat_ivl
        self._ttl_ms = int(limits.ttl_seconds * 1000)
        self._pages: dict[bytes, _Pages] = {}  # conn -> its session's paging
        self._appended: list[_Appended] = []
        self._stalled: set[str] = set()  # queues whose next page is due at the next redelivery tick
        self._next_redelivery = 0.0
        self._next_expiry = 0.0

    # --- sessions ------------------------------------------------------------------------------
    def opened(self, conn: bytes, queue: str) -> list[Action]:
        """A session started, to be handed ``queue``: its first page."""
        self._pages[conn] = _Pages(queue)
        return self.next_page(conn)

    def closed(self, conn: bytes) -> None:
        self._pages.pop(conn, None)

    # --- durable frames in ---------------------------------------------------------------------
    def queue(self, conn: bytes, env: Envelope, targets: Sequence[tuple[str, Frames]],
              sessions: tuple[Location, ...], skip_full: bool = False, seq: int | None = None) -> list[Action]:
        """Append each ``(queue, frames)`` of ``targets`` (the recipient's device queues, and for a message its
        sender's other devices'); acknowledge once and deliver once the shell reports the commit (``on_commit``).
        ``sessions``: the recipient's. ``skip_full`` (a room message, numbered ``seq``): a full queue misses its
        copy, the others get theirs and the ack counts the misses; else a full queue refuses the whole frame. Raises
        ``StoreUnavailable`` if the store cannot take it now."""
        sender: str = env.message.sender  # type: ignore[attr-defined]
        recipient: str | None = getattr(env.message, "recipient", None)  # None: a room's
        expires_ms = self._wall_ms() + self._ttl_ms
        first, acked, missed = len(self._appended), env.message.ACKED, 0
        for queue, frames in targets:
            refusal = self.store.append(env.msg_id, sender, queue, bytes(frames[0]), expires_ms)
            if skip_full and (refusal is Refusal.QUEUE_FULL or refusal is Refusal.SHARE_FULL):
                missed += 1
                continue
            if refusal is Refusal.QUEUE_FULL or refusal is Refusal.SHARE_FULL:
                if len(self._appended) > first:  # the copies queued already stay (a resend is idempotent) unacked
                    self._appended[first] = replace(self._appended[first], acked=False)
                whose = (f"{recipient!r} has" if refusal is Refusal.QUEUE_FULL
                         else f"your share of {recipient!r}'s queue has")
                return [Send(conn, self._frames.error(ErrorCode.QUEUE_FULL, f"{whose} too many undelivered messages; "
                                                      "try later", env.msg_id))]
            self._appended.append(_Appended(conn, env.msg_id, acked, queue, frames, refusal is None))
            acked = False
            if refusal is None:  # to every other broker with a session of that user: one of them has the device
                user = queue.partition("/")[0]
                for broker in {where.broker for where in (sessions if user == recipient else self._directory.locate(user))
                               if where.broker != self._broker_id}:
                    self._link.forward(broker, queue, [bytes(frames[0])])  # goes out with the append's commit
        if len(self._appended) == first:  # nothing to store (a room of one device, or every queue full)
            return [Send(conn, self._frames.make(Ack(env.msg_id, AckStatus.STORED, missed or None, seq)))] \
                if acked else []
        if missed or seq is not None:
            self._appended[first] = replace(self._appended[first], missed=missed, seq=seq)
        return []

    def on_commit(self, failure: ErrorCode | None) -> list[Action]:
        """The shell committed the batch (``failure`` None) or could not: answer and deliver its durable frames.

        Committed: ``ack stored`` and delivery to a recipient here. Not committed: a recipient online
        here still gets the frame (``ack relayed``); the rest get ``error`` with the failure's code
        (``storage_full``: disk full; ``storage_unavailable``: Redis down): not stored, send again later.
        """
        if not self._appended:
            return []
        appended, self._appended = self._appended, []
        make = self._frames.make
        conns = {item.recipient: self.conn_of(item.recipient) for item in appended}
        # A message with a copy neither stored nor handed over is answered with an error only, never also an ack.
        lost = {item.msg_id for item in appended if not (failure is None and item.queued) and
                conns[item.recipient] is None}
        told: set[bytes] = set()
        actions: list[Action] = []
        for item in appended:
            conn = conns[item.recipient]
            acked = item.acked and item.msg_id not in lost
            if failure is None and item.queued:
                if conn is not None and not self._pages[conn].draining:  # else it comes with a later page
                    actions.append(Send(conn, item.frames, item.recipient))
                if acked:
                    actions.append(Send(item.sender, make(Ack(item.msg_id, AckStatus.STORED, item.missed or None,
                                                              item.seq))))
            elif conn is not None:
                ack = make(Ack(item.msg_id, AckStatus.RELAYED, item.missed or None, item.seq)) if acked else None
                actions.append(Relay(conn, item.frames, item.sender, ack,
                                     lambda r=item.recipient, m=item.msg_id: self._frames.error(
                                         ErrorCode.RECIPIENT_BUSY, f"recipient {r!r} is not keeping up", m)))
            elif item.msg_id not in told:  # one error per message, however many of its copies were lost
                told.add(item.msg_id)
                actions.append(Send(item.sender, self._frames.error(
                    failure or ErrorCode.STORAGE_FULL, "the broker cannot store messages now; try again later",
                    item.msg_id)))
        return actions

    def delivers_later(self, conn: bytes, msg: Message) -> bool:
        """Does ``msg``, sent to session ``conn`` by another broker, wait in the queue instead? Yes for a
        durable frame while the queue is being paged: a later page brings it, behind older frames."""
        return msg.DURABLE and self.durable and self._pages[conn].draining

    # --- paging --------------------------------------------------------------------------------
    def consumed(self, conn: bytes, msg_ids: Sequence[bytes]) -> list[Action]:
        """The recipient on ``conn`` released these queued frames (one CONSUME, one or a batch of ids)."""
        pages = self._pages[conn]
        for msg_id in msg_ids:
            self.store.consume(pages.queue, msg_id)
        if pages.unconsumed:
            pages.unconsumed = max(0, pages.unconsumed - len(msg_ids))
            if pages.draining and pages.unconsumed <= self.limits.page // 2:
                return self.next_page(conn)
        return []

    def next_page(self, conn: bytes) -> list[Action]:
        """The next page of ``conn``'s queue, in order: never the whole queue at once."""
        pages = self._pages[conn]
        limit = self.limits.page
        page = self.store.pending(pages.queue, self._wall_ms(), pages.cursor, limit)
        pages.draining = len(page) == limit
        if pages.draining:  # one more page a heartbeat even if the recipient consumes nothing
            self._stalled.add(pages.queue)
        if not page:
            return []
        pages.cursor = page[-1][0]
        pages.unconsumed += len(page)
        log.debug("queue=%s delivering %d queued frames", pages.queue, len(page))
        return [Send(conn, [header], pages.queue) for _, header in page]

    def failed(self, queue: str) -> None:
        """A frame of ``queue`` did not reach its session, or the queue could not be read: page it again from the
        start."""
        conn = self.conn_of(queue)
        if conn is not None:
            pages = self._pages[conn]
            pages.cursor, pages.draining, pages.unconsumed = 0, True, 0
        self._stalled.add(queue)

    def failed_all(self) -> None:
        for pages in self._pages.values():
            self.failed(pages.queue)

    def on_tick(self, now: float, recheck: Iterable[str]) -> list[Action]:
        """Pages that are due (and the ``recheck`` users' queues), and a bounded step of the expiry sweep."""
        self._stalled.update(recheck)  # frames go to the queue named by the user (its primary device's)
        actions: list[Action] = []
        if self._stalled and now >= self._next_redelivery:
            self._next_redelivery = now + self._heartbeat_ivl
            queues, self._stalled = self._stalled, set()
            for queue in queues:
                conn = self.conn_of(queue)
                if conn is not None:
                    actions += self.next_page(conn)
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_SWEEP
            if self.store.expire(self._wall_ms()) >= self.limits.expire_batch:
                self._next_expiry = now + self._heartbeat_ivl  # more are due: next step soon, loop never stalls
        return actions

    def conn_of(self, queue: str) -> bytes | None:
        """The connection of the session on this broker that is handed ``queue``, if there is one."""
        for where in self._directory.locate(queue.partition("/")[0]):
            if where.broker == self._broker_id:
                pages = self._pages.get(where.conn)
                if pages is not None and pages.queue == queue:
                    return where.conn
        return None
