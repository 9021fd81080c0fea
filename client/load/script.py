"""The load tool's scripted client: one user's script as a sans-I/O state machine.

Frames and ``now`` (CLOCK_MONOTONIC nanoseconds, the same clock in every
process on a host) go in; outputs come out: frames to send on the client's
DEALER, or ``Connect`` / ``Disconnect`` for the shell to open or close its
sockets. It reads no clock and touches no socket, so thousands of them share
one process and one poll loop (``client/load/worker.py``).

It speaks just enough of the protocol to load a broker honestly: REGISTER
(retried 20 ms, doubling, as §5.2 says), HEARTBEAT when idle, MESSAGE on a
schedule, CONSUME for every message received (the broker is store-and-forward),
optional DELIVERED receipts, re-register on silence or ``not_registered``, and
re-send of unacknowledged messages once registered again (at-least-once).
Bodies are **not sealed**: the broker treats them as opaque, and the load tool
measures the broker, not client crypto. A body is ``BODY`` (run tag, sender
index, per-sender sequence number, send time) plus padding, so a receiver can
tell loss, duplicates and reordering per sender, and one-way latency.

Transitions (anything not listed leaves the phase alone):

    phase        input                              outputs                      next
    IDLE         tick >= start_at                   Connect                      (shell: on_connected)
    (any)        on_connected                       REGISTER                     REGISTERING
    REGISTERING  tick, retry due                    REGISTER                     REGISTERING
    REGISTERING  REGISTERED                         unacknowledged messages      READY
    READY        error not_registered, or silence   REGISTER                     REGISTERING
    READY        tick, churn due (graceful)         -                            LEAVING
    READY        tick, churn due (crash)            Disconnect(graceful=False)   DOWN
    LEAVING      all acked, or 2 s                  UNREGISTER, Disconnect(True) DOWN
    DOWN         tick >= up_at                      Connect                      (shell: on_connected)
    (any)        leave()                            UNREGISTER if READY, Disconnect  CLOSED
"""

from __future__ import annotations

import enum
import os
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2pchat.client.load.files import FileTraffic, file_content
from p2pchat.client.load.stats import ProcessStats, record_ns
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import (
    Ack,
    ChatMessage,
    Consume,
    Error,
    Heartbeat,
    PeerUpdate,
    Receipt,
    ReceiptStatus,
    Register,
    Registered,
    Unregister,
    decode,
    pack,
)

BODY = struct.Struct(">IIQq")  # run tag, sender index, sequence number, send time (CLOCK_MONOTONIC ns)
NS = 1_000_000_000
REGISTER_RETRY_FIRST_NS = 20_000_000  # §5.2: a REGISTER sent before the TCP connection is up is dropped
RESEND_AFTER_NS = 5 * NS  # no ACK progress for this long: send the unacknowledged ones again
RATE_LIMIT_BACKOFF_NS = NS
LEAVE_TIMEOUT_NS = 2 * NS  # graceful churn waits this long at most for outstanding ACKs
LATE_NS = 10_000_000  # a paced send this late counts as late (the load generator is not keeping up)
MAX_CATCH_UP_NS = NS  # further behind than this, the schedule restarts from now instead of bursting
MAX_SENDS_PER_TICK = 100
NEVER = 1 << 62

PEER_MODES = ("random", "ring", "pairs")


class Phase(enum.Enum):
    IDLE = "idle"  # waiting for its slot in the connection ramp
    REGISTERING = "registering"
    READY = "ready"
    LEAVING = "leaving"  # graceful churn: no new messages, waiting for outstanding ACKs
    DOWN = "down"  # churn: disconnected until up_at
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a fresh DEALER (and SUB) for this client, then call ``on_connected``."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    graceful: bool  # True: after an UNREGISTER, closed with a linger; False: like a crash (linger 0)


CONNECT = Connect()


@dataclass(frozen=True, slots=True)
class ScriptPlan:
    """What every scripted client of a run does; built once by the coordinator, pickled to workers."""

    run_tag: int
    clients: int
    senders: int  # clients 0 .. senders-1 send; every client receives
    peers: str = "random"  # random | ring | pairs
    rate: float = 1.0  # messages per second per sender; 0 (and not flood): no messages
    flood: bool = False  # unpaced: keep ``window`` messages unacknowledged
    window: int = 1000  # most messages one client has unacknowledged
    count: int = 0  # messages per sender; 0: until told to stop
    size: int = BODY.size  # body bytes
    heartbeat: float = 0.0  # seconds; 0: the broker's REGISTERED heartbeat_ms (1 s until known), else min of both
    liveness: int = 3
    receipts: bool = False  # send a DELIVERED receipt per message, as the real client does
    churn_every: float = 0.0  # mean seconds between a client's reconnects; 0: no churn
    churn_down: float = 0.5  # seconds a churned client stays away
    churn_crash: bool = False  # churn without UNREGISTER (a crash), coming back with the same token
    inject_drop: int = -1  # TEST HOOK: client 0 pretends its message with this seq was acked, never sends it
    inject_dup: int = -1  # TEST HOOK: client 0 sends its message with this seq twice (fresh message ids)
    file_every: float = 0.0  # seconds between a sender's file offers, on average; 0: no file traffic
    file_size: int = 1024 * 1024
    seed: int = 0

    @property
    def sends(self) -> bool:
        return self.flood or self.rate > 0


