"""The processes of bench_rooms.py: the library's ``ClientSession`` cores on DEALERs, many in one process.

``SessionLoop`` is a shell like the load tool's worker (client/load/worker.py), cut down to what a room of 100
needs and with the security the load tool leaves out: sealing on (an ``EndToEnd`` with keys in memory, a
``MemorySenderKeys`` per session), rooms and devices on as in ``ChatClient``, CURVE with each session's key
admitted by the key service. No history (a member's SQLite commits would be on its own machine), no presence,
the broker's heartbeat interval. A ``zmq.Poller`` over a few dozen DEALERs (the load worker's epoll pays off at
thousands). One thread per process: 50 members in a process share one GIL, not 50 agent threads.

``members_main``: one process of members; reports ("got", tag, i, first, last) once every one of its members has
message ``i`` of ``tag`` (perf_counter_ns of the first and the last of them, taken when its session has opened it).
``sender_main``: the room's owner; creates the room, invites the members, and sends on command at a fixed rate,
to the room (one seal) or one-to-one to every member (a seal per member), reporting perf_counter_ns taken before
each message was sealed. perf_counter_ns is CLOCK_MONOTONIC: the same clock in every process of this machine.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

import zmq
from zmq.utils import z85

from p2pchat.client import events as ev
from p2pchat.client.broker_trust import ADMIT_TIMEOUT, admit
from p2pchat.client.core.actions import Transmit
from p2pchat.client.core.session import ClientSession
from p2pchat.client.e2e import EndToEnd, MemoryKeys
from p2pchat.client.sender_keys import MemorySenderKeys
from p2pchat.common.crypto import Identity
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.protocol import new_msg_id
from p2pchat.common.protocol_rooms import MAX_INVITE_BATCH, RoomCreate, RoomInvite, RoomJoin

DRAIN_BATCH = 200  # frames read from one DEALER before the others get a turn
STEP_S = 1.0  # longest poll: frames, the pipe and the sessions' deadlines end it sooner (fewer idle wake-ups)
FAILURES = (ev.SendFailed, ev.ErrorReported, ev.RegisterFailed, ev.Stopped)  # a run with any is not a figure


class CountingEndToEnd(EndToEnd):
    """Counts pairwise seals (one per recipient device): the baseline's cost, and a room's key distribution."""

    pairwise = 0

    def seal(self, *args, **kwargs) -> bytes:
        self.pairwise += 1
        return super().seal(*args, **kwargs)

    def seal_to(self, *args, **kwargs) -> bytes:
        self.pairwise += 1
        return super().seal_to(*args, **kwargs)


def _wall_ms() -> int:
    return int(time.time() * 1000)


class SessionLoop:
    """Sessions on DEALERs in one thread: poll, hand frames to the cores, send what they return, run their
    deadlines; each event goes to ``on_event(session, event)``."""

    def __init__(self, port: int, server_key: bytes, on_event: Callable[[ClientSession, object], None]) -> None:
        self.port, self.server_key, self.on_event = port, server_key, on_event
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.sessions: dict[zmq.Socket, ClientSession] = {}
        self.sockets: dict[str, zmq.Socket] = {}
        self.deadlines: dict[zmq.Socket, float] = {}  # each session's next_deadline, as of its last call
        self.registered = 0

    def add(self, user: str) -> ClientSession:
        identity = Identity.generate()
        service = ServerAddress("127.0.0.1", self.port)
        admit(service, self.port + 2, user, identity.public, ADMIT_TIMEOUT)  # as ChatClient does on first use
        e2e = CountingEndToEnd(user, identity, MemoryKeys(), MemoryKeys(), broker_key=self.server_key)
        session = ClientSession(user, wall_ms=_wall_ms, heartbeat_ivl=None, e2e=e2e, token=os.urandom(32),
                                new_id=new_msg_id, presence=False, devices=True, device_name="bench", rooms=True,
                                sender_key_store=MemorySenderKeys())
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # a REGISTER before the connection is up is dropped, and retried
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.curve_serverkey = z85.encode(self.server_key)
        sock.curve_publickey = identity.curve_public
        sock.curve_secretkey = identity.curve_secret
        sock.connect(f"tcp://127.0.0.1:{self.port}")
        self.sessions[sock] = session
        self.sockets[user] = sock
        self.poller.register(sock, zmq.POLLIN)
        self.execute(session, session.start(time.monotonic()))
        return session

    def execute(self, session: ClientSession, actions: list) -> None:
        sock = self.sockets[session.user]
        for action in actions:
            if type(action) is Transmit:
                try:
                    sock.send_multipart(action.frames, zmq.NOBLOCK)
                except zmq.Again:  # not connected yet: the session sends REGISTER again, and what is unacked
                    pass
            else:
                if type(action.event) is ev.Registered:
                    self.registered += 1
                self.on_event(session, action.event)
        self.deadlines[sock] = session.next_deadline()

    def step(self, timeout: float, pipe: Connection | None = None) -> bool:
        """One turn: wait up to ``timeout`` s (less if a deadline comes first) for frames; True if ``pipe`` has
        something to read."""
        now = time.monotonic()
        wait_s = max(0.0, min(timeout, min(self.deadlines.values(), default=now + timeout) - now))
        wait_ms = math.ceil(wait_s * 1000)  # zmq_poll takes whole ms: rounded down, the last one is a busy wait
        ready = dict(self.poller.poll(wait_ms))
        for sock in ready:
            session = self.sessions.get(sock)
            if session is None:
                continue  # the pipe
            for _ in range(DRAIN_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.execute(session, session.on_frames(frames, time.monotonic()))
            self.execute(session, session.end_batch(time.monotonic()))
        now = time.monotonic()
        for sock, deadline in list(self.deadlines.items()):
            if deadline <= now:
                session = self.sessions[sock]
                self.execute(session, session.on_tick(now))
        return pipe is not None and pipe.fileno() in ready

    def commands(self, pipe: Connection) -> Iterator[tuple]:
        """The coordinator's commands as they come, the sessions running meanwhile; ends at ("stop",)."""
        self.poller.register(pipe.fileno(), zmq.POLLIN)
        while True:
            if self.step(STEP_S, pipe):
                command = pipe.recv()
                if command[0] == "stop":
                    return
                yield command

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
            self.step(STEP_S)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.ctx.term()


