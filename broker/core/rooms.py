"""Who may change a room, and how: the rule table and bounds of docs/ROOMS-DESIGN.md §2.1-2.2, sans I/O.

Each function takes the room as stored (``Room``, frozen) and what the storage knows about the users involved
(counts), and returns the room as it must be stored next, or the ``RoomRefusal`` that says why not. The
backends (broker/backends/sqlite_rooms.py) only load, call one of these, and store the result atomically, so
the rules live in one place. A user who is neither a member nor invited learns ``UNKNOWN_ROOM`` whatever it
asks, exactly as for a room that does not exist (§2.4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from p2pchat.broker.core.ports import Member, Role, Room, RoomRefusal
from p2pchat.common.protocol import USER_ID_RE

ROOM_TOPIC_CHARS = 256


@dataclass(frozen=True, slots=True)
class RoomLimits:
    members: int = 256  # MAX_ROOM_MEMBERS, joined + invited
    rooms_per_user: int = 64  # MAX_ROOMS_PER_USER, joined
    pending_invites: int = 32  # MAX_PENDING_INVITES per user
    invite_batch: int = 32  # MAX_INVITE_BATCH
    admins: int = 16  # MAX_ROOM_ADMINS
    rooms: int = 100_000  # MAX_ROOMS per broker or cluster (--rooms-max)
    invite_ttl_ms: int = 30 * 24 * 3600 * 1000  # an invitation not taken up within 30 days is gone
    expire_batch: int = 100  # rooms whose expired invitations one sweep step removes


Count = Callable[[str], int]  # a user -> how many (joined rooms, or pending invitations) it has


def fold(name: str) -> str:
    """Room names are unique case-insensitively (``Team`` cannot impersonate ``team``); the pattern is ASCII."""
    return name.lower()


def check_name(name: str) -> RoomRefusal | None:
    return None if type(name) is str and USER_ID_RE.fullmatch(name) else RoomRefusal.BAD_NAME


def check_topic(topic: str) -> RoomRefusal | None:
    return None if type(topic) is str and len(topic) <= ROOM_TOPIC_CHARS else RoomRefusal.BAD_NAME


def create(rid: bytes, name: str, owner: str, topic: str, now_ms: int, owner_rooms: int, rooms: int,
           limits: RoomLimits) -> Room | RoomRefusal:
    """A new room with ``owner`` joined; the name's uniqueness is the storage's to check (``ROOM_EXISTS``)."""
    refused = check_name(name) or check_topic(topic)
    if refused:
        return refused
    if owner_rooms >= limits.rooms_per_user or rooms >= limits.rooms:
        return RoomRefusal.TOO_MANY_ROOMS
    return Room(rid, name, topic, owner, 1, 0, (Member(owner, Role.OWNER, True, now_ms),))


def stale(member: Member, now_ms: int, limits: RoomLimits) -> bool:
    """An invitation older than the TTL counts for nothing, whether or not the sweep has removed it yet."""
    return not member.joined and now_ms - member.since_ms >= limits.invite_ttl_ms


def expire(room: Room | None, now_ms: int, limits: RoomLimits) -> Room | None:
    """The room without its expired invitations (the epoch stays: no joined member changed)."""
    if room is None:
        return None
    kept = tuple(m for m in room.members if not stale(m, now_ms, limits))
    return room if len(kept) == len(room.members) else replace(room, members=kept)


def _visible(room: Room | None, user: str) -> Member | RoomRefusal:
    member = room.member(user) if room is not None else None
    return RoomRefusal.UNKNOWN_ROOM if member is None else member


def _managing(room: Room | None, by: str) -> RoomRefusal | None:
    """Owner and admins manage invitations, name and topic; a mere invitee or member may not."""
    member = _visible(room, by)
    if isinstance(member, RoomRefusal):
        return member
    if not member.joined or member.role is Role.MEMBER:
        return RoomRefusal.NOT_ALLOWED
    return None


def invite(room: Room | None, by: str, users: Sequence[str], now_ms: int, pending: Count,
           limits: RoomLimits) -> Room | RoomRefusal:
    """Invite ``users``; those already members or invited are left as they are, but an expired invitation is
    made afresh. ``pending`` counts a user's invitations that have not expired. All or nothing."""
    room = expire(room, now_ms, limits)
    refused = _managing(room, by)
    if refused:
        return refused
    if len(users) > limits.invite_batch:
        return RoomRefusal.TOO_MANY_INVITATIONS
    new = [user for user in dict.fromkeys(users) if room.member(user) is None]
    if any(check_name(user) for user in new):
        return RoomRefusal.BAD_NAME
    if len(room.members) + len(new) > limits.members:
        return RoomRefusal.TOO_MANY_MEMBERS
    if any(pending(user) >= limits.pending_invites for user in new):  # none is pushed out (§2.2)
        return RoomRefusal.TOO_MANY_INVITATIONS
    invited = tuple(Member(user, Role.MEMBER, False, now_ms) for user in new)
    return replace(room, members=room.members + invited)


