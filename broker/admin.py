"""``p2pchat broker admin``: the operator's commands on the key bindings (docs/PROTOCOL.md §10.2).

They work on the data directory of a stopped or a running broker (its ``keys.sqlite``), or on a cluster's
Redis (``--cluster URL``). A running broker notices a change within a heartbeat interval: it closes the
session of the key that lost the ID and tells everyone else online of the new key. Every change goes to
the durable audit with who made it (``audit`` prints it), and every running broker logs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from p2pchat.broker.backends.audit import AuditRecord, Change, operator_origin
from p2pchat.broker.backends.tickets import KeyLimits
from p2pchat.broker.core.ports import StoreUnavailable
from p2pchat.common.crypto import KEY_BYTES, fingerprint
from p2pchat.common.errors import ExitCode, P2PChatError
from p2pchat.common.paths import broker_dir
from p2pchat.common.protocol import check_user_id

REDIS_TIMEOUT = 2.0  # seconds per Redis call
OPERATOR_LIMITS = KeyLimits(ids_per_key=sys.maxsize)  # the operator's move is not held to --ids-per-key


def configure_parser(admin: argparse.ArgumentParser) -> None:
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    release = actions.add_parser("release", help="unbind a user ID: the next key to register it gets it",
                                 description="Unbind a user ID and forget its recovery key; the next key to "
                                             "register it gets it. A running broker signs its session out.")
    move = actions.add_parser("move", help="bind a user ID to another key",
                              description="Bind a user ID to the key given (the user's new public key, as "
                                          "`p2pchat keys --user ID --json` prints it) and forget its recovery key: "
                                          "the phrase that was lost, or seen by someone else, stops working, and "
                                          "the new key's next registration brings its own.")
    audit = actions.add_parser("audit", help="print the changes made to bindings",
                               description="Every recovery, move and release, oldest first.")
    for p in (release, move, audit):
        p.add_argument("--data-dir", dest="admin_data_dir", default=None, metavar="DIR",
                       help="the broker's data directory (default: --data-dir of `broker`, else $P2PCHAT_HOME/broker)")
        p.add_argument("--cluster", "--redis", dest="admin_cluster", default=None, metavar="redis://HOST:PORT/DB",
                       help="a cluster's Redis instead of a data directory")
    for p in (release, move):
        p.add_argument("user", type=_user, help="the user ID")
    move.add_argument("--key", required=True, type=_key, metavar="HEX", help="the new key: 64 hex digits")
    audit.add_argument("user", type=_user, nargs="?", default=None, help="only this user ID's changes")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    admin.set_defaults(func=run)


def _user(text: str) -> str:
    try:
        return check_user_id(text)
    except P2PChatError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise argparse.ArgumentTypeError(f"a key is {2 * KEY_BYTES} hex digits")
    return key


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except StoreUnavailable as exc:
        print(f"p2pchat broker admin: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except P2PChatError as exc:
        print(f"p2pchat broker admin: {exc.message}", file=sys.stderr)
        return ExitCode.ERROR


def _run(args: argparse.Namespace) -> int:
    registry = _open(args)
    try:
        if args.admin_command == "audit":
            for record in registry.audit(args.user):
                print(json.dumps(_as_json(record)) if args.json else _as_text(record))
            return ExitCode.OK
        was = registry.lookup(args.user)
        if args.admin_command == "release":
            if not registry.release(args.user, operator_origin()):
                print(f"p2pchat broker admin: {args.user} is not bound to any key", file=sys.stderr)
                return ExitCode.ERROR
            print(f"released {args.user} (its key was {fingerprint(was)}); the next key to register it gets it")
            return ExitCode.OK
        refused = registry.move(args.user, args.key, Change.MOVED, operator_origin())
        if refused is not None:
            print(f"p2pchat broker admin: {args.user} not moved: {refused.value}", file=sys.stderr)
            return ExitCode.REFUSED
        print(f"moved {args.user} to key {fingerprint(args.key)}"
              + (f" (from {fingerprint(was)})" if was and was != args.key else ""))
        return ExitCode.OK
    finally:
        registry.close()


def _open(args: argparse.Namespace):
    url = args.admin_cluster or getattr(args, "cluster", None)
    if url:
        from p2pchat.broker.backends.redis_health import connect
        from p2pchat.broker.backends.redis_keys import RedisKeyRegistry
        from p2pchat.broker.backends.redis_schema import RedisKeys

        return RedisKeyRegistry(connect(url, REDIS_TIMEOUT), RedisKeys(), OPERATOR_LIMITS)
    from p2pchat.broker.backends.sqlite_keys import SqliteKeyRegistry

    directory = Path(args.admin_data_dir or getattr(args, "data_dir", None) or broker_dir()).expanduser()
    path = directory / "keys.sqlite"
    if not path.is_file():  # never make an empty registry by mistake
        raise P2PChatError(f"no broker key bindings in {directory} ({path.name} is missing)")
    return SqliteKeyRegistry(path, OPERATOR_LIMITS)


def _as_json(record: AuditRecord) -> dict:
    return {"seq": record.seq, "at_ms": record.at_ms, "user": record.user, "change": record.change.value,
            "old_key": record.old_key.hex() if record.old_key else None,
            "new_key": record.new_key.hex() if record.new_key else None,
            "generation": record.generation, "origin": record.origin}


def _as_text(record: AuditRecord) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.at_ms / 1000))}  {record.describe()}"
