"""Group rooms in real windows on a real broker (issue 16, point 6): rooms in the ROOMS list with unread counts, a
room's view with its members, their roles and online dots, the room form (New room, Invite, Rename, Leave, Remove),
an invitation's Join and Decline, and the room's events shown live as they happen."""

from __future__ import annotations

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import K_COMPOSER, K_PEER_NAME, K_PEER_PRESENCE, K_SEND, K_THEME  # noqa: E402
from p2pchat.client.gui.room_layout import (  # noqa: E402
    K_DECLINE_ROOM,
    K_EDIT_ROOM,
    K_INVITE,
    K_INVITE_BANNER,
    K_INVITE_TITLE,
    K_JOIN_ROOM,
    K_LEAVE_ROOM,
    K_MEMBER_ACTIONS,
    K_MEMBER_ADMIN,
    K_MEMBER_COUNT,
    K_MEMBER_REMOVE,
    K_MEMBERS_PANEL,
    K_NEW_ROOM,
    K_ROOM_FIELDS,
    K_ROOM_FORM,
    K_ROOM_FORM_CANCEL,
    K_ROOM_FORM_NOTE,
)
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import (  # noqa: E402
    act,
    click,
    click_text,
    fill_room_form,
    line_of,
    meet,
    search_for,
    select_member,
    select_peer,
    select_room,
    shows,
    type_and_press,
)


def create_room(window, name: str, topic: str = "", others=(), enter: bool = False) -> None:
    click(window, K_NEW_ROOM)
    fill_room_form(window, name, topic, enter=enter)
    pump([window, *others], lambda: window.window[K_PEER_NAME].get() == f"# {name}", f"#{name} to open")


def invite(window, users: str, others, enter: bool = False) -> None:
    click(window, K_INVITE)
    fill_room_form(window, users, enter=enter)
    pump([window, *others], lambda: not window.shown(K_ROOM_FORM), "the invitation to be sent")


def invited(make_window):
    """alice's window with #team open, and bob's, invited to it."""
    alice, bob = make_window("alice"), make_window("bob")
    pump([alice, bob], lambda: shows(alice, "bob", "●"), "bob online")
    create_room(alice, "team", "", [bob])
    invite(alice, "bob", [bob])
    return alice, bob


def room_state(window, text: str) -> str:
    """Our message ``text`` in the open room: its delivery state as on screen."""
    return window.delivery_shown(line_of(window, window.model.active, text).msg_id)[0]


def test_a_room_is_created_its_invitation_joined_and_messages_go_both_ways_with_unread_counts(make_window):
    alice, bob = make_window("alice"), make_window("bob")
    both = [alice, bob]
    meet(alice, bob)
    create_room(alice, "team", "release planning", [bob], enter=True)
    assert alice.window[K_PEER_PRESENCE].get() == "release planning"
    assert alice.rooms_text() == ["#  team"] and alice.members_text() == ["●  alice  owner"]
    assert "You created #team" in alice.conversation_text()
    invite(alice, "bob", [bob], enter=True)  # Enter in a field, as the button
    assert "You invited bob" in alice.conversation_text() and "○  bob  invited" in alice.members_text()

    pump(both, lambda: bob.rooms_text() == ["✉  team"], "the invitation in bob's ROOMS list")
    select_room(bob, "team", both)
    assert bob.shown(K_INVITE_BANNER) and bob.window[K_INVITE_TITLE].get() == "alice invited you to #team"
    assert bob.window[K_COMPOSER].Widget.cget("state") == "disabled"
    click(bob, K_JOIN_ROOM)
    pump(both, lambda: not bob.shown(K_INVITE_BANNER) and "You joined" in bob.conversation_text(), "bob in #team")
    assert bob.members_text() == ["●  alice  owner", "●  bob"] and bob.rooms_text() == ["#  team"]
    pump(both, lambda: "bob joined" in alice.conversation_text() and alice.members_text() == [
        "●  alice  owner", "●  bob"], "bob's joining at alice")

    select_peer(bob, "alice", both)  # bob looks elsewhere: the room's messages count as unread
    type_and_press(alice, "Kick-off at ten, agenda in the doc.")
    pump(both, lambda: bob.rooms_text() == ["#  team  1"], "an unread count on bob's #team")
    pump(both, lambda: room_state(alice, "Kick-off at ten, agenda in the doc.") == "sent ✓", "alice's message sent")
    select_room(bob, "team", both)
    assert bob.rooms_text() == ["#  team"]  # shown: no longer unread
    assert "alice" in bob.conversation_text() and "Kick-off at ten, agenda in the doc." in bob.conversation_text()
    type_and_press(bob, "I'll bring the numbers.")
    pump(both, lambda: "I'll bring the numbers." in alice.conversation_text(), "bob's answer at alice")
    text = alice.conversation_text()
    assert text.index("bob joined") < text.index("Kick-off") < text.index("bob   ") < text.index("I'll bring")
    assert [e.state for e in bob.history.room_conversation(bob.model.active)] == ["read", "stored"]

    click(bob, K_LEAVE_ROOM)
    assert "You stop receiving its messages" in bob.window[K_ROOM_FORM_NOTE].get()
    fill_room_form(bob)
    pump(both, lambda: bob.rooms_text() == [] and bob.model.active is None and "You left #team" in bob.log_text(),
         "bob out of #team")
    pump(both, lambda: "bob left" in alice.conversation_text() and alice.members_text() == ["●  alice  owner"],
         "bob's leaving at alice")


