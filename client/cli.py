"""``p2pchat``: the command line. One subcommand per job; exit 0 on success,
non-zero with a one-line error on stderr otherwise.

(Over 500 lines: one short function per subcommand and the parser that lists them all, read one at a time.)"""

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

from p2pchat.client import events as ev
from p2pchat.common.allocator import tune_for_bulk_transfer
from p2pchat.common.endpoints import ServerAddress
from p2pchat.broker.cli import configure_parser as configure_broker
from p2pchat.client.cli_rooms import add_room_parser
from p2pchat.common.errors import BrokenError, ExitCode, P2PChatError, RemoteError, TransferError


log = logging.getLogger("p2pchat")


def _default_user() -> str:
    name = os.environ.get("P2PCHAT_USER") or getpass.getuser()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:32] or "user"


def _server(text: str) -> ServerAddress:
    try:
        return ServerAddress.parse(text)
    except P2PChatError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _client_options(parser: argparse.ArgumentParser, user_default: str | None = None, timeout: float = 5.0) -> None:
    parser.add_argument("--server", type=_server, default=ServerAddress(), metavar="H:P",
                        help="broker address (default 127.0.0.1:5555)")
    parser.add_argument("--pub-port", type=int, default=None,
                        help="the broker's presence port, if not the server port + 1")
    parser.add_argument("--user", default=user_default, help="your user ID (default: $P2PCHAT_USER or login name)")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds to wait for the broker (default {timeout:g})")
    parser.add_argument("--server-key", default=None, metavar="FINGERPRINT",
                        help="pin the broker's key fingerprint (default: trust on first use, then remember)")
    parser.add_argument("--key-port", type=int, default=None, help="the broker's key port (default: port + 2)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext transport, for debugging against a broker run with --insecure")
    parser.add_argument("--trust-key-changes", action="store_true",
                        help="accept a peer's new key at once (the change is still reported) instead of holding "
                             "messages to and from them until you run `p2pchat trust`")


def _device_list_options(parser: argparse.ArgumentParser) -> None:
    """``keys`` and ``verify`` work offline; with ``--server`` they also list each peer's devices."""
    parser.add_argument("--server", type=_server, default=None, metavar="H:P",
                        help="also list each peer's devices as this broker has them (default: offline, no list)")
    parser.add_argument("--key-port", type=int, default=None, help="the broker's key port (default: port + 2)")
    parser.add_argument("--server-key", default=None, metavar="FINGERPRINT", help="pin the broker's key fingerprint")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")


def _config(args: argparse.Namespace):
    from p2pchat.client.chat_client import ClientConfig

    server = ServerAddress(args.server.host, args.server.port, args.pub_port)
    return ClientConfig(server=server, send_timeout=args.timeout, insecure=args.insecure,
                        server_key=args.server_key, key_port=args.key_port,
                        trust_key_changes=args.trust_key_changes)


def _show_new_phrase(user: str, phrase: str) -> None:
    """A new identity's recovery phrase, shown this once (stderr: stdout may be a script's)."""
    print(f"p2pchat: {user} has a new key. Write down its recovery phrase and keep it safe: with it you can move "
          f"{user} to another machine (p2pchat recover --user {user}); `p2pchat recovery-phrase --user {user}` "
          f"shows it again.\n\n    {phrase}\n", file=sys.stderr)


def _connect(args: argparse.Namespace, user: str, on_event: Callable[[ev.Event], None] | None = None,
             show_new_phrase: bool = True):
    from p2pchat.client.chat_client import ChatClient

    config = _config(args)
    if getattr(args, "received_dir", None):
        config = dataclasses.replace(config, received_dir=Path(args.received_dir).expanduser())
    if getattr(args, "chunk_size", None):
        config = dataclasses.replace(config, chunk_size=args.chunk_size)
    if getattr(args, "window", None):
        config = dataclasses.replace(config, window=args.window)
    if getattr(args, "max_file_size", None):
        config = dataclasses.replace(config, max_file_size=args.max_file_size)
    if getattr(args, "no_files", False):
        config = dataclasses.replace(config, accept_files=False)
    client = ChatClient(user, config, on_event=on_event)
    if client.new_recovery_phrase and show_new_phrase:
        _show_new_phrase(user, client.recovery_phrase)
    client.connect(timeout=args.timeout)
    return client