def join(room: Room | None, user: str, now_ms: int, joined_rooms: int, limits: RoomLimits) -> Room | RoomRefusal:
    room = expire(room, now_ms, limits)  # an expired invitation cannot be taken up
    member = _visible(room, user)
    if isinstance(member, RoomRefusal):
        return member
    if member.joined:
        return room  # joining twice changes nothing
    if joined_rooms >= limits.rooms_per_user:
        return RoomRefusal.TOO_MANY_ROOMS
    others = tuple(m for m in room.members if m.user != user)
    return replace(room, epoch=room.epoch + 1, members=others + (replace(member, joined=True, since_ms=now_ms),))


def _without(room: Room, member: Member) -> Room:
    members = tuple(m for m in room.members if m.user != member.user)
    return replace(room, epoch=room.epoch + member.joined, members=members)


def leave(room: Room | None, user: str) -> Room | None | RoomRefusal:
    """Leave, or decline an invitation. The owner's role passes to the oldest admin, else the oldest joined
    member; the last joined member leaving deletes the room (None) with its invitations."""
    member = _visible(room, user)
    if isinstance(member, RoomRefusal):
        return member
    after = _without(room, member)
    joined = [m for m in after.members if m.joined]
    if not joined:
        return None
    if member.role is not Role.OWNER:
        return after
    heir = next((m for m in joined if m.role is Role.ADMIN), joined[0])
    members = tuple(replace(m, role=Role.OWNER) if m is heir else m for m in after.members)
    return replace(after, owner=heir.user, members=members)


def remove(room: Room | None, by: str, user: str) -> Room | RoomRefusal:
    """The owner removes anyone but itself; an admin removes plain members and invitees only."""
    actor = _visible(room, by)
    if isinstance(actor, RoomRefusal):
        return actor
    target = room.member(user)
    if target is None:
        return RoomRefusal.NOT_MEMBER
    if not actor.joined or target.role >= actor.role or actor.role is Role.MEMBER:
        return RoomRefusal.NOT_ALLOWED
    return _without(room, target)


def set_(room: Room | None, by: str, name: str | None, topic: str | None) -> Room | RoomRefusal:
    """Rename, or set the topic (owner, admins); the new name's uniqueness is the storage's to check."""
    refused = _managing(room, by) or (name is not None and check_name(name)) or (
        topic is not None and check_topic(topic))
    if refused:
        return refused
    return replace(room, name=room.name if name is None else name, topic=room.topic if topic is None else topic)


def role(room: Room | None, by: str, user: str, admin: bool, limits: RoomLimits) -> Room | RoomRefusal:
    """Make or unmake a joined member an admin: the owner only."""
    actor = _visible(room, by)
    if isinstance(actor, RoomRefusal):
        return actor
    if actor.role is not Role.OWNER:
        return RoomRefusal.NOT_ALLOWED
    target = room.member(user)
    if target is None or not target.joined:
        return RoomRefusal.NOT_MEMBER
    if target.role is Role.OWNER:
        return RoomRefusal.NOT_ALLOWED
    wanted = Role.ADMIN if admin else Role.MEMBER
    if wanted is target.role:
        return room
    if admin and sum(m.role is Role.ADMIN for m in room.members) >= limits.admins:
        return RoomRefusal.TOO_MANY_ADMINS
    return replace(room, members=tuple(replace(m, role=wanted) if m is target else m for m in room.members))


def bump(room: Room | None, user: str) -> Room | None:
    """``user``'s device list changed: the keys of the rooms it has joined must follow (§4)."""
    member = room.member(user) if room is not None else None
    return replace(room, epoch=room.epoch + 1) if member is not None and member.joined else room


def raised(marks: tuple[int, int], delivered: int, read: int | None, seq: int) -> tuple[int, int]:
    """A member's ``(delivered, read)`` after it reported these: marks only go up (a member's devices report
    one by one, late ones lower), and never past ``seq``, the last number handed out (nobody read the future)."""
    kept, shown = marks
    return max(kept, min(delivered, seq)), shown if read is None else max(shown, min(read, seq))
