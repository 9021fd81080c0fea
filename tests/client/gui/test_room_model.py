"""The rules behind the rooms in the window, without a display: the ROOMS list, members with roles and online dots,
who may do what, a removal, the words of a room's events, and room messages in the chat model."""

from __future__ import annotations

from p2pchat.client import events as ev
from p2pchat.client.gui.delivery import Delivery
from p2pchat.client.gui.model import ChatModel
from p2pchat.client.gui.room_model import ADMIN, MEMBER, OWNER, RoomBook, describe_event
from p2pchat.client.storage.history import HistoryEntry

TEAM, OPS, DESIGN = b"t" * 16, b"o" * 16, b"d" * 16


def room(rid: bytes, name: str, *members: tuple[str, int, bool], epoch: int = 1, topic: str = "") -> ev.RoomView:
    return ev.RoomView(rid, name, topic, members[0][0], epoch, members)


def team(**extra) -> ev.RoomView:
    return room(TEAM, "team", ("alice", OWNER, False), ("bob", ADMIN, False), ("me", MEMBER, False),
                ("dave", MEMBER, True), **extra)


def test_invitations_come_first_then_rooms_by_name_with_their_unread_counts():
    book = RoomBook("me")
    book.listed([team(), room(OPS, "Ops", ("bob", OWNER, False), ("me", MEMBER, False)),
                 room(DESIGN, "design", ("carol", OWNER, False), ("me", MEMBER, True))])
    rows = book.rows(lambda rid: {TEAM: 2}.get(rid, 0))
    assert [(r.name, r.unread, r.invited) for r in rows] == [("design", 0, True), ("Ops", 0, False),
                                                             ("team", 2, False)]


def test_members_list_joined_before_invited_owner_and_admins_first_with_online_dots():
    book = RoomBook("me")
    book.updated(team())
    rows = book.members(TEAM, frozenset({"bob", "dave"}))
    assert [(m.user, m.label, m.online) for m in rows] == [
        ("alice", "owner", False), ("bob", "admin", True), ("me", "", True), ("dave", "invited", False)]


def test_who_may_do_what_follows_the_brokers_rule_table():
    owner, admin, member = RoomBook("alice"), RoomBook("bob"), RoomBook("me")
    for book in (owner, admin, member):
        book.updated(team())
    assert owner.may_manage(TEAM) and admin.may_manage(TEAM) and not member.may_manage(TEAM)
    assert owner.may_remove(TEAM, "bob") and not owner.may_remove(TEAM, "alice")
    assert admin.may_remove(TEAM, "me") and admin.may_remove(TEAM, "dave") and not admin.may_remove(TEAM, "alice")
    assert not member.may_remove(TEAM, "dave")
    assert owner.may_set_admin(TEAM, "me") and owner.may_set_admin(TEAM, "bob")
    assert not owner.may_set_admin(TEAM, "dave")  # invited, not joined yet
    assert not admin.may_set_admin(TEAM, "me")


def test_an_invitation_may_be_joined_but_nothing_else():
    book = RoomBook("dave")
    book.updated(team())
    book.invited(TEAM, "alice")
    assert book.is_invitation(TEAM) and book.inviter(TEAM) == "alice"
    assert not book.joined(TEAM) and book.role(TEAM) is None and not book.may_manage(TEAM)
    book.updated(room(TEAM, "team", ("alice", OWNER, False), ("dave", MEMBER, False), epoch=2))
    assert book.joined(TEAM) and book.inviter(TEAM) is None


def test_a_removed_room_stays_listed_with_why_and_nothing_may_be_done_there():
    book = RoomBook("me")
    book.updated(team())
    why = book.gone(TEAM, "removed", "alice")
    assert why == "alice removed you from #team. You cannot send here or read what is sent after."
    assert [(r.name, r.gone) for r in book.rows(lambda rid: 0)] == [("team", True)]
    assert not book.joined(TEAM) and book.members(TEAM, frozenset()) == [] and not book.may_manage(TEAM)
    book.listed([])  # signing in again: still there, saying so
    assert book.get(TEAM).gone == why
    book.updated(team(epoch=3))  # invited and joined again
    assert book.joined(TEAM) and not book.get(TEAM).gone


