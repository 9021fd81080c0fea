"""Group rooms as the window shows them, as plain data: the rooms we are in or invited to, their members with
their roles and online dots, who may do what, and the lines a room's events add to its timeline.

No Tk here (as model.py). A room's messages are a conversation of ``ChatModel`` keyed by the room's id; this
module keeps what the broker last said of each room (``RoomView``) and says it in words. What the user may do
mirrors the broker's rule table (docs/ROOMS-DESIGN.md §2.1) only to hide buttons that could not work: the broker
decides, and a refusal is shown in words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from p2pchat.client import events as ev

MEMBER, ADMIN, OWNER = 0, 1, 2  # RoomView's roles
ROLE_WORDS = {MEMBER: "", ADMIN: "admin", OWNER: "owner"}
RoomView = ev.RoomView


@dataclass(slots=True)
class NoticeLine:
    """Something that happened in a room (a member joined, the room was renamed): a line of its timeline, not a
    message. Kept for this run only; history keeps the messages."""

    ts_ms: int
    text: str


@dataclass(slots=True)
class RoomEntry:
    view: RoomView
    gone: str = ""  # we were removed: the line that says so; sending is off until we are in it again


@dataclass(frozen=True, slots=True)
class RoomRow:
    """A room in the roster: a joined room, an invitation, or one we were removed from in this run."""

    rid: bytes
    name: str
    unread: int
    invited: bool
    gone: bool


@dataclass(frozen=True, slots=True)
class MemberRow:
    user: str
    role: int
    invited: bool
    online: bool

    @property
    def label(self) -> str:
        return "invited" if self.invited else ROLE_WORDS.get(self.role, "")


class RoomBook:
    """The rooms of one user, by id, as the broker last described them (``RoomsListed``, ``RoomUpdated``,
    ``RoomGone``)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.names: dict[bytes, str] = {}  # every room we know a name for, history's included
        self._rooms: dict[bytes, RoomEntry] = {}
        self._inviters: dict[bytes, str] = {}  # who invited us, when the broker said (not after a restart)

    def get(self, rid: bytes) -> RoomEntry | None:
        return self._rooms.get(rid)

    def name(self, rid: bytes) -> str:
        return self.names.get(rid) or rid.hex()[:8]

    def listed(self, views: Iterable[RoomView]) -> None:
        """The broker's list after signing in: our rooms and invitations. A listing names only ourselves among the
        members, so the members known for the same epoch are kept until the room's own answer comes."""
        fresh: dict[bytes, RoomEntry] = {}
        for view in views:
            known = self._rooms.get(view.rid)
            if known is not None and not known.gone and known.view.epoch == view.epoch:
                view = replace(view, topic=known.view.topic or view.topic, owner=known.view.owner or view.owner,
                               members=known.view.members)
            fresh[view.rid] = RoomEntry(view)
            self.names[view.rid] = view.name
        # Rooms left elsewhere while we were signed out are simply no longer ours; those we were removed from in
        # this run stay, with the line that says so.
        fresh.update({rid: entry for rid, entry in self._rooms.items() if entry.gone and rid not in fresh})
        self._rooms = fresh

    def updated(self, view: RoomView) -> list[str]:
        """The room as it is now (we are in it again, if we were removed); the lines its role changes add."""
        known = self._rooms.get(view.rid)
        self._rooms[view.rid] = RoomEntry(view)
        self.names[view.rid] = view.name
        return _role_changes(known.view, view, self.user) if known is not None and not known.gone else []

    def invited(self, rid: bytes, by: str) -> None:
        """``by`` invited us (the room's description follows)."""
        self._inviters[rid] = by

    def inviter(self, rid: bytes) -> str | None:
        return self._inviters.get(rid) if self.is_invitation(rid) else None

    def gone(self, rid: bytes, why: str, by: str | None) -> str | None:
        """We are no longer in the room. Removed: it stays, marked, and the line that says so is returned; left or
        declined: it is dropped (None)."""
        entry = self._rooms.get(rid)
        if why != "removed" or entry is None:
            self._rooms.pop(rid, None)
            return None
        room = f"#{entry.view.name}"
        entry.gone = (f"{by} removed you from {room}." if by else f"You are no longer a member of {room}.") + \
            " You cannot send here or read what is sent after."
        return entry.gone

    def rows(self, unread: Callable[[bytes], int]) -> list[RoomRow]:
        """Invitations first, then rooms by name (those we were removed from last)."""
        rows = [RoomRow(rid, e.view.name, unread(rid), self.is_invitation(rid), bool(e.gone))
                for rid, e in self._rooms.items()]
        return sorted(rows, key=lambda r: (not r.invited, r.gone, r.name.lower()))

    def members(self, rid: bytes, online: frozenset[str]) -> list[MemberRow]:
        """Joined members before invitees; the owner, then admins, then members; each by name."""
        entry = self._rooms.get(rid)
        if entry is None or entry.gone:
            return []
        rows = [MemberRow(user, role, invited, not invited and (user == self.user or user in online))
                for user, role, invited in entry.view.members]
        return sorted(rows, key=lambda m: (m.invited, -m.role, m.user.lower()))

    # --- what we may do (the broker has the last word) --------------------------------------------------------
    def is_invitation(self, rid: bytes) -> bool:
        own = self._own(rid)
        return own is not None and own[2]

    def joined(self, rid: bytes) -> bool:
        own = self._own(rid)
        return own is not None and not own[2]

    def role(self, rid: bytes) -> int | None:
        """Our role in a room we have joined and are still in; None otherwise."""
        own = self._own(rid)
        return own[1] if own is not None and not own[2] else None

    def may_manage(self, rid: bytes) -> bool:
        """Invite, rename, set the topic: the owner and admins."""
        return (self.role(rid) or MEMBER) >= ADMIN

    def may_remove(self, rid: bytes, user: str) -> bool:
        """The owner removes anyone but itself; an admin, plain members and invitees."""
        role, target = self.role(rid), self._member(rid, user)
        return role is not None and role >= ADMIN and target is not None and target[1] < role

    def may_set_admin(self, rid: bytes, user: str) -> bool:
        """The owner makes a joined member an admin, or an admin a member again."""
        target = self._member(rid, user)
        return self.role(rid) == OWNER and target is not None and not target[2] and target[1] != OWNER

    def _own(self, rid: bytes) -> tuple[str, int, bool] | None:
        entry = self._rooms.get(rid)
        return None if entry is None or entry.gone else entry.view.member(self.user)

    def _member(self, rid: bytes, user: str) -> tuple[str, int, bool] | None:
        entry = self._rooms.get(rid)
        return None if entry is None or entry.gone else entry.view.member(user)