@pytest.fixture
def team(make_window):
    """alice's #team in three windows: bob and carol joined it (through their clients), everyone's room open."""
    def make():
        alice, bob, carol = make_window("alice"), make_window("bob"), make_window("carol")
        everyone = [alice, bob, carol]
        pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●"), "everyone online")
        create_room(alice, "team", "plans", everyone)
        invite(alice, "bob carol", everyone)
        for window in (bob, carol):
            window.client.room_join("team")
        for window in everyone:
            pump(everyone, lambda: window.rooms_text() == ["#  team"], f"#team at {window.model.user}")
            select_room(window, "team", everyone)
            pump(everyone, lambda: len(window.members_text()) == 3, f"#team's members at {window.model.user}")
        return alice, bob, carol
    return make


def test_the_owner_makes_an_admin_and_removes_a_member_who_is_told_and_can_no_longer_send(team):
    alice, bob, carol = team()
    everyone = [alice, bob, carol]
    assert not carol.shown(K_MEMBER_ACTIONS) and not carol.shown(K_INVITE)  # a member manages nothing
    select_member(alice, "bob")
    assert alice.window[K_MEMBER_ADMIN].get_text() == "Make admin"
    click(alice, K_MEMBER_ADMIN)
    pump(everyone, lambda: "●  bob  admin" in bob.members_text() and "You are now an admin" in bob.conversation_text()
         and "bob is now an admin" in alice.conversation_text(), "bob an admin, at both")
    assert alice.window[K_MEMBER_ADMIN].get_text() == "Remove admin"
    assert bob.shown(K_MEMBER_ACTIONS) and bob.shown(K_INVITE) and not bob.shown(K_MEMBER_ADMIN)  # the owner's

    select_member(alice, "carol")
    click(alice, K_MEMBER_REMOVE)
    assert "carol stops receiving the room's messages" in alice.window[K_ROOM_FORM_NOTE].get()
    fill_room_form(alice)
    removed = "alice removed you from #team. You cannot send here or read what is sent after."
    pump(everyone, lambda: removed in carol.conversation_text() and "alice removed carol" in bob.conversation_text()
         and "You removed carol" in alice.conversation_text(), "carol's removal, everywhere")
    assert removed in carol.log_text() and carol.window[K_PEER_PRESENCE].get() == "you are no longer a member"
    assert not carol.shown(K_MEMBERS_PANEL) and carol.rooms_text() == ["#  team"]
    assert carol.window[K_COMPOSER].Widget.cget("state") == "disabled" and carol.window[K_SEND].Widget.cget(
        "state") == "disabled"
    pump(everyone, lambda: [row.split()[1] for row in alice.members_text()] == ["alice", "bob"], "carol gone")

    type_and_press(alice, "Only the two of us now.")
    pump(everyone, lambda: "Only the two of us now." in bob.conversation_text(), "alice's message at bob")
    assert "Only the two of us now." not in carol.conversation_text()

    bob.close()  # the members' dots follow presence
    pump([alice, carol], lambda: alice.members_text() == ["●  alice  owner", "○  bob  admin"], "bob offline")
    assert "1 of 2 online" == alice.window[K_MEMBER_COUNT].get()