PRESENCE_WAIT = 2.0  # seconds send-file waits for the peer list, to know whether the recipient is online


# --- subcommands -------------------------------------------------------------
def cmd_send(args: argparse.Namespace) -> int:
    text = " ".join(args.text) if args.text else sys.stdin.read()
    with _connect(args, args.user) as client:
        if args.room is not None:
            client.send_room(args.room, text, timeout=args.timeout)
        else:
            client.send(args.to, text, timeout=args.timeout)
    return ExitCode.OK


def cmd_send_file(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    path = Path(args.path).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise TransferError(f"{path} is neither a readable file nor a folder")
    size = path.stat().st_size if path.is_file() else None  # a folder's stream: known from its first progress
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name[:30],
               disable=args.quiet or None, file=sys.stderr)
    lock = threading.Lock()
    mine: list[bytes] = []
    uploaded: list[ev.FileUploaded] = []

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.FileProgress) and event.xfer in mine:
            with lock:
                bar.total = event.size
                bar.update(event.done - bar.n)
        elif isinstance(event, ev.FileUploaded):
            uploaded.append(event)

    try:
        with _connect(args, args.user, on_event) as client:
            if args.room is not None:
                xfer, done = client.send_room_file(args.room, path)
            else:
                if not args.later:
                    client.wait_presence(PRESENCE_WAIT)  # offline recipients get it from the broker later
                xfer, done = client.send_file(args.to, path, later=args.later)
            mine.append(xfer)
            done.result()  # the receiver verified and saved it, or the broker holds it for them
            with lock:
                bar.update((bar.total or 0) - bar.n)
    finally:
        bar.close()
    if any(event.xfer in mine for event in uploaded):
        print(f"uploaded {path.name}: the broker keeps it for {args.to}, who gets it when next online")
    return ExitCode.OK


def cmd_peers(args: argparse.Namespace) -> int:
    user = args.user or f"peers-{os.urandom(3).hex()}"
    first_list = threading.Event()

    def on_event(event: ev.Event) -> None:
        if isinstance(event, ev.PeersChanged):
            first_list.set()

    with _connect(args, user, on_event, show_new_phrase=args.user is not None) as client:
        if not first_list.wait(args.timeout):
            raise BrokenError("no peer list from the broker")
        peers = sorted(client.peers() - {user})
    print(json.dumps(peers) if args.json else "\n".join(peers))
    return ExitCode.OK


