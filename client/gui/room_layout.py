"""The rooms' part of the chat window's layout: their keys, the sidebar's ROOMS list, the invitation banner, the
room form (New room, Invite, Rename, Leave, Remove) and the members column beside a room's timeline.

Build-only, like layout.py, which places these and styles the lists; the rooms mixin (rooms.py) fills them.
The form is a strip in the window, not a modal popup: a popup runs its own read loop, which would stall the
client's events and the tests that drive the window.
"""

from __future__ import annotations

from typing import Any

import PySimpleGUI as sg

from p2pchat.client.gui.theme import Fonts, Palette

K_ROOMS, K_NEW_ROOM = "-ROOMS-", "-NEW-ROOM-"
K_INVITE_BANNER, K_INVITE_TITLE, K_INVITE_TEXT = "-INVITE-BANNER-", "-INVITE-TITLE-", "-INVITE-TEXT-"
K_JOIN_ROOM, K_DECLINE_ROOM = "-JOIN-ROOM-", "-DECLINE-ROOM-"
K_ROOM_FORM, K_ROOM_FORM_TITLE, K_ROOM_FORM_NOTE = "-ROOM-FORM-", "-ROOM-FORM-TITLE-", "-ROOM-FORM-NOTE-"
K_ROOM_FORM_OK, K_ROOM_FORM_CANCEL = "-ROOM-FORM-OK-", "-ROOM-FORM-CANCEL-"
K_ROOM_FIELDS = ("-ROOM-FIELD-1-", "-ROOM-FIELD-2-")  # the form's inputs (their labels and rows: + "LABEL", "ROW")
K_MEMBERS_PANEL, K_MEMBERS, K_MEMBER_COUNT, K_MEMBER_NOTE = "-MEMBERS-PANEL-", "-MEMBERS-", "-MEMBER-COUNT-", \
    "-MEMBER-NOTE-"
K_INVITE, K_EDIT_ROOM, K_LEAVE_ROOM = "-INVITE-", "-EDIT-ROOM-", "-LEAVE-ROOM-"
K_MEMBER_ADMIN, K_MEMBER_REMOVE, K_MEMBER_ACTIONS = "-MEMBER-ADMIN-", "-MEMBER-REMOVE-", "-MEMBER-ACTIONS-"
ROOM_FORM_SUBMIT = "+SUBMIT"
ROOM_FORM_ESCAPE = "+ESCAPE"
MEMBERS_WIDTH = 210


def label_key(field: str) -> str:
    return field + "LABEL"


def row_key(field: str) -> str:
    return field + "ROW"


def rooms_section(pal: Palette, fonts: Fonts) -> list[list[Any]]:
    """The sidebar's ROOMS heading with its New button, and the list (styled with the people's, in layout.py)."""
    bg = dict(background_color=pal.sidebar_bg)
    return [
        [sg.Text("ROOMS", font=fonts.small_bold, text_color=pal.sidebar_muted, pad=((16, 0), (10, 4)), **bg),
         sg.Push(pal.sidebar_bg),
         sg.Button("+ New room", key=K_NEW_ROOM, font=fonts.small, border_width=0, tooltip=" Create a room ",
                   button_color=(pal.sidebar_muted, pal.sidebar_bg), mouseover_colors=(pal.sidebar_text, pal.border),
                   pad=((0, 10), (8, 2)))],
        [sg.Table([], headings=["name", "unread"], key=K_ROOMS, col_widths=[20, 4], auto_size_columns=False,
                  justification="left", num_rows=3, row_height=32, font=fonts.base, enable_events=True,
                  select_mode=sg.TABLE_SELECT_MODE_BROWSE, background_color=pal.sidebar_bg,
                  text_color=pal.sidebar_text, selected_row_colors=(pal.select_text, pal.select_bg),
                  border_width=0, expand_x=True, expand_y=True, hide_vertical_scroll=True, pad=((8, 8), 0))],
    ]


def _pinned(element: Any, colour: str) -> sg.Column:
    """``sg.pin`` in the panel's colour: its 1 px stays in place while the element is hidden, and is not seen."""
    return sg.Column([[element, sg.Column([[]], pad=0, background_color=colour)]], pad=0, expand_x=True,
                     background_color=colour)