def _role_changes(before: RoomView, after: RoomView, me: str) -> list[str]:
    lines = []
    for user, role, invited in after.members:
        was = before.member(user)
        if was is None or invited or was[1] == role:  # an invitee's role is a member's
            continue
        who, be = ("You", "are") if user == me else (user, "is")
        lines.append(f"{who} {be} now the owner" if role == OWNER else f"{who} {be} now an admin" if role == ADMIN
                     else f"{who} {be} no longer an admin")
    return lines


def describe_event(event: ev.RoomEvent, me: str, declined: bool = False) -> str | None:
    """A room event as a line of the room's timeline; None for what shows elsewhere (role changes come with the
    room's new description, a member's devices only concern the keys). ``declined``: the user who left was only
    invited."""
    def who(user: str | None) -> str:
        return "You" if user == me else user or "Someone"

    def whom(user: str) -> str:
        return "you" if user == me else user

    kind, user, by = event.kind, event.user, event.by
    if kind == "invited":
        return f"{who(by)} invited {whom(user)}"
    if kind == "joined":
        return f"{who(user)} joined"
    if kind == "left":
        return f"{who(user)} declined the invitation" if declined else f"{who(user)} left"
    if kind == "removed":
        return f"{who(by)} removed {whom(user)}"
    if kind == "renamed":
        return f"{who(by or user)} renamed the room to #{event.name}"
    if kind == "topic":
        return f"{who(by or user)} changed the topic"
    return None
