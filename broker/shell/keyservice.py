"""The key service: the broker's public key, admission tickets, recovery by phrase and the linking of devices
(with its PAKE rendezvous), one text line each way over plain TCP.

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
from p2pchat.broker.core.pake_slots import PakeRendezvous, PakeSlots, SlotRefused
from p2pchat.broker.core.ports import REFUSALS, KeyRegistry, StoreUnavailable
from p2pchat.broker.core.ratelimit import TokenBucket
from p2pchat.broker.shell.keyservice_lines import LABELS, MAX_REQUEST, AdmitQuery, DevicesQuery, KeyQuery, \
    LinkRequest, PakeClose, PakeGet, PakeOpen, PakePut, ProofRequest, RecoverRequest, RecoveryQuery, Request, \
    UnlinkRequest, devices_line, error_line, parse_request
from p2pchat.common.errors import ErrorCode, ProtocolError
from p2pchat.common.incidents import IncidentLog
from p2pchat.common.recovery import verify_recovery

log = logging.getLogger(__name__)

MAX_REQUESTS = 4  # per connection; then it is closed


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

    def link_device(self, user: str, key: bytes, generation: int, proof: bytes, origin: str,
                    name: str = "") -> ErrorCode | None:
        """Add the device ``key`` with its link proof, if still at ``generation``; why not, or None."""

    def unlink_device(self, user: str, key: bytes, generation: int | None, origin: str) -> ErrorCode | None:
        """Remove the device ``key``, if still at ``generation`` (when given); why not, or None."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class KeyServiceLimits:
    max_connections: int = 256  # past it the oldest connection is closed
    idle_timeout: float = 5.0  # seconds a connection may wait between requests
    admit_rate: float = 20.0  # ADMIT and DEVICES requests per second per source address...
    admit_burst: float = 200.0  # ...with this burst (raise both for load tests from one host)
    max_sources: int = 10_000  # source addresses (and IDs) with a bucket; the least recent is forgotten
    recover_rate: float = 1.0  # RECOVERY, RECOVER, LINK, UNLINK and PAKE_OPEN requests per second per source...
    recover_burst: float = 10.0  # ...with this burst
    # RECOVER, LINK and UNLINK attempts per second per user ID, from anywhere: each tests a proof of the phrase,
    # so they share one bound, 30 an hour...
    recover_id_rate: float = 1 / 120
    recover_id_burst: float = 5.0  # ...after these (a phrase partly seen over a shoulder stays out of reach)
    pake_rate: float = 10.0  # PAKE_PUT, PAKE_GET and PAKE_CLOSE per second per source (a waiting side polls)...
    pake_burst: float = 100.0  # ...with this burst


_UNAVAILABLE = error_line(ErrorCode.STORAGE_UNAVAILABLE, "the broker's shared store is unavailable; retry later")


