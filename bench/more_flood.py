"""The unfinished-multipart flood: parts that all carry ZeroMQ's MORE flag, at one broker endpoint.

libzmq keeps the parts of a message that never ends outside the high-water mark, and
``ZMQ_MAXMSGSIZE`` limits one frame only, so an endpoint that reads ZeroMQ from strangers can be
made to hold them all. A libzmq sender never writes an unfinished message either, so this program
sends one message of ``--parts`` parts plus a last one through a TCP relay of its own that stops
forwarding before that last part: the broker sees parts that all say "more is coming". It prints
the broker's RSS before, at its peak and after the sender left (one JSON object).

    python bench/more_flood.py --pid PID --port P --target key|router|pub [--parts 1000000]

``key`` floods the key port (plain TCP bytes where it is no ZeroMQ socket); ``router`` and ``pub``
connect with a fresh CURVE key that the key service first admits (``--user``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from p2pchat.common.crypto import Identity
from p2pchat.common.endpoints import ServerAddress

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


@dataclass
class FloodResult:
    bytes_forwarded: int = 0
    cut: bool = False  # the broker closed the connection on us


class CappedRelay:
    """Listens on a loopback port; forwards one connection to ``target`` until ``budget`` bytes went upstream
    (or until ``freeze()``), then holds it open: the broker sees a peer that stopped mid-message. ``cut``
    is set when the broker closes the connection."""

    def __init__(self, target: tuple[str, int], budget: float = float("inf")) -> None:
        self.target, self.budget = target, budget
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.result = FloodResult()
        self.cut = threading.Event()  # the broker closed the connection (before we did)
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            inner, _ = self.listener.accept()
            outer = socket.create_connection(self.target)
        except OSError:
            self.cut.set()
            return
        self._sink = (inner, outer)  # kept open after the loop: the message stays unfinished; close() ends them
        threading.Thread(target=self._down, args=(outer, inner), daemon=True).start()
        try:
            while self.result.bytes_forwarded < self.budget and not self.cut.is_set():
                data = inner.recv(int(min(1 << 16, self.budget - self.result.bytes_forwarded)))
                if not data:
                    break
                outer.sendall(data)
                self.result.bytes_forwarded += len(data)
        except OSError:
            self._cut()

    def _down(self, outer: socket.socket, inner: socket.socket) -> None:
        try:
            while data := outer.recv(1 << 16):
                inner.sendall(data)
        except OSError:
            pass
        self._cut()

    def freeze(self) -> None:
        """Forward nothing more upstream (what is in flight may still go)."""
        self.budget = self.result.bytes_forwarded

    def _cut(self) -> None:
        if not self._closing:
            self.result.cut = True
            self.cut.set()

    def close(self) -> None:
        self._closing = True
        for sock in (*getattr(self, "_sink", ()), self.listener):
            sock.close()


def _broker_key(server: ServerAddress, key_port: int) -> bytes:
    from p2pchat.client import broker_trust
    try:
        key = broker_trust.fetch_broker_key(server, key_port, timeout=5.0)
    except TypeError:  # a broker from before the plain TCP key service: the client asked with a ZeroMQ context
        key = broker_trust.fetch_broker_key(zmq.Context.instance(), server, key_port, timeout=5.0)
    if key is None:
        raise SystemExit("the key service did not answer")
    return key


def flood(target: str, server: ServerAddress, key_port: int, parts: int, size: int, user: str,
          seconds: float) -> FloodResult:
    """Send ``parts`` MORE-flagged parts of ``size`` bytes at ``target``; hold the connection until the end."""
    port = {"key": key_port, "router": server.port, "pub": server.port + 1}[target]
    budget = parts * size
    if target == "key" and _plain_key_service(server.host, key_port):
        return _raw_flood((server.host, key_port), budget, size)
    relay = CappedRelay((server.host, port), budget)
    try:
        ctx = zmq.Context()
        sock = ctx.socket({"key": zmq.DEALER, "router": zmq.DEALER, "pub": zmq.XSUB}[target])
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        if target != "key":
            identity = Identity.generate()
            broker_key = _broker_key(server, key_port)
            from p2pchat.client import broker_trust
            if hasattr(broker_trust, "admit"):
                broker_trust.admit(server, key_port, user, identity.public, timeout=5.0)
            sock.curve_serverkey = z85.encode(broker_key)
            sock.curve_publickey, sock.curve_secretkey = identity.curve_public, identity.curve_secret
        sock.connect(f"tcp://127.0.0.1:{relay.port}")
        part = b"x" * size
        for _ in range(parts):
            sock.send(part, zmq.SNDMORE)
        sock.send(b"")  # the last part: libzmq writes the message now, and the relay never forwards this
        relay.cut.wait(seconds)  # hold the unfinished message until the broker cuts us or time is up
        sock.close(0)
        ctx.term()
        return relay.result
    finally:
        time.sleep(1.0)
        relay.close()


def _raw_flood(address: tuple[str, int], budget: int, size: int) -> FloodResult:
    """A plain TCP service: the same ZMTP bytes (MORE-flagged parts of a NULL-mechanism peer), written straight."""
    result = FloodResult()
    head = b"\x03" + size.to_bytes(8, "big") if size > 255 else bytes((1, size))
    chunk = (head + b"x" * size) * 64
    try:
        with socket.create_connection(address, timeout=5.0) as raw:
            while result.bytes_forwarded < budget:
                raw.sendall(chunk)
                result.bytes_forwarded += len(chunk)
    except OSError:
        result.cut = True
    return result


def _plain_key_service(host: str, port: int) -> bool:
    """A ZeroMQ ROUTER (an old broker's key port) greets first with the ZMTP signature; ours waits."""
    with socket.create_connection((host, port), timeout=5.0) as raw:
        raw.settimeout(0.3)
        try:
            return raw.recv(1, socket.MSG_PEEK) != b"\xff"
        except (TimeoutError, socket.timeout):
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the broker's process id (for its RSS)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the broker's ROUTER port (PUB +1, keys +2)")
    parser.add_argument("--target", choices=("key", "router", "pub"), required=True)
    parser.add_argument("--parts", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--user", default="flooder")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="hold the connection at most this long, waiting for the broker to cut it")
    args = parser.parse_args(argv)
    before = peak = rss_mib(args.pid)
    done = threading.Event()
    out: dict = {}

    def run() -> None:
        out["r"] = flood(args.target, ServerAddress(args.host, args.port), args.port + 2, args.parts, args.size,
                         args.user, args.seconds)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    while not done.wait(0.05):
        peak = max(peak, rss_mib(args.pid))
    time.sleep(2.0)
    after = rss_mib(args.pid)
    result: FloodResult = out["r"]
    print(json.dumps({"target": args.target, "mib_forwarded": round(result.bytes_forwarded / 2**20, 1),
                      "cut_by_broker": result.cut, "rss_before_mib": round(before, 1),
                      "rss_peak_mib": round(max(peak, after), 1), "rss_after_sender_left_mib": round(after, 1),
                      "growth_mib": round(max(peak, after) - before, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