def cmd_listen(args: argparse.Namespace) -> int:
    stop = threading.Event()
    lock = threading.Lock()
    count = 0
    stopped: list[P2PChatError] = []  # the client stopped by itself (signed out by the broker)

    rooms: dict[bytes, str] = {}  # room names as heard, for the file events of a room

    def emit(record: dict, human: str) -> None:
        with lock:
            print(json.dumps(record) if args.json else human, flush=True)

    def in_room(record: dict, event) -> dict:
        """A file event of a room carries ``room`` beside ``from`` (issue 16's contract)."""
        if getattr(event, "room", None) is not None:
            record["room"] = rooms.get(event.room, event.room.hex())
        return record

    def on_event(event: ev.Event) -> None:
        nonlocal count
        if isinstance(event, (ev.RoomUpdated, ev.RoomsListed)):
            for room in (event.room,) if isinstance(event, ev.RoomUpdated) else event.rooms:
                rooms[room.rid] = room.name
        if isinstance(event, ev.MessageReceived) and event.room is not None:
            room = rooms[event.room] = event.room_name
            emit({"type": "message", "from": event.sender, "room": room, "text": event.text,
                  "id": event.msg_id.hex(), "ts": event.ts}, f"[{room}] [{event.sender}] {event.text}")
            count += 1
            if args.count and count >= args.count:
                stop.set()
        elif isinstance(event, ev.MessageReceived):
            emit({"type": "message", "from": event.sender, "to": args.user, "text": event.text,
                  "id": event.msg_id.hex(), "ts": event.ts}, f"[{event.sender}] {event.text}")
            count += 1
            if args.count and count >= args.count:
                stop.set()
        elif isinstance(event, ev.MessageEchoed):  # sent by another device of ours: not counted as received
            emit({"type": "sent_elsewhere", "from": args.user, "to": event.peer, "text": event.text,
                  "id": event.msg_id.hex(), "ts": event.ts}, f"[you -> {event.peer}, another device] {event.text}")
        elif isinstance(event, ev.ReadElsewhere):
            emit({"type": "read_elsewhere", "peer": event.peer, "id": event.msg_id.hex()},
                 f"* {event.peer}'s message read on another device")
        elif isinstance(event, ev.PeersChanged):
            for user in sorted(event.joined):
                emit({"type": "presence", "user": user, "online": True}, f"* {user} is online")
            for user in sorted(event.left):
                emit({"type": "presence", "user": user, "online": False}, f"* {user} went offline")
        elif isinstance(event, ev.FileIncoming):
            emit(in_room({"type": "file_incoming", "from": event.sender, "name": event.name, "size": event.size,
                          "id": event.xfer.hex()}, event), f"[{event.sender}] sending {event.name} ({event.size} bytes)...")
        elif isinstance(event, ev.FileQueued):
            emit(in_room({"type": "file_queued", "from": event.sender, "name": event.name, "size": event.size,
                          "id": event.xfer.hex(), "waiting": event.waiting}, event),
                 f"[{event.sender}] {event.name} waits: {event.waiting} transfers queued")
        elif isinstance(event, ev.FileReceived):
            folder = {} if event.files is None else {"files": event.files, "bytes": event.content_bytes}
            emit(in_room({"type": "file", "from": event.sender, "name": event.name, "path": str(event.path),
                          "size": event.size, "id": event.xfer.hex()} | folder, event),
                 f"[{event.sender}] {'folder' if folder else 'file'} saved: {event.path}")
        elif isinstance(event, ev.FileFailed) and event.direction == "in":
            emit(in_room({"type": "file_failed", "from": event.peer, "name": event.name,
                          "code": event.error.code.value, "error": event.error.message, "id": event.xfer.hex()}, event),
                 f"[{event.peer}] file {event.name} failed: {event.error}")
        elif isinstance(event, ev.RoomEvent):
            emit({"type": f"room_{event.kind}", "room": event.name, "user": event.user, "by": event.by},
                 f"* [{event.name}] {event.user} {event.kind}" + (f" (by {event.by})" if event.by else ""))
        elif isinstance(event, ev.RoomGone):
            emit({"type": "room_gone", "room": event.name, "why": event.why, "by": event.by},
                 f"* you are no longer in {event.name} ({event.why})")
        elif isinstance(event, ev.Reconnecting):
            emit({"type": "status", "status": "reconnecting", "reason": event.reason}, f"! reconnecting: {event.reason}")
        elif isinstance(event, ev.Registered) and event.reconnect:
            emit({"type": "status", "status": "connected"}, "! reconnected")
        elif isinstance(event, ev.Stopped):
            stopped.append(event.error)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _connect(args, args.user, on_event):
        emit({"type": "status", "status": "connected", "user": args.user}, f"! listening as {args.user}")
        stop.wait()
    if stopped:
        raise stopped[0]
    return ExitCode.OK


def _peer_keys(user: str):
    """The user's state directory and the stores of their peers' keys: pinned, changed (waiting), verified."""
    from p2pchat.client.storage.trust import CHANGED_KEYS, PINNED_KEYS, VERIFIED_KEYS, KeyStore, VerifiedKeys
    from p2pchat.common.paths import user_dir
    from p2pchat.common.protocol import check_user_id

    state = user_dir(check_user_id(user))
    return state, KeyStore(state / PINNED_KEYS), KeyStore(state / CHANGED_KEYS), VerifiedKeys(state / VERIFIED_KEYS)


