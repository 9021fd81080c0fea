"""The load tool's scripted client: one user's script, driving the library's ``ClientSession``.

The protocol is the chat client's own (``client/core/session.py``: REGISTER
retried at 20 ms doubling, heartbeats, re-register on silence or
``not_registered``, at-least-once re-sends, CONSUME, receipts; file transfers
through ``client/core/transfer.py``), run with the load switches: no history,
sealing off (``e2e.NO_SEALING``: the load tool measures the broker, not client
crypto), no presence tracking, the broker's heartbeat interval, no threads.
What stays here is the script: when to connect, send, churn and leave; to whom;
the body's stamp (``plan.BODY``: run tag, sender index, sequence number, send
time, then padding) that lets a receiver tell loss, duplicates, reordering and
one-way latency per sender; the ledgers and counters; the test hooks.

Sans-I/O: frames and ``now`` (CLOCK_MONOTONIC nanoseconds, the same clock in
every process on a host) go in; outputs come out: frames to send on the
client's DEALER, or ``Connect`` / ``Disconnect`` for the shell
(``client/load/worker.py``) to open or close its sockets. Thousands share one
process, one ``Crowd`` and one poll loop.

Script phases (the session's own states live in the session):

    phase        input                              outputs                      next
    IDLE         tick >= start_at                   Connect                      (shell: on_connected)
    (any)        on_connected                       REGISTER                     REGISTERING
    REGISTERING  the session registered             unacknowledged messages      READY
    READY        the session reconnects             REGISTER                     REGISTERING
    READY        tick, churn due (graceful)         -                            LEAVING
    READY        tick, churn due (crash)            Disconnect(graceful=False)   DOWN
    LEAVING      all acked, or 2 s                  UNREGISTER, Disconnect(True) DOWN
    DOWN         tick >= up_at                      Connect                      (shell: on_connected)
    (any)        leave()                            UNREGISTER if READY, Disconnect  CLOSED
"""

from __future__ import annotations

import enum
import functools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Transmit
from p2pchat.client.core.session import ClientSession, State
from p2pchat.client.e2e import NO_SEALING
from p2pchat.client.load.files import FileScript, make_transfers, write_source
from p2pchat.client.load.plan import BODY, NEVER, NS, ScriptPlan, peer_of
from p2pchat.client.load.stats import ProcessStats, record_ns
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.protocol import MSG_ID_BYTES, ChatMessage, Error, Envelope, PeerUpdate, decode

LEAVE_TIMEOUT_NS = 2 * NS  # graceful churn waits this long at most for outstanding ACKs
LATE_NS = 10_000_000  # a paced send this late counts as late (the load generator is not keeping up)
MAX_CATCH_UP_NS = NS  # further behind than this, the schedule restarts from now instead of bursting
MAX_SENDS_PER_TICK = 100
# The session's deadlines are float seconds; a tick this long after one is surely past it.
DEADLINE_MARGIN_NS = 1_000


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


@dataclass(slots=True)
class Crowd:
    """What every scripted client of one worker process shares (so that each client holds only its own state)."""

    names: Sequence[str]
    plan: ScriptPlan
    stats: ProcessStats
    wall_ms: Callable[[], int]
    wall_time: Callable[[], float]
    scratch: Path | None = None  # where file traffic keeps its state (needed with plan.file_every)
    stream: int = 0  # which of the run's random streams (one per worker process, from the plan's seed)
    watch: set[str] = field(default_factory=set)  # users whose presence changes are timed
    rng: random.Random = field(init=False)
    new_id: Callable[[], bytes] = field(init=False)  # message ids: unique, not secret (sealing is off)
    interval: int = field(init=False)  # ns between a paced sender's messages
    padding: bytes = field(init=False)
    everyone: frozenset[str] = field(init=False)
    file_source: Path | None = field(init=False)

    def __post_init__(self) -> None:
        plan = self.plan
        self.rng = random.Random(plan.seed * 1_000_003 + self.stream)
        # os.urandom costs a system call per id (13% of a flooding worker's CPU); a generator seeded from it
        # once per process keeps ids unique across workers and runs at a fraction of the cost.
        self.new_id = functools.partial(random.Random(os.urandom(32)).randbytes, MSG_ID_BYTES)
        self.interval = int(NS / plan.rate) if plan.rate > 0 else NEVER
        self.padding = bytes(max(0, plan.size - BODY.size))
        self.everyone = frozenset(self.names)
        self.file_source = None
        if plan.file_every > 0:
            assert self.scratch is not None, "file traffic needs a scratch directory"
            self.file_source = write_source(self.scratch, plan.file_size, plan.seed)