def _failure(conn: Connection, session: ClientSession, event: object) -> None:
    """A failure is reported to the coordinator, which ends the run with it; other events need nothing here."""
    if isinstance(event, FAILURES):
        conn.send(("error", f"{session.user}: {type(event).__name__}: {event.error}"))


def members_main(worker: int, users: list[str], port: int, server_key: bytes, conn: Connection,
                 timeout: float) -> None:
    """One process of room members (module docstring); commands: ("join", rid), ("stop",)."""
    counts: dict[tuple[str, int], list[int]] = {}  # (tag, i) -> [members that have it, first ns, last ns]
    joins: set[bytes] = set()  # join requests not answered yet

    def on_event(session: ClientSession, event: object) -> None:
        if type(event) is ev.MessageReceived:
            now = time.perf_counter_ns()
            tag, i, _ = event.text.split(" ", 2)
            entry = counts.setdefault((tag, int(i)), [0, now, now])
            entry[0] += 1
            entry[2] = now
            if entry[0] == len(users):
                conn.send(("got", tag, int(i), entry[1], entry[2]))
                del counts[tag, int(i)]
        elif type(event) is ev.RoomUpdated:
            joins.discard(event.ref)
        else:
            _failure(conn, session, event)

    loop = SessionLoop(port, server_key, on_event)
    try:
        for user in users:
            loop.add(user)
        loop.run_until(lambda: loop.registered == len(users), timeout, "registering")
        conn.send(("ready", worker))
        for _, rid in loop.commands(conn):  # ("join", rid)
            for session in loop.sessions.values():
                msg_id, actions = session.room_request(RoomJoin(rid), time.monotonic())
                joins.add(msg_id)
                loop.execute(session, actions)
            loop.run_until(lambda: not joins, timeout, "joining")
            conn.send(("joined", worker))
    finally:
        loop.close()


def sender_main(user: str, members: list[str], port: int, server_key: bytes, conn: Connection, text_bytes: int,
                timeout: float) -> None:
    """The room's owner (module docstring); commands: ("send", "room"|"direct", tag, count, interval s), ("stop",).
    Answers each with ("sent", tag, {"t0": [ns per message], "seals": ..., "pairwise": ..., "late_ms": ...})
    once the broker has acknowledged everything it sent."""
    answers: dict[bytes, object] = {}  # request id -> its RoomUpdated
    unacked: set[bytes] = set()

    def on_event(session: ClientSession, event: object) -> None:
        if type(event) is ev.Acked:
            unacked.discard(event.msg_id)
        elif type(event) is ev.RoomUpdated and event.ref is not None:
            answers[event.ref] = event
        elif type(event) is not ev.Receipt:  # the members' delivered receipts of direct messages
            _failure(conn, session, event)

    def ask(message) -> ev.RoomUpdated:
        msg_id, actions = session.room_request(message, time.monotonic())
        loop.execute(session, actions)
        loop.run_until(lambda: msg_id in answers, timeout, type(message).__name__)
        return answers.pop(msg_id)  # type: ignore[return-value]

    loop = SessionLoop(port, server_key, on_event)
    try:
        session = loop.add(user)
        loop.run_until(lambda: loop.registered == 1, timeout, "registering")
        rid = ask(RoomCreate("bench")).room.rid
        for start in range(0, len(members), MAX_INVITE_BATCH):
            ask(RoomInvite(rid, tuple(members[start:start + MAX_INVITE_BATCH])))
        conn.send(("room", rid))
        for _, mode, tag, count, interval in loop.commands(conn):
            keys_before, pairwise_before = session.sender_keys.seals, session.e2e.pairwise
            t0s, late = [], 0
            start = time.perf_counter_ns()
            for i in range(count):
                due = start + int(i * interval * 1e9)
                while (now := time.perf_counter_ns()) < due:
                    loop.step((due - now) / 1e9)
                late = max(late, now - due)
                body = f"{tag} {i} ".encode()
                body += b"x" * max(0, text_bytes - len(body))
                t0s.append(time.perf_counter_ns())  # before sealing
                if mode == "room":
                    msg_id = new_msg_id()
                    unacked.add(msg_id)
                    loop.execute(session, session.send_room_text(rid, body, time.monotonic(), msg_id))
                else:
                    for member in members:
                        msg_id = new_msg_id()
                        unacked.add(msg_id)
                        loop.execute(session, session.send_text(member, body, time.monotonic(), msg_id))
            loop.run_until(lambda: not unacked, timeout, f"acknowledgements of {tag}")
            conn.send(("sent", tag, {"t0": t0s, "seals": session.sender_keys.seals - keys_before,
                                     "pairwise": session.e2e.pairwise - pairwise_before, "late_ms": late / 1e6}))
    finally:
        loop.close()