def _accounts(state: Path, user: str):
    """Our account key (None: not known here) and the store of the peers' account keys pinned on first sight."""
    from p2pchat.client.storage.account import account_key
    from p2pchat.client.storage.trust import PEER_ACCOUNTS, KeyStore

    return account_key(state, user), KeyStore(state / PEER_ACCOUNTS)


def _listed_devices_of(args: argparse.Namespace, peer: str) -> list[dict] | None:
    """``peer``'s devices as the broker at ``--server`` lists them (None without ``--server``): what the one
    account safety number covers."""
    from p2pchat.client.broker_trust import trusted_key_service
    from p2pchat.common.crypto import fingerprint

    if args.server is None:
        return None
    service, _ = trusted_key_service(args.server, args.key_port, args.server_key, False, args.timeout)
    return [{"id": d.id, "name": d.name, "fingerprint": fingerprint(d.key), "key": d.key.hex()}
            for d in service.devices(peer).devices]


def _print_devices(peer: str, devices: list[dict] | None) -> None:
    if devices:
        print(f"  {peer}'s devices, as the broker lists them:")
        for d in devices:
            print(f"  {d['id']:>3}  {d['name'] or '(unnamed)':<32}  {d['fingerprint']}")


def cmd_keys(args: argparse.Namespace) -> int:
    from p2pchat.common.crypto import Identity, account_safety_number, fingerprint, safety_number
    from p2pchat.common.paths import ensure_private_dir

    state, pinned, changed, verified = _peer_keys(args.user)
    me = Identity.load_or_create(ensure_private_dir(state) / "identity.key")
    my_account, accounts = _accounts(state, args.user)
    peers = []
    for user, key in pinned.items():
        new = changed.get(user)
        account = accounts.get(user)
        peers.append({"user": user, "fingerprint": fingerprint(key), "safety_number": safety_number(me.public, key),
                      "verified": verified.is_verified(user, key, account),
                      "changed_to": fingerprint(new) if new else None,
                      "changed_safety_number": safety_number(me.public, new) if new else None,
                      "account_fingerprint": fingerprint(account) if account else None,
                      "account_safety_number": account_safety_number(my_account, account)
                      if account and my_account else None,
                      "devices": _listed_devices_of(args, user)})
    if args.json:
        print(json.dumps({"user": args.user, "fingerprint": fingerprint(me.public), "key": me.public.hex(),
                          "account_fingerprint": fingerprint(my_account) if my_account else None, "peers": peers}))
        return ExitCode.OK
    print(f"{args.user} (you): {fingerprint(me.public)}"
          + (f"   account {fingerprint(my_account)}" if my_account else ""))
    for peer in peers:
        name = peer["user"]
        state_word = "verified" if peer["verified"] else "not verified"
        if peer["account_safety_number"]:
            print(f"{name}: account {peer['account_fingerprint']}   {state_word}   safety number "
                  f"{peer['account_safety_number']} (one for the account, whichever devices you both use)")
        else:
            print(f"{name}: {peer['fingerprint']}   {state_word}   safety number {peer['safety_number']} "
                  "(per device)")
        _print_devices(name, peer["devices"])
        if peer["changed_to"]:
            print(f"  {name}'s key CHANGED to {peer['changed_to']}: {name} reinstalled, set up a new device or "
                  f"recovered the account, or someone is impersonating {name}. Messages to and from {name} wait.\n"
                  f"  Compare the new safety number {peer['changed_safety_number']} with {name}, then run "
                  f"`p2pchat verify --peer {name}` (or `p2pchat trust --peer {name}` to accept it unverified).")
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from p2pchat.client.e2e import accept_pending
    from p2pchat.common.crypto import Identity, account_safety_number, fingerprint, safety_number
    from p2pchat.common.protocol import check_user_id

    peer = check_user_id(args.peer)
    state, pinned, changed, verified = _peer_keys(args.user)
    key = changed.get(peer) or pinned.get(peer)  # a key change waiting: the new key is the one to compare
    if key is None:
        raise P2PChatError(f"no key known for {peer!r} yet: exchange a message with them first")
    me = Identity.load_or_create(state / "identity.key")
    number = safety_number(me.public, key)
    my_account, accounts = _accounts(state, args.user)
    account = accounts.get(peer)
    account_number = account_safety_number(my_account, account) if account and my_account else None
    devices = _listed_devices_of(args, peer)
    if not args.json and account_number:
        print(f"Safety number with {peer}: {account_number}   (one for {peer}'s account: it stays the same when "
              f"either of you links or unlinks a device)\n"
              f"{peer}'s account key: {fingerprint(account)}\n"
              f"{peer}'s key{' (new)' if changed.get(peer) else ''}: {fingerprint(key)}\n"
              f"your account key: {fingerprint(my_account)}")
        _print_devices(peer, devices)
    elif not args.json:
        print(f"Safety number with {peer}: {number}   (per device: it changes when either of you uses another "
              f"device)\n"
              f"{peer}'s key{' (new)' if changed.get(peer) else ''}: {fingerprint(key)}\n"
              f"your key: {fingerprint(me.public)}")
        _print_devices(peer, devices)
    if not args.json:
        print(f"Compare the safety number with {peer} in person or on a call ({peer} sees it with p2pchat keys, "
              f"or under Verify in the chat window).")
    if not args.yes:
        print(f"Does {peer} see the same safety number? Mark {peer}'s key as verified [y/N] ", end="",
              file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise P2PChatError(f"{peer}'s key was not marked verified")
    accepted = accept_pending(pinned, changed, peer)  # the GUI or a listener running notices within a heartbeat
    verified.mark(peer, key, account if account_number else None)
    if args.json:
        print(json.dumps({"user": args.user, "peer": peer, "fingerprint": fingerprint(key), "safety_number": number,
                          "verified": True, "accepted": accepted, "account_safety_number": account_number,
                          "account_fingerprint": fingerprint(account) if account else None, "devices": devices}))
    else:
        what = f"{peer}'s account is verified (each device it links counts as verified)" if account_number else \
            f"{peer}'s key is verified"
        print(what + ("; their new key is accepted and what waited goes" if accepted else ""))
    return ExitCode.OK


def cmd_trust(args: argparse.Namespace) -> int:
    from p2pchat.client.e2e import accept_pending

    _state, pinned, changed, _verified = _peer_keys(args.user)
    if not accept_pending(pinned, changed, args.peer):
        raise P2PChatError(f"no changed key waiting for {args.peer!r}")
    print(f"accepted the new key of {args.peer} (not verified: compare safety numbers with p2pchat verify)")
    return ExitCode.OK


def cmd_recovery_phrase(args: argparse.Namespace) -> int:
    from p2pchat.client.storage.account import linked_by_code
    from p2pchat.client.storage.phrase import load_or_create_phrase
    from p2pchat.common.crypto import Identity
    from p2pchat.common.paths import ensure_private_dir, user_dir
    from p2pchat.common.protocol import check_user_id

    state = ensure_private_dir(user_dir(check_user_id(args.user)))
    if linked_by_code(state):
        raise P2PChatError(f"this device was linked to {args.user} by code: the recovery phrase is on the device "
                           "that linked it")
    Identity.load_or_create(state / "identity.key")  # a first run: the phrase belongs with a key
    phrase, _ = load_or_create_phrase(state)
    print(phrase)
    return ExitCode.OK


def cmd_recover(args: argparse.Namespace) -> int:
    from p2pchat.client.recovery import recover_user
    from p2pchat.common.crypto import fingerprint
    from p2pchat.common.recovery import PhraseError

    try:
        key = recover_user(args.user, _read_phrase(args.user), _config(args), timeout=args.timeout)
    except PhraseError as exc:  # refused here, before anything was sent
        print(f"p2pchat recover: {exc.message}", file=sys.stderr)
        return ExitCode.REFUSED
    print(f"{args.user} now belongs to this machine's key {fingerprint(key)}. The broker signed the old key out and "
          f"told {args.user}'s contacts online that the key changed: they accept the new one before they write again.")
    return ExitCode.OK


def _read_phrase(user: str) -> str:
    if sys.stdin.isatty():
        print(f"Type the recovery phrase of {user} (12 words), then Enter:", file=sys.stderr)
    return sys.stdin.readline() if sys.stdin.isatty() else sys.stdin.read()


def cmd_link(args: argparse.Namespace) -> int:
    import socket

    from p2pchat.client.linking import Linking, join_link, link_with_phrase, offer_link
    from p2pchat.common.crypto import fingerprint
    from p2pchat.common.linking import LinkRefused, WrongCode, device_name
    from p2pchat.common.recovery import PhraseError

    def show_code(code: str, ttl: float) -> None:
        print(code, flush=True)
        print(f"On the new device run: p2pchat link --user {args.user} --code {code}   (within "
              f"{min(args.timeout, ttl):g} s; the code works once)", file=sys.stderr, flush=True)

    if args.code and args.recovery:
        print("p2pchat link: --code and --recovery exclude each other", file=sys.stderr)
        return ExitCode.USAGE
    linking = Linking.start(args.user, _config(args), args.timeout)
    try:
        if not (args.code or args.recovery):
            device = offer_link(linking, args.timeout, show_code)
            print(f"linked {device.name or 'a device'} ({fingerprint(device.key)}) as a device of {args.user}",
                  file=sys.stderr)
            return ExitCode.OK
        name = device_name(args.name if args.name is not None else socket.gethostname())
        if args.recovery:
            identity = link_with_phrase(linking, _read_phrase(args.user), name)
        else:
            identity = join_link(linking, args.code, name, args.timeout)
    except (WrongCode, LinkRefused, PhraseError) as exc:
        print(f"p2pchat link: {exc.message}", file=sys.stderr)
        return ExitCode.REFUSED
    with _connect(args, args.user, show_new_phrase=False):  # registered once: the broker knows the device
        pass
    print(f"this installation is now a device of {args.user}: key {fingerprint(identity.public)}")
    return ExitCode.OK


def _listed_devices(args: argparse.Namespace):
    """The user's devices as the broker lists them, and this installation's key (None: it has none)."""
    from p2pchat.client.linking import Linking
    from p2pchat.common.crypto import Identity

    linking = Linking.start(args.user, _config(args), args.timeout)
    path = linking.state_dir / "identity.key"
    mine = Identity.load_or_create(path).public if path.exists() else None
    return linking, linking.service.devices(args.user), mine


def cmd_devices(args: argparse.Namespace) -> int:
    import time as _time

    from p2pchat.common.crypto import fingerprint

    _linking, devices, mine = _listed_devices(args)
    listed = [{"id": d.id, "fingerprint": fingerprint(d.key), "key": d.key.hex(), "name": d.name,
               "added": d.added_ms, "this": d.key == mine} for d in devices.devices]
    if args.json:
        print(json.dumps(listed))
        return ExitCode.OK
    for d in listed:
        when = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(d["added"] / 1000)) if d["added"] else "-"
        print(f"{d['id']:>3}  {d['name'] or '(unnamed)':<32}  {d['fingerprint']}  added {when}"
              + ("  (this device)" if d["this"] else ""))
    return ExitCode.OK


