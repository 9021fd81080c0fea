"""One load-tool worker process: many scripted clients on one zmq.Context and one poll loop.

The shell around ``ScriptedClient`` (sans-I/O): it owns every socket of its
clients, a timer heap of their deadlines, and a pipe to the coordinator
(``client/load/coordinator.py``), and carries out what the cores return.

Readiness comes from epoll over each socket's ``ZMQ_FD`` rather than from
``zmq.Poller``: ``zmq_poll`` costs O(sockets) per call (about 1 us a socket, so
2 ms for 2,500 DEALERs), epoll costs O(ready ones). ``ZMQ_FD`` only says "the
socket's state may have changed" and a send can consume that signal, so every
socket we send on is re-checked (``ZMQ_EVENTS``) on the next turn of the loop
(libzmq ``zmq_getsockopt`` on ZMQ_FD/ZMQ_EVENTS).

Coordinator -> worker commands (dicts): ``ramp``, ``subscribe``,
``go``, ``stop``, ``report``, ``exit``. Worker -> coordinator: ``armed``,
``progress`` (every ``progress_every`` s), ``report``, ``bye``, ``crash``.
"""

from __future__ import annotations

import heapq
import logging
import resource
import select
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path
from dataclasses import dataclass

import zmq

from p2pchat.client.broker_trust import ADMIT_TIMEOUT, admit
from p2pchat.client.load.plan import NEVER, NS, ScriptPlan
from p2pchat.client.load.script import CONNECT, Connect, Crowd, ScriptedClient
from p2pchat.client.load.stats import ProcessStats
from p2pchat.common.crypto import Identity
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.protocol import MAX_HEADER_BYTES

log = logging.getLogger(__name__)

TIMER_BATCH = 1000  # timer events per loop turn before sockets get a turn
DRAIN_BATCH = 200  # messages read from one socket per loop turn
GRACEFUL_LINGER_MS = 500
FDS_PER_SOCKET = 2  # its mailbox eventfd and its TCP connection


def user_name(prefix: str, index: int) -> str:
    return f"{prefix}{index}"