def peer_of(index: int, plan: ScriptPlan, rng: random.Random) -> int:
    """The recipient of ``index``'s next message under the plan's topology."""
    n = plan.clients
    if plan.peers == "ring":
        return (index + 1) % n
    if plan.peers == "pairs":
        partner = index ^ 1
        return partner if partner < n else (index + 1) % n  # odd count: the last one talks to 0
    other = rng.randrange(n - 1)
    return other + (other >= index)


class ScriptedClient:
    __slots__ = (
        "index", "user", "names", "key", "token", "plan", "stats", "watch", "_wall_ms", "_rng", "_padding",
        "phase", "start_at", "up_at", "_last_sent", "_last_heard", "_retry", "_hb", "_expiry",
        "_connected_at", "_registered_once", "_sending", "_next_send", "_interval", "seq", "outstanding",
        "_resend_at", "_churn", "_churn_at", "_leave_by", "_highest", "sub_live", "done", "files",
    )

    def __init__(self, index: int, names: Sequence[str], key: bytes, plan: ScriptPlan, stats: ProcessStats,
                 wall_ms: Callable[[], int], watch: set[str] | None = None, token: bytes | None = None) -> None:
        self.index = index
        self.user = names[index]
        self.names = names
        self.key = key  # the raw X25519 public key: with CURVE it must be this connection's key
        self.token = token or os.urandom(16)  # kept across reconnects: a crash-churned client takes its session back
        self.plan = plan
        self.stats = stats
        self.watch = watch if watch is not None else set()  # users whose presence changes are timed
        self._wall_ms = wall_ms
        self._rng = random.Random(plan.seed * 1_000_003 + index)
        self._padding = bytes(max(0, plan.size - BODY.size))
        self.phase = Phase.IDLE
        self.start_at = NEVER
        self.up_at = NEVER
        self._last_sent = self._last_heard = self._connected_at = 0
        self._retry = REGISTER_RETRY_FIRST_NS
        self._hb = int((plan.heartbeat or 1.0) * NS)
        self._expiry = self._hb * plan.liveness
        self._registered_once = False
        self._sending = False
        self._interval = int(NS / plan.rate) if plan.rate > 0 else NEVER
        self._next_send = NEVER
        self.seq = 0  # the next sequence number
        self.outstanding: dict[bytes, list] = {}  # msg id -> [seq, sent ns, frames]: sent, not yet acked
        self._resend_at = NEVER
        self._churn = plan.churn_every > 0
        self._churn_at = NEVER
        self._leave_by = NEVER
        self._highest: dict[int, int] = {}  # sender index -> highest seq received from it
        self.sub_live = False  # the SUB has delivered something since it was (re)opened
        self.done = False  # sent its ``count`` messages (or never sends)
        self.files: FileTraffic | None = None  # every client receives files when the run has file traffic
        if plan.file_every > 0:
            self.files = FileTraffic(index, names, file_content(plan.file_size, plan.seed), plan.file_every, stats,
                                     self._rng, lambda: peer_of(index, plan, self._rng), wall_ms)

    # --- commands from the shell ----------------------------------------------
    @property
    def is_sender(self) -> bool:
        return self.plan.sends and self.index < self.plan.senders

    def on_connected(self, now: int) -> list:
        """The shell opened fresh sockets: register on them."""
        self._set_phase(Phase.REGISTERING)
        self._connected_at = now
        self._last_heard = now
        self._retry = REGISTER_RETRY_FIRST_NS
        return [self._register(now)]

    def start_sending(self, now: int) -> list:
        if self.files is not None and self.index < self.plan.senders:
            self.files.start(now)
        if not self.is_sender or self.done:
            self._mark_done()
            return []
        self._sending = True
        if not self.plan.flood:  # spread the senders over one interval
            self._next_send = now + int(self._rng.random() * self._interval)
        return self._fill(now) if self.phase is Phase.READY else []

    def stop_sending(self) -> None:
        self._sending = False
        if self.files is not None:
            self.files.stop()

    def resume(self, now: int) -> None:
        """End of the run: no more churn; a client that is away comes back now to collect its queue."""
        self._churn = False
        self._churn_at = NEVER
        if self.phase is Phase.DOWN:
            self.up_at = now
        elif self.phase is Phase.LEAVING:
            self._set_phase(Phase.READY)

    def leave(self, now: int) -> list:
        out: list = []
        if self.phase in (Phase.READY, Phase.LEAVING):
            out.append(self._frames(pack(Unregister(), self._wall_ms()), now))
        if self.phase not in (Phase.IDLE, Phase.DOWN, Phase.CLOSED):
            out.append(Disconnect(graceful=True))
        self._set_phase(Phase.CLOSED)
        return out

    # --- inputs ----------------------------------------------------------------
    def on_tick(self, now: int) -> list:
        phase = self.phase
        if phase is Phase.IDLE:
            return [CONNECT] if now >= self.start_at else []
        if phase is Phase.DOWN:
            return [CONNECT] if now >= self.up_at else []
        if phase is Phase.CLOSED:
            return []
        if phase is Phase.REGISTERING:
            if now - self._last_sent >= self._retry:
                self._retry = min(self._retry * 2, self._hb)
                return [self._register(now)]
            return []
        out: list = []
        if now - self._last_heard > self._expiry:
            self.stats.counters["silences"] += 1
            return self._reregister(now)
        if phase is Phase.LEAVING:
            if not self.outstanding or now >= self._leave_by:
                out.append(self._frames(pack(Unregister(), self._wall_ms()), now))
                return out + self._go_down(now, graceful=True)
        elif self._churn and now >= self._churn_at:
            self.stats.counters["churns"] += 1
            if self.plan.churn_crash:
                return self._go_down(now, graceful=False)
            self._set_phase(Phase.LEAVING)
            self._leave_by = now + LEAVE_TIMEOUT_NS
            if not self.outstanding:
                out.append(self._frames(pack(Unregister(), self._wall_ms()), now))
                return out + self._go_down(now, graceful=True)
        if self.outstanding and now >= self._resend_at:
            out += self._resend(now)
        if self._sending and self.phase is Phase.READY:  # not once LEAVING (churn just began)
            out += self._fill(now)
        if self.files is not None and self.phase is Phase.READY:
            out += [self._frames(frames, now) for frames in self.files.on_tick(now)]
        if now - self._last_sent >= self._hb:
            out.append(self._frames(pack(Heartbeat(), self._wall_ms()), now))
        return out

    def next_deadline(self) -> int:
        phase = self.phase
        if phase is Phase.IDLE:
            return self.start_at
        if phase is Phase.DOWN:
            return self.up_at
        if phase is Phase.CLOSED:
            return NEVER
        if phase is Phase.REGISTERING:
            return self._last_sent + self._retry
        deadline = min(self._last_sent + self._hb, self._last_heard + self._expiry + 1)
        if phase is Phase.LEAVING:
            return min(deadline, self._leave_by)
        if self._churn:
            deadline = min(deadline, self._churn_at)
        if self.outstanding:
            deadline = min(deadline, self._resend_at)
        if self._sending and not self.plan.flood and len(self.outstanding) < self.plan.window:
            deadline = min(deadline, self._next_send)
        if self.files is not None and phase is Phase.READY:
            deadline = min(deadline, self.files.next_deadline())
        return deadline

    def on_frames(self, frames: list, now: int) -> list:
        """A message from the broker on the DEALER."""
        if self.phase in (Phase.CLOSED, Phase.DOWN, Phase.IDLE):
            return []
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.stats.error("bad_frame_from_broker", exc.message)
            return []
        self._last_heard = now
        msg = env.message
        kind = type(msg)
        if kind is ChatMessage:
            return self._on_message(env.msg_id, msg, now)
        files = self.files
        if kind is Ack:
            return [] if files is not None and files.on_ack(msg.ref) else self._on_ack(msg.ref, now)
        if kind is Registered:
            return self._on_registered(msg, now)
        if kind is Error:
            return [] if files is not None and files.on_error(msg, now) else self._on_error(msg, now)
        if kind is Receipt:
            self.stats.counters["receipts_received"] += 1
            return [self._frames(pack(Consume(env.msg_id), self._wall_ms()), now)]
        if files is not None and (answer := files.on_message(env, now)) is not None:
            return [self._frames(frames, now) for frames in answer]
        return []  # HEARTBEAT answers: hearing them is all that matters

    def on_publish(self, frames: list, now: int) -> None:
        """A presence frame on the SUB: count it, and time the watched users' changes."""
        counters = self.stats.counters
        counters["presence_frames"] += 1
        if not self.sub_live:
            self.sub_live = True
            counters["subscribed_now"] += 1
        if not self.watch:
            return
        try:
            msg = decode(frames).message
        except ProtocolError as exc:
            self.stats.error("bad_presence_frame", exc.message)
            return
        if type(msg) is PeerUpdate and msg.user in self.watch:
            self.stats.presence.setdefault(f"{msg.user}:{int(msg.online)}", []).append(now)

    def on_sub_closed(self) -> None:
        if self.sub_live:
            self.sub_live = False
            self.stats.counters["subscribed_now"] -= 1

    # --- handlers ----------------------------------------------------------------
    def _on_message(self, msg_id: bytes, msg: ChatMessage, now: int) -> list:
        stats = self.stats
        out = [self._frames(pack(Consume(msg_id), self._wall_ms()), now)]  # even for a duplicate: forget it
        body = msg.body
        if len(body) < BODY.size:
            stats.error("foreign_message", f"{msg.sender} sent a {len(body)}-byte body")
            return out
        tag, sender, seq, sent_ns = BODY.unpack_from(body)
        if tag != self.plan.run_tag:
            stats.error("foreign_message", f"{msg.sender} sent a body of another run")
            return out
        if not stats.record_received(sender, seq):
            stats.counters["duplicated"] += 1
            return out
        counters = stats.counters
        counters["received"] += 1
        record_ns(stats.latency, now - sent_ns)
        stats.last_receive_ns = now
        if seq < self._highest.get(sender, -1):
            counters["out_of_order"] += 1
        else:
            self._highest[sender] = seq
        if self.plan.receipts:
            receipt = Receipt(self.user, msg.sender, msg_id, ReceiptStatus.DELIVERED)
            out.append(self._frames(pack(receipt, self._wall_ms()), now))
        return out

    def _on_ack(self, ref: bytes, now: int) -> list:
        entry = self.outstanding.pop(ref, None)
        counters = self.stats.counters
        if entry is None:
            counters["acks_unmatched"] += 1  # the ACK of a copy re-sent after its first ACK
            return []
        counters["outstanding"] -= 1
        seq, sent_ns, _ = entry
        if self.stats.record_acked(self.index, seq):
            counters["acked"] += 1
            record_ns(self.stats.ack_latency, now - sent_ns)
        self._resend_at = now + RESEND_AFTER_NS  # progress
        if self._sending and self.phase is Phase.READY:
            return self._fill(now)
        if self.phase is Phase.LEAVING and not self.outstanding:
            return [self._frames(pack(Unregister(), self._wall_ms()), now)] + self._go_down(now, graceful=True)
        return []

    def _on_registered(self, msg: Registered, now: int) -> list:
        if self.phase is not Phase.REGISTERING:
            return []
        if msg.heartbeat_ms:  # §5.2: at least one frame every heartbeat_ms
            broker_hb = msg.heartbeat_ms * 1_000_000
            self._hb = min(int(self.plan.heartbeat * NS), broker_hb) if self.plan.heartbeat else broker_hb
            self._expiry = self._hb * self.plan.liveness
        self._set_phase(Phase.READY)
        counters = self.stats.counters
        if self._registered_once:
            counters["reconnects"] += 1
        else:
            self._registered_once = True
            counters["registered"] += 1
            record_ns(self.stats.register_latency, now - self._connected_at)
        if self._churn:
            self._churn_at = now + int(self.plan.churn_every * NS * (0.5 + self._rng.random()))
        out = self._resend(now)
        if self._sending:
            if not self.plan.flood and self._next_send < now:  # slots missed while away are skipped, not burst
                self.stats.counters["skipped_slots"] += (now - self._next_send) // self._interval
                self._next_send = now
            out += self._fill(now)
        return out

    def _on_error(self, msg: Error, now: int) -> list:
        code = msg.code
        stats = self.stats
        if code is ErrorCode.NOT_REGISTERED:  # the broker restarted and forgot us
            if self.phase in (Phase.READY, Phase.LEAVING):
                stats.counters["not_registered"] += 1
                return self._reregister(now)
            return []  # the answer to something sent before REGISTERED
        if code is ErrorCode.RATE_LIMITED:
            stats.error(code.value, f"{self.user}: {msg.message}")
            self._resend_at = now + RATE_LIMIT_BACKOFF_NS
            return []
        if self.phase is Phase.REGISTERING and code in (ErrorCode.ID_TAKEN, ErrorCode.ALREADY_REGISTERED,
                                                        ErrorCode.KEY_MISMATCH):
            stats.error(code.value, f"{self.user}: REGISTER refused: {msg.message}")
            self._retry = self._hb  # our own stale session may be expiring: keep trying, slowly
            return []
        if msg.ref is not None:
            entry = self.outstanding.pop(msg.ref, None)
            if entry is not None:  # refused, so never stored: failed, not lost
                stats.counters["outstanding"] -= 1
                stats.counters["failed"] += 1
        stats.error(code.value, f"{self.user}: {msg.message}")
        return []

    # --- helpers -------------------------------------------------------------------
    def _fill(self, now: int) -> list:
        """Messages due now: up to the window when flooding, else those the schedule says."""
        plan, out = self.plan, []
        count, window = plan.count, plan.window
        if plan.flood:
            while len(self.outstanding) < window and len(out) < window:
                if count and self.seq >= count:
                    self._finish_sending()
                    break
                out += self._message(now)
            return out
        if now - self._next_send > MAX_CATCH_UP_NS:  # far behind (e.g. was away): no burst
            self.stats.counters["skipped_slots"] += (now - self._next_send) // self._interval
            self._next_send = now
        sends = 0
        while now >= self._next_send and len(self.outstanding) < window and sends < MAX_SENDS_PER_TICK:
            if count and self.seq >= count:
                self._finish_sending()
                break
            if now - self._next_send > LATE_NS:
                self.stats.counters["late_sends"] += 1
            out += self._message(now)
            self._next_send += self._interval
            sends += 1
        return out

    def _finish_sending(self) -> None:
        self._sending = False
        self._mark_done()

    def _mark_done(self) -> None:
        if not self.done:
            self.done = True
            self.stats.counters["senders_done"] += 1

    def _message(self, now: int) -> list:
        stats, plan, index = self.stats, self.plan, self.index
        seq = self.seq
        self.seq = seq + 1
        stats.sent[index] = self.seq
        stats.counters["sent"] += 1
        if not stats.first_send_ns:
            stats.first_send_ns = now
        recipient = self.names[peer_of(index, plan, self._rng)]
        body = BODY.pack(plan.run_tag, index, seq, now) + self._padding
        if index == 0 and seq == plan.inject_drop:
            # TEST HOOK: behave as if the broker had acknowledged this message and then lost it.
            stats.counters["injected_drop"] += 1
            if stats.record_acked(index, seq):
                stats.counters["acked"] += 1
            return []
        copies = 2 if index == 0 and seq == plan.inject_dup else 1  # TEST HOOK: one message sent twice
        if copies == 2:
            stats.counters["injected_dup"] += 1
        out = []
        for _ in range(copies):
            msg_id = os.urandom(16)
            frames = pack(ChatMessage(self.user, recipient, body), self._wall_ms(), msg_id)
            if not self.outstanding:
                self._resend_at = now + RESEND_AFTER_NS
            self.outstanding[msg_id] = [seq, now, frames]
            stats.counters["outstanding"] += 1
            out.append(self._frames(frames, now))
        return out

    def _resend(self, now: int) -> list:
        """At-least-once: the unacknowledged messages again, same ids (the broker stores each id once)."""
        self._resend_at = now + RESEND_AFTER_NS
        if not self.outstanding:
            return []
        self.stats.counters["resent"] += len(self.outstanding)
        return [self._frames(entry[2], now) for entry in self.outstanding.values()]

    def _reregister(self, now: int) -> list:
        self._set_phase(Phase.REGISTERING)
        self._retry = REGISTER_RETRY_FIRST_NS
        self._last_heard = now
        return [self._register(now)]

    def _go_down(self, now: int, graceful: bool) -> list:
        self._set_phase(Phase.DOWN)
        if self.files is not None:
            self.files.abandon()
        self.up_at = now + int(self.plan.churn_down * NS)
        self._leave_by = NEVER
        return [Disconnect(graceful)]

    def _register(self, now: int) -> list:
        return self._frames(pack(Register(self.user, self.token, self.key), self._wall_ms()), now)

    def _frames(self, frames: list, now: int) -> list:
        self._last_sent = now
        return frames

    def _set_phase(self, phase: Phase) -> None:
        old = self.phase
        if old is phase:
            return
        counters = self.stats.counters
        if old is Phase.READY:
            counters["ready_now"] -= 1
        elif old is Phase.DOWN:
            counters["down_now"] -= 1
        if phase is Phase.READY:
            counters["ready_now"] += 1
        elif phase is Phase.DOWN:
            counters["down_now"] += 1
        self.phase = phase