def cmd_unlink(args: argparse.Namespace) -> int:
    from p2pchat.client.linking import Linking, unlink
    from p2pchat.common.crypto import fingerprint
    from p2pchat.common.recovery import PhraseError

    linking = Linking.start(args.user, _config(args), args.timeout)
    try:
        device = unlink(linking, args.device, _read_phrase(args.user) if args.recovery else None)
    except PhraseError as exc:
        print(f"p2pchat unlink: {exc.message}", file=sys.stderr)
        return ExitCode.REFUSED
    print(f"unlinked device {device.id} ({device.name or 'unnamed'}, {fingerprint(device.key)}) from {args.user}: "
          "it can no longer connect as it")
    return ExitCode.OK


def cmd_history(args: argparse.Namespace) -> int:
    import time as _time

    from p2pchat.client.storage.history import History
    from p2pchat.common.paths import user_dir
    from p2pchat.common.protocol import check_user_id

    path = user_dir(check_user_id(args.user)) / "history.sqlite"
    if not path.exists():
        raise P2PChatError(f"no history for {args.user!r} in {path.parent}")
    history = History(path)
    try:
        names = history.room_names()
        room = None
        if args.room is not None:
            room = history.room_named(args.room)
            if room is None:
                raise P2PChatError(f"no history of a room {args.room!r}")
        if args.search:
            entries = history.search(args.search, peer=room or args.peer, limit=args.limit)
        elif room is not None:
            entries = history.room_conversation(room, limit=args.limit)
        elif args.peer:
            entries = history.conversation(args.peer, limit=args.limit)
        else:
            entries = [e for peer in history.peers() for e in history.conversation(peer, limit=args.limit)]
            entries += [e for rid in names for e in history.room_conversation(rid, limit=args.limit)]
    finally:
        history.close()
    for e in entries:
        room_name = names.get(e.room, e.room.hex()) if e.room is not None else None
        if args.json:
            record = {"id": e.msg_id.hex(), "peer": e.peer, "from": args.user if e.outgoing else e.peer,
                      "to": e.peer if e.outgoing else args.user, "text": e.text, "ts": e.ts, "state": e.state}
            if room_name is not None:
                record.update({"room": room_name, "from": e.peer, "peer": room_name})
                del record["to"]
            print(json.dumps(record))
        else:
            when = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(e.ts / 1000))
            if room_name is not None:
                who = f"[{room_name}] " + ("you" if e.outgoing else e.peer)
            else:
                who = f"you -> {e.peer}" if e.outgoing else f"{e.peer} -> you"
            print(f"{when}  {who}: {e.text}" + (f"  [{e.state}]" if e.outgoing else ""))
    return ExitCode.OK


