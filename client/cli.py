"""``p2pchat``: the command line. One subcommand per job; exit 0 on success,
non-zero with a one-line error on stderr otherwise."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from client import events as ev
from common.allocator import tune_for_bulk_transfer
from common.endpoints import ServerAddress
from common.errors import BrokenError, P2PChatError, RemoteError, TransferError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2, 3, 4

log = logging.getLogger("p2pchat")


def _default_user() -> str:
    name = os.environ.get("P2PCHAT_USER") or getpass.getuser()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:32] or "user"


def _server(text: str) -> ServerAddress:
    try:
        return ServerAddress.parse(text)
    except P2PChatError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _client_options(parser: argparse.ArgumentParser, user_default: str | None = None) -> None:
    parser.add_argument("--server", type=_server, default=ServerAddress(), metavar="H:P",
                        help="broker address (default 127.0.0.1:5555)")
    parser.add_argument("--pub-port", type=int, default=None,
                        help="the broker's presence port, if not the server port + 1")
    parser.add_argument("--user", default=user_default, help="your user ID (default: $P2PCHAT_USER or login name)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")
    parser.add_argument("--server-key", default=None, metavar="FINGERPRINT",
                        help="pin the broker's key fingerprint (default: trust on first use, then remember)")
    parser.add_argument("--key-port", type=int, default=None, help="the broker's key port (default: port + 2)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext transport, for debugging against a broker run with --insecure")


def _connect(args: argparse.Namespace, user: str, on_event: Callable[[ev.Event], None] | None = None):
    from client.client import ChatClient, ClientConfig

    server = ServerAddress(args.server.host, args.server.port, args.pub_port)
    config = ClientConfig(server=server, send_timeout=args.timeout, insecure=args.insecure,
                          server_key=args.server_key, key_port=args.key_port)
    if getattr(args, "received_dir", None):
        config = dataclasses.replace(config, received_dir=Path(args.received_dir).expanduser())
    if getattr(args, "chunk_size", None):
        config = dataclasses.replace(config, chunk_size=args.chunk_size)
    if getattr(args, "window", None):
        config = dataclasses.replace(config, window=args.window)
    if getattr(args, "max_file_size", None):
        config = dataclasses.replace(config, max_file_size=args.max_file_size)
    client = ChatClient(user, config, on_event=on_event)
    client.connect(timeout=args.timeout)
    return client


# --- subcommands -------------------------------------------------------------
def cmd_broker(args: argparse.Namespace) -> int:
    from broker.keys import KeyLimits
    from broker.keyservice import KeyServiceLimits
    from broker.server import BrokerConfig, BrokerServer, is_loopback
    from broker.ratelimit import RateLimits
    from broker.store import QueueLimits
    from common.paths import broker_dir

    if args.insecure and not is_loopback(args.host):
        # Without CURVE anyone can register as anyone by quoting a public key: never beyond this host.
        print(f"p2pchat broker: --insecure turns off authentication and encryption; it is refused on {args.host} "
              "(only a loopback host such as 127.0.0.1 may run it)", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1:
        if not args.cluster:
            print("p2pchat broker: --workers N needs --cluster redis://HOST:PORT/DB (the workers share "
                  "their state through Redis)", file=sys.stderr)
            return EXIT_USAGE
        from broker.workers import WorkerPool, strip_workers

        pool = WorkerPool(strip_workers(sys.argv[1:]), args.workers)
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
        key_service=KeyServiceLimits(admit_rate=args.admit_rate, admit_burst=args.admit_burst),
    )
    server = BrokerServer(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve_forever()
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    text = " ".join(args.text) if args.text else sys.stdin.read()
    with _connect(args, args.user) as client:
        client.send(args.to, text, timeout=args.timeout)
    return EXIT_OK


def cmd_send_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    path = Path(args.path).expanduser()
    if not path.is_file():
        raise TransferError(f"{path} is not a readable file")
    size = path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name[:30],
               disable=args.quiet or None, file=sys.stderr)
    lock = threading.Lock()
    mine: list[bytes] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.FileProgress) and event.xfer in mine:
            with lock:
                bar.update(event.done - bar.n)

    try:
        with _connect(args, args.user, on_event) as client:
            xfer, done = client.send_file(args.to, path)
            mine.append(xfer)
            done.result()  # returns once the receiver has verified and saved the file
            with lock:
                bar.update(size - bar.n)
    finally:
        bar.close()
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    user = args.user or f"peers-{os.urandom(3).hex()}"
    first_list = threading.Event()

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.PeersChanged):
            first_list.set()

    with _connect(args, user, on_event) as client:
        if not first_list.wait(args.timeout):
            raise BrokenError("no peer list from the broker")
        peers = sorted(client.peers() - {user})
    print(json.dumps(peers) if args.json else "\n".join(peers))
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    stop = threading.Event()
    lock = threading.Lock()
    count = 0

    def emit(record: dict, human: str) -> None:
        with lock:
            print(json.dumps(record) if args.json else human, flush=True)

    def on_event(event: ev.Event) -> None:
        nonlocal count
        if isinstance(event, ev.MessageReceived):
            emit({"type": "message", "from": event.sender, "to": args.user, "text": event.text,
                  "id": event.msg_id.hex(), "ts": event.ts}, f"[{event.sender}] {event.text}")
            count += 1
            if args.count and count >= args.count:
                stop.set()
        elif isinstance(event, ev.PeersChanged):
            for user in sorted(event.joined):
                emit({"type": "presence", "user": user, "online": True}, f"* {user} is online")
            for user in sorted(event.left):
                emit({"type": "presence", "user": user, "online": False}, f"* {user} went offline")
        elif isinstance(event, ev.FileIncoming):
            emit({"type": "file_incoming", "from": event.sender, "name": event.name, "size": event.size,
                  "id": event.xfer.hex()}, f"[{event.sender}] sending {event.name} ({event.size} bytes)...")
        elif isinstance(event, ev.FileQueued):
            emit({"type": "file_queued", "from": event.sender, "name": event.name, "size": event.size,
                  "id": event.xfer.hex(), "waiting": event.waiting},
                 f"[{event.sender}] {event.name} waits: {event.waiting} transfers queued")
        elif isinstance(event, ev.FileReceived):
            emit({"type": "file", "from": event.sender, "name": event.name, "path": str(event.path),
                  "size": event.size, "id": event.xfer.hex()}, f"[{event.sender}] file saved: {event.path}")
        elif isinstance(event, ev.FileFailed) and event.direction == "in":
            emit({"type": "file_failed", "from": event.peer, "name": event.name, "code": event.error.code.value,
                  "error": event.error.message, "id": event.xfer.hex()},
                 f"[{event.peer}] file {event.name} failed: {event.error}")
        elif isinstance(event, ev.Reconnecting):
            emit({"type": "status", "status": "reconnecting", "reason": event.reason}, f"! reconnecting: {event.reason}")
        elif isinstance(event, ev.Registered) and event.reconnect:
            emit({"type": "status", "status": "connected"}, "! reconnected")

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _connect(args, args.user, on_event):
        emit({"type": "status", "status": "connected", "user": args.user}, f"! listening as {args.user}")
        stop.wait()
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from client.trust import KeyStore
    from common.crypto import Identity, fingerprint, safety_number
    from common.paths import ensure_private_dir, user_dir
    from common.protocol import check_user_id

    state = ensure_private_dir(user_dir(check_user_id(args.user)))
    me = Identity.load_or_create(state / "identity.key")
    pinned, changed = KeyStore(state / "peer_keys.json"), KeyStore(state / "peer_keys_changed.json")
    peers = [{"user": user, "fingerprint": fingerprint(key), "safety_number": safety_number(me.public, key),
              "changed_to": fingerprint(changed.get(user)) if changed.get(user) else None}
             for user, key in pinned.items()]
    if args.json:
        print(json.dumps({"user": args.user, "fingerprint": fingerprint(me.public), "peers": peers}))
        return EXIT_OK
    print(f"{args.user} (you): {fingerprint(me.public)}")
    for peer in peers:
        line = f"{peer['user']}: {peer['fingerprint']}   safety number {peer['safety_number']}"
        if peer["changed_to"]:
            line += f"   KEY CHANGED to {peer['changed_to']}: verify, then p2pchat trust --peer {peer['user']}"
        print(line)
    return EXIT_OK


def cmd_trust(args: argparse.Namespace) -> int:
    from client.e2e import accept_pending
    from client.trust import KeyStore
    from common.paths import user_dir
    from common.protocol import check_user_id

    state = user_dir(check_user_id(args.user))
    if not accept_pending(KeyStore(state / "peer_keys.json"), KeyStore(state / "peer_keys_changed.json"),
                          check_user_id(args.peer)):
        raise P2PChatError(f"no changed key waiting for {args.peer!r}")
    print(f"accepted the new key of {args.peer}")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    import time as _time

    from client.history import History
    from common.paths import user_dir
    from common.protocol import check_user_id

    path = user_dir(check_user_id(args.user)) / "history.sqlite"
    if not path.exists():
        raise P2PChatError(f"no history for {args.user!r} in {path.parent}")
    history = History(path)
    try:
        if args.search:
            entries = history.search(args.search, peer=args.peer, limit=args.limit)
        elif args.peer:
            entries = history.conversation(args.peer, limit=args.limit)
        else:
            entries = [e for peer in history.peers() for e in history.conversation(peer, limit=args.limit)]
    finally:
        history.close()
    for e in entries:
        if args.json:
            print(json.dumps({"id": e.msg_id.hex(), "peer": e.peer, "from": args.user if e.outgoing else e.peer,
                              "to": e.peer if e.outgoing else args.user, "text": e.text, "ts": e.ts,
                              "state": e.state}))
        else:
            when = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(e.ts / 1000))
            who = f"you -> {e.peer}" if e.outgoing else f"{e.peer} -> you"
            print(f"{when}  {who}: {e.text}" + (f"  [{e.state}]" if e.outgoing else ""))
    return EXIT_OK


def cmd_gui(args: argparse.Namespace) -> int:
    from client.gui import run_gui

    return run_gui(args)


# --- parser ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pchat", description="Chat and file transfer for small teams, over a ZeroMQ broker.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO for the broker, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a broker", description="Run a broker: ROUTER on --port, presence PUB on --pub-port.")
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
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("send", help="send one message", description="Send a message and wait for the broker's acknowledgement.")
    _client_options(p, _default_user())
    p.add_argument("--to", required=True, help="recipient user ID")
    p.add_argument("text", nargs="*", help="the message (read from stdin when absent)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("listen", help="print incoming messages", description="Stay online and print one line per event.")
    _client_options(p, _default_user())
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    p.add_argument("--received-dir", default=None, help="where incoming files are saved (default ~/client_received)")
    p.add_argument("--max-file-size", type=int, default=None, help="refuse incoming files larger than this (bytes)")
    p.add_argument("--window", type=int, default=None, help="chunks in flight per incoming transfer (default 32)")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("send-file", help="send a file", description="Send a file; exits 0 once the receiver verified it.")
    _client_options(p, _default_user())
    p.add_argument("--to", required=True, help="recipient user ID")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk (default 512 KiB; max 1 MiB - 16)")
    p.add_argument("path", help="the file to send")
    p.set_defaults(func=cmd_send_file)

    p = sub.add_parser("peers", help="list online peers", description="Print the users online now.")
    _client_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("keys", help="show key fingerprints", description="Your key fingerprint, and each peer's "
                       "pinned key with the safety number to compare with them out of band.")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("trust", help="accept a peer's changed key", description="Accept a peer's new key after "
                       "verifying its fingerprint with them; until then sending to them is blocked.")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--peer", required=True, help="the peer whose new key you accept")
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser("history", help="show or search your conversations",
                       description="Show your stored conversations, or search them (full text, word prefixes).")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--peer", default=None, help="only the conversation with this user")
    p.add_argument("--search", default=None, metavar="WORDS", help="messages containing all these words")
    p.add_argument("--limit", type=int, default=200, help="at most this many messages (per conversation)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("load", help="load- or soak-test a broker with scripted clients",
                       description="Scripted DEALER clients: throughput, latency percentiles, loss, duplicates.")
    from client.load import configure_parser as configure_load

    configure_load(p)

    p = sub.add_parser("gui", help="open the desktop chat window",
                       description="Open the chat window; connects at once when --server and --user are both given.")
    p.add_argument("--server", default=None, metavar="H:P", help="broker address (default: last used, else 127.0.0.1:5555)")
    p.add_argument("--user", default=None, help="your user ID (default: last used)")
    p.set_defaults(func=cmd_gui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "broker" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_for_bulk_transfer()  # every command may move file chunks, the broker included
    try:
        return args.func(args)
    except RemoteError as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenError as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (P2PChatError, OSError, zmq.ZMQError) as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