class KeyServiceCore:
    """Answers requests: KEY with the broker's key, ADMIT with a ticket (or why not), RECOVERY with the
    generation a proof must name, RECOVER, LINK and UNLINK by changing the ID's devices if the proof holds,
    DEVICES with the ID's devices, and the PAKE_ requests on the link slots (docs/PROTOCOL.md §10.1, §10.2)."""

    def __init__(self, broker_key: bytes, keys: AdmissionRegistry, limits: KeyServiceLimits = KeyServiceLimits(),
                 *, slots: PakeRendezvous | None = None) -> None:
        self.broker_key = broker_key
        self._key_line = f"KEY {broker_key.hex()}\n".encode()
        self.keys, self.limits = keys, limits
        self.slots = slots if slots is not None else PakeSlots()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._recover_sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._recover_ids: OrderedDict[str, TokenBucket] = OrderedDict()
        self._pake_sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self.failed_recoveries = IncidentLog("recoveries refused", log)  # per user ID, logged aggregated
        self._answer: dict[type, Callable[[Request, str, float], bytes]] = {
            KeyQuery: lambda request, source, now: self._key_line, AdmitQuery: self._admit,
            RecoveryQuery: self._recovery, RecoverRequest: self._prove, LinkRequest: self._prove,
            UnlinkRequest: self._prove, DevicesQuery: self._devices, PakeOpen: self._pake_open,
            PakePut: self._pake, PakeGet: self._pake, PakeClose: self._pake}

    def answer(self, request: Request, source: str, now: float) -> bytes:
        try:
            return self._answer[type(request)](request, source, now)
        except StoreUnavailable:  # cluster mode with Redis away: bindings, tickets and slots cannot be checked
            return _UNAVAILABLE
        except SlotRefused as exc:
            return error_line(exc.code, exc.message)

    def _admit(self, request: AdmitQuery, source: str, now: float) -> bytes:
        if not self._take(self._buckets, source, self.limits.admit_rate, self.limits.admit_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many admissions from this address; retry later")
        refused = self.keys.can_bind(request.user, request.key)
        devices = self.keys.devices(request.user)
        if refused is None and (devices is None or devices.find(request.key) is None):  # devices need no ticket
            refused = self.keys.issue_ticket(request.key, now)
        if refused is not None:
            log.info("admission of user=%s from %s refused: %s", request.user, source, refused.value)
            return error_line(refused, REFUSALS[refused].format(user=request.user))
        return b"OK\n"

    def _devices(self, request: DevicesQuery, source: str, now: float) -> bytes:
        if not self._take(self._buckets, source, self.limits.admit_rate, self.limits.admit_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many requests from this address; retry later")
        devices = self.keys.devices(request.user, fresh=True)
        if devices is None:
            return error_line(ErrorCode.UNKNOWN_RECIPIENT, f"user ID {request.user!r} is not registered here")
        return devices_line(devices)

    def _recovery(self, request: RecoveryQuery, source: str, now: float) -> bytes:
        state = self._account(request.user, source, now)
        return f"RECOVERY {state.generation}\n".encode() if type(state) is RecoveryState else state

    def _account(self, user: str, source: str, now: float) -> RecoveryState | bytes:
        """``user``'s recovery state if it has an account key, else the ERR line (the source's bucket first)."""
        limits = self.limits
        if not self._take(self._recover_sources, source, limits.recover_rate, limits.recover_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many recovery requests from this address; retry later")
        state = self.keys.recovery_state(user)
        if state is None:
            return error_line(ErrorCode.RECOVERY_REFUSED, f"user ID {user!r} is not registered here: nothing to "
                              "recover (the next key to register it gets it)")
        if state.recovery is None:
            return error_line(ErrorCode.RECOVERY_REFUSED, f"user ID {user!r} has no recovery key here (it was "
                              "registered by an older client): ask the broker's operator")
        return state

    def _prove(self, request: ProofRequest, source: str, now: float) -> bytes:
        """RECOVER, LINK or UNLINK: the account key's proof over the change, then the change itself."""
        user, limits = request.user, self.limits
        state = self._account(user, source, now)
        if type(state) is not RecoveryState:
            return state
        # Counted before the proof is checked: a guesser learns nothing from attempts past the bound.
        if not self._take(self._recover_ids, user, limits.recover_id_rate, limits.recover_id_burst, now):
            self.failed_recoveries.record(user, f"user={user}", f"attempt from {source} past the bound", now)
            return error_line(ErrorCode.RATE_LIMITED, f"too many recovery attempts for {user!r}; retry later")
        if not verify_recovery(state.recovery, request.signature, self.broker_key, user, state.generation,
                               request.key, LABELS[type(request)]):
            self.failed_recoveries.record(user, f"user={user}", f"wrong proof from {source}", now)
            return error_line(ErrorCode.RECOVERY_REFUSED, f"that is not the recovery phrase of {user!r} (or its "
                              "binding changed meanwhile: try again)")
        origin = f"key service {source}"
        if type(request) is RecoverRequest:
            refused = self.keys.move(user, request.key, Change.RECOVERED, origin, state.generation)
        elif type(request) is LinkRequest:
            refused = self.keys.link_device(user, request.key, state.generation, request.signature, origin,
                                            request.name)
        else:
            refused = self.keys.unlink_device(user, request.key, state.generation, origin)
        if refused is not None:
            return error_line(refused, _PROOF_REFUSALS.get(refused, REFUSALS.get(refused, "")).format(user=user))
        log.warning("user=%s: %s with its recovery phrase, from %s", user, _DONE[type(request)], source)
        return b"OK\n"

    def _pake_open(self, request: PakeOpen, source: str, now: float) -> bytes:
        if not self._take(self._recover_sources, source, self.limits.recover_rate, self.limits.recover_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many links opened from this address; retry later")
        return f"PAKE {self.slots.open(now)} {int(self.slots.ttl)}\n".encode()

    def _pake(self, request: PakePut | PakeGet | PakeClose, source: str, now: float) -> bytes:
        if not self._take(self._pake_sources, source, self.limits.pake_rate, self.limits.pake_burst, now):
            return error_line(ErrorCode.RATE_LIMITED, "too many link requests from this address; retry later")
        if type(request) is PakePut:
            self.slots.put(request.slot, request.side, request.n, request.data, now)
        elif type(request) is PakeClose:
            self.slots.close(request.slot, now)
        else:
            data = self.slots.get(request.slot, request.side, request.n, now)
            return b"WAIT\n" if data is None else f"PAKE_DATA {data.hex()}\n".encode()
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


_DONE = {RecoverRequest: "moved to a new key", LinkRequest: "a device linked", UnlinkRequest: "a device unlinked"}
_PROOF_REFUSALS = {  # why a proof that holds changed nothing
    ErrorCode.RECOVERY_REFUSED: "the binding of {user!r} changed meanwhile: try again",
    ErrorCode.TOO_MANY_DEVICES: "{user!r} has as many devices as the broker allows: unlink one first",
    ErrorCode.DEVICES_CHANGED: "that key is not a device of {user!r}",
    ErrorCode.LINK_FAILED: "that is the last device of {user!r}: it cannot be unlinked (recover the ID to another "
                           "key instead)",
}


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
                sock.send(reply)  # at most a few KiB into an empty socket buffer; a peer that can't take them loses them
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