def cmd_gui(args: argparse.Namespace) -> int:
    from p2pchat.client.gui.app import run_gui

    return run_gui(args)


# --- parser ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pchat", description="Chat and file transfer for small teams, over a ZeroMQ broker.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO for the broker, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run a broker", description="Run a broker: ROUTER on --port, presence PUB on --pub-port.")
    configure_broker(p)

    p = sub.add_parser("send", help="send one message", description="Send a message and wait for the broker's acknowledgement.")
    _client_options(p, _default_user())
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", help="recipient user ID")
    to.add_argument("--room", help="a room you are a member of (p2pchat room list)")
    p.add_argument("text", nargs="*", help="the message (read from stdin when absent)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("listen", help="print incoming messages", description="Stay online and print one line per event.")
    _client_options(p, _default_user())
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    p.add_argument("--received-dir", default=None, help="where incoming files are saved (default ~/client_received)")
    p.add_argument("--max-file-size", type=int, default=None, help="refuse incoming files larger than this (bytes)")
    p.add_argument("--window", type=int, default=None, help="chunks in flight per incoming transfer (default 32)")
    p.add_argument("--no-files", action="store_true",
                   help="refuse files on this device (with several devices, another of yours takes them)")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("send-file", help="send a file", description="Send a file; exits 0 once the receiver verified it.")
    _client_options(p, _default_user())
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", help="recipient user ID")
    to.add_argument("--room", help="a room you are a member of: every member's devices fetch it from the broker")
    p.add_argument("--later", action="store_true",
                   help="leave it at the broker for the recipient to fetch when it will, and exit once it is there "
                        "(done anyway when the recipient is offline)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk (default 512 KiB; max 1 MiB - 16)")
    p.add_argument("path", help="the file to send")
    p.set_defaults(func=cmd_send_file)

    p = sub.add_parser("peers", help="list online peers", description="Print the users online now.")
    _client_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("keys", help="show key fingerprints", description="Your key fingerprint, and each peer's "
                       "pinned key with the safety number to compare with them out of band, whether you verified it, "
                       "and any key change waiting for you.")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--json", action="store_true")
    _device_list_options(p)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("verify", help="mark a peer's key verified", description="Show the safety number to compare "
                       "with a peer, then mark their key verified (a changed key waiting is accepted too).")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--peer", required=True, help="the peer whose key you compared")
    p.add_argument("--yes", action="store_true", help="do not ask whether the safety numbers match")
    p.add_argument("--json", action="store_true", help="print the result as a JSON object")
    _device_list_options(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("trust", help="accept a peer's changed key", description="Accept a peer's new key without "
                       "verifying it; until then messages to and from them wait.")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--peer", required=True, help="the peer whose new key you accept")
    p.set_defaults(func=cmd_trust)

    p = sub.add_parser("recovery-phrase", help="print your recovery phrase",
                       description="Print the recovery phrase of a user ID on this machine (one line of 12 words): "
                                   "write it down; `p2pchat recover` moves the ID to a new machine with it.")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.set_defaults(func=cmd_recovery_phrase)

    p = sub.add_parser("recover", help="move your user ID to this machine with your recovery phrase",
                       description="Read the recovery phrase from standard input and move the user ID to this "
                                   "machine's key; its old key stops working. Exit 0 once moved, 4 when refused.")
    _client_options(p, _default_user())
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("link", help="link another device to your user ID",
                       description="On a device that has the user ID (and its recovery phrase): print a short code "
                                   "and wait for a new device to use it. On the new device: --code CODE links it "
                                   "(or --recovery, reading the phrase on standard input). Exit 0 once linked, 4 "
                                   "for a wrong code or a refusal.")
    _client_options(p, _default_user(), timeout=300.0)
    p.add_argument("--code", default=None, help="the code the other device shows (on the new device)")
    p.add_argument("--recovery", action="store_true",
                   help="link this new device with the recovery phrase, read from standard input, instead of a code")
    p.add_argument("--name", default=None, help="this new device's name (default: the host name, cut to 32)")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("devices", help="list your user ID's devices",
                       description="List the devices of a user ID as the broker has them (no session needed).")
    _client_options(p, _default_user())
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of {id, fingerprint, key, name, added, this}")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("unlink", help="remove a device from your user ID",
                       description="Remove a device (by number or name, as `p2pchat devices` shows them) with the "
                                   "recovery phrase stored here, or read from standard input with --recovery; it "
                                   "can no longer connect. Exit 0 once removed, 4 when refused.")
    _client_options(p, _default_user())
    p.add_argument("--recovery", action="store_true", help="read the recovery phrase from standard input")
    p.add_argument("device", help="the device's number or name")
    p.set_defaults(func=cmd_unlink)

    add_room_parser(sub, _client_options, _connect)

    p = sub.add_parser("history", help="show or search your conversations",
                       description="Show your stored conversations, or search them (full text, word prefixes).")
    p.add_argument("--user", default=_default_user(), help="your user ID")
    p.add_argument("--peer", default=None, help="only the conversation with this user")
    p.add_argument("--room", default=None, help="only this room's messages")
    p.add_argument("--search", default=None, metavar="WORDS", help="messages containing all these words")
    p.add_argument("--limit", type=int, default=200, help="at most this many messages (per conversation)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("load", help="load- or soak-test a broker with scripted clients",
                       description="Scripted DEALER clients: throughput, latency percentiles, loss, duplicates.")
    from p2pchat.client.load.main import configure_parser as configure_load

    configure_load(p)

    p = sub.add_parser("gui", help="open the desktop chat window",
                       description="Open the chat window; connects at once when --server and --user are both given.")
    p.add_argument("--server", default=None, metavar="H:P", help="broker address (default: last used, else 127.0.0.1:5555)")
    p.add_argument("--user", default=None, help="your user ID (default: last used)")
    p.set_defaults(func=cmd_gui)
    return parser


def _command_index(argv: Sequence[str]) -> int:
    """Where the subcommand stands in ``argv``: the first word that is neither an option nor its value."""
    i = 0
    while argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    return i


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "broker":  # its own options, for --workers to hand to each worker process
        args.broker_argv = argv[_command_index(argv) + 1:]
    level = args.log_level or ("INFO" if args.command == "broker" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_for_bulk_transfer()  # every command may move file chunks, the broker included
    try:
        return args.func(args)
    except RemoteError as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    except BrokenError as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except (P2PChatError, OSError, zmq.ZMQError) as exc:
        print(f"p2pchat {args.command}: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
