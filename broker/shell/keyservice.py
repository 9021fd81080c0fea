"""The key service: the broker's public key, admission tickets and recovery by phrase, one short text line
each way over plain TCP.

It is deliberately not a ZeroMQ socket: libzmq keeps the parts of an unfinished multipart message
without limit, while here every connection holds at most one ``MAX_REQUEST`` buffer and the number
of connections is capped (docs/PROTOCOL.md §10.1). ``KeyServiceCore`` is the sans-I/O part
(bytes and time in, reply bytes out); ``KeyServiceListener`` is the non-blocking shell whose
descriptors the broker registers in its own poller.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from p2pchat.broker.backends.audit import Change, RecoveryState
from p2pchat.broker.core.ports import REFUSALS, KeyRegistry, StoreUnavailable
from p2pchat.broker.core.ratelimit import TokenBucket
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.protocol import check_user_id
from p2pchat.common.recovery import SIGNATURE_BYTES, verify_recovery

log = logging.getLogger(__name__)

MAX_REQUEST = 256  # bytes of one request line, newline included
MAX_REQUESTS = 4  # per connection; then it is closed
KEY_HEX = 64


class AdmissionRegistry(KeyRegistry, Protocol):
    """The key registry as the key service and the ZAP handler use it (backends/sqlite_keys.py, redis_keys.py)."""

    def can_bind(self, user: str, key: bytes) -> ErrorCode | None:
        """What ``bind`` would answer, without binding."""

    def issue_ticket(self, key: bytes, now: float) -> ErrorCode | None:
        """Admit ``key`` to the CURVE sockets until ``now + ticket_ttl``; an error when too many are pending."""

    def admits(self, key: bytes, now: float) -> bool:
        """Bound to an ID, or holding a fresh ticket (thread-safe, non-blocking: the ZAP thread asks)."""

    def recovery_state(self, user: str) -> RecoveryState | None:
        """The recovery key and generation of ``user``'s binding; None if it is unbound."""

    def move(self, user: str, key: bytes, change: Change, origin: str,
             generation: int | None = None) -> ErrorCode | None:
        """Bind ``user`` to ``key`` instead, if still at ``generation`` (when given); why not, or None."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class KeyServiceLimits:
    max_connections: int = 256  # past it the oldest connection is closed
    idle_timeout: float = 5.0  # seconds a connection may wait between requests
    admit_rate: float = 20.0  # ADMIT requests per second per source address...
    admit_burst: float = 200.0  # ...with this burst (raise both for load tests from one host)
    max_sources: int = 10_000  # source addresses (and IDs) with a bucket; the least recent is forgotten
    recover_rate: float = 1.0  # RECOVERY and RECOVER requests per second per source address...
    recover_burst: float = 10.0  # ...with this burst
    recover_id_rate: float = 1 / 120  # RECOVER attempts per second per user ID, from anywhere: 30 an hour...
    recover_id_burst: float = 5.0  # ...after these (a phrase partly seen over a shoulder stays out of reach)


@dataclass(frozen=True, slots=True)
class KeyQuery:
    pass


@dataclass(frozen=True, slots=True)
class AdmitQuery:
    user: str
    key: bytes


@dataclass(frozen=True, slots=True)
class RecoveryQuery:
    user: str


@dataclass(frozen=True, slots=True)
class RecoverRequest:
    user: str
    key: bytes
    signature: bytes


Request = KeyQuery | AdmitQuery | RecoveryQuery | RecoverRequest


def _hex(text: str, size: int, what: str) -> bytes:
    if len(text) != 2 * size or text != text.lower():
        raise ProtocolError(f"{what} must be {2 * size} lowercase hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"{what} must be {2 * size} lowercase hex digits") from None


def parse_request(line: bytes) -> Request:
    """One request line without its newline; ProtocolError(bad_frame) if it is not one."""
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProtocolError("a key service request is ASCII") from None
    if words == ["KEY"]:
        return KeyQuery()
    if len(words) == 3 and words[0] == "ADMIT":
        return AdmitQuery(check_user_id(words[1]), _hex(words[2], KEY_HEX // 2, "the key"))
    if len(words) == 2 and words[0] == "RECOVERY":
        return RecoveryQuery(check_user_id(words[1]))
    if len(words) == 4 and words[0] == "RECOVER":
        return RecoverRequest(check_user_id(words[1]), _hex(words[2], KEY_HEX // 2, "the key"),
                              _hex(words[3], SIGNATURE_BYTES, "the signature"))
    raise ProtocolError("expected 'KEY', 'ADMIT <user> <key hex>', 'RECOVERY <user>' or "
                        "'RECOVER <user> <key hex> <signature hex>'")


def error_line(code: ErrorCode, message: str) -> bytes:
    """``ERR <code> <message>``, cut to fit one reply line (a message may quote what was sent)."""
    return f"ERR {code.value} {message}".encode("ascii", "replace")[:MAX_REQUEST - 1] + b"\n"


class KeyServiceCore:
    """Answers requests: KEY with the broker's key, ADMIT with a ticket (or why not), RECOVERY with the
    generation a recovery must name, RECOVER by moving the ID if the proof holds (docs/PROTOCOL.md §10.2)."""

    def __init__(self, broker_key: bytes, keys: AdmissionRegistry,
                 limits: KeyServiceLimits = KeyServiceLimits()) -> None:
        self.broker_key = broker_key
        self._key_line = f"KEY {broker_key.hex()}\n".encode()
        self.keys, self.limits = keys, limits
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._recover_sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._recover_ids: OrderedDict[str, TokenBucket] = OrderedDict()
        self.failed_recoveries = IncidentLog("recoveries refused", log)  # per user ID, logged aggregated

    def answer(self, request: Request, source: str, now: float) -> bytes:
        if type(request) is KeyQuery:
            return self._key_line
        if type(request) is not AdmitQuery:
            try:
                return self._recover(request, source, now)
            except StoreUnavailable:
                return error_line(ErrorCode.STORAGE_UNAVAILABLE, "the broker's shared store is unavailable; "
                                  "retry later")
        if not self._take(self._buckets, source, self.limits.admit_rate, self.limits.admit_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many admissions from this address; retry later")
        try:
            refused = self.keys.can_bind(request.user, request.key)
            if refused is None and self.keys.lookup(request.user) != request.key:  # bound keys need no ticket
                refused = self.keys.issue_ticket(request.key, now)
        except StoreUnavailable:  # cluster mode with Redis away: bindings and tickets cannot be checked
            return error_line(ErrorCode.STORAGE_UNAVAILABLE, "the broker's shared store is unavailable; retry later")
        if refused is not None:
            log.info("admission of user=%s from %s refused: %s", request.user, source, refused.value)
            return error_line(refused, REFUSALS[refused].format(user=request.user))
        return b"OK\n"

    def _recover(self, request: RecoveryQuery | RecoverRequest, source: str, now: float) -> bytes:
        limits, user = self.limits, request.user
        if not self._take(self._recover_sources, source, limits.recover_rate, limits.recover_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many recovery requests from this address; retry later")
        state = self.keys.recovery_state(user)
        if state is None:
            return error_line(ErrorCode.RECOVERY_REFUSED, f"user ID {user!r} is not registered here: nothing to "
                              "recover (the next key to register it gets it)")
        if state.recovery is None:
            return error_line(ErrorCode.RECOVERY_REFUSED, f"user ID {user!r} has no recovery key here (it was "
                              "registered by an older client): ask the broker's operator")
        if type(request) is RecoveryQuery:
            return f"RECOVERY {state.generation}\n".encode()
        # Counted before the proof is checked: a guesser learns nothing from attempts past the bound.
        if not self._take(self._recover_ids, user, limits.recover_id_rate, limits.recover_id_burst, now):
            self.failed_recoveries.record(user, f"user={user}", f"attempt from {source} past the bound", now)
            return error_line(ErrorCode.RATE_LIMITED, f"too many recovery attempts for {user!r}; retry later")
        if not verify_recovery(state.recovery, request.signature, self.broker_key, user, state.generation,
                               request.key):
            self.failed_recoveries.record(user, f"user={user}", f"wrong proof from {source}", now)
            return error_line(ErrorCode.RECOVERY_REFUSED, f"that is not the recovery phrase of {user!r} (or its "
                              "binding changed meanwhile: try again)")
        refused = self.keys.move(user, request.key, Change.RECOVERED, f"key service {source}", state.generation)
        if refused is ErrorCode.RECOVERY_REFUSED:
            return error_line(refused, f"the binding of {user!r} changed meanwhile: try again")
        if refused is not None:
            return error_line(refused, REFUSALS[refused].format(user=user))
        log.warning("user=%s moved to a new key with its recovery phrase, from %s", user, source)
        return b"OK\n"

    def _take(self, buckets: OrderedDict[str, TokenBucket], name: str, rate: float, burst: float,
              now: float) -> bool:
        """A token from ``name``'s bucket (made full on first use; the least recently used is forgotten)."""
        bucket = buckets.pop(name, None)
        if bucket is None:
            bucket = TokenBucket(rate, burst, now)
            if len(buckets) >= self.limits.max_sources:
                buckets.popitem(last=False)
        buckets[name] = bucket  # most recent last
        return bucket.take(1, now)