def raise_nofile(wanted: int | None) -> int:
    """Raise RLIMIT_NOFILE's soft limit to ``wanted`` (default: the hard limit); returns the new soft limit.

    Raising the hard limit too works only with privileges; then it is tried, quietly.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted or hard
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    worker: int
    indices: range  # the clients this process runs
    plan: ScriptPlan
    user_prefix: str
    endpoint: str
    pub_endpoint: str
    server_key: bytes | None  # the broker's raw public key; None: plaintext (--insecure)
    key_service: ServerAddress | None  # where each client's key gets its admission ticket (with CURVE)
    subscribe: bool  # also open a SUB per client (subscribed on the coordinator's word)
    nofile: int | None
    progress_every: float = 0.1


def worker_main(spec: WorkerSpec, conn) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator owns shutdown
    # Thousands of sessions in one process: what each would log (reconnects, refusals, transfers) is counted
    # in the stats instead, so the library's cores log only what breaks.
    logging.getLogger("p2pchat.client.core").setLevel(logging.ERROR)
    try:
        Worker(spec, conn).run()
    except BaseException:  # reported, never lost
        try:
            conn.send({"type": "crash", "worker": spec.worker, "error": traceback.format_exc()})
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


class Worker:
    def __init__(self, spec: WorkerSpec, conn) -> None:
        self.spec = spec
        self.conn = conn
        self.stats = ProcessStats()
        self.crowd: Crowd | None = None
        self.subscribed = False
        self.stopped = False  # the coordinator said stop: progress from now on is final-ish
        self.running = True
        self.clients: dict[int, ScriptedClient] = {}
        self.curve: dict[int, tuple[bytes, bytes]] = {}  # index -> (z85 public, z85 secret)
        self.dealers: dict[int, zmq.Socket] = {}
        self.subs: dict[int, zmq.Socket] = {}
        self.owner: dict[zmq.Socket, tuple[ScriptedClient, bool]] = {}  # socket -> (client, is_sub)
        self.by_fd: dict[int, zmq.Socket] = {}
        self.heap: list[tuple[int, int]] = []
        self.scheduled: dict[int, int] = {}
        self.check: set[zmq.Socket] = set()
        self.ctx: zmq.Context | None = None
        self.nofile = 0
        self.epoll = select.epoll()

    # --- set-up and tear-down ---------------------------------------------------
    def arm(self) -> None:
        spec = self.spec
        self.nofile = raise_nofile(spec.nofile)
        self.ctx = zmq.Context()
        sockets_per_client = 2 if spec.subscribe else 1
        self.ctx.set(zmq.MAX_SOCKETS, len(spec.indices) * sockets_per_client * 2 + 64)  # churn reopens
        names = [user_name(spec.user_prefix, i) for i in range(spec.plan.clients)]
        scratch = None
        if spec.plan.file_every > 0:  # file traffic keeps transfer state and received files here, not on a disk
            shm = Path("/dev/shm")
            scratch = Path(tempfile.mkdtemp(prefix=f"p2pchat-load-{spec.worker}-", dir=shm if shm.is_dir() else None))
        self.crowd = crowd = Crowd(names, spec.plan, self.stats, wall_ms=lambda: int(time.time() * 1000),
                                   wall_time=time.time, scratch=scratch, stream=spec.worker)
        for index in spec.indices:
            identity = Identity.generate()
            if spec.key_service is not None:
                admit(spec.key_service, spec.key_service.port, names[index], identity.public, ADMIT_TIMEOUT)
            self.curve[index] = (identity.curve_public, identity.curve_secret)
            self.clients[index] = ScriptedClient(index, crowd, identity.public)
            self.scheduled[index] = NEVER
        self.epoll.register(self.conn.fileno(), select.EPOLLIN)

    def close(self) -> None:
        for index in list(self.dealers):
            self._close_sockets(self.clients[index], linger_ms=0)
        self.epoll.close()
        if self.ctx is not None:
            self.ctx.term()
        if self.crowd is not None and self.crowd.scratch is not None:
            shutil.rmtree(self.crowd.scratch, ignore_errors=True)

    # --- the loop -----------------------------------------------------------------
    def run(self) -> None:
        try:  # closed whatever happens, arming included: the scratch directory is on /dev/shm
            self.arm()
            self.conn.send({"type": "armed", "worker": self.spec.worker, "nofile": self.nofile})
            pipe_fd = self.conn.fileno()
            progress_ns = int(self.spec.progress_every * NS)
            next_progress = time.monotonic_ns()
            while self.running:
                self._run_timers()
                now = time.monotonic_ns()
                if now >= next_progress:
                    self._send({"type": "progress", "worker": self.spec.worker, "stopped": self.stopped,
                                **self.stats.progress()})
                    next_progress = now + progress_ns
                if self.check:
                    timeout = 0.0
                else:
                    due = min(self.heap[0][0] if self.heap else NEVER, next_progress)
                    timeout = max(0.0, (due - now) / NS)
                for fd, _ in self.epoll.poll(timeout):
                    if fd == pipe_fd:
                        self._commands()
                    else:
                        sock = self.by_fd.get(fd)
                        if sock is not None:
                            self.check.add(sock)
                self._drain()
        finally:
            self.close()
        self._send({"type": "bye", "worker": self.spec.worker})

    def _run_timers(self) -> None:
        heap, scheduled, clients = self.heap, self.scheduled, self.clients
        for _ in range(TIMER_BATCH):
            if not heap:
                return
            deadline, index = heap[0]
            now = time.monotonic_ns()
            if deadline > now:
                return
            heapq.heappop(heap)
            if scheduled[index] != deadline:
                continue  # superseded by an earlier deadline
            scheduled[index] = NEVER
            client = clients[index]
            self._execute(client, client.on_tick(now))
            self._reschedule(client)

    def _drain(self) -> None:
        check, self.check = self.check, set()
        owner = self.owner
        for sock in check:
            entry = owner.get(sock)
            if entry is None:
                continue  # closed meanwhile
            client, is_sub = entry
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                continue
            for _ in range(DRAIN_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if is_sub:
                    client.on_publish(frames, time.monotonic_ns())
                else:
                    self._execute(client, client.on_frames(frames, time.monotonic_ns()))
                    if sock not in owner:
                        break  # an output closed it
            else:
                self.check.add(sock)  # more waiting: after the others had their turn
            if not is_sub and sock in owner:
                self._execute(client, client.end_batch(time.monotonic_ns()))
            self._reschedule(client)

    def _reschedule(self, client: ScriptedClient) -> None:
        deadline = client.next_deadline()
        if deadline < self.scheduled[client.index]:
            self.scheduled[client.index] = deadline
            heapq.heappush(self.heap, (deadline, client.index))

    def _execute(self, client: ScriptedClient, outputs: list) -> None:
        counters = self.stats.counters
        for out in outputs:
            if type(out) is list:
                sock = self.dealers.get(client.index)
                if sock is None:
                    counters["send_no_socket"] += 1
                    continue
                try:
                    sock.send_multipart(out, zmq.NOBLOCK)
                except zmq.Again:  # not connected (IMMEDIATE) or at the HWM: what matters is re-sent
                    counters["send_again"] += 1
                self.check.add(sock)
            elif type(out) is Connect:
                self._open(client)
                self._execute(client, client.on_connected(time.monotonic_ns()))
            else:
                self._close_sockets(client, GRACEFUL_LINGER_MS if out.graceful else 0)

    # --- sockets --------------------------------------------------------------------
    def _socket(self, kind: int, index: int) -> zmq.Socket:
        assert self.ctx is not None
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES + 1024)
        if self.spec.server_key is not None:
            from zmq.utils import z85

            public, secret = self.curve[index]
            sock.curve_serverkey = z85.encode(self.spec.server_key)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        return sock

    def _track(self, sock: zmq.Socket, client: ScriptedClient, is_sub: bool) -> None:
        fd = sock.getsockopt(zmq.FD)
        self.owner[sock] = (client, is_sub)
        self.by_fd[fd] = sock
        self.epoll.register(fd, select.EPOLLIN)
        self.check.add(sock)

    def _open(self, client: ScriptedClient) -> None:
        self._close_sockets(client, 0)
        index = client.index
        dealer = self._socket(zmq.DEALER, index)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a broker that is not there (§1)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.setsockopt(zmq.RCVHWM, 100_000)
        dealer.connect(self.spec.endpoint)
        self.dealers[index] = dealer
        self._track(dealer, client, False)
        if self.spec.subscribe:
            sub = self._socket(zmq.SUB, index)
            if self.subscribed:
                sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.spec.pub_endpoint)
            self.subs[index] = sub
            self._track(sub, client, True)
        self.stats.counters["connects"] += 1

    def _close_sockets(self, client: ScriptedClient, linger_ms: int) -> None:
        for table in (self.dealers, self.subs):
            sock = table.pop(client.index, None)
            if sock is None:
                continue
            fd = sock.getsockopt(zmq.FD)
            self.epoll.unregister(fd)
            self.by_fd.pop(fd, None)
            self.owner.pop(sock, None)
            self.check.discard(sock)
            sock.close(linger=linger_ms)
            if table is self.subs:
                client.on_sub_closed()

    # --- the coordinator ------------------------------------------------------------
    def _send(self, message: dict) -> None:
        self.conn.send(message)

    def _commands(self) -> None:
        while self.conn.poll():
            command = self.conn.recv()
            getattr(self, "_cmd_" + command["cmd"])(command)

    def _cmd_ramp(self, command: dict) -> None:
        t0, ramp_ns, n = command["t0"], int(command["ramp"] * NS), self.spec.plan.clients
        for index, client in self.clients.items():
            client.start_at = t0 + ramp_ns * index // n
            self._reschedule(client)

    def _cmd_subscribe(self, command: dict) -> None:
        assert self.crowd is not None
        self.subscribed = True
        self.crowd.watch.update(command.get("watch", ()))
        for sub in self.subs.values():
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.check.add(sub)

    def _cmd_go(self, command: dict) -> None:
        for client in self.clients.values():
            self._execute(client, client.start_sending(time.monotonic_ns()))
            self._reschedule(client)

    def _cmd_stop(self, command: dict) -> None:
        self.stopped = True
        now = time.monotonic_ns()
        for client in self.clients.values():
            client.stop_sending()
            client.resume(now)
            self._reschedule(client)

    def _cmd_report(self, command: dict) -> None:
        report = self.stats.export()
        report.update(type="report", worker=self.spec.worker, cpu_s=time.process_time())
        self._send(report)

    def _cmd_exit(self, command: dict) -> None:
        now = time.monotonic_ns()
        for client in self.clients.values():
            self._execute(client, client.leave(now))
        self.running = False


__all__ = ["CONNECT", "FDS_PER_SOCKET", "WorkerSpec", "raise_nofile", "user_name", "worker_main"]
