"""The broker's ZeroMQ shell: a ROUTER for requests, a PUB for presence.

It polls, hands frames to ``BrokerCore`` and carries out the actions. Every
send is non-blocking with ROUTER_MANDATORY, so an unroutable or slow peer is
reported instead of silently dropped or stalling everyone else. The core's
ports come from a ``Backend``: a single broker's (SQLite, in process) or a
cluster's (Redis); that choice, in ``open_backend``, is the only place where
the two modes differ.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from p2pchat.broker.backends.single import SingleBackend
from p2pchat.broker.backends.tickets import KeyLimits
from p2pchat.broker.core.actions import Action, Publish, Relay, Send
from p2pchat.broker.core.pake_slots import PakeRendezvous
from p2pchat.broker.backends.room_files import DiskRoomFileStore
from p2pchat.broker.core.room_files import RoomFileLimits
from p2pchat.broker.core.ports import BrokerLink, PeerDirectory, QueueLimits, QueueStore, RoomRegistry, StoreUnavailable
from p2pchat.broker.core.ratelimit import RateLimits
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.broker.shell.backlog import SendBacklog
from p2pchat.broker.shell.connguard import LIBC, ConnectionGuard, GuardLimits
from p2pchat.broker.shell.keyservice import AdmissionRegistry, KeyServiceCore, KeyServiceLimits, KeyServiceListener
from p2pchat.common.crypto import Identity, fingerprint
from p2pchat.common.errors import P2PChatError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.paths import broker_dir, ensure_private_dir
from p2pchat.common.protocol import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, new_msg_id
from p2pchat.common.wakeup import Waker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    pub_port: int | None = None  # port + 1 unless given
    data_dir: Path = field(default_factory=broker_dir)
    heartbeat_ivl: float = 1.0
    liveness: int = 3
    insecure: bool = False  # plaintext transport, for debugging only
    key_port: int | None = None  # port + 2 unless given; plain TCP key service: trust on first use, admission
    limits: RateLimits = RateLimits()
    durable: bool = True  # store-and-forward in SQLite; False: relay to online peers only
    fsync: bool = False  # also survive power loss, not just a killed broker
    queue: QueueLimits = QueueLimits()
    cluster: str | None = None  # redis://HOST:PORT/DB: share directory, keys, queues and presence (redis_cluster.py)
    reuse_port: bool = False  # SO_REUSEPORT: several brokers listen on one port and the kernel spreads clients
    io_threads: int = 1  # libzmq I/O threads: connections (and their CURVE work) are spread over them
    key_limits: KeyLimits = KeyLimits()
    key_service: KeyServiceLimits = KeyServiceLimits()
    guard: GuardLimits = GuardLimits()
    zmtp_heartbeat_ivl: float = 10.0  # ZMTP pings on idle connections; a silent peer is dropped after 3 of them
    room_files_dir: Path | None = None  # the rooms' sealed files (default <data_dir>/room-files; one for a cluster)
    room_files: RoomFileLimits = RoomFileLimits()

    @property
    def publish_port(self) -> int:
        return self.pub_port if self.pub_port is not None else self.port + 1

    @property
    def key_service_port(self) -> int:
        return self.key_port if self.key_port is not None else self.port + 2


class Backend(Protocol):
    """The core's ports and what the shell does with them: ``backends/single.py`` or ``backends/redis_cluster.py``."""

    identity: Identity  # the broker's CURVE keypair
    directory: PeerDirectory
    store: QueueStore
    keys: AdmissionRegistry
    link: BrokerLink
    rooms: RoomRegistry
    pake_slots: PakeRendezvous  # the key service's link slots
    description: str  # for the start-up log line

    def start(self) -> None: ...

    def commit(self) -> None:
        """Make the batch's queue writes and link sends durable; ``StoreUnavailable`` (batch undone) if not."""

    def rollback(self) -> None: ...

    def close(self) -> None: ...


def open_backend(config: BrokerConfig, epoch: bytes, wake: Callable[[], None]) -> Backend:
    if not config.cluster:
        return SingleBackend(config.data_dir, epoch, durable=config.durable, fsync=config.fsync,
                             queue_limits=config.queue, key_limits=config.key_limits)
    from p2pchat.broker.backends.redis_cluster import ClusterBackend  # Redis is needed only in cluster mode

    return ClusterBackend(config.cluster, epoch, config.data_dir, heartbeat_ivl=config.heartbeat_ivl,
                          liveness=config.liveness, wake=wake, durable=config.durable, queue_limits=config.queue,
                          key_limits=config.key_limits)


