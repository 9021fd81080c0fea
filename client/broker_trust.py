"""Which broker key to trust: pinned on the command line, remembered (known_brokers), or on first use.

CurveZMQ needs the broker's public key before connecting, so the broker also
answers on a plaintext *key port* (server port + 2) with its key. That answer
is only ever trusted the first time (loudly), or when it matches a pin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from client.trust import KeyStore
from common.crypto import fingerprint
from common.endpoints import ServerAddress
from common.errors import ErrorCode, ProtocolError, RemoteError
from common.protocol import BrokerKey, decode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: bytes
    first_use: bool  # True: nothing vouched for it; we pinned what the broker said


def _normalise(fp: str) -> str:
    return "".join(fp.lower().split())


def fetch_broker_key(ctx: zmq.Context, server: ServerAddress, key_port: int, timeout: float) -> bytes | None:
    """Ask the key port once; None if it does not answer in time or answers nonsense."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024)
    try:
        sock.connect(f"tcp://{server.host}:{key_port}")
        sock.send_multipart([b"", b"key?"])
        if not sock.poll(int(timeout * 1000)):
            return None
        parts = sock.recv_multipart()
        msg = decode(parts[-1:]).message
        return msg.key if type(msg) is BrokerKey else None
    except (zmq.ZMQError, ProtocolError):
        return None
    finally:
        sock.close(0)


def resolve_broker_key(ctx: zmq.Context, server: ServerAddress, key_port: int, known: KeyStore,
                       pinned_fingerprint: str | None, stopped: Callable[[], bool]) -> TrustedKey | None:
    """The key to use for ``server``; raises RemoteError(BROKER_KEY_CHANGED) on a mismatch, None if stopped."""
    name = str(server)
    remembered = known.get(name)
    delay = 0.05
    while not stopped():
        offered = fetch_broker_key(ctx, server, key_port, timeout=delay * 4)
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
