"""Which broker key to trust: pinned on the command line, remembered (known_brokers), or on first use.

CurveZMQ needs the broker's public key before connecting, so the broker also runs a small plain
TCP *key service* (server port + 2, docs/PROTOCOL.md §10.1) that answers ``KEY`` with its key. That
answer is only ever trusted the first time (loudly), or when it matches a pin. The same service
admits a client key to the CURVE sockets (``ADMIT``) before it has registered an ID, moves an ID to
a new key on the proof of its recovery phrase (``RECOVERY``, ``RECOVER``), links and unlinks devices on the
account key's proofs (``LINK``, ``UNLINK``), lists them (``DEVICES``) and carries the link code's PAKE between
two devices (``PAKE_*``; ``KeyService`` has a method per request).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from p2pchat.broker.core.ports import Device, DeviceList
from p2pchat.client.storage.trust import KeyStore
from p2pchat.common.crypto import fingerprint
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import BrokenError, ErrorCode, P2PChatError, ProtocolError, RemoteError
from p2pchat.common.paths import ensure_private_dir, home_dir
from p2pchat.common.recovery import LINK_LABEL, STATEMENT_LABEL, UNLINK_LABEL, RecoveryKey

log = logging.getLogger(__name__)

MAX_REPLY = 4096  # the service's replies are one line (a DEVICES list the longest)
ADMIT_TIMEOUT = 30.0  # seconds to get a ticket while the broker says "later"
RETRY_LATER = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.ADMISSION_FULL, ErrorCode.STORAGE_UNAVAILABLE})


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: bytes
    first_use: bool  # True: nothing vouched for it; we pinned what the broker said


def _normalise(fp: str) -> str:
    return "".join(fp.lower().split())


def key_service_request(server: ServerAddress, key_port: int, line: str, timeout: float) -> str | None:
    """Send one request line, return the reply line (without newline); None if unreachable or silent."""
    try:
        with socket.create_connection((server.host, key_port), timeout=timeout) as sock:
            sock.sendall(line.encode("ascii") + b"\n")
            reply = b""
            while b"\n" not in reply and len(reply) < MAX_REPLY:
                data = sock.recv(MAX_REPLY - len(reply))
                if not data:
                    return None
                reply += data
    except OSError:
        return None
    line_out, newline, _ = reply.partition(b"\n")
    return line_out.decode("ascii", "replace") if newline else None


def fetch_broker_key(server: ServerAddress, key_port: int, timeout: float) -> bytes | None:
    """Ask the key service once; None if it does not answer in time or answers nonsense."""
    reply = key_service_request(server, key_port, "KEY", timeout)
    word, _, key = (reply or "").partition(" ")
    if word != "KEY" or len(key) != 64:
        return None
    try:
        return bytes.fromhex(key)
    except ValueError:
        return None


def admit(server: ServerAddress, key_port: int, user: str, key: bytes, timeout: float,
          stopped: Callable[[], bool] = lambda: False,
          waiting: Callable[[RemoteError], None] = lambda error: None) -> None:
    """Have the broker admit ``key`` to its CURVE sockets for registering ``user`` (a no-op once bound).

    Retries while the broker says "later" (rate_limited, admission_full, storage_unavailable) until
    ``timeout``, calling ``waiting`` with the first such answer; raises RemoteError with the broker's
    code when it refuses, BrokenError when the service is unreachable.
    """
    told = False
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        remaining = deadline - time.monotonic()
        reply = key_service_request(server, key_port, f"ADMIT {user} {key.hex()}", max(0.05, min(remaining, 2.0)))
        if reply == "OK":
            return
        code, message = ErrorCode.BROKER_UNREACHABLE, "the key service did not answer"
        if reply is not None:
            code, message = _refusal(reply)
            if code not in RETRY_LATER:
                raise RemoteError(f"the broker refused to admit {user!r}: {message or reply}", code)
            if not told:
                told = True
                waiting(RemoteError(f"the broker cannot admit {user!r} yet: {message}; retrying", code))
        if stopped() or time.monotonic() + delay >= deadline:
            if code is ErrorCode.BROKER_UNREACHABLE:
                raise BrokenError(f"the key service {server.host}:{key_port} did not answer")
            raise RemoteError(f"the broker refused to admit {user!r}: {message}", code)
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _refusal(reply: str) -> tuple[ErrorCode, str]:
    """The code and message of an ``ERR <code> <message>`` line (``bad_frame`` and the line for anything else)."""
    word, _, rest = reply.partition(" ")
    text, _, message = rest.partition(" ")
    try:
        return (ErrorCode(text), message) if word == "ERR" else (ErrorCode.BAD_FRAME, reply)
    except ValueError:
        return ErrorCode.BAD_FRAME, reply


_LABELS = {"RECOVER": STATEMENT_LABEL, "LINK": LINK_LABEL, "UNLINK": UNLINK_LABEL}
_DONE = {"RECOVER": "recover", "LINK": "link a device of", "UNLINK": "unlink a device of"}


@dataclass(frozen=True, slots=True)
class KeyService:
    """The key service of one broker: a method per request, each on its own connection."""

    server: ServerAddress
    port: int
    timeout: float

    def ask(self, line: str) -> str:
        """The reply line; BrokenError if the service does not answer."""
        reply = key_service_request(self.server, self.port, line, self.timeout)
        if reply is None:
            raise BrokenError(f"the key service {self.server.host}:{self.port} did not answer")
        return reply

    def expect(self, line: str, word: str, what: str) -> str:
        """The reply's text after ``word``; RemoteError with the broker's code if it answered otherwise."""
        reply = self.ask(line)
        answer, _, rest = reply.partition(" ")
        if answer != word:
            code, message = _refusal(reply)
            raise RemoteError(f"the broker refused to {what}: {message}", code)
        return rest

    def generation(self, user: str, what: str) -> int:
        """The generation a proof for ``user`` must name (RECOVERY), to ``what`` (for the error)."""
        generation = self.expect(f"RECOVERY {user}", "RECOVERY", what)
        if not generation.isdigit():
            raise ProtocolError(f"the key service answered RECOVERY with {generation!r}")
        return int(generation)

    def prove(self, verb: str, user: str, key: bytes, account: RecoveryKey, broker_key: bytes,
              name: str = "") -> None:
        """RECOVER, LINK or UNLINK ``key`` with the account key's proof for the broker whose key is
        ``broker_key`` (RemoteError if refused: ``recovery_refused``, ``rate_limited``, ``too_many_devices``...)."""
        what = f"{_DONE[verb]} {user!r}"
        proof = account.prove(broker_key, user, self.generation(user, what), key, _LABELS[verb])
        extra = f" {name.encode().hex()}" if name else ""
        self.expect(f"{verb} {user} {key.hex()} {proof.hex()}{extra}", "OK", what)

    def devices(self, user: str) -> DeviceList:
        reply = self.expect(f"DEVICES {user}", "DEVICES", f"list the devices of {user!r}")
        try:
            ver, *listed = reply.split(" ")
            devices = []
            for entry in listed:
                number, key, flags, added_ms, name = entry.split(":")
                devices.append(Device(int(number), bytes.fromhex(key), bytes.fromhex(name).decode(), int(flags),
                                      int(added_ms)))
            return DeviceList(int(ver), tuple(devices))
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(f"the key service answered DEVICES with {reply[:80]!r}") from None

    def pake_open(self) -> tuple[int, float]:
        """A new link slot: its number and how many seconds it lives."""
        slot, _, ttl = self.expect("PAKE_OPEN", "PAKE", "open a link slot").partition(" ")
        if not (slot.isdigit() and ttl.isdigit()):
            raise ProtocolError(f"the key service answered PAKE_OPEN with {slot} {ttl}")
        return int(slot), float(ttl)

    def pake_put(self, slot: int, side: str, n: int, data: bytes) -> None:
        self.expect(f"PAKE_PUT {slot} {side} {n} {data.hex()}", "OK", "link")

    def pake_get(self, slot: int, side: str, n: int) -> bytes | None:
        """Message ``n`` of ``side`` in the slot, or None while it is not there."""
        reply = self.ask(f"PAKE_GET {slot} {side} {n}")
        if reply == "WAIT":
            return None
        word, _, data = reply.partition(" ")
        if word != "PAKE_DATA":
            code, message = _refusal(reply)
            raise RemoteError(f"the broker refused to link: {message}", code)
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise ProtocolError("the key service answered PAKE_GET with bytes that are not hex") from None

    def pake_close(self, slot: int) -> None:
        self.expect(f"PAKE_CLOSE {slot}", "OK", "close the link slot")


def resolve_broker_key(server: ServerAddress, key_port: int, known: KeyStore,
                       pinned_fingerprint: str | None, stopped: Callable[[], bool]) -> TrustedKey | None:
    """The key to use for ``server``; raises RemoteError(BROKER_KEY_CHANGED) on a mismatch, None if stopped."""
    name = str(server)
    remembered = known.get(name)
    delay = 0.05
    while not stopped():
        offered = fetch_broker_key(server, key_port, timeout=delay * 4)
        if offered is None and remembered is not None:
            offered = remembered  # key port unreachable: the CURVE handshake checks the pin anyway
        if offered is not None:
            if pinned_fingerprint and _normalise(fingerprint(offered)) != _normalise(pinned_fingerprint):
                raise RemoteError(f"broker {name} presents key {fingerprint(offered)}, not the pinned "
                                  f"{pinned_fingerprint}: refusing to connect", ErrorCode.BROKER_KEY_CHANGED)
            if remembered is not None and offered != remembered:
                raise RemoteError(
                    f"broker {name} key CHANGED from {fingerprint(remembered)} to {fingerprint(offered)}: refusing "
                    f"to connect. If the broker was reinstalled, verify the new key and remove {name!r} from "
                    f"{known.path}", ErrorCode.BROKER_KEY_CHANGED)
            if remembered is None:
                known.put(name, offered)
                if not pinned_fingerprint:
                    log.warning("TRUSTING broker %s on first use: key fingerprint %s (remembered in %s)",
                                name, fingerprint(offered), known.path)
            return TrustedKey(offered, first_use=remembered is None and not pinned_fingerprint)
        delay = min(delay * 2, 1.0)
    return None


def trusted_key_service(server: ServerAddress, key_port: int | None, pinned_fingerprint: str | None,
                        insecure: bool, timeout: float) -> tuple[KeyService, bytes]:
    """``server``'s key service, and the broker's key trusted as a connection would trust it (pinned, remembered,
    or on first use): what a proof must name. BrokenError if it does not answer within ``timeout``."""
    if insecure:
        raise P2PChatError("this needs the broker's key service, which a broker run with --insecure has not")
    port = key_port or server.port + 2
    deadline = time.monotonic() + timeout
    trusted = resolve_broker_key(server, port, KeyStore(ensure_private_dir(home_dir()) / "known_brokers.json"),
                                 pinned_fingerprint, stopped=lambda: time.monotonic() > deadline)
    if trusted is None:
        raise BrokenError(f"broker {server} unreachable after {timeout:g}s")
    return KeyService(server, port, timeout), trusted.key