ACCEPT_BACKLOG = 4096
BACKLOG_RETRY = 0.005  # seconds between tries to send held frames
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TCP_KEEPALIVE = (60, 10, 6)  # idle seconds, probe interval, probes: a half-open peer goes within ~2 minutes


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")
_MORE = int(zmq.SNDMORE | zmq.DONTWAIT)
_NOWAIT = int(zmq.DONTWAIT)


def raise_fd_limit() -> int:
    """Every client costs a descriptor (two with presence): take the hard limit we are allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _curve_key(frame: zmq.Frame) -> bytes | None:
    user_id = frame.get("User-Id")
    return _decode_key(user_id) if user_id else None


@functools.lru_cache(maxsize=4096)  # read on every frame: the few keys of busy connections stay decoded
def _decode_key(user_id: str) -> bytes | None:
    try:
        return z85.decode(user_id)
    except ValueError:
        return None


class _Admission:
    """The ZAP credentials callback: runs on the authenticator thread, reads memory only."""

    def __init__(self, keys: AdmissionRegistry) -> None:
        self._keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return self._keys.admits(z85.decode(key), time.monotonic())


def _wall_ms() -> int:
    return int(time.time() * 1000)


class BrokerServer:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        if config.insecure and not is_loopback(config.host):
            raise P2PChatError(f"--insecure is refused on {config.host}: without CURVE a user ID protects nothing, "
                               "so only a loopback host may run it")
        self.config = config
        self._ctx = context or zmq.Context(io_threads=config.io_threads)
        self._own_ctx = context is None
        self._waker = Waker()
        self._dropped = IncidentLog("frame dropped", log)  # sends to a gone peer, or past its backlog
        self._backlog = SendBacklog()  # answers a peer's full pipe could not take yet
        self._stopping = False
        epoch = os.urandom(8)
        ensure_private_dir(config.data_dir)
        fds = raise_fd_limit()
        log.info("file descriptor limit %d: about %d clients with presence subscriptions", fds, (fds - 50) // 2)
        backend = self._backend = open_backend(config, epoch, self._waker.wake)
        self._room_files = DiskRoomFileStore(config.room_files_dir or config.data_dir / "room-files")
        self.identity = backend.identity
        self.core = BrokerCore(
            backend.directory,
            broker_id=epoch,
            heartbeat_ivl=config.heartbeat_ivl,
            liveness=config.liveness,
            wall_ms=_wall_ms,
            new_id=new_msg_id,
            keys=backend.keys,
            store=backend.store,
            link=backend.link,
            queue_limits=config.queue,
            require_key=not config.insecure,
            limits=config.limits,
            rooms=backend.rooms,
            room_files=self._room_files,
            room_file_limits=config.room_files,
        )
        self._auth: ThreadAuthenticator | None = None
        if not config.insecure:
            # Without a ZAP handler in this context CURVE would accept any key silently. Ours admits only
            # keys bound to an ID or holding a fresh ticket from the key service (§10.1), and their key
            # reaches us as the User-Id of their frames.
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("broker.zap"))
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_Admission(backend.keys))
        LIBC.seed_rand()  # before the ROUTER exists: its routing ids start at rand()
        self.router = self._ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, max(MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES) + 1024)
        self.router.setsockopt(zmq.LINGER, 0)
        # Per-connection pipes, in messages: a relayed header is at most ~70 KiB (64 KiB body) and file
        # chunks are bounded in bytes by the credit ledger (broker/core/credit.py), so these bound bytes too.
        self.router.setsockopt(zmq.RCVHWM, 256)
        self.router.setsockopt(zmq.SNDHWM, 1_000)
        self.pub = self._ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        for sock in (self.router, self.pub):
            if not config.insecure:
                sock.curve_server = True
                sock.curve_secretkey = self.identity.curve_secret
            ivl_ms = int(config.zmtp_heartbeat_ivl * 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl_ms)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            for option, value in zip((zmq.TCP_KEEPALIVE_IDLE, zmq.TCP_KEEPALIVE_INTVL, zmq.TCP_KEEPALIVE_CNT),
                                     TCP_KEEPALIVE):
                sock.setsockopt(option, value)
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED
        self._monitor = self.router.get_monitor_socket(events)
        self._pub_monitor = self.pub.get_monitor_socket(events)
        self.guard = ConnectionGuard(config.guard, config.heartbeat_ivl, lambda conn: self.core.user_of(conn) is not None)
        self._bind(self.router, config.port)
        self._bind(self.pub, config.publish_port)
        self.key_service: KeyServiceListener | None = None
        if not config.insecure:
            self.key_service = KeyServiceListener(
                config.host, config.key_service_port, KeyServiceCore(self.identity.public, backend.keys,
                                                                     config.key_service, slots=backend.pake_slots),
                reuse_port=config.reuse_port, clock=time.monotonic)
        self._store_failing = False
        backend.start()
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.pub_endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        if config.insecure:
            log.warning("PLAINTEXT transport (--insecure), NOT FOR USE: no encryption, and anyone who can reach "
                        "%s can register as any user by quoting their public key and read their queue",
                        config.host)
        else:
            log.info("broker key fingerprint %s (clients can pin it with --server-key)",
                     fingerprint(self.identity.public))
        log.info("broker listening on %s, presence on %s, data in %s%s", self.endpoint, self.pub_endpoint,
                 config.data_dir, f", {backend.description}" if backend.description else "")

    def _bind(self, sock: zmq.Socket, port: int) -> None:
        if self.config.reuse_port:
            # libzmq never sets SO_REUSEPORT: listen ourselves and hand the descriptor over (ZMQ_USE_FD).
            family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((self.config.host, port))
            listener.listen(ACCEPT_BACKLOG)
            sock.setsockopt(zmq.USE_FD, listener.detach())  # libzmq owns and closes it now
        sock.setsockopt(zmq.BACKLOG, ACCEPT_BACKLOG)  # libzmq's 100 overflows when thousands reconnect at once
        sock.bind(f"tcp://{self.config.host}:{port}")

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._pub_monitor, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        keys = self.key_service
        if keys is not None:
            poller.register(keys.fileno(), zmq.POLLIN)
            keys.on_open = lambda fd: poller.register(fd, zmq.POLLIN)
            keys.on_close = poller.unregister
        router, core, guard = self.router, self.core, self.guard
        try:
            while not self._stopping:
                now = time.monotonic()
                self._commit_then_execute(core.on_tick(now))
                self._dropped.flush(now)
                guard.check(now)
                if keys is not None:
                    keys.expire(now)
                self._backlog.flush(self._try_send)
                deadline = min(core.next_deadline(), guard.next_check())
                if self._backlog:  # held frames: look again soon (POLLOUT on a ROUTER means any peer)
                    deadline = min(deadline, now + BACKLOG_RETRY)
                timeout_ms = max(0, int((deadline - now) * 1000) + 1)
                ready = dict(poller.poll(timeout_ms))
                if self._monitor in ready or self._pub_monitor in ready:  # first: the guard maps new fds
                    self._connection_events()
                if router in ready:
                    # Drain a batch: fewer poll calls, one group commit, bounded so ticks still run.
                    batch: list[Action] = []
                    for _ in range(1000):
                        try:
                            parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        batch += self._handle(parts)
                    self._commit_then_execute(batch)
                if self._waker.fileno() in ready:
                    self._waker.drain()
                if keys is not None:
                    self._serve_keys(keys, ready)
        finally:
            self._close()

    def _handle(self, parts: list[zmq.Frame]) -> list[Action]:
        conn = parts[0].bytes
        self.guard.received(conn, parts)

        # The CURVE key ZAP authenticated for this frame's connection; the core checks it on every frame.
        def peer_key() -> bytes | None:
            return None if self.config.insecure or len(parts) < 2 else _curve_key(parts[1])

        try:
            actions = self.core.on_frames(conn, self._frames(parts[1:]), time.monotonic(), peer_key)
        except Exception:  # a bug must cost one frame, never the broker
            log.exception("conn=%s frame handling failed; frame dropped", conn.hex())
            return []
        return actions

    def _commit_then_execute(self, actions: list[Action]) -> None:
        """Acknowledge nothing that is not committed: commit the batch's queue changes (and, in a cluster,
        its frames for other brokers) first; the core then answers its durable frames (``on_commit``),
        and everything else goes out either way."""
        try:
            self._backend.commit()
            failure = None
        except StoreUnavailable as exc:
            self._backend.rollback()
            failure = exc.code
            if not self._store_failing:  # once per outage, not once per batch
                log.error("store commit failed (%s): answering %s until it works again", exc, failure.value)
        if failure is None and self._store_failing:
            log.info("store commits work again")
        self._store_failing = failure is not None
        self._execute(actions + self.core.on_commit(failure))

    def stop(self) -> None:
        """Ask the loop to finish (safe from any thread or a signal handler)."""
        self._stopping = True
        self._waker.wake()

    @staticmethod
    def _frames(parts: list[zmq.Frame]) -> list:
        # The header is small: take bytes. A payload stays a Frame so relays don't copy it.
        return [parts[0].bytes, *parts[1:]] if parts else []

    def _execute(self, actions: list[Action]) -> None:
        missed: set[str] = set()  # a queued frame did not reach them: the rest follows in the re-page, in order
        for action in actions:
            if type(action) is Relay:
                if self._send(action.conn, action.frames):
                    if action.on_success is not None:
                        self._send(action.sender, action.on_success)
                else:
                    self._send(action.sender, action.on_failure())
            elif type(action) is Send:
                queue = action.queued_for
                if queue is None:
                    self._send(action.conn, action.frames)
                elif queue not in missed and not self._send(action.conn, action.frames):
                    missed.add(queue)
                    self.core.on_delivery_failed(queue)
            elif type(action) is Publish:
                self.pub.send_multipart(action.frames)

    def _send(self, conn: bytes, frames) -> bool:
        """Send now, or hold behind what ``conn`` already waits for; False if it was dropped."""
        sent = False if self._backlog.holds(conn) else self._try_send(conn, frames)
        if sent is False:
            if self._backlog.hold(conn, frames):
                return True
            self._dropped.record(conn, self._who(conn), "its send backlog is full", time.monotonic())
        return bool(sent)

    def _who(self, conn: bytes) -> str:
        return f"conn={conn.hex()} user={self.core.user_of(conn)}"

    def _try_send(self, conn: bytes, frames) -> bool | None:
        """True: sent; False: its pipe is full (try later); None: the connection is gone."""
        send = self.router.send
        try:
            # Part by part with plain int flags: send_multipart's flag-enum arithmetic is a hot-path cost.
            send(conn, _MORE)  # ROUTER_MANDATORY: an unroutable or full peer fails here, before any payload
            last = len(frames) - 1
            for i, frame in enumerate(frames):
                send(frame, _NOWAIT if i == last else _MORE, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._dropped.record(conn, self._who(conn), "the connection is gone", time.monotonic())
            return None

    @staticmethod
    def _serve_keys(keys: KeyServiceListener, ready: dict) -> None:
        if keys.fileno() in ready:
            keys.accept()
        for fd in ready:
            if type(fd) is int and keys.owns(fd):
                keys.readable(fd)

    def _connection_events(self) -> None:
        # Drain them all: libzmq sends monitor events blocking, under a lock, so a backlog of unread
        # events stalls its I/O thread (and later disable_monitor()).
        now = time.monotonic()
        for monitor, pub in ((self._monitor, False), (self._pub_monitor, True)):
            while True:
                try:
                    event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_ACCEPT_FAILED:
                    log.warning("accept failed: %s (file descriptors exhausted?)", os.strerror(event["value"]))
                    continue
                accepted = event["event"] == zmq.EVENT_ACCEPTED
                if accepted:
                    self.guard.accepted(event["value"], pub, now)
                else:
                    self.guard.disconnected(event["value"], pub)
                log.debug("%s fd=%d %s", "connect" if accepted else "disconnect", event["value"],
                          "presence" if pub else "requests")

    def _close(self) -> None:
        self._connection_events()
        self.router.disable_monitor()
        self.pub.disable_monitor()
        for sock in (self._monitor, self._pub_monitor, self.router, self.pub):
            sock.close(linger=0)
        if self.key_service is not None:
            self.key_service.close()
        self.guard.close()
        if self._auth is not None:
            self._auth.stop()
        self._backend.close()
        self._room_files.close()
        self._waker.close()
        if self._own_ctx:
            self._ctx.term()
        log.info("broker stopped")