def test_a_rename_and_a_new_topic_show_live_and_a_refusal_is_shown_in_words(team):
    alice, bob, carol = team()
    everyone = [alice, bob, carol]
    assert not bob.shown(K_EDIT_ROOM)
    click(alice, K_EDIT_ROOM)
    assert [alice.window[key].get() for key in K_ROOM_FIELDS] == ["team", "plans"]
    act(alice, lambda: alice.window[K_ROOM_FIELDS[0]].update("ops"))
    click(alice, K_THEME)  # the window is built again: the form stays open with what was typed
    pump(everyone, lambda: alice.settings.theme == "dark", "the dark theme")
    assert alice.shown(K_ROOM_FORM) and alice.window[K_ROOM_FIELDS[0]].get() == "ops"
    assert alice.members_text() == ["●  alice  owner", "●  bob", "●  carol"]
    fill_room_form(alice, "ops", "on-call and incidents")
    pump(everyone, lambda: bob.window[K_PEER_NAME].get() == "# ops" and bob.rooms_text() == ["#  ops"]
         and bob.window[K_PEER_PRESENCE].get() == "on-call and incidents"
         and "You renamed the room to #ops and changed the topic" in alice.conversation_text(),
         "the new name and topic at bob")
    assert "alice renamed the room to #ops" in bob.conversation_text()
    assert "alice changed the topic" in bob.conversation_text()

    click(alice, K_NEW_ROOM)
    fill_room_form(alice, "", "")
    assert alice.window[K_ROOM_FORM_NOTE].get() == "Give the room a name."
    fill_room_form(alice, "OPS", "")
    pump(everyone, lambda: alice.window[K_ROOM_FORM_NOTE].get() == "Refused: a room of that name exists",
         "the broker's refusal in the form")
    fill_room_form(alice, "not a name!", "")
    pump(everyone, lambda: alice.window[K_ROOM_FORM_NOTE].get().startswith("Refused: "), "a bad name refused")
    click(alice, K_ROOM_FORM_CANCEL)
    assert not alice.shown(K_ROOM_FORM) and alice.rooms_text() == ["#  ops"]


def test_an_invitation_declined_is_gone_and_the_room_says_so(make_window):
    alice, bob = invited(make_window)
    both = [alice, bob]
    pump(both, lambda: bob.rooms_text() == ["✉  team"], "the invitation at bob")
    select_room(bob, "team", both)
    click(bob, K_DECLINE_ROOM)
    pump(both, lambda: bob.rooms_text() == [] and bob.model.active is None
         and "You declined the invitation to #team" in bob.log_text(), "the invitation gone")
    pump(both, lambda: "bob declined the invitation" in alice.conversation_text()
         and alice.members_text() == ["●  alice  owner"], "bob's answer at alice")
    assert not bob.shown(K_INVITE_BANNER) and not bob.shown(K_MEMBERS_PANEL)


def test_room_messages_sent_while_away_are_unread_after_signing_in_and_found_by_search(make_window):
    alice, bob = invited(make_window)
    bob.client.room_join("team")
    bob.close()
    type_and_press(alice, "Standup moved to 9:30.")
    type_and_press(alice, "Agenda: the release checklist.")
    pump([alice], lambda: room_state(alice, "Agenda: the release checklist.") == "sent ✓", "stored for bob")

    bob = make_window("bob")
    pump([alice, bob], lambda: bob.rooms_text() == ["#  team  2"], "two unread in #team at bob")
    select_room(bob, "team", [alice, bob])
    rid = bob.model.active
    assert bob.rooms_text() == ["#  team"]
    text = bob.conversation_text()
    assert "alice" in text and text.index("Standup moved") < text.index("Agenda: the release checklist.")
    pump([bob], lambda: bob.history.unread() == {}, "read in bob's history")

    select_peer(bob, "alice", [alice])  # elsewhere, then back to the room by a search result
    search_for(bob, "checklist")
    pump([bob], lambda: "alice in #team" in bob.conversation_text(), "the room's message among the results")
    click_text(bob, bob._view().result_index(line_of(bob, rid, "Agenda: the release checklist.").msg_id))
    pump([bob], lambda: bob.model.active == rid and bob.window[K_PEER_NAME].get() == "# team", "the room open")


def test_a_message_in_a_room_not_on_screen_pops_a_notification_that_opens_it(make_window):
    alice = make_window("alice", notifications=True)
    bob = make_window("bob")
    both = [alice, bob]
    meet(alice, bob)
    bob_room = bob.client.room_create("team")
    bob.client.room_invite("team", ["alice"])
    pump(both, lambda: alice.toast is not None and alice.rooms_text() == ["✉  team"], "the invitation, notified")
    assert toast_title(alice) == "bob invited you to #team"
    alice.client.room_join("team")
    bob.client.send_room("team", "welcome!")
    pump(both, lambda: alice.rooms_text() == ["#  team  1"] and toast_title(alice) == "#team · bob",
         "the message, notified")
    alice.toast.window.TKroot.event_generate("<Button-1>")
    pump(both, lambda: alice.model.active == bob_room.rid and "welcome!" in alice.conversation_text(),
         "the room open")


def toast_title(window) -> str:
    toast = window.toast
    return toast.window.element_list()[1].get() if toast is not None else ""
