"""The public client: a thread-safe front object and one agent thread that owns the sockets.

Front + agent, as in the ZeroMQ Guide's ``clone.py``: every call on
``ChatClient`` becomes a command the agent runs on its own thread, so the DEALER
and SUB sockets are only ever touched by one thread. Events reach the user by
callback (called on the agent thread: keep it short) or through ``events``.
The agent is the cores' shell: it owns the sockets, the history's commits, the
transfers' files (``storage.transfers``) and the writer threads.
(Over 500 lines: the front and its agent are two halves of one object, read together.)
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.broker_trust import ADMIT_TIMEOUT, RETRY_LATER, admit, resolve_broker_key
from p2pchat.client.e2e import NO_SEALING, EndToEnd, PeerKeyChanged, Sealing
from p2pchat.client.refusals import explain_refusal
from p2pchat.client.room_commands import RoomCommands
from p2pchat.client.storage.sender_keys import SqliteSenderKeys
from p2pchat.client.storage.account import account_key
from p2pchat.client.storage.history import History
from p2pchat.client.storage.identity import InstanceClaim
from p2pchat.client.storage.partfile import WriterPool
from p2pchat.client.storage.phrase import load_or_create_phrase
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.client.storage.trust import CHANGED_KEYS, PEER_ACCOUNTS, PINNED_KEYS, VERIFIED_KEYS, KeyStore, VerifiedKeys
from p2pchat.common.crypto import Identity, account_safety_number, fingerprint, safety_number
from p2pchat.common.protocol import DEVICE_NAME_CHARS
from p2pchat.client.core.session import ClientSession, State, validate_text
from p2pchat.client.core.transfer import CHUNK_SIZE, WINDOW, TransferConfig, TransferManager
from p2pchat.common.paths import ensure_private_dir, home_dir, user_dir
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import BrokenError, ClosedError, ErrorCode, P2PChatError, RemoteError, StorageError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol import MAX_HEADER_BYTES, check_user_id, new_msg_id
from p2pchat.common.recovery import RecoveryKey
from p2pchat.common.wakeup import Waker

log = logging.getLogger(__name__)


def _default_received_dir() -> Path:
    return Path.home() / "client_received"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    server: ServerAddress = ServerAddress()
    heartbeat_ivl: float = 1.0
    liveness: int = 3
    send_timeout: float = 10.0
    received_dir: Path = field(default_factory=_default_received_dir)
    max_file_size: int = 1 << 40
    chunk_size: int = CHUNK_SIZE
    window: int = WINDOW
    state_dir: Path | None = None  # default: the user's directory under $P2PCHAT_HOME
    insecure: bool = False  # plaintext transport (the broker must run with --insecure too): debugging only
    encrypt: bool = True  # end-to-end encryption; off only for debugging and benchmarks
    server_key: str | None = None  # pin the broker's key fingerprint instead of trusting on first use
    key_port: int | None = None  # the broker's key service, server port + 2 unless given
    history: bool = True  # keep conversations and the outbox in SQLite (off: load-test clients)
    read_receipts: bool = True  # tell senders when we have read their messages
    trust_key_changes: bool = False  # accept a peer's new key at once (still reported) instead of waiting for the user
    accept_files: bool = True  # False: refuse files on this device (with several devices, another one takes them)
    rooms: bool = True  # take part in group rooms (docs/PROTOCOL.md §5.7)
    # TransferConfig overrides (max_incoming, max_incoming_per_peer, max_queued, max_queued_per_peer,
    # give_up_after, max_age); defaults in client.transfer.
    transfer_limits: dict[str, float] = field(default_factory=dict)


def _forward_failure(command: Future, result: Future) -> None:
    """A command that raised (or never ran) fails the caller's future too."""
    def done(f: Future) -> None:
        if f.exception() is not None and not result.done():
            result.set_exception(f.exception())

    command.add_done_callback(done)


SLICE = 0.02  # seconds the agent spends on one source before looking at the others
REOPEN_FACTOR = 3  # expiry periods without registering before the agent opens new sockets


_ROOM_ANSWERS = frozenset({ev.RoomUpdated, ev.RoomGone, ev.RoomsListed, ev.RoomReceipts})


def _wall_ms() -> int:
    return int(time.time() * 1000)


