"""The coordinator's presence probe: a client whose REGISTER and UNREGISTER are the timed presence changes.

It is the library's ``ClientSession`` (sealing off, no presence tracking, the
broker's heartbeat) on one DEALER with ``IMMEDIATE`` set: a send the socket
accepts goes out on a connection that is up, so the first REGISTER it accepts
starts the clock of the "online" change, and the UNREGISTER's send starts the
clock of the "offline" one.
"""

from __future__ import annotations

import os
import time

import zmq
from zmq.utils import z85

from p2pchat.client import events as ev
from p2pchat.client.broker_trust import ADMIT_TIMEOUT, admit
from p2pchat.client.core.actions import Action, Transmit
from p2pchat.client.core.session import ClientSession
from p2pchat.client.e2e import NO_SEALING
from p2pchat.client.load.result import RunFailed
from p2pchat.common.crypto import Identity
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.protocol import new_msg_id

TURN = 0.05  # seconds the probe waits for the broker before it ticks its session


def _wall_ms() -> int:
    return int(time.time() * 1000)


class ProbeClient:
    def __init__(self, ctx: zmq.Context, endpoint: str, server_key: bytes | None, user: str,
                 key_service: ServerAddress | None) -> None:
        self.user = user
        identity = Identity.generate()
        if key_service is not None:
            admit(key_service, key_service.port, user, identity.public, ADMIT_TIMEOUT)
        self.session = ClientSession(user, wall_ms=_wall_ms, heartbeat_ivl=None, e2e=NO_SEALING, key=identity.public,
                                     presence=False, delivery_receipts=False, read_receipts=False,
                                     token=os.urandom(32), new_id=new_msg_id)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # a send before the connection is up fails instead of waiting
        if server_key is not None:
            self.sock.curve_serverkey = z85.encode(server_key)
            self.sock.curve_publickey = identity.curve_public
            self.sock.curve_secretkey = identity.curve_secret
        self.sock.connect(endpoint)
        self._first_sent_ns: int | None = None

    def register(self, timeout: float = 10.0) -> int:
        """REGISTER (retried by the session until the connection is up) and wait for REGISTERED; its send time."""
        deadline = time.monotonic() + timeout
        self._first_sent_ns = None
        self._execute(self.session.start(time.monotonic()))
        while time.monotonic() < deadline:
            for event in self._turn():
                if type(event) is ev.Registered and self._first_sent_ns is not None:
                    return self._first_sent_ns
                if type(event) in (ev.RegisterFailed, ev.ErrorReported):
                    raise RunFailed(f"probe {self.user}: REGISTER refused: {event.error.code.value}: "
                                    f"{event.error.message}")
        raise RunFailed(f"probe {self.user}: no REGISTERED within {timeout:.0f}s")

    def keep_alive(self) -> None:
        """Answer the broker and heartbeat, without waiting."""
        self._turn(wait=0.0)

    def unregister(self) -> int:
        t0 = time.monotonic_ns()
        self._execute(self.session.close(time.monotonic()))
        return t0

    def close(self) -> None:
        self.sock.close(linger=200)

    def _turn(self, wait: float = TURN) -> list[ev.Event]:
        """What the broker sent, then the session's timers; the events of both."""
        events: list[ev.Event] = []
        if self.sock.poll(int(wait * 1000)):
            while self.sock.poll(0):
                events += self._execute(self.session.on_frames(self.sock.recv_multipart(), time.monotonic()))
            events += self._execute(self.session.end_batch(time.monotonic()))
        return events + self._execute(self.session.on_tick(time.monotonic()))

    def _execute(self, actions: list[Action]) -> list[ev.Event]:
        events = []
        for action in actions:
            if type(action) is not Transmit:
                events.append(action.event)
                continue
            sent_ns = time.monotonic_ns()
            try:
                self.sock.send_multipart(action.frames, zmq.NOBLOCK)
            except zmq.Again:
                continue  # not connected yet: the session sends REGISTER again
            if self._first_sent_ns is None:
                self._first_sent_ns = sent_ns
        return events