class KeyServiceConnection:
    """One connection's request buffer (sans-I/O): bytes in, reply bytes out, and whether to close."""

    __slots__ = ("source", "buffer", "answered", "last_active")

    def __init__(self, source: str, now: float) -> None:
        self.source, self.buffer, self.answered, self.last_active = source, b"", 0, now

    def receive(self, data: bytes, core: KeyServiceCore, now: float) -> tuple[bytes, bool]:
        self.last_active = now
        self.buffer += data
        replies: list[bytes] = []
        while True:
            line, newline, rest = self.buffer.partition(b"\n")
            if len(line) >= MAX_REQUEST:
                replies.append(error_line(ErrorCode.TOO_LARGE, f"a request is at most {MAX_REQUEST} bytes"))
                return b"".join(replies), True
            if not newline:
                return b"".join(replies), False
            self.buffer = rest
            try:
                request = parse_request(line)
            except ProtocolError as exc:
                replies.append(error_line(exc.code, exc.message))
                return b"".join(replies), True
            replies.append(core.answer(request, self.source, now))
            self.answered += 1
            if self.answered >= MAX_REQUESTS:
                return b"".join(replies), True


class KeyServiceListener:
    """The shell: a non-blocking listening socket and its connections, polled by the broker's loop."""

    def __init__(self, host: str, port: int, core: KeyServiceCore, *, reuse_port: bool = False,
                 backlog: int = 1024, clock: Callable[[], float]) -> None:
        self.core, self._clock = core, clock
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind((host, port))
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self._conns: OrderedDict[int, tuple[socket.socket, KeyServiceConnection]] = OrderedDict()
        self.on_open: Callable[[int], None] = lambda fd: None  # the broker (un)registers fds in its poller
        self.on_close: Callable[[int], None] = lambda fd: None

    def fileno(self) -> int:
        return self.listener.fileno()

    def owns(self, fd: int) -> bool:
        return fd in self._conns

    def accept(self) -> None:
        for _ in range(64):  # a bounded batch per loop pass
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the broker's other sockets come first
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("key service accept failed: %s", exc.strerror)
                    return
                raise
            sock.setblocking(False)
            if len(self._conns) >= self.core.limits.max_connections:
                self._close(next(iter(self._conns)))  # the oldest goes: a slow client loses, the service stays up
            fd = sock.fileno()
            self._conns[fd] = (sock, KeyServiceConnection(_source(addr), self._clock()))
            self.on_open(fd)

    def readable(self, fd: int) -> None:
        sock, conn = self._conns[fd]
        try:
            data = sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        reply, close = conn.receive(data, self.core, self._clock())
        self._conns.move_to_end(fd)
        if reply:
            try:
                sock.send(reply)  # a few dozen bytes into an empty socket buffer; a peer that can't take them loses them
            except OSError:
                close = True
        if close:
            self._close(fd)

    def expire(self, now: float) -> None:
        """Close connections idle for longer than the timeout (oldest activity first)."""
        self.core.failed_recoveries.flush(now)
        timeout = self.core.limits.idle_timeout
        while self._conns:
            fd, (_, conn) = next(iter(self._conns.items()))
            if now - conn.last_active <= timeout:
                return
            self._close(fd)

    def _close(self, fd: int) -> None:
        sock, _ = self._conns.pop(fd)
        self.on_close(fd)
        sock.close()

    def close(self) -> None:
        for fd in list(self._conns):
            self._close(fd)
        self.listener.close()


def _source(addr) -> str:
    host = addr[0] if isinstance(addr, tuple) else str(addr)
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host