def _button(text: str, key: str, pal: Palette, fonts: Fonts, primary: bool = False, **extra: Any) -> sg.Button:
    colours = (pal.accent_text, pal.accent, pal.accent_hover) if primary else (pal.text, pal.chat_bg, pal.border)
    return sg.Button(text, key=key, font=fonts.small_bold, border_width=0, button_color=colours[:2],
                     mouseover_colors=(colours[0], colours[2]), disabled_button_color=(pal.muted, pal.border),
                     **extra)


def invite_banner(pal: Palette, fonts: Fonts) -> sg.Column:
    """An invitation, shown in its room: who invited us, what the room is, Join or Decline."""
    colours = dict(background_color=pal.info_bg)
    text = sg.Column([
        [sg.Text("", key=K_INVITE_TITLE, font=fonts.bold, text_color=pal.info_text, pad=(0, (0, 2)), **colours)],
        [sg.Text("", key=K_INVITE_TEXT, font=fonts.small, text_color=pal.info_text, pad=0, **colours)],
        [_button("Join", K_JOIN_ROOM, pal, fonts, primary=True, pad=((0, 8), (10, 0))),
         sg.Button("Decline", key=K_DECLINE_ROOM, font=fonts.small_bold, border_width=0,
                   button_color=(pal.info_text, pal.info_bg), mouseover_colors=(pal.info_text, pal.info_border),
                   pad=(0, (10, 0)))],
    ], pad=((0, 20), 0), vertical_alignment="top", **colours)
    mark = sg.Column([[sg.Text("✉", font=fonts.title, text_color=pal.info, pad=0, **colours)]],
                     pad=((20, 12), 0), vertical_alignment="top", **colours)
    return sg.Column([
        [sg.Column([[mark, text]], pad=(0, 12), expand_x=True, **colours)],
        [sg.Column([[]], size=(1, 1), expand_x=True, background_color=pal.info_border, pad=0)],
    ], key=K_INVITE_BANNER, visible=False, expand_x=True, pad=0, **colours)


def room_form(pal: Palette, fonts: Fonts) -> sg.Column:
    """One strip for every room dialog: a title, up to two labelled fields, a note (or the broker's refusal)."""
    bg = dict(background_color=pal.sidebar_bg)

    def field_row(field: str) -> sg.Column:
        return _pinned(sg.Column([[
            sg.Text("", key=label_key(field), font=fonts.small, text_color=pal.muted, size=(10, 1),
                    pad=((20, 6), 4), **bg),
            sg.Input("", key=field, size=(36, 1), font=fonts.base, border_width=0, expand_x=True,
                     background_color=pal.input_bg, text_color=pal.input_text, pad=((0, 20), 4)),
        ]], key=row_key(field), expand_x=True, pad=0, **bg), pal.sidebar_bg)

    rows = [
        [sg.Text("", key=K_ROOM_FORM_TITLE, font=fonts.small_bold, text_color=pal.muted, pad=((20, 0), (12, 6)),
                 **bg),
         sg.Push(pal.sidebar_bg),
         _button("", K_ROOM_FORM_OK, pal, fonts, primary=True, pad=((0, 8), (10, 4))),
         sg.Button("Cancel", key=K_ROOM_FORM_CANCEL, font=fonts.small, border_width=0,
                   button_color=(pal.muted, pal.sidebar_bg), mouseover_colors=(pal.text, pal.border),
                   pad=((0, 14), (10, 4)))],
        *[[field_row(field)] for field in K_ROOM_FIELDS],
        [sg.Text("", key=K_ROOM_FORM_NOTE, font=fonts.small, text_color=pal.muted, pad=((20, 16), (4, 12)), **bg)],
        [sg.Column([[]], size=(1, 1), expand_x=True, background_color=pal.border, pad=0)],
    ]
    return sg.Column(rows, key=K_ROOM_FORM, visible=False, expand_x=True, pad=0, **bg)


