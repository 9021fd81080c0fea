"""Group rooms in the window: the ROOMS list, a room's view (members, invitation, the room form), the room requests
the user makes, and the library's room events.

A mixin of ``ChatWindow`` (window.py holds its state and dispatches). A room's messages are a conversation of the
model keyed by the room's id, so opening, sending, unread counts and marking read go through messaging.py like a
person's. The library's room requests wait for the broker's answer, so each runs on a thread of its own (as the
Devices panel's jobs do) and its outcome comes back through the window's bridge as a ``RoomJob`` tagged with the
client generation it was started for; what it changed arrives anyway as the library's ``RoomUpdated`` or
``RoomGone``, which update the rooms (the answer itself only adds a room not known yet). A refusal is shown in
words where the user asked (the form, the invitation, the members column) and in the connection log.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pchat.client import events as ev
from p2pchat.client.gui.layout import K_COMPOSER, K_PEER_NAME, K_PEER_PRESENCE, K_TIMELINE
from p2pchat.client.gui.rendering import now_ms
from p2pchat.client.gui.room_layout import (
    K_EDIT_ROOM,
    K_INVITE,
    K_INVITE_BANNER,
    K_INVITE_TEXT,
    K_INVITE_TITLE,
    K_LEAVE_ROOM,
    K_MEMBER_ACTIONS,
    K_MEMBER_ADMIN,
    K_MEMBER_COUNT,
    K_MEMBER_NOTE,
    K_MEMBER_REMOVE,
    K_MEMBERS,
    K_MEMBERS_PANEL,
    K_NEW_ROOM,
    K_ROOM_FIELDS,
    K_ROOM_FORM,
    K_ROOM_FORM_NOTE,
    K_ROOM_FORM_OK,
    K_ROOM_FORM_TITLE,
    K_ROOMS,
    label_key,
    row_key,
)
from p2pchat.client.gui.model import should_notify
from p2pchat.client.gui.room_model import OWNER, NoticeLine, describe_event
from p2pchat.common.errors import P2PChatError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoomJob:
    """What a room request came to: ``kind`` (a form's mode, or ``join``, ``decline``, ``admin``), the room it was
    about (None for a new room), the room as the broker answered, the line it adds to the room's timeline, or the
    refusal in words (``error``)."""

    kind: str
    rid: bytes | None
    room: ev.RoomView | None = None
    done: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class RoomForm:
    """The room form as opened: what it does, to which room (and member), its fields as (label, value)."""

    mode: str
    rid: bytes | None
    title: str
    button: str
    note: str
    fields: tuple[tuple[str, str], ...] = ()
    member: str = ""


# The buttons that open the room form, and the mode each opens it in.
FORM_BUTTONS = {K_NEW_ROOM: "create", K_INVITE: "invite", K_EDIT_ROOM: "edit", K_LEAVE_ROOM: "leave",
                K_MEMBER_REMOVE: "remove"}
NAME_RULE = "Letters, digits and . _ - (up to 32, starting with a letter or digit)."


def split_users(text: str) -> list[str]:
    """User IDs as typed: separated by commas or spaces, each once."""
    return list(dict.fromkeys(u.lstrip("@") for u in re.split(r"[\s,;]+", text) if u.strip("@")))


def room_form_for(mode: str, rid: bytes | None, room: ev.RoomView | None, member: str = "") -> RoomForm:
    """The form for ``mode`` (a room's but "create", which makes one)."""
    if mode == "create":
        return RoomForm(mode, None, "NEW ROOM", "Create", f"{NAME_RULE} You become its owner and can invite people.",
                        (("Name", ""), ("Topic", "")))
    assert room is not None
    name = f"#{room.name}"
    if mode == "invite":
        return RoomForm(mode, rid, f"INVITE PEOPLE TO {name}", "Invite", "User IDs, separated by commas or spaces. "
                        "Each sees an invitation and chooses to join.", (("User IDs", ""),))
    if mode == "edit":
        return RoomForm(mode, rid, f"RENAME {name} OR SET ITS TOPIC", "Save", NAME_RULE,
                        (("Name", room.name), ("Topic", room.topic)))
    if mode == "leave":
        return RoomForm(mode, rid, f"LEAVE {name}?", "Leave", "You stop receiving its messages, and what is sent "
                        "after is sealed with a key you never get. To come back, someone must invite you again.")
    return RoomForm(mode, rid, f"REMOVE {member} FROM {name}?", "Remove", f"{member} stops receiving the room's "
                    "messages: what is sent after is sealed with a key they never get.", member=member)


def and_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class RoomViews:
    _room_form: RoomForm | None = None
    _room_form_error = ""
    _room_busy = False  # a request of the form is under way: its button waits
    _invite_error = ""
    _member_note = ""
    _room_rows: list[bytes] = []  # the ROOMS list's rooms, in the order shown

    # --- the user's requests --------------------------------------------------------------------------------
    def open_room_form(self, mode: str) -> None:
        """A button opened the room form: "create" anywhere, the others for the open room (and member)."""
        rid = self.model.active if type(self.model.active) is bytes else None
        entry = self.model.rooms.get(rid) if rid is not None else None
        member = self._selected_member() or "" if mode == "remove" else ""
        if self.client is None or mode != "create" and entry is None or mode == "remove" and not member:
            return
        self._room_form = room_form_for(mode, rid, entry.view if entry is not None else None, member)
        self._room_form_error = ""
        for field, (_, value) in zip(K_ROOM_FIELDS, self._room_form.fields):
            self.window[field].update(value)
        self._render_room_form()
        if self._room_form.fields:
            self.window[K_ROOM_FIELDS[0]].set_focus()

    def close_room_form(self) -> None:
        self._room_form, self._room_form_error, self._room_busy = None, "", False
        self._render_room_form()
        self.window[K_COMPOSER].set_focus()

    def submit_room_form(self) -> None:
        form = self._room_form
        if form is None or self._room_busy or self.client is None:
            return
        values = [self.window[field].get().strip() for field in K_ROOM_FIELDS[:len(form.fields)]]
        name = self.model.rooms.name(form.rid) if form.rid is not None else ""
        if form.mode == "create":
            new, topic = values[0].lstrip("#"), values[1] or None
            if not new:
                self._form_refused("Give the room a name.")
                return
            work, done = (lambda c: c.room_create(new, topic)), f"You created #{new}"
        elif form.mode == "invite":
            users = split_users(values[0])
            if not users:
                self._form_refused("Type at least one user ID.")
                return
            work, done = (lambda c: c.room_invite(name, users)), f"You invited {and_list(users)}"
        elif form.mode == "edit":
            new = values[0].lstrip("#")
            new_name = new if new and new != name else None
            topic = values[1] if values[1] != self.model.rooms.get(form.rid).view.topic else None
            if new_name is None and topic is None:
                self.close_room_form()
                return
            changes = ([f"renamed the room to #{new_name}"] if new_name else []) + (
                ["changed the topic"] if topic is not None else [])
            work, done = (lambda c: c.room_set(name, new_name, topic)), "You " + " and ".join(changes)
        elif form.mode == "leave":
            work, done = (lambda c: c.room_leave(name)), f"You left #{name}"
        else:
            work, done = (lambda c: c.room_remove(name, form.member)), f"You removed {form.member}"
        self._room_busy, self._room_form_error = True, ""
        self._start_room_job(form.mode, form.rid, work, done)
        self._render_room_form()

    def join_room(self) -> None:
        rid = self.model.active
        if type(rid) is bytes and self.model.rooms.is_invitation(rid) and self.client is not None:
            name = self.model.rooms.name(rid)
            self._start_room_job("join", rid, lambda c: c.room_join(name), "You joined")

    def decline_room(self) -> None:
        rid = self.model.active
        if type(rid) is bytes and self.model.rooms.is_invitation(rid) and self.client is not None:
            name = self.model.rooms.name(rid)
            self._start_room_job("decline", rid, lambda c: c.room_leave(name),
                                 f"You declined the invitation to #{name}")

    def toggle_admin(self) -> None:
        rid, user = self.model.active, self._selected_member()
        if type(rid) is not bytes or not user or not self.model.rooms.may_set_admin(rid, user):
            return
        admin = self.model.rooms.get(rid).view.member(user)[1] == 0
        name = self.model.rooms.name(rid)
        self._member_note = f"Making {user} an admin…" if admin else f"Making {user} a member again…"
        self._start_room_job("admin", rid, lambda c: c.room_admin(name, user, admin))
        self._render_members()

    def forget_room_requests(self) -> None:
        """Another client: requests under way report to a generation that is gone."""
        self._room_busy, self._invite_error, self._member_note = False, "", ""

    def _form_refused(self, why: str) -> None:
        self._room_form_error = why
        self._render_room_form()

    def _start_room_job(self, kind: str, rid: bytes | None, work: Callable[[Any], Any], done: str = "") -> None:
        client, generation, post = self.client, self._generation, self.bridge.post

        def run() -> None:
            try:
                room = work(client)
                job = RoomJob(kind, rid, room if isinstance(room, ev.RoomView) else None, done)
            except P2PChatError as exc:
                job = RoomJob(kind, rid, error=exc.message)
            post((generation, job))

        threading.Thread(target=run, name=f"p2pchat-gui-room-{kind}", daemon=True).start()

    def _on_room_job(self, job: RoomJob) -> None:
        form = self._room_form
        mine = form is not None and form.mode == job.kind and form.rid == job.rid
        if job.error:
            self._log(f"Room: {job.error}")
            if mine:
                self._room_busy, self._room_form_error = False, f"Refused: {job.error}"
            elif job.kind in ("join", "decline"):
                self._invite_error = f"Refused: {job.error}"
            elif job.kind == "admin":
                self._member_note = f"Refused: {job.error}"
            self._render_header()
            return
        if job.kind == "admin":
            self._member_note = ""
        if job.room is not None and self.model.rooms.get(job.room.rid) is None:
            # A new room: its RoomUpdated may come just after this answer. A known room waits for that event,
            # since an answer posted late by its thread may be older than what later events said.
            self._on_room_updated(job.room)
        rid = job.room.rid if job.room is not None else job.rid
        if job.kind in ("leave", "decline"):
            self._log(job.done)
        elif job.done:
            self._room_notice(rid, job.done)
        if mine:
            self.close_room_form()
        if job.kind == "create":
            self.open_conversation(rid)
        self._render_header()

    # --- the library's room events ----------------------------------------------------------------------------
    def _on_rooms_listed(self, event: ev.RoomsListed) -> None:
        self.model.rooms.listed(event.rooms)
        if type(self.model.active) is bytes and self.model.rooms.get(self.model.active) is None:
            self._close_room(self.model.active)
        self._render_roster()
        self._render_header()

    def _on_room_updated(self, room: ev.RoomView) -> None:
        invitation = self.model.rooms.is_invitation(room.rid)
        for line in self.model.rooms.updated(room):
            self._room_notice(room.rid, line)
        if self.model.rooms.is_invitation(room.rid) and not invitation:
            self._invite_error = ""
        self._render_roster()
        if self.model.active == room.rid:
            self._render_header()

    def _on_room_gone(self, event: ev.RoomGone) -> None:
        why = self.model.rooms.gone(event.rid, event.why, event.by)
        if why is not None:  # removed: the room stays, saying so
            self._log(why)
            self._room_notice(event.rid, why)
        elif self.model.active == event.rid:
            self._close_room(event.rid)
        self._render_roster()
        self._render_header()

    def _on_room_event(self, event: ev.RoomEvent) -> None:
        me = self.model.user
        if event.kind == "invited" and event.user == me:
            self.model.rooms.invited(event.rid, event.by or "someone")
            text = f"{event.by or 'Someone'} invited you to #{event.name}"
            self._log(text)
            if should_notify(self._notifications_on(), self._focused(), self.model.active, event.rid):
                self._notify(event.rid, "Open it in the ROOMS list to join or decline.", title=text)
            return
        entry = self.model.rooms.get(event.rid)
        if entry is None or event.kind == "removed" and event.user == me:  # RoomGone says that
            return
        member = entry.view.member(event.user)
        invitee = member is not None and member[2]
        line = describe_event(event, me, declined=invitee)
        if line is not None:
            self._room_notice(event.rid, line)
        if invitee and event.kind in ("left", "removed") and self.client is not None:
            # The room's epoch stays when an invitation goes, and the library fetches a room again only when its
            # epoch moved: ask, so the members column drops them.
            name = entry.view.name
            self._start_room_job("refresh", event.rid, lambda c: c.room_info(name))

    def _room_notice(self, rid: bytes, text: str) -> None:
        line = NoticeLine(now_ms(), text)
        self.model.conversation(rid).lines.append(line)
        if self._showing(rid):
            self._view().append(line)

    def _close_room(self, rid: bytes) -> None:
        """The room open on screen is no longer ours (left, declined, gone while we were away)."""
        if self.model.active == rid:
            self.model.active = None
            self._view().show(None, self._empty_hint())
        if self._room_form is not None and self._room_form.rid == rid:
            self._room_form, self._room_form_error, self._room_busy = None, "", False

    # --- drawing ------------------------------------------------------------------------------------------------
    def _render_rooms(self, select: bytes | str | None = None) -> None:
        """The ROOMS list: invitations (✉) first, then rooms (#) with their unread counts."""
        pal, fonts = self.palette, self.fonts
        keep = select if select is not None else self._selected_room() or self.model.active
        rows = self.model.rooms.rows(lambda rid: self.model.conversation(rid).unread)
        self._room_rows = [row.rid for row in rows]
        table = self.window[K_ROOMS]
        selected = [self._room_rows.index(keep)] if keep in self._room_rows else []
        table.update(values=[[row.name, str(row.unread) if row.unread else ""] for row in rows],
                     select_rows=selected)
        tree = table.Widget
        for i, (iid, row) in enumerate(zip(tree.get_children(), rows)):
            tree.item(iid, text="✉" if row.invited else "#", image="")
            tree.tag_configure(i, foreground=pal.offline if row.gone else pal.sidebar_text,
                               font=fonts.bold if row.unread or row.invited else fonts.base)

    def _selected_room(self) -> bytes | None:
        tree = self.window[K_ROOMS].Widget
        for iid in tree.selection():
            index = tree.index(iid)
            if index < len(self._room_rows):
                return self._room_rows[index]
        return None

    def _render_room_header(self, rid: bytes) -> None:
        """A room's name, and its topic or our standing in it, in the conversation's header."""
        entry, pal = self.model.rooms.get(rid), self.palette
        self.window[K_PEER_NAME].update(f"# {self.model.rooms.name(rid)}")
        if entry is None:
            presence = "you are not in this room"
        elif entry.gone:
            presence = "you are no longer a member"
        elif self.model.rooms.is_invitation(rid):
            presence = "invitation"
        else:
            presence = entry.view.topic or "no topic"
        self.window[K_PEER_PRESENCE].update(presence, text_color=pal.muted)

    def _render_room_view(self) -> None:
        """What belongs to the open room: the invitation banner, the room form, the members column."""
        rid = self.model.active if self.model.search is None and type(self.model.active) is bytes else None
        rooms = self.model.rooms
        invitation = rid is not None and rooms.is_invitation(rid)
        self._set_visible(K_INVITE_BANNER, invitation)
        if invitation:
            inviter = rooms.inviter(rid)
            view = rooms.get(rid).view
            self.window[K_INVITE_TITLE].update(f"{inviter} invited you to #{view.name}" if inviter
                                               else f"You are invited to #{view.name}")
            members = view.joined
            about = [f"Topic: {view.topic}."] if view.topic else []
            about += [f"Members: {', '.join(members)}."] if members else []
            self.window[K_INVITE_TEXT].update(" ".join(about + [
                "Join to read and send its messages (end-to-end encrypted), or decline.", self._invite_error]))
        self._render_room_form()
        self._render_members()

    def _render_room_form(self) -> None:
        form = self._room_form
        shown = form is not None and (form.mode == "create" or form.rid == self.model.active)
        self._set_visible(K_ROOM_FORM, shown)
        if not shown:
            return
        self.window[K_ROOM_FORM_TITLE].update(form.title)
        self.window[K_ROOM_FORM_OK].update(form.button, disabled=self._room_busy)
        for i, field in enumerate(K_ROOM_FIELDS):
            self._set_visible(row_key(field), i < len(form.fields))
            if i < len(form.fields):
                self.window[label_key(field)].update(form.fields[i][0])
        note = self._room_form_error or ("Asking the broker…" if self._room_busy else form.note)
        self.window[K_ROOM_FORM_NOTE].update(note, text_color=self.palette.error if self._room_form_error
                                             else self.palette.muted)

    def _render_members(self) -> None:
        rid = self.model.active if self.model.search is None and type(self.model.active) is bytes else None
        rooms = self.model.rooms
        entry = rooms.get(rid) if rid is not None else None
        shown = entry is not None and not entry.gone
        self._show_members(shown)
        if not shown:
            return
        rows = rooms.members(rid, self.model.online)
        chosen = self._selected_member()
        names = [row.user for row in rows]
        table = self.window[K_MEMBERS]
        table.update(values=[[row.user, row.label] for row in rows],
                     select_rows=[names.index(chosen)] if chosen in names else [])
        tree, pal = table.Widget, self.palette
        for i, (iid, row) in enumerate(zip(tree.get_children(), rows)):
            tree.item(iid, text="", image=self._dots[row.online])
            tree.tag_configure(i, foreground=pal.sidebar_text if row.online else pal.offline)
        joined = [row for row in rows if not row.invited]
        online = sum(row.online for row in joined)
        self.window[K_MEMBER_COUNT].update(f"{online} of {len(joined)} online")
        self._render_member_actions()

    def _render_member_actions(self) -> None:
        """What the user may do in the open room, and to the member selected (on each click in the list: the
        list itself is not drawn again, which would select again and click again)."""
        rid, rooms, pal = self.model.active, self.model.rooms, self.palette
        if type(rid) is not bytes or rooms.get(rid) is None:
            return
        chosen = self._selected_member()
        manage, owner = rooms.may_manage(rid), rooms.role(rid) == OWNER
        self._set_visible(K_MEMBER_ACTIONS, manage)
        if manage:
            target = rooms.get(rid).view.member(chosen) if chosen else None
            self.window[K_MEMBER_ADMIN].update("Remove admin" if target and target[1] else "Make admin",
                                               disabled=not (chosen and rooms.may_set_admin(rid, chosen)))
            self._set_visible(K_MEMBER_ADMIN, owner)
            self.window[K_MEMBER_REMOVE].update(disabled=not (chosen and rooms.may_remove(rid, chosen)))
        self._set_visible(K_INVITE, manage)
        self._set_visible(K_EDIT_ROOM, manage)
        self._set_visible(K_LEAVE_ROOM, rooms.joined(rid))
        note = self._member_note or ("Select a member to change their role or remove them." if manage else "")
        self.window[K_MEMBER_NOTE].update(note, text_color=pal.error if note.startswith("Refused") else pal.muted)

    def _show_members(self, shown: bool) -> None:
        """Packed at the right before the timeline, the column keeps its width and the timeline takes the rest (sg
        shows it again after the timeline, where a wide banner or panel would squeeze it)."""
        element = self.window[K_MEMBERS_PANEL]
        if element.visible == shown:
            return
        element.update(visible=shown)
        if shown:
            element.Widget.pack_configure(side="right", expand=False, fill="y", before=self.window[K_TIMELINE].Widget)

    def _selected_member(self) -> str | None:
        return self._selected_name(K_MEMBERS)

    # --- reading the window (what a user sees; used by tests) ---------------------------------------------------
    def rooms_text(self) -> list[str]:
        """The ROOMS list as "#  team  2" ("✉  team" for an invitation)."""
        tree = self.window[K_ROOMS].Widget
        return ["  ".join([tree.item(iid, "text"), *(str(c) for c in tree.item(iid, "values") if str(c))])
                for iid in tree.get_children()]

    def members_text(self) -> list[str]:
        """The members column as "●  alice  owner" ("○" offline)."""
        tree = self.window[K_MEMBERS].Widget
        return ["  ".join(["●" if tree.item(iid, "image") == (str(self._dots[True]),) else "○",
                           *(str(c) for c in tree.item(iid, "values") if str(c))]) for iid in tree.get_children()]