class ChatClient(RoomCommands):
    def __init__(
        self,
        user: str,
        config: ClientConfig | None = None,
        *,
        on_event: Callable[[ev.Event], None] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self.user = user
        self.events: queue.Queue[ev.Event] = queue.Queue()
        self._on_event = on_event or self.events.put
        cfg = self.config
        self.state_dir = ensure_private_dir(cfg.state_dir or user_dir(check_user_id(user)))
        self._claim = InstanceClaim(self.state_dir)
        self.identity = Identity.load_or_create(self.state_dir / "identity.key")
        # Made with the identity: the CLI and the GUI show it once when ``new_recovery_phrase`` says it is new.
        self.recovery_phrase, self.new_recovery_phrase = load_or_create_phrase(self.state_dir)
        self.e2e: Sealing = NO_SEALING
        if cfg.encrypt:
            accounts = KeyStore(self.state_dir / PEER_ACCOUNTS)
            own_account = account_key(self.state_dir, user)
            if own_account is not None:  # our own devices' links are checked against our own account key
                accounts.put(user, own_account)
            self.e2e = EndToEnd(user, self.identity, KeyStore(self.state_dir / PINNED_KEYS),
                                KeyStore(self.state_dir / CHANGED_KEYS), accounts=accounts)
        self._verified = VerifiedKeys(self.state_dir / VERIFIED_KEYS)
        self._accounts_read = KeyStore(self.state_dir / PEER_ACCOUNTS)  # the agent's e2e writes; this only reads
        self._writers = WriterPool()  # received chunks are written by these threads, shared by every transfer
        self._files = LocalFiles(self._writers)
        transfers = TransferManager(
            user,
            TransferConfig(cfg.received_dir, cfg.max_file_size, cfg.chunk_size, cfg.window,
                           stall_timeout=cfg.heartbeat_ivl * cfg.liveness, accept_files=cfg.accept_files,
                           **cfg.transfer_limits),
            self.e2e,
            wall_ms=_wall_ms,
            wall_time=time.time,
            new_id=new_msg_id,
            files=self._files,
            records=RecordDir(self.state_dir / "transfers", user),
        )
        self._history = History(self.state_dir / "history.sqlite") if cfg.history else None
        self._sender_keys = SqliteSenderKeys(self.state_dir / "sender_keys.sqlite") if cfg.encrypt and cfg.rooms \
            else None
        self._session = ClientSession(
            user,
            wall_ms=_wall_ms,
            heartbeat_ivl=cfg.heartbeat_ivl,
            liveness=cfg.liveness,
            history=self._history,
            read_receipts=cfg.read_receipts,
            e2e=self.e2e,
            key=self.identity.public,
            recovery=RecoveryKey.from_phrase(self.recovery_phrase, user).public if self.recovery_phrase else None,
            transfers=transfers,
            token=self._claim.token,
            new_id=new_msg_id,
            trust_key_changes=cfg.trust_key_changes,
            devices=cfg.encrypt,
            device_name=socket.gethostname()[:DEVICE_NAME_CHARS],
            rooms=cfg.rooms,
            sender_key_store=self._sender_keys,
        )
        self.broker_key: bytes | None = None
        self._dealer: zmq.Socket | None = None
        self._backlog: deque[list] = deque()  # frames the DEALER could not take yet (high-water mark)
        self._unregistered_since: float | None = None  # since when the session has tried to register
        self._sub: zmq.Socket | None = None
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._commands: queue.SimpleQueue[tuple[Callable[[float], Any], Future]] = queue.SimpleQueue()
        self._waker = Waker()
        self._registered: Future[None] = Future()
        self._acks: dict[bytes, Future[str]] = {}
        self._transfers: dict[bytes, Future[None]] = {}
        self._peers: frozenset[str] = frozenset()
        self._closed = False
        self._agent_done = False
        self._release_by_agent = False
        self._dropped = IncidentLog("frames dropped after an internal error", log)  # per kind of error
        self._thread = threading.Thread(target=self._run, name=f"p2pchat-agent-{user}", daemon=True)

    # --- public API (any thread) ----------------------------------------------
    def connect(self, timeout: float = 5.0) -> None:
        """Start the agent and wait until registered. Raises RemoteError or BrokenError."""
        if self._closed:
            raise ClosedError("client is closed")
        if self._on_agent():
            return  # from an event callback: the agent is running, and must not wait for itself
        if not self._thread.is_alive():
            self._thread.start()
        try:
            self._registered.result(timeout)
        except FutureTimeout:
            self.close()
            raise BrokenError(f"broker {self.config.server} unreachable after {timeout:g}s") from None
        except P2PChatError:
            self.close()
            raise

    def start(self) -> None:
        """Start connecting in the background (events report progress); for GUIs."""
        if not self._thread.is_alive():
            self._thread.start()

    def send(self, to: str, text: str, timeout: float | None = None) -> bytes:
        """Send and wait for the broker's acknowledgement; returns the message id.

        From an event callback (the agent thread, which must not wait for itself) it does not wait:
        it returns once the message is queued, as ``send_async`` does.
        """
        msg_id, acked = self.send_async(to, text)
        if self._on_agent():
            return msg_id
        try:
            acked.result(timeout if timeout is not None else self.config.send_timeout + 1)
        except FutureTimeout:
            kept = "; kept in the outbox" if self.config.history else ""
            raise BrokenError("no acknowledgement from the broker" + kept, ErrorCode.TIMEOUT) from None
        return msg_id

    def send_async(self, to: str, text: str) -> tuple[bytes, Future[str]]:
        """Queue a message and return at once; the future resolves with the ack status or the error."""
        body = validate_text(to, text)  # bad input fails here, in the caller's thread
        msg_id, acked = new_msg_id(), Future()

        def command(now: float) -> None:
            self._acks[msg_id] = acked
            self._execute(self._session.send_text(to, body, now, msg_id))

        _forward_failure(self._call(command), acked)
        return msg_id, acked

    def send_file(self, to: str, path: str | Path, later: bool = False) -> tuple[bytes, Future[None]]:
        """Offer a file and return at once; the future resolves once the receiver verified and saved it, or, for a
        file left at the broker (``later``, or ``to`` offline: docs/PROTOCOL.md §8.2), once the broker holds it
        (``FileUploaded``; ``FileSent`` follows when ``to`` has it while we are online)."""
        done: Future[None] = Future()
        source = self._files.inspect(Path(path))  # a folder is walked and hashed here, off the agent's loop

        def command(now: float) -> bytes:
            xfer, actions = self._session.send_file(to, source, now, later)
            self._transfers[xfer] = done
            self._execute(actions)
            return xfer

        return self._call(command).result(10), done

    def mark_read(self, peer: str) -> None:
        """The user has seen the conversation with ``peer`` (sends read receipts if enabled)."""
        self._call(lambda now: self._execute(self._session.mark_read(peer, now)))

    def open_history(self) -> History:
        """A separate connection to this user's conversation store, for reading from another thread."""
        return History(self.state_dir / "history.sqlite")

    def cancel_transfer(self, xfer: bytes) -> None:
        self._call(lambda now: self._execute(self._session.transfers.cancel(xfer, now))).result()

    def peers(self) -> frozenset[str]:
        return self._peers

    def wait_presence(self, timeout: float) -> bool:
        """Wait until the session has the broker's peer list (who is online), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._call(lambda now: self._session.presence is not None and self._session.presence.synced
                             ).result(timeout):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)  # the agent answers the snapshot within a round trip
        return True

    def accept_peer_key(self, user: str) -> bool:
        """Trust ``user``'s new key (after checking its fingerprint with them); False if none was waiting.
        What waited for it goes out at once: our messages sealed again, theirs shown."""
        def accept(now: float) -> bool:
            if self.e2e.pending_key(user) is None:
                return False
            self._execute(self._session.accept_peer_key(user, now))
            return True

        return self._call(accept).result()

    def fingerprint_of(self, user: str) -> str | None:
        """The fingerprint of the key pinned for ``user`` (our own for our user ID)."""
        if user == self.user:
            return fingerprint(self.identity.public)
        key = self.e2e.pinned_key(user)
        return fingerprint(key) if key else None

    def pending_key_change(self, user: str) -> tuple[bytes, bytes] | None:
        """(pinned key, new key) while ``user``'s key change awaits acceptance, else None."""
        new = self.e2e.pending_key(user)
        return (self.e2e.pinned_key(user) or b"", new) if new is not None else None

    def safety_number(self, user: str) -> str | None:
        """The per-device number: our key and ``user``'s pinned one."""
        key = self.e2e.pinned_key(user)
        return safety_number(self.identity.public, key) if key else None

    def account_of(self, user: str) -> bytes | None:
        """``user``'s account key as pinned on first sight (ours for our user ID), or None if not known yet."""
        return self._accounts_read.get(user) if self.e2e.enabled else None

    def devices_of(self, user: str) -> tuple[tuple[int, bytes], ...]:
        """``user``'s devices as this run last checked them against their account key: ``(number, key)``, the
        primary first; empty until fetched (the session fetches them when it first seals to ``user``)."""
        devices = self.e2e.devices_of(user)
        return devices.devices if devices is not None else ()

    def account_safety_number(self, user: str) -> str | None:
        """The one number for our account and ``user``'s (the same while either links or unlinks devices); None
        unless both account keys are known."""
        ours, theirs = self.account_of(self.user), self.account_of(user)
        return account_safety_number(ours, theirs) if ours and theirs else None

    def is_verified(self, user: str) -> bool:
        """Whether the user verified ``user``'s pinned key with them, or their account (false again once that key
        changes, or that account key)."""
        return self._verified.is_verified(user, self.e2e.pinned_key(user), self.account_of(user))

    def was_verified(self, user: str) -> bool:
        """Whether the user had verified some key of ``user``: a change from it deserves more care."""
        return self._verified.was_verified(user)

    def set_verified(self, user: str, verified: bool = True) -> bool:
        """Mark ``user``'s pinned key verified, and their account where its safety number is the one shown (or
        clear both); False if no key is pinned for them yet."""
        key = self.e2e.pinned_key(user)
        if key is None:
            return False
        if verified:
            self._verified.mark(user, key, self.account_of(user) if self.account_safety_number(user) else None)
        else:
            self._verified.clear(user)
        return True

    def held_from(self, user: str) -> int:
        """How many of ``user``'s messages wait, unshown, for the user to accept their new key."""
        return self._call(lambda now: self._session.held_from(user)).result()

    def close(self) -> None:
        """Unregister, stop the agent and release the sockets. Idempotent; never hangs."""
        if self._closed:
            return
        self._closed = True
        if self._on_agent():  # from an event callback: the agent finishes the job when its loop ends
            self._release_by_agent = True
            return
        if self._thread.ident is not None:  # started: the agent closes its sockets and context
            self._waker.wake()
            self._thread.join()
        elif self._own_ctx:
            self._ctx.term()
        self._release()

    def _release(self) -> None:
        self._writers.close()  # after the agent closed every .part file
        self._waker.close()
        if self._history is not None:
            self._history.close()
        if self._sender_keys is not None:
            self._sender_keys.close()
        self._claim.release()

    def _on_agent(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[float], Any]) -> Future:
        future: Future = Future()
        if self._closed or self._agent_done:
            future.set_exception(ClosedError("client is closed"))
            return future
        if self._on_agent():  # an event callback: the agent itself, so run inline
            try:
                future.set_result(fn(time.monotonic()))
            except Exception as exc:
                future.set_exception(exc)
            return future
        self._commands.put((fn, future))
        self._waker.wake()
        if self._agent_done:  # the agent ended meanwhile: nobody else will answer this command
            self._run_commands(time.monotonic())
        return future

    # --- agent (its own thread) ---------------------------------------------
    def _run(self) -> None:
        server = self.config.server
        if not self.config.insecure:
            key_port = self.config.key_port or server.port + 2
            try:
                trusted = resolve_broker_key(
                    server, key_port, KeyStore(ensure_private_dir(home_dir()) / "known_brokers.json"),
                    self.config.server_key, stopped=self._idle_while_resolving)
                if trusted is not None:  # the broker lets only keys with an ID or a ticket through CURVE
                    self._admit(server, key_port)
            except BrokenError as exc:  # key service gone since: a bound key still gets in, and we retry
                log.info("user=%s admission not confirmed (%s); connecting anyway", self.user, exc.message)
            except P2PChatError as exc:
                self._dispatch(ev.RegisterFailed(exc))
                self._finish_agent()
                return
            if trusted is None:  # closed while waiting for the broker
                self._finish_agent()
                return
            self.broker_key = trusted.key
            if self.e2e.enabled:
                self.e2e.broker_key = trusted.key  # devices' link proofs name it
        poller = zmq.Poller()
        poller.register(self._waker.fileno(), zmq.POLLIN)
        self._open_sockets(poller)
        session = self._session
        try:
            self._execute(session.start(time.monotonic()))
            backlog = False  # work left over from a time slice: poll without waiting
            while not self._closed and session.state is not State.CLOSED:
                timeout = 0 if backlog else max(0, int((session.next_deadline() - time.monotonic()) * 1000) + 1)
                ready = dict(poller.poll(timeout))
                if self._waker.fileno() in ready:
                    self._waker.drain()
                # Each source gets a bounded slice, so a burst of sends or frames never starves
                # the others (heartbeats included) long enough to look like a dead connection.
                backlog = self._run_commands(time.monotonic(), budget=SLICE)
                if backlog or self._dealer in ready:
                    backlog |= self._drain(self._dealer, session.on_frames)
                if backlog or self._sub in ready:
                    backlog |= self._drain(self._sub, session.on_publish)
                self._execute(session.on_tick(time.monotonic()))
                self._dropped.flush(time.monotonic())
                self._flush_backlog(poller)
                self._reopen_if_stuck(poller)
            self._execute(session.close(time.monotonic()))
        except Exception as exc:  # the agent must not die silently: report, then clean up
            log.exception("user=%s client agent crashed", self.user)
            error = BrokenError(f"client stopped after an internal error: {exc!r}")
            self._fail_all(error)
            self._dispatch(ev.Stopped(error))
        finally:
            self._dealer.close(linger=0)
            self._sub.close(linger=0)
            self._dealer = self._sub = None
            self._finish_agent()

    def _admit(self, server: ServerAddress, key_port: int) -> None:
        """Get a ticket for our key; while the broker says "later", say why once and keep asking."""
        while True:
            try:
                admit(server, key_port, self.user, self.identity.public, ADMIT_TIMEOUT,
                      stopped=self._idle_while_resolving,
                      waiting=lambda error: self._dispatch(ev.ErrorReported(error)))
                return
            except RemoteError as exc:
                if exc.code not in RETRY_LATER or self._closed:
                    raise explain_refusal(self.user, exc) from None

    def _open_sockets(self, poller: zmq.Poller) -> None:
        server = self.config.server
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._sub = self._ctx.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            if self.broker_key is not None:
                sock.curve_serverkey = z85.encode(self.broker_key)
                sock.curve_publickey = self.identity.curve_public
                sock.curve_secretkey = self.identity.curve_secret
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES + 1024)
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a broker that isn't there
        self._dealer.setsockopt(zmq.SNDHWM, 10_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(server.pub_endpoint)  # subscribe before the snapshot (Clone)
        self._dealer.connect(server.endpoint)
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._sub, zmq.POLLIN)
        self._unregistered_since = None

    def _reopen_if_stuck(self, poller: zmq.Poller) -> None:
        """Open new sockets when registering has failed for a while. libzmq never reconnects a
        connection whose handshake the broker refused (its ZAP check could not reach Redis, say):
        without new sockets such a client would stay cut off until restarted."""
        if self._session.state is not State.CONNECTING:
            self._unregistered_since = None
            return
        now = time.monotonic()
        if self._unregistered_since is None:
            self._unregistered_since = now
        elif now - self._unregistered_since > REOPEN_FACTOR * self.config.heartbeat_ivl * self.config.liveness:
            log.info("user=%s not registered for %.1fs: opening new connections", self.user,
                     now - self._unregistered_since)
            for sock in (self._dealer, self._sub):
                poller.unregister(sock)
                sock.close(linger=0)
            self._backlog.clear()
            self._open_sockets(poller)

    def _idle_while_resolving(self) -> bool:
        """Between tries to reach the broker: still take commands (sends go to the outbox)."""
        self._run_commands(time.monotonic())
        return self._closed

    def _finish_agent(self) -> None:
        self._agent_done = True
        self._run_commands(time.monotonic())  # fail any command queued during shutdown
        if self._own_ctx:
            self._ctx.term()
        if self._release_by_agent:  # closed by an event callback: nobody joins us
            self._release()

    def _flush_backlog(self, poller: zmq.Poller) -> None:
        """Send held frames while the DEALER takes them; poll for POLLOUT only while some are held."""
        if self._session.state is not State.READY:
            self._backlog.clear()  # the session re-sends what matters after re-registering
        while self._backlog:
            try:
                self._dealer.send_multipart(self._backlog[0], zmq.DONTWAIT)
            except zmq.Again:
                break
            self._backlog.popleft()
        poller.modify(self._dealer, zmq.POLLIN | zmq.POLLOUT if self._backlog else zmq.POLLIN)

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes], float], list]) -> bool:
        """Handle what the socket has, for one time slice; True if it may have more."""
        batch: list = []
        end = time.monotonic() + SLICE
        more = True
        while more and time.monotonic() < end:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                more = False
                break
            # Header as bytes; a chunk payload stays a zero-copy buffer.
            frames = [parts[0].bytes, *(p.buffer for p in parts[1:])]
            now = time.monotonic()
            try:
                actions = handler(frames, now)
            except Exception as exc:  # a bug must not stop the client at one frame: drop it and say so (throttled)
                if self._dropped.record(type(exc).__name__, f"user={self.user}", repr(exc), now, quiet=True):
                    log.exception("user=%s frame dropped after an internal error (more are counted)", self.user)
                continue
            batch += actions
            if any(type(a) is Transmit and a.urgent for a in actions):
                self._execute(batch)  # a credit held back until the batch ends would stall the sender
                batch = []
        self._execute(batch)  # one history commit per batch, then its consumes and receipts
        return more

    def _run_commands(self, now: float, budget: float | None = None) -> bool:
        """Run queued commands (for ``budget`` seconds at most); True if some are left."""
        end = None if budget is None else time.monotonic() + budget
        while True:
            if end is not None and time.monotonic() > end:
                return True
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return False
            if self._closed or self._agent_done:
                future.set_exception(ClosedError("client is closed"))
                continue
            try:
                future.set_result(fn(now))
            except Exception as exc:
                future.set_exception(exc)

    def _commit(self) -> list:
        """Make the batch's history durable; the session hands back what waited for it (consumes, receipts)."""
        held: list = []
        if self._history is not None:
            try:
                self._history.commit()
            except StorageError as exc:  # kept in memory and retried at the next commit
                held = self._session.history_failed(exc)
            else:
                held = self._session.history_saved()
        return held + self._session.end_batch(time.monotonic())

    def _execute(self, actions: list) -> None:
        # History first: a CONSUME must never precede what it confirms (the session holds them till then),
        # and a sent message is in the outbox before it goes out.
        for action in [*actions, *self._commit()]:
            if type(action) is Transmit:
                if self._dealer is None:
                    continue  # not connected yet: the session sends its outbox once registered
                if self._backlog:
                    self._backlog.append(action.frames)  # keep the order
                    continue
                try:
                    # Chunks go zero-copy: their bytes are not touched again; pyzmq copies frames under 64 KiB.
                    self._dealer.send_multipart(action.frames, zmq.DONTWAIT, copy=False)
                except zmq.Again:
                    # At the high-water mark: hold it and send when the socket takes more. With no
                    # connection at all (IMMEDIATE) the session re-sends what matters once registered.
                    if self._session.state is State.READY:
                        self._backlog.append(action.frames)
            elif type(action) is Emit:
                self._dispatch(action.event)

    def _dispatch(self, event: ev.Event) -> None:
        kind = type(event)
        if kind is ev.Acked:
            self._resolve(event.msg_id, result=event.status)
        elif kind is ev.SendFailed:
            self._resolve(event.msg_id, error=event.error)
        elif kind is ev.SendState and event.state == "held":  # waits for a key decision: do not block the caller
            self._resolve(event.msg_id, error=PeerKeyChanged(
                event.peer, self.e2e.pinned_key(event.peer) or b"", self.e2e.pending_key(event.peer) or b"",
                kept="; the message waits in your outbox and goes once you accept it"))
        elif kind is ev.Registered and not self._registered.done():
            self._registered.set_result(None)
        elif kind is ev.RegisterFailed and not self._registered.done():
            self._registered.set_exception(event.error)
        elif kind is ev.PeersChanged:
            self._peers = event.peers
        elif kind in _ROOM_ANSWERS and event.ref is not None:
            future = self._acks.pop(event.ref, None)
            if future is not None:
                future.set_result(event)
        elif (kind is ev.FileSent or kind is ev.FileUploaded) and event.xfer in self._transfers:
            self._transfers.pop(event.xfer).set_result(None)
        elif kind is ev.FileFailed and event.xfer in self._transfers:
            self._transfers.pop(event.xfer).set_exception(event.error)
        try:
            self._on_event(event)
        except Exception:
            log.exception("user=%s event callback failed on %r", self.user, event)

    def _resolve(self, msg_id: bytes, *, result: str | None = None, error: P2PChatError | None = None) -> None:
        future = self._acks.pop(msg_id, None)
        if future is None:
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_all(self, error: P2PChatError) -> None:
        for msg_id in list(self._acks):
            self._resolve(msg_id, error=error)
        for done in self._transfers.values():
            done.set_exception(error)
        self._transfers.clear()
        if not self._registered.done():
            self._registered.set_exception(error)