def members_column(pal: Palette, fonts: Fonts) -> sg.Column:
    """Beside a room's timeline: its members with online dots and roles, and what the user may do there."""
    bg = dict(background_color=pal.sidebar_bg)
    side = dict(pad=((12, 12), (6, 0)), expand_x=True)
    actions = sg.Column([[
        _button("Make admin", K_MEMBER_ADMIN, pal, fonts, pad=((0, 6), 0), expand_x=True,
                tooltip=" The owner makes a member an admin, or an admin a member again "),
        _button("Remove", K_MEMBER_REMOVE, pal, fonts, pad=0, expand_x=True,
                tooltip=" Remove the selected member from the room "),
    ]], key=K_MEMBER_ACTIONS, pad=((12, 12), (6, 0)), expand_x=True, **bg)
    rows = [
        [sg.Text("MEMBERS", font=fonts.small_bold, text_color=pal.muted, pad=((14, 0), (12, 6)), **bg),
         sg.Push(pal.sidebar_bg),
         sg.Text("", key=K_MEMBER_COUNT, font=fonts.small, text_color=pal.muted, pad=((0, 12), (12, 6)), **bg)],
        [sg.Table([], headings=["name", "role"], key=K_MEMBERS, col_widths=[14, 6], auto_size_columns=False,
                  justification="left", num_rows=6, row_height=28, font=fonts.base, enable_events=True,
                  select_mode=sg.TABLE_SELECT_MODE_BROWSE, background_color=pal.sidebar_bg,
                  text_color=pal.sidebar_text, selected_row_colors=(pal.select_text, pal.select_bg),
                  border_width=0, expand_x=True, expand_y=True, hide_vertical_scroll=True, pad=((6, 6), 0))],
        [_pinned(actions, pal.sidebar_bg)],
        [sg.Text("", key=K_MEMBER_NOTE, font=fonts.small, text_color=pal.muted, pad=((14, 12), (6, 0)), **bg)],
        [_pinned(_button("Invite people…", K_INVITE, pal, fonts, primary=True, **side), pal.sidebar_bg)],
        [_pinned(_button("Rename or set topic…", K_EDIT_ROOM, pal, fonts, **side), pal.sidebar_bg)],
        [_pinned(_button("Leave room", K_LEAVE_ROOM, pal, fonts, pad=((12, 12), (6, 12)), expand_x=True),
                 pal.sidebar_bg)],
    ]
    # Hidden (and shown) by rooms.py, which packs it; expand_x too, else sg packs its row to fill only downwards.
    return sg.Column(rows, key=K_MEMBERS_PANEL, visible=False, expand_x=True, expand_y=True, pad=0, **bg)


def style_room_widgets(window: sg.Window, pal: Palette, fonts: Fonts) -> None:
    """The form's entries and key bindings, the buttons' padding (layout.py styles the lists and wraps the prose)."""
    for field in K_ROOM_FIELDS:
        entry = window[field].Widget
        entry.configure(highlightthickness=1, highlightbackground=pal.border, highlightcolor=pal.accent,
                        relief="flat", borderwidth=5, insertbackground=pal.text, font=fonts.base)
        window[field].bind("<Return>", ROOM_FORM_SUBMIT, propagate=False)
        window[field].bind("<KP_Enter>", ROOM_FORM_SUBMIT, propagate=False)
        window[field].bind("<Escape>", ROOM_FORM_ESCAPE, propagate=False)
    for key in (K_JOIN_ROOM, K_ROOM_FORM_OK, K_INVITE):
        window[key].Widget.configure(padx=12, pady=4, cursor="hand2", relief="flat", highlightthickness=0)
    for key, border in ((K_DECLINE_ROOM, pal.info_border), (K_MEMBER_ADMIN, pal.border),
                        (K_MEMBER_REMOVE, pal.border), (K_EDIT_ROOM, pal.border), (K_LEAVE_ROOM, pal.border)):
        window[key].Widget.configure(padx=10, pady=3, cursor="hand2", relief="flat", highlightthickness=1,
                                     highlightbackground=border)
    for key in (K_NEW_ROOM, K_ROOM_FORM_CANCEL):
        window[key].Widget.configure(padx=8, pady=1, cursor="hand2", relief="flat", highlightthickness=0)
    window[K_MEMBER_NOTE].Widget.configure(wraplength=MEMBERS_WIDTH - 26, justify="left", width=0)