def test_a_room_left_or_declined_is_dropped():
    book = RoomBook("me")
    book.updated(team())
    assert book.gone(TEAM, "left", None) is None and book.get(TEAM) is None and book.rows(lambda rid: 0) == []


def test_signing_in_again_keeps_the_members_known_for_the_same_epoch_and_drops_rooms_no_longer_listed():
    book = RoomBook("me")
    book.updated(team(topic="plans"))
    book.updated(room(OPS, "ops", ("bob", OWNER, False), ("me", MEMBER, False)))
    book.listed([room(TEAM, "team", ("me", MEMBER, False))])  # a listing names only ourselves
    assert book.get(OPS) is None
    assert [m.user for m in book.members(TEAM, frozenset())] == ["alice", "bob", "me", "dave"]
    assert book.get(TEAM).view.topic == "plans"
    book.listed([room(TEAM, "team", ("me", MEMBER, False), epoch=2)])  # it moved on: the room's answer follows
    assert [m.user for m in book.members(TEAM, frozenset())] == ["me"]


def test_role_changes_are_lines_of_the_timeline():
    book = RoomBook("me")
    book.updated(team())
    after = room(TEAM, "team", ("bob", OWNER, False), ("me", ADMIN, False), ("dave", MEMBER, False), epoch=2)
    assert book.updated(after) == ["bob is now the owner", "You are now an admin"]  # dave only joined
    assert book.updated(room(TEAM, "team", ("bob", OWNER, False), ("me", MEMBER, False), epoch=3)) == [
        "You are no longer an admin"]


def test_room_events_in_words():
    def said(kind: str, user: str, by: str | None = None, declined: bool = False) -> str | None:
        return describe_event(ev.RoomEvent(TEAM, "ops", kind, user, by), "me", declined)

    assert said("invited", "carol", "alice") == "alice invited carol"
    assert said("invited", "carol", "me") == "You invited carol"
    assert said("joined", "carol") == "carol joined"
    assert said("left", "carol") == "carol left"
    assert said("left", "carol", declined=True) == "carol declined the invitation"
    assert said("removed", "carol", "alice") == "alice removed carol"
    assert said("renamed", "alice", "alice") == "alice renamed the room to #ops"
    assert said("topic", "me", "me") == "You changed the topic"
    assert said("role", "carol", "alice") is None and said("devices", "carol") is None


def test_room_messages_are_a_conversation_keyed_by_the_room_with_their_own_unread_count():
    model = ChatModel("me")
    line = model.receive(b"1", "alice", "hello team", 10, TEAM)
    assert line is not None and line.key == TEAM and line.peer == "alice"
    model.receive(b"2", "alice", "and you, directly", 20)
    assert model.conversation(TEAM).unread == 1 and model.conversation("alice").unread == 1
    assert [r.name for r in model.roster()] == ["alice"]  # rooms are not people
    model.open(TEAM)
    assert model.mark_read(TEAM) and not model.has_unread(TEAM) and model.has_unread("alice")
    mine = model.sending(b"3", "me", "hi all", 30, TEAM)
    assert model.acked(b"3") is mine and mine.delivery is Delivery.SENT and mine.key == TEAM


def test_room_history_keeps_each_authors_name_and_counts_what_is_unread():
    model = ChatModel("me")
    model.load(TEAM, [HistoryEntry(b"1", "alice", False, "one", 10, "read", TEAM),
                      HistoryEntry(b"2", "me", True, "two", 20, "stored", TEAM),
                      HistoryEntry(b"3", "bob", False, "three", 30, "received", TEAM)])
    conv = model.conversation(TEAM)
    assert [(line.peer, line.outgoing) for line in conv.lines] == [("alice", False), ("me", True), ("bob", False)]
    assert conv.unread == 1 and model.line(b"2").delivery is Delivery.SENT
