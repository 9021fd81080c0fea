"""``p2pchat load``: load- and soak-test a broker with scripted DEALER clients.

    p2pchat load --clients 1000 --duration 30 --rate 2 --ramp 5          # a broker of its own
    p2pchat load --server 127.0.0.1:5555 --clients 200 --json            # an existing broker
    p2pchat load --soak --clients 200 --duration 3600 --restart-every 300

Without ``--server`` the tool starts ``p2pchat broker`` (or ``--broker-cmd``)
on free loopback ports with a data directory of its own, and can then kill and
restart it (``--restart-every``). Clients run many to a process, on one
ZeroMQ context and one poll loop each (``client/load/worker.py``); their script
is ``client/load/script.py``; the figures and the verdict are
``client/load/report.py``. Message bodies are not end-to-end sealed: the
broker cannot tell, and the tool measures the broker, not client crypto.

Exit status: 0 when the verdict is PASS, 1 when it is FAIL (anything
acknowledged lost, errors, unexplained duplicates, a broken run), 2 on bad
options.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from p2pchat.client.load.config import LoadConfig
from p2pchat.client.load.plan import BODY, PEER_MODES
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import ExitCode, P2PChatError
from p2pchat.common.protocol import MAX_BODY_BYTES


SOAK_DURATION = 600.0
SOAK_CHURN_EVERY = 30.0
COUNT_DURATION_BOUND = 600.0


def _server(text: str) -> ServerAddress:
    try:
        return ServerAddress.parse(text)
    except P2PChatError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker")
    g.add_argument("--server", type=_server, default=None, metavar="H:P",
                   help="load this broker (default: start one of our own on free 127.0.0.1 ports)")
    g.add_argument("--pub-port", type=int, default=None, help="its presence port, if not the server port + 1")
    g.add_argument("--key-port", type=int, default=None, help="its key port (default: server port + 2)")
    g.add_argument("--server-key", default=None, metavar="FINGERPRINT", help="pin the broker's key fingerprint")
    g.add_argument("--insecure", action="store_true", help="plaintext transport (a broker run with --insecure)")
    g.add_argument("--broker-cmd", default=None, metavar="CMD",
                   help="how to start our broker instead of 'p2pchat broker'; may use {python} {port} {pub_port} "
                        "{key_port} {data_dir} {heartbeat}; it must print 'listening on' to stderr when ready")
    g.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for our broker (repeatable), e.g. --broker-arg=--no-store")
    g.add_argument("--broker-heartbeat", type=float, default=1.0, help="our broker's --heartbeat (default 1)")
    g.add_argument("--broker-rate-limit", type=float, default=1_000_000.0,
                   help="our broker's per-connection --rate-limit in frames/s (default 1e6: measure throughput, "
                        "not the abuse limit; the broker's own default is 10000)")
    g.add_argument("--broker-pid", type=int, default=None, help="sample this process's RSS/CPU (with --server)")

    g = parser.add_argument_group("clients and traffic")
    g.add_argument("--clients", type=int, default=10, help="scripted clients (default 10)")
    g.add_argument("--processes", type=int, default=None,
                   help="worker processes (default: enough for the fd limit, up to one per CPU)")
    g.add_argument("--ramp", type=float, default=0.0, help="seconds over which the clients connect (default 0)")
    g.add_argument("--duration", type=float, default=None,
                   help="seconds of sending (default 10; with --count an upper bound of 600; --soak 600)")
    g.add_argument("--rate", type=float, default=1.0,
                   help="messages per second per sender (default 1; 0: register and stay idle)")
    g.add_argument("--flood", action="store_true", help="unpaced: each sender keeps --window messages unacknowledged")
    g.add_argument("--window", type=int, default=1000, help="most unacknowledged messages per sender (default 1000)")
    g.add_argument("--count", type=int, default=0, help="messages per sender, then stop (default: for --duration)")
    g.add_argument("--senders", type=int, default=None, help="only the first N clients send (default: all)")
    g.add_argument("--peers", choices=PEER_MODES, default="random",
                   help="who sends to whom: random (default), ring (i -> i+1), pairs (0<->1, 2<->3, ...)")
    g.add_argument("--size", type=int, default=BODY.size, help=f"message body bytes (default and minimum {BODY.size})")
    g.add_argument("--receipts", action="store_true",
                   help="recipients also send DELIVERED receipts, as the chat client does")
    g.add_argument("--heartbeat", type=float, default=0.0,
                   help="cap the clients' heartbeat interval (default: the broker's, from REGISTERED; the chat "
                        "client uses min(1 s, the broker's))")
    g.add_argument("--files", type=float, default=0.0, metavar="SECONDS",
                   help="file traffic: each sender offers a file about every SECONDS, one at a time (default 0: "
                        "none); every client receives and verifies")
    g.add_argument("--file-size", type=int, default=1024 * 1024, metavar="BYTES",
                   help="bytes per file with --files (default 1 MiB)")
    g.add_argument("--seed", type=int, default=None, help="seed for peers, timing jitter and user names")

    g = parser.add_argument_group("presence")
    g.add_argument("--subscribe", action="store_true",
                   help="every client also opens a SUB (subscribed once all are registered); then time how long "
                        "a presence change takes to reach them all")
    g.add_argument("--probes", type=int, default=1, help="presence changes to time with --subscribe (default 1: "
                   "a probe user coming online and going offline)")

    g = parser.add_argument_group("soak")
    g.add_argument("--soak", action="store_true",
                   help="long run with client churn (default every 30 s per client) and a PASS/FAIL verdict")
    g.add_argument("--churn-every", type=float, default=None,
                   help="mean seconds between one client's disconnect and re-register (0: none)")
    g.add_argument("--churn-down", type=float, default=0.5, help="seconds a churned client stays away (default 0.5)")
    g.add_argument("--churn-crash", action="store_true",
                   help="churn like a crash: no UNREGISTER, come back with the same session token")
    g.add_argument("--restart-every", type=float, default=0.0,
                   help="kill and restart our broker every this many seconds while sending")
    g.add_argument("--restart-signal", choices=("KILL", "TERM"), type=str.upper, default="KILL",
                   help="how to stop it for a restart (default KILL)")
    g.add_argument("--max-rss-growth", type=float, default=None, metavar="MIB",
                   help="FAIL if the broker's RSS grows more than this while sending (without restarts)")

    g = parser.add_argument_group("run")
    g.add_argument("--drain", type=float, default=10.0,
                   help="after sending stops: once every client is registered again and nothing new has arrived "
                        "for this many seconds, what is still missing counts as lost (default 10; the drain is "
                        "capped at this + 120 s + clients/100 s)")
    g.add_argument("--register-timeout", type=float, default=None,
                   help="seconds after the ramp for every client to register (default 30 + clients/200)")
    g.add_argument("--sample-every", type=float, default=1.0, help="seconds between broker RSS/CPU samples")
    g.add_argument("--nofile", type=int, default=None,
                   help="RLIMIT_NOFILE for the tool, its workers and its broker (default: the hard limit; more "
                        "needs privileges)")
    g.add_argument("--json", action="store_true", help="print the report as one JSON object")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    g = parser.add_argument_group("test hooks (they make the run FAIL on purpose)")
    g.add_argument("--inject-drop", type=int, default=-1, metavar="SEQ",
                   help="client 0 counts its message SEQ as sent and acknowledged but never sends it: must be "
                        "reported lost")
    g.add_argument("--inject-dup", type=int, default=-1, metavar="SEQ",
                   help="client 0 sends its message SEQ twice: must be reported duplicated")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> LoadConfig:
    """The LoadConfig for these options; P2PChatError for a combination that cannot work."""
    if args.clients < 2:
        raise P2PChatError("--clients must be at least 2 (every message needs another client)")
    if args.rate < 0 or args.window < 1 or args.count < 0 or args.ramp < 0 or args.drain < 0:
        raise P2PChatError("--rate, --count, --ramp and --drain must not be negative; --window at least 1")
    if not BODY.size <= args.size <= MAX_BODY_BYTES:
        raise P2PChatError(f"--size must be from {BODY.size} to {MAX_BODY_BYTES}")
    if args.server is not None and args.restart_every > 0:
        raise P2PChatError("--restart-every restarts a broker the tool started itself: drop --server")
    if args.server is not None and args.broker_cmd:
        raise P2PChatError("--broker-cmd starts our own broker: drop --server")
    if args.count and not (args.rate > 0 or args.flood):
        raise P2PChatError("--count needs senders: a --rate above 0, or --flood")
    if args.files < 0 or args.file_size < 0:
        raise P2PChatError("--files and --file-size must not be negative")
    if args.subscribe and args.probes < 1:
        raise P2PChatError("--probes must be at least 1")
    duration = args.duration
    if duration is None:
        duration = SOAK_DURATION if args.soak else (COUNT_DURATION_BOUND if args.count else 10.0)
    churn_every = args.churn_every
    if churn_every is None:
        churn_every = SOAK_CHURN_EVERY if args.soak else 0.0
    return LoadConfig(
        clients=args.clients, duration=duration, rate=args.rate, flood=args.flood, window=args.window,
        count=args.count, senders=args.senders, peers=args.peers, size=args.size, receipts=args.receipts,
        ramp=args.ramp, processes=args.processes, server=args.server, pub_port=args.pub_port,
        key_port=args.key_port, server_key=args.server_key, insecure=args.insecure, subscribe=args.subscribe,
        probes=args.probes, drain=args.drain, register_timeout=args.register_timeout, soak=args.soak,
        churn_every=churn_every, churn_down=args.churn_down, churn_crash=args.churn_crash,
        restart_every=args.restart_every, restart_signal=args.restart_signal, broker_cmd=args.broker_cmd,
        broker_args=tuple(args.broker_arg), broker_heartbeat=args.broker_heartbeat,
        broker_rate_limit=args.broker_rate_limit, broker_pid=args.broker_pid, sample_every=args.sample_every,
        nofile=args.nofile, json=args.json, quiet=args.quiet, seed=args.seed, heartbeat=args.heartbeat,
        inject_drop=args.inject_drop, inject_dup=args.inject_dup, max_rss_growth_mib=args.max_rss_growth,
        files=args.files, file_size=args.file_size,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except P2PChatError as exc:
        print(f"p2pchat load: {exc.message}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        from p2pchat.client.load.coordinator import LoadRun
        from p2pchat.client.load.report import render, summarize
    except ImportError as exc:  # hdrhistogram / psutil are optional dependencies of the project
        print(f"p2pchat load: {exc}: install hdrhistogram and psutil (pip install -e '.[test]')", file=sys.stderr)
        return 1
    def terminate(*_: object) -> None:
        raise KeyboardInterrupt  # unwind through LoadRun's cleanup: workers joined, broker stopped

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        result = LoadRun(config).execute()
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(result)
    if config.json:
        print(json.dumps(summary))
        print(summary["verdict"]["line"], file=sys.stderr)
    else:
        print(render(summary))
    return 0 if summary["verdict"]["pass"] else 1
