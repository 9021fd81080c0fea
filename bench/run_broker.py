"""The real broker (``broker.server.BrokerServer``, as ``p2pchat broker`` runs it), configured for a benchmark.

It differs from the CLI in two ways. The per-connection abuse limits are raised out of reach: the
token buckets still run on every frame, but they never refuse one, because a benchmark sender
is a flood by design. Sessions are kept alive for the whole run: the scripted clients send no
heartbeats. ``--transport plain`` asks for the broker's plaintext mode, and ``--store off``
for relaying without store-and-forward, where the broker has them.

    python bench/run_broker.py --port P --data-dir D [--transport curve|plain] [--store on|off]

Logs like the CLI; "broker listening on ..." on stderr means ready. Stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from p2pchat.broker.shell.server import BrokerConfig, BrokerServer

HEARTBEAT_S = 60.0
UNREACHABLE = 1e15  # per second and burst, for every field of the broker's RateLimits


def supports_curve() -> bool:
    """Does this broker build speak CURVE (and so have a plaintext switch)?"""
    return "insecure" in {f.name for f in dataclasses.fields(BrokerConfig)}


def default_store() -> str:
    """"on" if this broker build queues durable frames (store-and-forward) by default."""
    return "on" if getattr(BrokerConfig(), "durable", False) else "off"


def config(port: int, data_dir: Path, transport: str, store: str | None = None) -> BrokerConfig:
    fields = {f.name for f in dataclasses.fields(BrokerConfig)}
    options: dict = dict(host="127.0.0.1", port=port, pub_port=port + 1, data_dir=data_dir, heartbeat_ivl=HEARTBEAT_S)
    if "insecure" in fields:
        options["insecure"] = transport == "plain"
    elif transport != "plain":
        raise SystemExit("this broker has no CURVE transport: use --transport plain")
    if "durable" in fields:
        options["durable"] = (store or default_store()) == "on"
    elif store == "on":
        raise SystemExit("this broker has no store-and-forward: use --store off")
    if "key_port" in fields:
        options["key_port"] = port + 2
    if "limits" in fields:
        limits_type = type(BrokerConfig().limits)
        options["limits"] = limits_type(**{f.name: UNREACHABLE for f in dataclasses.fields(limits_type)})
    if "key_service" in fields:  # every benchmark client comes from this host
        service_type = type(BrokerConfig().key_service)
        options["key_service"] = service_type(admit_rate=UNREACHABLE, admit_burst=UNREACHABLE)
    return BrokerConfig(**options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="ROUTER port; PUB on +1, key service on +2")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--transport", choices=("curve", "plain"), default="curve")
    parser.add_argument("--store", choices=("on", "off"), default=None, help="default: the broker's own default")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = BrokerServer(config(args.port, args.data_dir, args.transport, args.store))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
