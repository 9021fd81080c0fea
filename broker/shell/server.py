"""The broker's ZeroMQ shell: a ROUTER for requests, a PUB for presence.

It polls, hands frames to ``BrokerCore`` and carries out the actions. Every
send is non-blocking with ROUTER_MANDATORY, so an unroutable or slow peer is
reported instead of silently dropped or stalling everyone else.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from p2pchat.broker.shell.connguard import LIBC, ConnectionGuard, GuardLimits
from p2pchat.broker.shell.backlog import SendBacklog
from p2pchat.broker.core.directory import LocalDirectory
from p2pchat.broker.backends.sqlite_keys import KeyLimits, SqliteKeyRegistry
from p2pchat.broker.shell.keyservice import KeyServiceCore, KeyServiceLimits, KeyServiceListener
from p2pchat.broker.core.ratelimit import AggregatedLog, RateLimits
from p2pchat.broker.backends.sqlite_store import NoStore, QueueLimits, SqliteMessageStore, StoreUnavailable
from p2pchat.common.crypto import Identity, fingerprint
from p2pchat.common.errors import ErrorCode, P2PChatError
from p2pchat.broker.core.routing import Action, BrokerCore, Forward, Kick, Publish, Relay, Send
from p2pchat.common.paths import broker_dir, ensure_private_dir
from p2pchat.common.protocol import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES
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
    cluster: str | None = None  # redis://HOST:PORT/DB: share directory, keys, queues and presence (broker/backends/redis_cluster.py)
    reuse_port: bool = False  # SO_REUSEPORT: several brokers listen on one port and the kernel spreads clients
    io_threads: int = 1  # libzmq I/O threads: connections (and their CURVE work) are spread over them
    key_limits: KeyLimits = KeyLimits()
    key_service: KeyServiceLimits = KeyServiceLimits()
    guard: GuardLimits = GuardLimits()
    zmtp_heartbeat_ivl: float = 10.0  # ZMTP pings on idle connections; a silent peer is dropped after 3 of them

    @property
    def publish_port(self) -> int:
        return self.pub_port if self.pub_port is not None else self.port + 1

    @property
    def key_service_port(self) -> int:
        return self.key_port if self.key_port is not None else self.port + 2


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

    def __init__(self, keys) -> None:
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
        self._dropped = AggregatedLog("frame dropped")  # sends to a gone peer, or past its backlog
        self._backlog = SendBacklog()  # answers a peer's full pipe could not take yet
        self._stopping = False
        epoch = os.urandom(8)
        ensure_private_dir(config.data_dir)
        fds = raise_fd_limit()
        log.info("file descriptor limit %d: about %d clients with presence subscriptions", fds, (fds - 50) // 2)
        self._cluster = None
        if config.cluster:
            from p2pchat.broker.backends import redis_cluster as cluster  # Redis is needed only in cluster mode

            # Every Redis call is bounded by half a heartbeat (within 0.25-1 s), then fails fast while down.
            timeout = min(cluster.TIMEOUT_MAX, max(cluster.TIMEOUT_MIN, config.heartbeat_ivl / 2))
            self._cluster = link = cluster.ClusterLink(config.cluster, epoch, config.heartbeat_ivl * config.liveness,
                                                       self._waker.wake, timeout=timeout)
            self.identity = cluster.shared_broker_identity(link.redis, link.keys, config.data_dir / "broker.key")
            self._keys = cluster.RedisKeyRegistry(link.redis, link.keys, config.key_limits)
            self._store = cluster.RedisMessageStore(link, config.queue) if config.durable else NoStore()
            directory = self._directory = cluster.RedisDirectory(link.redis, epoch, link.keys, _wall_ms, link.health)
        else:
            self.identity = Identity.load_or_create(config.data_dir / "broker.key")
            self._keys = SqliteKeyRegistry(config.data_dir / "keys.sqlite", config.key_limits)
            self._store = (SqliteMessageStore(config.data_dir / "queue.sqlite", config.queue, config.fsync)
                           if config.durable else NoStore())
            directory = LocalDirectory(epoch)
        self.core = BrokerCore(
            directory,
            broker_id=epoch,
            heartbeat_ivl=config.heartbeat_ivl,
            liveness=config.liveness,
            wall_ms=_wall_ms,
            keys=self._keys,
            store=self._store,
            queue_limits=config.queue,
            require_key=not config.insecure,
            limits=config.limits,
        )
        self._auth: ThreadAuthenticator | None = None
        if not config.insecure:
            # Without a ZAP handler in this context CURVE would accept any key silently. Ours admits only
            # keys bound to an ID or holding a fresh ticket from the key service (§10.1), and their key
            # reaches us as the User-Id of their frames.
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("broker.zap"))
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=_Admission(self._keys))
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
                config.host, config.key_service_port, KeyServiceCore(self.identity.public, self._keys,
                                                                     config.key_service),
                reuse_port=config.reuse_port, clock=time.monotonic)
        self._next_refresh = 0.0
        self._store_failing = False
        self._refreshed_once = False
        if self._cluster is not None:
            self._cluster.start_reader(lambda: self._directory.stream_pos)
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
                 config.data_dir, f", cluster {config.cluster} as broker {epoch.hex()} pid {os.getpid()}"
                 if config.cluster else "")

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
                if self._cluster is not None:
                    self._cluster_tick(now)
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
        """Acknowledge nothing that is not committed: commit the batch's queue changes first; the core
        then answers its durable frames (``on_commit``), and everything else goes out either way."""
        try:
            if self._cluster is not None:  # cross-broker frames ride in the same pipeline: one round trip
                for action in actions:
                    if type(action) is Forward:
                        self._cluster.forward(action.broker, action.user, action.frames)
                    elif type(action) is Kick and action.broker:
                        self._cluster.kick(action.broker, action.conn, action.user)
                self._cluster.flush()
            self._store.commit()
            failure = None
        except (sqlite3.Error, StoreUnavailable) as exc:
            self._store.rollback()
            failure = exc.code if isinstance(exc, StoreUnavailable) else ErrorCode.STORAGE_FULL
            if not self._store_failing:  # once per outage, not once per batch
                log.error("store commit failed (%s): answering %s until it works again", exc, failure.value)
        if failure is None and self._store_failing:
            log.info("store commits work again")
        self._store_failing = failure is not None
        self._execute(actions + self.core.on_commit(failure))

    def _cluster_tick(self, now: float) -> None:
        """Cluster chores: frames from other brokers, presence to republish, liveness and reaping."""
        link, core, batch = self._cluster, self.core, []
        while True:
            try:
                kind, fields = link.entries.get_nowait()
            except Exception:  # queue.Empty
                break
            if kind == "presence":
                update = self._directory.apply(fields)
                if update is not None:
                    self.pub.send_multipart(update)
            elif kind == "inbox":
                user = fields[b"u"].decode()
                if fields[b"k"] == b"k":
                    batch += core.on_kicked(fields[b"c"], user)
                else:
                    frames = [fields[b"h"], fields[b"p"]] if b"p" in fields else [fields[b"h"]]
                    batch += core.on_forwarded(user, frames)
            elif kind == "up":
                link.health.retry_now()  # the reader got through: probe at once
        if batch:
            self._commit_then_execute(batch)
        health = link.health
        if health.available and now < self._next_refresh or not health.available and not health.due(now):
            return
        self._next_refresh = now + self.config.heartbeat_ivl
        try:
            with health.probing():  # while down, only this probe gets through
                lapsed = link.refresh()
                if not health.available or lapsed and self._refreshed_once:
                    self._reassert()
            if not health.available:
                log.info("redis is back after %.1fs: cluster mode whole again", health.recovered())
            self._refreshed_once = True
            link.drop_inboxes(self._directory.reap())
        except StoreUnavailable:
            pass  # RedisHealth logged it and schedules the next probe; local clients are still served
        except Exception:  # a bug must cost one round of chores, never the broker
            log.exception("cluster chores failed; retrying next beat")

    def _reassert(self) -> None:
        """Redis is back (or others reaped us): make it agree with the sessions that exist here."""
        sessions = self.core.sessions()
        kicks, lost = self._directory.reconcile(sessions)
        batch: list[Action] = [Kick(where.broker, where.conn, user) for where, user in kicks]
        for conn, user in lost:
            log.warning("user=%s conn=%s lost its ID to a session elsewhere during the redis outage", user, conn.hex())
            batch += self.core.on_kicked(conn, user)
        for user, _, _ in sessions:  # queues could not be read while Redis was down
            self.core.on_delivery_failed(user)
        self._commit_then_execute(batch)
        log.info("cluster state reconciled: %d sessions here, %d taken over, %d lost",
                 len(sessions) - len(lost), len(kicks), len(lost))

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
                user = action.queued_for
                if user is None:
                    self._send(action.conn, action.frames)
                elif user not in missed and not self._send(action.conn, action.frames):
                    missed.add(user)
                    self.core.on_delivery_failed(user)
            elif type(action) is Publish:
                self.pub.send_multipart(action.frames)

    def _send(self, conn: bytes, frames) -> bool:
        """Send now, or hold behind what ``conn`` already waits for; False if it was dropped."""
        sent = False if self._backlog.holds(conn) else self._try_send(conn, frames)
        if sent is False:
            if self._backlog.hold(conn, frames):
                return True
            self._dropped.record(conn, self.core.user_of(conn), "its send backlog is full", time.monotonic())
        return bool(sent)

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
            self._dropped.record(conn, self.core.user_of(conn), "the connection is gone", time.monotonic())
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
        self._keys.close()
        self._store.close()
        if self._cluster is not None:
            self._cluster.close()
        self._waker.close()
        if self._own_ctx:
            self._ctx.term()
        log.info("broker stopped")
