"""``p2pchat broker`` (or ``python -m p2pchat.broker``): the broker's command line.

The options build one ``BrokerConfig``; ``--workers N`` runs N of these processes on one port
instead (broker/shell/workers.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from p2pchat.common.errors import ExitCode
from p2pchat.common.paths import broker_dir


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The broker's options, on ``p`` (the ``broker`` subcommand, or this module's own parser)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="request port (default 5555)")
    p.add_argument("--pub-port", type=int, default=None, help="presence port (default: --port + 1)")
    p.add_argument("--data-dir", default=None, help="broker state (default: $P2PCHAT_HOME/broker)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds (default 1)")
    p.add_argument("--key-port", type=int, default=None, help="plain TCP key service: the broker key for clients' "
                   "trust on first use, admission tickets for new keys (default: --port + 2)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext transport, no CURVE and no identity protection: debugging on a loopback host only")
    p.add_argument("--ids-per-key", type=int, default=4, help="user IDs one key may claim (default 4)")
    p.add_argument("--admit-rate", type=float, default=20.0,
                   help="admissions of new keys per second per source address (default 20; raise it for load "
                        "tests from one host)")
    p.add_argument("--admit-burst", type=float, default=200.0,
                   help="burst of admissions per source address (default 200)")
    p.add_argument("--recover-rate", type=float, default=1.0,
                   help="recovery requests (RECOVERY, RECOVER) per second per source address (default 1)")
    p.add_argument("--recover-burst", type=float, default=10.0,
                   help="burst of recovery requests per source address (default 10)")
    p.add_argument("--no-store", action="store_true",
                   help="no offline delivery: relay to online peers only (no SQLite store)")
    p.add_argument("--rate-limit", type=float, default=10_000.0,
                   help="frames per second one connection may send, bursts of twice that (default 10000)")
    p.add_argument("--fsync", action="store_true", help="fsync every group commit (survive power loss too)")
    p.add_argument("--queue-max", type=int, default=20_000,
                   help="undelivered frames kept per user (default 20000)")
    p.add_argument("--queue-sender-max", type=int, default=10_000,
                   help="of those, frames one sender may keep queued for one user (default 10000)")
    p.add_argument("--queue-ttl", type=float, default=7 * 24 * 3600.0,
                   help="seconds an undelivered frame is kept (default 7 days)")
    p.add_argument("--cluster", default=None, metavar="redis://HOST:PORT/DB",
                   help="cluster mode: share users, keys, queues and presence with other brokers through Redis")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run N broker processes on one port (SO_REUSEPORT; needs --cluster)")
    p.add_argument("--io-threads", type=int, default=1, metavar="N",
                   help="ZeroMQ I/O threads; each carries about 600 MiB/s of CURVE-encrypted file data per "
                        "direction: raise it on a host with spare cores and heavy file traffic (default 1)")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT, so several brokers (with --cluster) share the port")
    p.add_argument("--room-files", default=None, metavar="DIR",
                   help="where files sent to rooms are kept, sealed (default: DATA_DIR/room-files; every broker of a "
                        "cluster must be given the same directory)")
    p.add_argument("--room-quota", type=int, default=2 << 30, metavar="BYTES",
                   help="sealed bytes of files kept per room, or per recipient of held files (default 2 GiB)")
    p.add_argument("--room-files-max", type=int, default=16 << 30, metavar="BYTES",
                   help="room files kept in all (default 16 GiB)")
    p.set_defaults(func=run)
    commands = p.add_subparsers(dest="broker_command", metavar="admin")
    from p2pchat.broker.admin import configure_parser as configure_admin

    configure_admin(commands.add_parser("admin", help="the operator's commands on key bindings: release, move, audit",
                                        description="Release or move a user ID, or print the audit of such changes, "
                                                    "on a stopped or running broker's data (docs/PROTOCOL.md §10.2)."))


def run(args: argparse.Namespace) -> int:
    """Run the broker the parsed options describe, until SIGINT or SIGTERM."""
    from p2pchat.broker.backends.tickets import KeyLimits
    from p2pchat.broker.core.ports import QueueLimits
    from p2pchat.broker.core.room_files import RoomFileLimits
    from p2pchat.broker.core.ratelimit import RateLimits
    from p2pchat.broker.shell.keyservice import KeyServiceLimits
    from p2pchat.broker.shell.server import BrokerConfig, BrokerServer, is_loopback

    if args.insecure and not is_loopback(args.host):
        # Without CURVE anyone can register as anyone by quoting a public key: never beyond this host.
        print(f"p2pchat broker: --insecure turns off authentication and encryption; it is refused on {args.host} "
              "(only a loopback host such as 127.0.0.1 may run it)", file=sys.stderr)
        return ExitCode.USAGE
    if args.workers > 1:
        if not args.cluster:
            print("p2pchat broker: --workers N needs --cluster redis://HOST:PORT/DB (the workers share "
                  "their state through Redis)", file=sys.stderr)
            return ExitCode.USAGE
        from p2pchat.broker.shell.workers import WorkerPool

        pool = WorkerPool(args.broker_argv, args.workers, args.log_level)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: pool.stop())
        return pool.run()
    config = BrokerConfig(
        host=args.host, port=args.port, pub_port=args.pub_port,
        data_dir=Path(args.data_dir) if args.data_dir else broker_dir(),
        heartbeat_ivl=args.heartbeat, insecure=args.insecure, key_port=args.key_port,
        durable=not args.no_store, fsync=args.fsync,
        limits=RateLimits(frames_per_s=args.rate_limit, frame_burst=2 * args.rate_limit),
        queue=QueueLimits(max_per_user=args.queue_max, max_per_sender=args.queue_sender_max,
                          ttl_seconds=args.queue_ttl),
        cluster=args.cluster, reuse_port=args.reuse_port or args.workers > 1, io_threads=max(1, args.io_threads),
        key_limits=KeyLimits(ids_per_key=args.ids_per_key),
        key_service=KeyServiceLimits(admit_rate=args.admit_rate, admit_burst=args.admit_burst,
                                     recover_rate=args.recover_rate, recover_burst=args.recover_burst),
        room_files_dir=Path(args.room_files) if args.room_files else None,
        room_files=RoomFileLimits(room_quota=args.room_quota, total_quota=args.room_files_max),
    )
    server = BrokerServer(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pchat.broker", description="Run a p2p-chat broker.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    configure_parser(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.broker_argv = argv
    logging.basicConfig(level=(args.log_level or "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
