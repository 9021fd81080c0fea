"""The baseline for ``bench_relay.py``: a bare pyzmq ROUTER loop that only swaps frames.

It has the broker shell's I/O shape (poll, drain up to 1000 messages with
``copy=False``, send with ``DONTWAIT`` and ``ROUTER_MANDATORY``, same
high-water marks) and none of its work: no decoding, no sessions, no directory,
no ACK. The first message from a new routing id is taken to be a REGISTER and is
answered with one prebuilt REGISTERED frame; the first two such peers are the
pair, and everything else one of them sends goes, untouched, to the other.

With ``--transport curve`` its ROUTER is a CURVE server (a fresh keypair; no
ZAP handler, so any client key is let in: authentication costs only at the
handshake, encryption on every frame), and the broker's key service on port + 2
answers KEY with the public key and every ADMIT with OK.

With ``--ack`` it also answers every relayed message with one prebuilt ACK frame
(a constant, not referring to the message), so the sender does the same
receive work as against the broker: the difference left is the broker's
Python (decode, routing core, building the ACK), not its extra send.

    python bench/bare_router.py --port 5600 [--transport curve|plain] [--ack]

Prints "bare router listening on ..." to stderr when ready; stops on SIGINT or
SIGTERM and prints what it relayed and dropped.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import zmq

from p2pchat.common.protocol import Ack, AckStatus, Registered, pack

MAX_PEERS = 2
DRAIN_BATCH = 1000  # as in broker/shell/server.py


def _prebuilt(ack: bool) -> tuple[list[bytes], list[bytes] | None]:
    ts = int(time.time() * 1000)
    registered = pack(Registered("bare", os.urandom(8), 30_000), ts)
    return registered, (pack(Ack(bytes(16), AckStatus.RELAYED), ts) if ack else None)


def serve(port: int, ack: bool, curve: bool) -> int:
    registered, ack_frames = _prebuilt(ack)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    key_service = None
    peers: list[bytes] = []
    other: dict[bytes, bytes] = {}
    relayed = dropped = 0
    try:
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 10_000)
        if curve:
            from zmq.utils import z85

            from p2pchat.broker.shell.keyservice import KeyServiceCore, KeyServiceListener

            public, secret = zmq.curve_keypair()
            router.curve_server = True
            router.curve_secretkey = secret
            # The broker's key service (KEY, ADMIT), admitting every key: no ZAP handler here.
            key_service = KeyServiceListener("127.0.0.1", port + 2, KeyServiceCore(z85.decode(public), _AdmitAll()),
                                             clock=time.monotonic)
        router.bind(f"tcp://127.0.0.1:{port}")
        endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        print(f"bare router listening on {endpoint} (ack={'on' if ack else 'off'}, curve={'on' if curve else 'off'})",
              file=sys.stderr, flush=True)

        def send(frames: list) -> bool:
            try:
                router.send_multipart(frames, zmq.DONTWAIT, copy=False)
                return True
            except zmq.ZMQError as exc:  # a full pipe (EAGAIN) or a gone peer: dropped, as the broker drops it
                if exc.errno in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                    return False
                raise

        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        if key_service is not None:
            poller.register(key_service.fileno(), zmq.POLLIN)
            key_service.on_open = lambda fd: poller.register(fd, zmq.POLLIN)
            key_service.on_close = poller.unregister
        while not stopping:
            ready = dict(poller.poll(100))  # wake now and then to notice a signal
            if key_service is not None:
                key_service.expire(time.monotonic())
                if key_service.fileno() in ready:
                    key_service.accept()
                for fd in ready:
                    if type(fd) is int and key_service.owns(fd):
                        key_service.readable(fd)
            if router not in ready:
                continue
            for _ in range(DRAIN_BATCH):
                try:
                    parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                rid = parts[0].bytes
                dest = other.get(rid)
                if dest is not None:  # the whole job: swap the routing id
                    parts[0] = dest
                    if send(parts):
                        relayed += 1
                        if ack_frames is not None:
                            send([rid, *ack_frames])
                    else:
                        dropped += 1
                elif rid in peers or len(peers) >= MAX_PEERS:
                    dropped += 1  # a lone peer, or a third one: nowhere to go
                else:
                    peers.append(rid)
                    if len(peers) == MAX_PEERS:
                        other = {peers[0]: peers[1], peers[1]: peers[0]}
                    send([rid, *registered])
    finally:
        if key_service is not None:
            key_service.close()
        router.close(linger=0)
        ctx.term()
        print(f"bare router stopped: relayed={relayed} dropped={dropped}", file=sys.stderr, flush=True)
    return 0


class _AdmitAll:
    """Every ADMIT is answered OK: without a ZAP handler every key gets in anyway."""

    def can_bind(self, user: str, key: bytes) -> None:
        return None

    def issue_ticket(self, key: bytes, now: float) -> None:
        return None

    def devices(self, user: str, fresh: bool = False) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="ROUTER port on 127.0.0.1")
    parser.add_argument("--transport", choices=("curve", "plain"), default="plain")
    parser.add_argument("--ack", action="store_true", help="answer each relayed message with a constant ACK frame")
    args = parser.parse_args(argv)
    return serve(args.port, args.ack, args.transport == "curve")


if __name__ == "__main__":
    sys.exit(main())
