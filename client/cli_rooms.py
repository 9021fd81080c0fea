"""``p2pchat room …``: group rooms from the command line (docs/PROTOCOL.md §5.7).

Each subcommand connects, asks the broker once and prints the answer; a refusal exits 4 with the broker's
words (``unknown_room``, ``room_exists``, ``not_allowed`` …), as any refused request does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from p2pchat.client import events as ev
from p2pchat.common.errors import ExitCode

ROLES = ("member", "admin", "owner")


def _members(room: ev.RoomView, online: frozenset[str], receipts: ev.RoomReceipts | None) -> list[dict]:
    marks = receipts.marks if receipts is not None else {}
    return [{"user": user, "role": ROLES[role], "invited": invited, "online": user in online,
             **({"delivered": marks[user][0], "read": marks[user][1]} if user in marks else {})}
            for user, role, invited in room.members]


def _print_room(room: ev.RoomView, as_json: bool, online: frozenset[str],
                receipts: ev.RoomReceipts | None = None) -> None:
    members = _members(room, online, receipts)
    if as_json:
        print(json.dumps({"room": room.name, "topic": room.topic, "owner": room.owner,
                          **({"seq": receipts.seq} if receipts is not None else {}), "members": members}))
        return
    print(f"{room.name}" + (f" — {room.topic}" if room.topic else ""))
    for member in members:
        state = " (invited)" if member["invited"] else (" (online)" if member["online"] else "")
        marks = f"  read up to #{member['read']}" if member.get("read") else ""
        print(f"  {member['user']}  {member['role']}{state}{marks}")


def cmd_room(args: argparse.Namespace, connect: Callable) -> int:
    with connect(args, args.user) as client:
        action = args.room_command
        if action == "create":
            room = client.room_create(args.name, args.topic)
        elif action == "invite":
            room = client.room_invite(args.name, args.users)
        elif action == "join":
            room = client.room_join(args.name)
        elif action == "leave":
            client.room_leave(args.name)
            print(f"left {args.name}")
            return ExitCode.OK
        elif action == "remove":
            room = client.room_remove(args.name, args.member)
        elif action == "rename":
            room = client.room_set(args.name, new_name=args.new_name)
        elif action == "topic":
            room = client.room_set(args.name, topic=" ".join(args.text))
        elif action == "admin":
            room = client.room_admin(args.name, args.member, not args.off)
        elif action == "members":  # with how far each member has read (§5.9)
            room = client.room_info(args.name)
            _print_room(room, args.json, client.peers(), client.room_receipts(args.name))
            return ExitCode.OK
        else:  # list
            listed = []
            for r in client.room_list():
                _, role, invited = r.member(args.user) or (args.user, 0, False)
                listed.append({"room": r.name, "role": ROLES[role], "invited": invited})
            for entry in listed if not args.json else ():
                hint = f" (invited: p2pchat room join {entry['room']})" if entry["invited"] else ""
                print(f"{entry['room']}  {entry['role']}{hint}")
            if args.json:
                print(json.dumps(listed))
            return ExitCode.OK
        _print_room(room, getattr(args, "json", False), client.peers())
    return ExitCode.OK


def add_room_parser(sub, client_options: Callable[[argparse.ArgumentParser], None], connect: Callable) -> None:
    p = sub.add_parser("room", help="group rooms: create, invite, join, leave, members, list",
                       description="Group rooms: end-to-end encrypted, delivered to members who are offline later.")
    rooms = p.add_subparsers(dest="room_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, *, named: bool = True) -> argparse.ArgumentParser:
        q = rooms.add_parser(name, help=help_text, description=help_text)
        client_options(q)
        if named:
            q.add_argument("name", help="the room's name")
        q.set_defaults(func=lambda args: cmd_room(args, connect))
        return q

    q = action("create", "create a room; you are its owner")
    q.add_argument("--topic", default=None, help="what the room is for")
    q = action("invite", "invite users to a room (owner and admins)")
    q.add_argument("users", nargs="+", help="user IDs to invite")
    action("join", "join a room you are invited to")
    action("leave", "leave a room (or decline its invitation)")
    q = action("remove", "remove a member or invitation (owner and admins)")
    q.add_argument("member", help="the user to remove")
    q = action("rename", "rename a room (owner and admins)")
    q.add_argument("new_name", help="the new name")
    q = action("topic", "set a room's topic (owner and admins)")
    q.add_argument("text", nargs="*", help="the topic (empty: none)")
    q = action("admin", "make a member an admin, or with --off a member again (owner)")
    q.add_argument("member", help="the member")
    q.add_argument("--off", action="store_true", help="take the admin role away")
    q = action("members", "list a room's members, their roles and who is online")
    q.add_argument("--json", action="store_true", help="print a JSON object")
    q = action("list", "list your rooms and invitations", named=False)
    q.add_argument("--json", action="store_true", help="print a JSON array")