class ScriptedClient:
    __slots__ = (
        "index", "user", "crowd", "session", "phase", "start_at", "up_at", "_connected_at", "_registered_once",
        "_sending", "_next_send", "seq", "outstanding", "_churn", "_churn_at", "_leave_by", "_highest", "sub_live",
        "done", "files",
    )

    def __init__(self, index: int, crowd: Crowd, key: bytes) -> None:
        """``key``: the raw X25519 public key to register with (with CURVE, this connection's key)."""
        self.index = index
        self.user = user = crowd.names[index]
        self.crowd = crowd
        plan = crowd.plan
        transfers = None
        if plan.file_every > 0:
            assert crowd.scratch is not None
            transfers = make_transfers(user, crowd.scratch, crowd.wall_ms, crowd.wall_time, crowd.new_id)
            transfers.on_peers(crowd.everyone, 0.0)  # presence is off: every peer counts as online
        # The session keeps its token across reconnects: a crash-churned client takes its session back.
        self.session = ClientSession(user, wall_ms=crowd.wall_ms, heartbeat_ivl=plan.heartbeat or None,
                                     liveness=plan.liveness, e2e=NO_SEALING, key=key, transfers=transfers,
                                     presence=False, delivery_receipts=plan.receipts, read_receipts=False,
                                     token=crowd.rng.randbytes(32), new_id=crowd.new_id)
        self.phase = Phase.IDLE
        self.start_at = NEVER
        self.up_at = NEVER
        self._connected_at = 0
        self._registered_once = False
        self._sending = False
        self._next_send = NEVER
        self.seq = 0  # the next sequence number
        self.outstanding: dict[bytes, tuple[int, int]] = {}  # msg id -> (seq, sent ns): sent, not yet acked
        self._churn = plan.churn_every > 0
        self._churn_at = NEVER
        self._leave_by = NEVER
        self._highest: dict[int, int] | None = None  # sender index -> highest seq received from it
        self.sub_live = False  # the SUB has delivered something since it was (re)opened
        self.done = False  # sent its ``count`` messages (or never sends)
        self.files = FileScript(self) if transfers is not None else None

    # --- commands from the shell ----------------------------------------------
    @property
    def is_sender(self) -> bool:
        plan = self.crowd.plan
        return plan.sends and self.index < plan.senders

    def on_connected(self, now: int) -> list:
        """The shell opened fresh sockets: register on them."""
        self._set_phase(Phase.REGISTERING)
        self._connected_at = now
        return self._run(self.session.start(now / NS), now, ticked=False)

    def start_sending(self, now: int) -> list:
        if self.files is not None and self.index < self.crowd.plan.senders:
            self.files.start(now)
        if not self.is_sender or self.done:
            self._mark_done()
            return []
        self._sending = True
        if not self.crowd.plan.flood:  # spread the senders over one interval
            self._next_send = now + int(self.crowd.rng.random() * self.crowd.interval)
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
        if self.phase not in (Phase.IDLE, Phase.DOWN, Phase.CLOSED):
            out = [a.frames for a in self.session.close(now / NS) if type(a) is Transmit]  # UNREGISTER
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
        if phase is Phase.LEAVING and (not self.outstanding or now >= self._leave_by):
            return self._go_down(now, graceful=True)
        if phase is Phase.READY and now >= self._churn_at:
            self.crowd.stats.counters["churns"] += 1
            if self.crowd.plan.churn_crash:
                return self._go_down(now, graceful=False)
            self._set_phase(Phase.LEAVING)
            self._leave_by = now + LEAVE_TIMEOUT_NS
            if not self.outstanding:
                return self._go_down(now, graceful=True)
        out = self._run(self.session.on_tick(now / NS), now, ticked=True)
        if self._sending and self.phase is Phase.READY:  # not once LEAVING (churn just began)
            out += self._fill(now)
        if self.files is not None and self.phase is Phase.READY:
            out += self._run(self.files.on_tick(now), now, ticked=False)
        return out

    def next_deadline(self) -> int:
        phase = self.phase
        if phase is Phase.IDLE:
            return self.start_at
        if phase is Phase.DOWN:
            return self.up_at
        if phase is Phase.CLOSED:
            return NEVER
        deadline = int(self.session.next_deadline() * NS) + DEADLINE_MARGIN_NS
        if phase is Phase.LEAVING:
            return min(deadline, self._leave_by)
        if phase is Phase.READY:
            deadline = min(deadline, self._churn_at)
            plan = self.crowd.plan
            if self._sending and not plan.flood and len(self.outstanding) < plan.window:
                deadline = min(deadline, self._next_send)
            if self.files is not None:
                deadline = min(deadline, self.files.next_deadline())
        return deadline

    def on_frames(self, frames: list, now: int) -> list:
        """A message from the broker on the DEALER: looked at for the ledgers, then handed to the session."""
        if self.phase in (Phase.CLOSED, Phase.DOWN, Phase.IDLE):
            return []
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.crowd.stats.error("bad_frame_from_broker", exc.message)
            return []
        kind = type(env.message)
        if kind is ChatMessage:
            self._observe_message(env, now)
        elif kind is Error and env.message.code is ErrorCode.RATE_LIMITED:  # the session backs off, silently
            self.crowd.stats.error(ErrorCode.RATE_LIMITED.value, f"{self.user}: {env.message.message}")
        return self._run(self.session.on_envelope(env, now / NS), now, ticked=False)

    def end_batch(self, now: int) -> list:
        """The shell has handed over what the DEALER had: the batch's consumes go out as one frame."""
        return self._run(self.session.end_batch(now / NS), now, ticked=False)

    def on_publish(self, frames: list, now: int) -> None:
        """A presence frame on the SUB: count it, and time the watched users' changes."""
        crowd = self.crowd
        counters = crowd.stats.counters
        counters["presence_frames"] += 1
        if not self.sub_live:
            self.sub_live = True
            counters["subscribed_now"] += 1
        if not crowd.watch:
            return
        try:
            msg = decode(frames).message
        except ProtocolError as exc:
            crowd.stats.error("bad_presence_frame", exc.message)
            return
        if type(msg) is PeerUpdate and msg.user in crowd.watch:
            crowd.stats.presence.setdefault(f"{msg.user}:{int(msg.online)}", []).append(now)

    def on_sub_closed(self) -> None:
        if self.sub_live:
            self.sub_live = False
            self.crowd.stats.counters["subscribed_now"] -= 1

    # --- what the session did ------------------------------------------------------
    def _run(self, actions: list[Action], now: int, ticked: bool) -> list:
        """The session's actions: frames for the shell; events into the script and its counters."""
        out = []
        for action in actions:
            if type(action) is Transmit:
                out.append(action.frames)
                continue
            event = action.event
            kind = type(event)
            if kind is ev.MessageReceived:
                continue  # counted from the envelope (``_observe_message``): its body is binary
            if kind is ev.Acked:
                out += self._on_ack(event.msg_id, now)
            elif kind is ev.Registered:
                out += self._on_registered(now)
            elif kind is ev.Reconnecting:
                self.crowd.stats.counters["silences" if ticked else "not_registered"] += 1
                self._set_phase(Phase.REGISTERING)
            elif kind is ev.Receipt:
                self.crowd.stats.counters["receipts_received"] += 1
            elif kind is ev.SendFailed:
                self._on_send_failed(event)
            elif kind in (ev.ErrorReported, ev.RegisterFailed):
                self.crowd.stats.error(event.error.code.value, f"{self.user}: {event.error.message}")
                if self.session.state is State.CLOSED:  # refused at its first REGISTER, or replaced: it is over
                    self._set_phase(Phase.CLOSED)
            elif self.files is not None:
                self.files.on_event(event, now)
        return out

    def _observe_message(self, env: Envelope, now: int) -> None:
        """The ledgers: loss, duplicates and reordering per sender, and one-way latency."""
        msg = env.message
        stats = self.crowd.stats
        body = msg.body
        if len(body) < BODY.size:
            stats.error("foreign_message", f"{msg.sender} sent a {len(body)}-byte body")
            return
        tag, sender, seq, sent_ns = BODY.unpack_from(body)
        if tag != self.crowd.plan.run_tag:
            stats.error("foreign_message", f"{msg.sender} sent a body of another run")
            return
        counters = stats.counters
        if not stats.record_received(sender, seq):
            counters["duplicated"] += 1
            return
        counters["received"] += 1
        record_ns(stats.latency, now - sent_ns)
        stats.last_receive_ns = now
        highest = self._highest
        if highest is None:
            highest = self._highest = {}
        if seq < highest.get(sender, -1):
            counters["out_of_order"] += 1
        else:
            highest[sender] = seq

    def _on_ack(self, ref: bytes, now: int) -> list:
        entry = self.outstanding.pop(ref, None)
        stats = self.crowd.stats
        counters = stats.counters
        if entry is None:
            if self.files is None or not self.files.owns(ref):
                counters["acks_unmatched"] += 1  # the ACK of a copy re-sent after its first ACK, or a receipt's
            return []
        counters["outstanding"] -= 1
        seq, sent_ns = entry
        if stats.record_acked(self.index, seq):
            counters["acked"] += 1
            record_ns(stats.ack_latency, now - sent_ns)
        if self._sending and self.phase is Phase.READY:
            return self._fill(now)
        if self.phase is Phase.LEAVING and not self.outstanding:
            return self._go_down(now, graceful=True)
        return []

    def _on_send_failed(self, event: ev.SendFailed) -> None:
        if self.outstanding.pop(event.msg_id, None) is not None:  # refused, so never stored: failed, not lost
            self.crowd.stats.counters["outstanding"] -= 1
            self.crowd.stats.counters["failed"] += 1
        self.crowd.stats.error(event.error.code.value, f"{self.user}: {event.error.message}")

    def _on_registered(self, now: int) -> list:
        self._set_phase(Phase.READY)
        crowd = self.crowd
        counters = crowd.stats.counters
        if self._registered_once:
            counters["reconnects"] += 1
        else:
            self._registered_once = True
            counters["registered"] += 1
            record_ns(crowd.stats.register_latency, now - self._connected_at)
        plan = crowd.plan
        if self._churn:
            self._churn_at = now + int(plan.churn_every * NS * (0.5 + crowd.rng.random()))
        if not self._sending:
            return []
        if not plan.flood and self._next_send < now:  # slots missed while away are skipped, not burst
            counters["skipped_slots"] += (now - self._next_send) // crowd.interval
            self._next_send = now
        return self._fill(now)

    # --- the script ---------------------------------------------------------------
    def _fill(self, now: int) -> list:
        """Messages due now: up to the window when flooding, else those the schedule says."""
        crowd = self.crowd
        plan, out = crowd.plan, []
        count, window = plan.count, plan.window
        if plan.flood:
            while len(self.outstanding) < window and len(out) < window:
                if count and self.seq >= count:
                    self._finish_sending()
                    break
                out += self._message(now)
            return out
        if now - self._next_send > MAX_CATCH_UP_NS:  # far behind (e.g. was away): no burst
            crowd.stats.counters["skipped_slots"] += (now - self._next_send) // crowd.interval
            self._next_send = now
        sends = 0
        while now >= self._next_send and len(self.outstanding) < window and sends < MAX_SENDS_PER_TICK:
            if count and self.seq >= count:
                self._finish_sending()
                break
            if now - self._next_send > LATE_NS:
                crowd.stats.counters["late_sends"] += 1
            out += self._message(now)
            self._next_send += crowd.interval
            sends += 1
        return out

    def _finish_sending(self) -> None:
        self._sending = False
        self._mark_done()

    def _mark_done(self) -> None:
        if not self.done:
            self.done = True
            self.crowd.stats.counters["senders_done"] += 1

    def _message(self, now: int) -> list:
        crowd = self.crowd
        stats, plan, index = crowd.stats, crowd.plan, self.index
        seq = self.seq
        self.seq = seq + 1
        stats.sent[index] = self.seq
        stats.counters["sent"] += 1
        if not stats.first_send_ns:
            stats.first_send_ns = now
        recipient = crowd.names[peer_of(index, plan, crowd.rng)]
        body = BODY.pack(plan.run_tag, index, seq, now) + crowd.padding
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
            msg_id = self.crowd.new_id()
            self.outstanding[msg_id] = (seq, now)
            stats.counters["outstanding"] += 1
            out += self._run(self.session.send_text(recipient, body, now / NS, msg_id), now, ticked=False)
        return out

    def _go_down(self, now: int, graceful: bool) -> list:
        out = self._run(self.session.leave(now / NS, unregister=graceful), now, ticked=False)
        self._set_phase(Phase.DOWN)
        self.up_at = now + int(self.crowd.plan.churn_down * NS)
        self._leave_by = NEVER
        return out + [Disconnect(graceful)]

    def _set_phase(self, phase: Phase) -> None:
        old = self.phase
        if old is phase:
            return
        counters = self.crowd.stats.counters
        if old is Phase.READY:
            counters["ready_now"] -= 1
        elif old is Phase.DOWN:
            counters["down_now"] -= 1
        if phase is Phase.READY:
            counters["ready_now"] += 1
        elif phase is Phase.DOWN:
            counters["down_now"] += 1
        self.phase = phase
