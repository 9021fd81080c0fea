"""The chat window's layout: element keys, sizes, and the PySimpleGUI/Tk styling that makes it a chat app.

Build-only: no state and no behaviour beyond key bindings that turn keystrokes
into window events. ``ChatWindow`` owns the window this builds. The rooms' parts
are built by room_layout.py and placed here.
"""

from __future__ import annotations

import tkinter as tk
from tkinter import ttk
from typing import Any

import PySimpleGUI as sg

from p2pchat.client.gui.room_layout import (
    K_INVITE_TEXT,
    K_MEMBERS,
    K_ROOM_FORM_NOTE,
    K_ROOMS,
    MEMBERS_WIDTH,
    invite_banner,
    members_column,
    room_form,
    rooms_section,
    style_room_widgets,
)
from p2pchat.client.gui.settings import GuiSettings
from p2pchat.client.gui.theme import Fonts, Palette, apply_sg_theme

# --- element and event keys ---------------------------------------------------------
CLIENT_EVENT = "-CLIENT-EVENT-"  # value: (client generation, client event)
TOAST_CLICKED = "-TOAST-CLICKED-"  # value: the sender whose conversation to open
K_CONNECT_VIEW, K_CHAT_VIEW = "-CONNECT-VIEW-", "-CHAT-VIEW-"
K_HOST, K_PORT, K_USER, K_CONNECT = "-HOST-", "-PORT-", "-USER-", "-CONNECT-"
K_FORM_ERROR, K_FORM_PROGRESS = "-FORM-ERROR-", "-FORM-PROGRESS-"
K_SIDEBAR, K_SIDEBAR_RULE = "-SIDEBAR-", "-SIDEBAR-RULE-"
K_ME, K_PEOPLE_COUNT, K_PEERS, K_DISCONNECT = "-ME-", "-PEOPLE-COUNT-", "-PEERS-", "-DISCONNECT-"
K_PEER_NAME, K_PEER_PRESENCE = "-PEER-NAME-", "-PEER-PRESENCE-"
K_CONVERSATION, K_COMPOSER, K_SEND, K_LOG = "-CONVERSATION-", "-COMPOSER-", "-SEND-", "-LOG-"
K_TIMELINE = "-TIMELINE-"  # the conversation with the banners and panels above it
K_STATUS_DOT, K_STATUS, K_STATUS_DETAIL = "-STATUS-DOT-", "-STATUS-", "-STATUS-DETAIL-"
K_THEME, K_NOTIFY = "-THEME-", "-NOTIFY-"
K_STATUS_KEY, K_STATUS_TRANSFERS = "-STATUS-KEY-", "-STATUS-TRANSFERS-"
K_ATTACH, K_COMPOSER_NOTE = "-ATTACH-", "-COMPOSER-NOTE-"
K_PEER_KEY, K_KEY_INFO = "-PEER-KEY-", "-KEY-INFO-"  # header: the peer's fingerprint, and "Verify"
K_KEY_PANEL, K_KEY_PANEL_TITLE, K_KEY_HIDE = "-KEY-PANEL-", "-KEY-PANEL-TITLE-", "-KEY-HIDE-"
K_SAFETY, K_PEER_FP_LABEL, K_PEER_FP, K_OWN_FP = "-SAFETY-", "-PEER-FP-LABEL-", "-PEER-FP-", "-OWN-FP-"
K_KEY_PANEL_NOTE, K_VERIFIED_STATE, K_MARK_VERIFIED = "-KEY-PANEL-NOTE-", "-VERIFIED-STATE-", "-MARK-VERIFIED-"
K_PEER_DEVICES_LABEL, K_PEER_DEVICES = "-PEER-DEVICES-LABEL-", "-PEER-DEVICES-"
K_OWN_FP_LABEL, K_PEER_DEVICES_ROW = "-OWN-FP-LABEL-", "-PEER-DEVICES-ROW-"
K_DEVICE_SAFETY, K_DEVICE_SAFETY_ROW = "-DEVICE-SAFETY-", "-DEVICE-SAFETY-ROW-"  # beside an account's number
# Our own devices: the sidebar's "Devices…", and the panel it opens (list, link by code, unlink)
K_DEVICES, K_DEVICES_PANEL, K_DEVICES_HIDE, K_DEVICES_LIST = "-DEVICES-", "-DEVICES-PANEL-", "-DEVICES-HIDE-", "-DEVICES-LIST-"
K_LINK_DEVICE, K_UNLINK_DEVICE, K_UNLINK_WHICH = "-LINK-DEVICE-", "-UNLINK-DEVICE-", "-UNLINK-WHICH-"
K_DEVICES_NOTE, K_LINK_CODE = "-DEVICES-NOTE-", "-LINK-CODE-"
DEVICE_JOB = "-DEVICE-JOB-"  # value: (client generation, DeviceJob) from a device job's thread
K_KEY_BANNER, K_KEY_BANNER_TITLE, K_KEY_BANNER_TEXT = "-KEY-BANNER-", "-KEY-BANNER-TITLE-", "-KEY-BANNER-TEXT-"
K_ACCEPT_KEY, K_COMPARE_KEY = "-ACCEPT-KEY-", "-COMPARE-KEY-"  # the banner's Continue and Verify…
K_KEY_NOTICE, K_KEY_NOTICE_TITLE, K_KEY_NOTICE_TEXT = "-KEY-NOTICE-", "-KEY-NOTICE-TITLE-", "-KEY-NOTICE-TEXT-"
K_NOTICE_OK, K_NOTICE_VERIFY = "-NOTICE-OK-", "-NOTICE-VERIFY-"
K_SEARCH, K_SEARCH_CLOSE = "-SEARCH-", "-SEARCH-CLOSE-"
K_RECEIPTS, K_TRUST_KEYS, K_SETTINGS_NOTE = "-RECEIPTS-", "-TRUST-KEYS-", "-SETTINGS-NOTE-"
K_ACCEPT_FILES = "-ACCEPT-FILES-"
SEARCH_OPEN = "-SEARCH-OPEN-"  # value: the id of the message a search result shows
WINDOW_FOCUSED = "-WINDOW-FOCUSED-"  # the window took the keyboard focus: the open conversation is being read
FILE_CANCEL = "-FILE-CANCEL-"  # value: the transfer id
FILE_OPEN_FOLDER = "-FILE-OPEN-FOLDER-"  # value: the transfer id (its card's "Show in folder")
FILE_OPEN = "-FILE-OPEN-"  # value: the transfer id
FILES_DROPPED = "-FILES-DROPPED-"  # value: the paths dropped on the window
THUMBNAIL_READY = "-THUMBNAIL-READY-"  # value: a Thumbnail made off the Tk thread
K_ATTACH_FOLDER = "-ATTACH-FOLDER-"
K_RECEIVED_DIR = "-RECEIVED-DIR-"  # the sidebar's "Save files in …": where received files go
SEND_SUFFIX = "+SEND"
COMPOSER_SEND = K_COMPOSER + SEND_SUFFIX
FORM_SUBMIT = "+SUBMIT"
ESCAPE = "+ESCAPE"
SEARCH_SUBMIT, SEARCH_ESCAPE = K_SEARCH + FORM_SUBMIT, K_SEARCH + ESCAPE

WINDOW_SIZE = (1000, 680)
MIN_SIZE = (820, 540)
SIDEBAR_WIDTH = 250
DOT_COLUMN = 26
WRAP_PX = 600  # banner and panel prose: wrapped, not widening the window


def build_window(settings: GuiSettings, pal: Palette, fonts: Fonts, *, notify_toggle: bool,
                 location: tuple[int, int] | None = None, size: tuple[int, int] | None = None) -> sg.Window:
    apply_sg_theme(pal)
    layout = [
        [_connect_view(settings, pal, fonts), _chat_view(settings, pal, fonts)],
        [_status_bar(pal, fonts, notify_toggle)],
    ]
    window = sg.Window(
        "p2p-chat", layout, size=size or WINDOW_SIZE, location=location or (None, None), resizable=True,
        margins=(0, 0), element_padding=(0, 0), font=fonts.base, background_color=pal.chat_bg,
        enable_close_attempted_event=True, finalize=True,
    )
    window.TKroot.minsize(*MIN_SIZE)
    _style_widgets(window, pal, fonts)
    return window


def _connect_view(settings: GuiSettings, pal: Palette, fonts: Fonts) -> sg.Column:
    def label(text: str) -> sg.Text:
        return sg.Text(text, font=fonts.small_bold, text_color=pal.muted, background_color=pal.chat_bg,
                       pad=(0, (12, 4)))

    def field(key: str, value: str, width: int, placeholder: str) -> sg.Input:
        return sg.Input(value, key=key, size=(width, 1), font=fonts.base, border_width=0, expand_x=True,
                        placeholder=placeholder, placeholder_text_color=pal.muted,
                        background_color=pal.input_bg, text_color=pal.input_text, pad=(0, 0))

    host_col = sg.Column([[label("Broker host")], [field(K_HOST, settings.host, 24, "127.0.0.1")]],
                         background_color=pal.chat_bg, pad=((0, 12), 0), expand_x=True)
    port_col = sg.Column([[label("Port")], [field(K_PORT, str(settings.port), 8, "5555")]],
                         background_color=pal.chat_bg, pad=0)
    card = [
        [sg.Text("p2p-chat", font=fonts.display, text_color=pal.text, background_color=pal.chat_bg)],
        [sg.Text("Sign in to a broker to start chatting.", font=fonts.base, text_color=pal.muted,
                 background_color=pal.chat_bg, pad=(0, (4, 6)))],
        [host_col, port_col],
        [label("User ID")],
        [field(K_USER, settings.user, 36, "your name, e.g. alice")],
        [sg.Text("", key=K_FORM_ERROR, font=fonts.small, text_color=pal.error, background_color=pal.chat_bg,
                 size=(46, 2), pad=(0, (10, 4)))],
        [sg.Button("Connect", key=K_CONNECT, font=fonts.bold, border_width=0, expand_x=True,
                   button_color=(pal.accent_text, pal.accent), mouseover_colors=(pal.accent_text, pal.accent_hover),
                   pad=(0, (4, 6)))],
        [sg.Text("", key=K_FORM_PROGRESS, font=fonts.small, text_color=pal.muted, background_color=pal.chat_bg)],
    ]
    inner = sg.Column(card, background_color=pal.chat_bg, pad=0)
    return sg.Column(
        [[sg.VPush(pal.chat_bg)], [sg.Push(pal.chat_bg), inner, sg.Push(pal.chat_bg)], [sg.VPush(pal.chat_bg)]],
        key=K_CONNECT_VIEW, background_color=pal.chat_bg, expand_x=True, expand_y=True, pad=0,
    )


def _chat_view(settings: GuiSettings, pal: Palette, fonts: Fonts) -> sg.Column:
    flat = dict(border_width=0, font=fonts.small)
    setting = dict(font=fonts.small, text_color=pal.sidebar_text, background_color=pal.sidebar_bg,
                   checkbox_color=pal.sidebar_field)
    sidebar = sg.Column([
        [sg.Text("p2p-chat", font=fonts.heading, text_color=pal.sidebar_text, background_color=pal.sidebar_bg,
                 pad=((16, 16), (16, 0)))],
        [sg.Text("", key=K_ME, font=fonts.small, text_color=pal.sidebar_muted, background_color=pal.sidebar_bg,
                 pad=((16, 16), (2, 12)))],
        [sg.Input("", key=K_SEARCH, size=(20, 1), font=fonts.base, border_width=0, expand_x=True,
                  placeholder="Search messages", placeholder_text_color=pal.muted, tooltip=" Press Enter to search ",
                  background_color=pal.sidebar_field,
                  text_color=pal.input_text, pad=((12, 12), (0, 16)))],
        [sg.Text("PEOPLE", font=fonts.small_bold, text_color=pal.sidebar_muted, background_color=pal.sidebar_bg,
                 pad=((16, 0), (0, 6))),
         sg.Push(pal.sidebar_bg),
         sg.Text("", key=K_PEOPLE_COUNT, font=fonts.small, text_color=pal.sidebar_muted,
                 background_color=pal.sidebar_bg, pad=((0, 16), (0, 6)))],
        [sg.Table([], headings=["name", "unread"], key=K_PEERS, col_widths=[20, 4], auto_size_columns=False,
                  justification="left", num_rows=5, row_height=34, font=fonts.base, enable_events=True,
                  select_mode=sg.TABLE_SELECT_MODE_BROWSE, background_color=pal.sidebar_bg,
                  text_color=pal.sidebar_text, selected_row_colors=(pal.select_text, pal.select_bg),
                  border_width=0, expand_x=True, expand_y=True, hide_vertical_scroll=True,
                  pad=((8, 8), 0))],
        *rooms_section(pal, fonts),
        [sg.Checkbox("Send read receipts", key=K_RECEIPTS, default=settings.read_receipts, enable_events=True,
                     tooltip=" Let people see when you have read their messages ", pad=((12, 12), (8, 0)),
                     **setting)],
        [sg.Checkbox("Accept new keys at once", key=K_TRUST_KEYS,
                     default=settings.trust_key_changes, enable_events=True, pad=((12, 12), (4, 0)),
                     tooltip=" Messages to and from someone whose key changed go on at once, without waiting "
                             "for you to press Continue (you are still told) ", **setting)],
        [sg.Checkbox("Receive files on this device", key=K_ACCEPT_FILES, default=settings.accept_files,
                     enable_events=True, pad=((12, 12), (4, 0)),
                     tooltip=" Off: files sent to you go to another of your devices ", **setting)],
        [sg.Button("Save files in …", key=K_RECEIVED_DIR, button_color=(pal.sidebar_muted, pal.sidebar_bg),
                   mouseover_colors=(pal.sidebar_text, pal.border), expand_x=True, pad=((10, 10), (4, 0)), **flat)],
        [sg.Text("", key=K_SETTINGS_NOTE, font=fonts.small, text_color=pal.sidebar_muted,
                 background_color=pal.sidebar_bg, pad=((16, 12), (0, 0)))],
        [sg.Button("Devices…", key=K_DEVICES, tooltip=" Your devices: link another, unlink one ",
                   button_color=(pal.sidebar_text, pal.sidebar_field), mouseover_colors=(pal.sidebar_text, pal.border),
                   expand_x=True, pad=((12, 12), (8, 0)), **flat)],
        [sg.Button("Disconnect", key=K_DISCONNECT, button_color=(pal.sidebar_text, pal.border),
                   mouseover_colors=(pal.sidebar_text, pal.offline), expand_x=True, pad=((12, 12), (8, 12)), **flat)],
    ], key=K_SIDEBAR, background_color=pal.sidebar_bg, expand_y=True, pad=0)

    rule = dict(background_color=pal.border, pad=0)
    header = sg.Column([[
        sg.Text("", key=K_PEER_NAME, font=fonts.heading, text_color=pal.text, background_color=pal.chat_bg,
                pad=((20, 10), (14, 12))),
        sg.Text("", key=K_PEER_PRESENCE, font=fonts.small, text_color=pal.muted, background_color=pal.chat_bg,
                pad=(0, (18, 12))),
        sg.Push(pal.chat_bg),
        sg.Text("", key=K_PEER_KEY, font=fonts.small, text_color=pal.muted, background_color=pal.chat_bg,
                pad=((0, 8), (16, 12))),
        sg.Button("Verify", key=K_KEY_INFO, font=fonts.small, border_width=0, tooltip=" Compare keys with them ",
                  button_color=(pal.text, pal.chat_bg), mouseover_colors=(pal.text, pal.border),
                  pad=((0, 16), (12, 10))),
        sg.Button("Close search", key=K_SEARCH_CLOSE, font=fonts.small, border_width=0, visible=False,
                  tooltip=" Back to the conversation (Esc) ", button_color=(pal.text, pal.chat_bg),
                  mouseover_colors=(pal.text, pal.border), pad=((0, 16), (12, 10))),
    ]], background_color=pal.chat_bg, expand_x=True, pad=0)
    composer_row = sg.Column([[
        sg.Button("Attach", key=K_ATTACH, font=fonts.bold, border_width=0, size=(7, 1),
                  tooltip=" Send files (or drop them on the window) ",
                  button_color=(pal.text, pal.input_bg), mouseover_colors=(pal.text, pal.border),
                  disabled_button_color=(pal.muted, pal.chat_bg), pad=((16, 10), 12)),
        sg.Button("Folder", key=K_ATTACH_FOLDER, font=fonts.bold, border_width=0, size=(7, 1),
                  tooltip=" Send a whole folder (or drop files and folders on the window) ",
                  button_color=(pal.text, pal.input_bg), mouseover_colors=(pal.text, pal.border),
                  disabled_button_color=(pal.muted, pal.chat_bg), pad=((0, 10), 12)),
        sg.Multiline("", key=K_COMPOSER, size=(40, 2), font=fonts.base, no_scrollbar=True, border_width=0,
                     background_color=pal.input_bg, text_color=pal.input_text, expand_x=True,
                     pad=((0, 10), 12)),
        sg.Button("Send", key=K_SEND, font=fonts.bold, border_width=0, size=(7, 1),
                  button_color=(pal.accent_text, pal.accent), mouseover_colors=(pal.accent_text, pal.accent_hover),
                  disabled_button_color=(pal.muted, pal.border), pad=((0, 16), 12)),
    ]], background_color=pal.chat_bg, expand_x=True, pad=0)
    log_panel = sg.Column([
        [sg.Text("CONNECTION LOG", font=fonts.small_bold, text_color=pal.muted, background_color=pal.log_bg,
                 pad=((16, 0), (8, 2)))],
        [sg.Multiline("", key=K_LOG, size=(40, 4), font=fonts.mono, disabled=True, border_width=0,
                      background_color=pal.log_bg, text_color=pal.log_text, expand_x=True,
                      sbar_trough_color=pal.log_bg, sbar_background_color=pal.border, sbar_arrow_color=pal.muted,
                      sbar_relief="flat", pad=((16, 8), (0, 8)))],
    ], background_color=pal.log_bg, expand_x=True, pad=0)
    composer_note = sg.Text("", key=K_COMPOSER_NOTE, font=fonts.small, text_color=pal.warn,
                            background_color=pal.chat_bg, pad=((16, 16), (10, 0)))
    # The banners and panels above the timeline, hidden, are 1 px pins: in the timeline's colour, beside the
    # members column rather than across it.
    timeline = sg.Column([
        [sg.pin(_key_banner(pal, fonts), expand_x=True)],
        [sg.pin(_key_notice(pal, fonts), expand_x=True)],
        [sg.pin(_key_panel(pal, fonts), expand_x=True)],
        [sg.pin(_devices_panel(pal, fonts), expand_x=True)],
        [sg.pin(invite_banner(pal, fonts), expand_x=True)],
        [sg.pin(room_form(pal, fonts), expand_x=True)],
        [sg.Multiline("", key=K_CONVERSATION, disabled=True, border_width=0, expand_x=True, expand_y=True,
                      background_color=pal.chat_bg, text_color=pal.text, sbar_trough_color=pal.chat_bg,
                      sbar_background_color=pal.border, sbar_arrow_color=pal.muted, sbar_relief="flat", pad=0)],
    ], key=K_TIMELINE, background_color=pal.chat_bg, expand_x=True, expand_y=True, pad=0)
    main = sg.Column([
        [header],
        [sg.Column([[]], size=(1, 1), expand_x=True, **rule)],
        [timeline, members_column(pal, fonts)],
        [sg.Column([[]], size=(1, 1), expand_x=True, **rule)],
        [sg.pin(composer_note)],
        [composer_row],
        [sg.Column([[]], size=(1, 1), expand_x=True, **rule)],
        [log_panel],
    ], background_color=pal.chat_bg, expand_x=True, expand_y=True, pad=0)
    return sg.Column([[sidebar, sg.Column([[]], key=K_SIDEBAR_RULE, size=(1, 1), expand_y=True, **rule), main]],
                     key=K_CHAT_VIEW, background_color=pal.chat_bg, expand_x=True, expand_y=True, pad=0,
                     visible=False)


def _banner(keys: tuple[str, str, str], icon: str, tone: tuple[str, str, str, str], first: sg.Button,
            verify_key: str, fonts: Fonts) -> sg.Column:
    """A strip across the conversation: an icon, a title, a paragraph, its ``first`` button and Verify…, a rule.
    ``keys``: the strip's, its title's and its paragraph's; ``tone``: (icon, background, text, border) colours."""
    key, title_key, text_key = keys
    icon_colour, bg, fg, border = tone
    colours = dict(background_color=bg)
    verify = sg.Button("Verify…", key=verify_key, font=fonts.small_bold, border_width=0,
                       tooltip=" Compare the safety number with them ", button_color=(fg, bg),
                       mouseover_colors=(fg, border), pad=(0, (10, 0)))
    text = sg.Column([
        [sg.Text("", key=title_key, font=fonts.bold, text_color=fg, pad=(0, (0, 2)), **colours)],
        [sg.Text("", key=text_key, font=fonts.small, text_color=fg, pad=0, **colours)],
        [first, verify],
    ], pad=((0, 20), 0), vertical_alignment="top", **colours)
    mark = sg.Column([[sg.Text(icon, font=fonts.title, text_color=icon_colour, pad=0, **colours)]],
                     pad=((20, 12), 0), vertical_alignment="top", **colours)
    return sg.Column([
        [sg.Column([[mark, text]], pad=(0, 12), expand_x=True, **colours)],
        [sg.Column([[]], size=(1, 1), expand_x=True, background_color=border, pad=0)],
    ], key=key, visible=False, expand_x=True, pad=0, **colours)


def _primary(text: str, key: str, pal: Palette, fonts: Fonts, **extra: Any) -> sg.Button:
    return sg.Button(text, key=key, font=fonts.small_bold, border_width=0, button_color=(pal.accent_text, pal.accent),
                     mouseover_colors=(pal.accent_text, pal.accent_hover), pad=((0, 8), (10, 0)), **extra)


def _key_banner(pal: Palette, fonts: Fonts) -> sg.Column:
    """Shown in a conversation whose peer changed keys, until the user has seen it and pressed Continue."""
    first = _primary("Continue", K_ACCEPT_KEY, pal, fonts, tooltip=" Accept the new key: what waited goes at once ")
    return _banner((K_KEY_BANNER, K_KEY_BANNER_TITLE, K_KEY_BANNER_TEXT), "⚠",
                   (pal.warn, pal.warn_bg, pal.warn_text, pal.warn_border), first, K_COMPARE_KEY, fonts)


def _key_notice(pal: Palette, fonts: Fonts) -> sg.Column:
    """A key change accepted automatically (the user's setting): told, with nothing to decide."""
    first = _primary("OK", K_NOTICE_OK, pal, fonts, size=(6, 1))
    return _banner((K_KEY_NOTICE, K_KEY_NOTICE_TITLE, K_KEY_NOTICE_TEXT), "ℹ",
                   (pal.info, pal.info_bg, pal.info_text, pal.info_border), first, K_NOTICE_VERIFY, fonts)


def _key_panel(pal: Palette, fonts: Fonts) -> sg.Column:
    """The peer's key, ours, and the safety number to compare with them out of band."""
    bg = dict(background_color=pal.sidebar_bg)

    def label(text: str, key: str | None = None) -> sg.Text:
        return sg.Text(text, key=key, font=fonts.small, text_color=pal.muted, size=(14, 1), pad=((20, 0), 3), **bg)

    def value(key: str, font: tuple[Any, ...]) -> sg.Text:
        return sg.Text("", key=key, font=font, text_color=pal.text, pad=((0, 16), 3), **bg)

    rows = [
        [sg.Text("", key=K_KEY_PANEL_TITLE, font=fonts.small_bold, text_color=pal.muted, pad=((20, 0), (12, 6)),
                 **bg),
         sg.Text("", key=K_VERIFIED_STATE, font=fonts.small_bold, text_color=pal.muted, pad=((14, 0), (12, 6)), **bg),
         sg.Push(pal.sidebar_bg),
         sg.Button("Mark as verified", key=K_MARK_VERIFIED, font=fonts.small_bold, border_width=0,
                   button_color=(pal.text, pal.chat_bg), mouseover_colors=(pal.text, pal.border),
                   disabled_button_color=(pal.muted, pal.sidebar_bg), pad=((0, 8), (10, 0))),
         sg.Button("Hide", key=K_KEY_HIDE, font=fonts.small, border_width=0, button_color=(pal.muted, pal.sidebar_bg),
                   mouseover_colors=(pal.text, pal.border), pad=((0, 14), (10, 0)))],
        [label("Safety number"), value(K_SAFETY, fonts.mono_large)],
        [sg.pin(sg.Column([[label("Device number"), value(K_DEVICE_SAFETY, fonts.mono)]], key=K_DEVICE_SAFETY_ROW,
                          pad=0, **bg))],
        [label("", K_PEER_FP_LABEL), value(K_PEER_FP, fonts.mono)],
        [sg.pin(sg.Column([[label("Their devices", K_PEER_DEVICES_LABEL), value(K_PEER_DEVICES, fonts.mono)]],
                          key=K_PEER_DEVICES_ROW, pad=0, **bg))],
        [label("Your key", K_OWN_FP_LABEL), value(K_OWN_FP, fonts.mono)],
        [sg.Text("", key=K_KEY_PANEL_NOTE, font=fonts.small, text_color=pal.muted, pad=((20, 16), (6, 12)), **bg)],
        [sg.Column([[]], size=(1, 1), expand_x=True, background_color=pal.border, pad=0)],
    ]
    return sg.Column(rows, key=K_KEY_PANEL, visible=False, expand_x=True, pad=0, **bg)


def _devices_panel(pal: Palette, fonts: Fonts) -> sg.Column:
    """Our own devices, as the broker lists them: link another one by code, unlink one."""
    bg = dict(background_color=pal.sidebar_bg)
    button = dict(font=fonts.small_bold, border_width=0, button_color=(pal.text, pal.chat_bg),
                  mouseover_colors=(pal.text, pal.border), disabled_button_color=(pal.muted, pal.sidebar_bg))
    rows = [
        [sg.Text("YOUR DEVICES", font=fonts.small_bold, text_color=pal.muted, pad=((20, 0), (12, 6)), **bg),
         sg.Push(pal.sidebar_bg),
         _primary("Link a device", K_LINK_DEVICE, pal, fonts, tooltip=" Show a code to type on the new device "),
         sg.Button("Hide", key=K_DEVICES_HIDE, font=fonts.small, border_width=0,
                   button_color=(pal.muted, pal.sidebar_bg), mouseover_colors=(pal.text, pal.border),
                   pad=((0, 14), (10, 0)))],
        [sg.Text("", key=K_DEVICES_LIST, font=fonts.mono, text_color=pal.text, pad=((20, 16), 3), **bg)],
        [sg.pin(sg.Text("", key=K_LINK_CODE, font=fonts.mono_large, text_color=pal.accent, pad=((20, 16), (6, 0)),
                        visible=False, **bg))],
        [sg.pin(sg.Text("", key=K_DEVICES_NOTE, font=fonts.small, text_color=pal.muted, pad=((20, 16), (6, 0)),
                        visible=False, **bg))],
        [sg.Text("Unlink", font=fonts.small, text_color=pal.muted, pad=((20, 6), (10, 12)), **bg),
         sg.Combo([], key=K_UNLINK_WHICH, size=(28, 1), readonly=True, font=fonts.small, pad=((0, 8), (10, 12))),
         sg.Button("Unlink", key=K_UNLINK_DEVICE, pad=((0, 8), (10, 12)), **button)],
        [sg.Column([[]], size=(1, 1), expand_x=True, background_color=pal.border, pad=0)],
    ]
    return sg.Column(rows, key=K_DEVICES_PANEL, visible=False, expand_x=True, pad=0, **bg)


def _status_bar(pal: Palette, fonts: Fonts, notify_toggle: bool) -> sg.Column:
    bar: list[Any] = [
        sg.Text("●", key=K_STATUS_DOT, font=fonts.small, text_color=pal.offline, background_color=pal.status_bg,
                pad=((14, 4), 5)),
        sg.Text("", key=K_STATUS, font=fonts.small_bold, text_color=pal.status_text,
                background_color=pal.status_bg, pad=((0, 8), 5)),
        sg.Text("", key=K_STATUS_DETAIL, font=fonts.small, text_color=pal.status_text,
                background_color=pal.status_bg, pad=(0, 5)),
        sg.Text("", key=K_STATUS_KEY, font=fonts.small, text_color=pal.status_text,
                background_color=pal.status_bg, pad=((14, 0), 5)),
        sg.Push(pal.status_bg),
        sg.Text("", key=K_STATUS_TRANSFERS, font=fonts.small, text_color=pal.status_text,
                background_color=pal.status_bg, pad=((0, 12), 5)),
    ]
    toggle = dict(font=fonts.small, border_width=0, button_color=(pal.status_text, pal.status_bg),
                  mouseover_colors=(pal.text, pal.border), pad=((0, 6), 2))
    if notify_toggle:
        bar.append(sg.Button("Notifications: on", key=K_NOTIFY, **toggle))
    bar.append(sg.Button("Dark theme", key=K_THEME, **toggle))
    return sg.Column([bar], background_color=pal.status_bg, expand_x=True, pad=0)


def _style_widgets(window: sg.Window, pal: Palette, fonts: Fonts) -> None:
    """What PySimpleGUI does not expose: focus rings, inner padding, key bindings, table chrome."""
    for key in (K_HOST, K_PORT, K_USER, K_SEARCH):
        entry = window[key].Widget
        # A flat border in the entry's own colour is the only inner padding a Tk Entry has.
        entry.configure(highlightthickness=1, highlightbackground=pal.border, highlightcolor=pal.accent,
                        relief="flat", borderwidth=7 if key != K_SEARCH else 5, insertbackground=pal.text,
                        font=fonts.base)
        window[key].bind("<Return>", FORM_SUBMIT, propagate=False)
        window[key].bind("<KP_Enter>", FORM_SUBMIT, propagate=False)
    window[K_SEARCH].bind("<Escape>", ESCAPE, propagate=False)
    for key in (K_RECEIPTS, K_TRUST_KEYS, K_ACCEPT_FILES):
        window[key].Widget.configure(activebackground=pal.sidebar_bg, activeforeground=pal.sidebar_text,
                                     highlightthickness=0, cursor="hand2", borderwidth=0, justify="left",
                                     wraplength=SIDEBAR_WIDTH - 50)
    composer = window[K_COMPOSER].Widget
    composer.configure(highlightthickness=1, highlightbackground=pal.border, highlightcolor=pal.accent,
                       padx=10, pady=8, insertbackground=pal.text, wrap="word", relief="flat")
    window[K_COMPOSER].bind("<Return>", SEND_SUFFIX, propagate=False)
    window[K_COMPOSER].bind("<KP_Enter>", SEND_SUFFIX, propagate=False)
    # Shift+Enter is typing, not an app event: insert now, so fast typing cannot reorder it.
    composer.bind("<Shift-Return>", _insert_newline)
    for key in (K_CONNECT, K_SEND, K_DISCONNECT, K_DEVICES):
        window[key].Widget.configure(pady=6, cursor="hand2", relief="flat", highlightthickness=0)
    for key in (K_ACCEPT_KEY, K_NOTICE_OK, K_LINK_DEVICE):
        window[key].Widget.configure(padx=12, pady=4, cursor="hand2", relief="flat", highlightthickness=0)
    for key, border in ((K_COMPARE_KEY, pal.warn_border), (K_NOTICE_VERIFY, pal.info_border),
                        (K_MARK_VERIFIED, pal.border), (K_UNLINK_DEVICE, pal.border)):
        window[key].Widget.configure(padx=12, pady=3, cursor="hand2", relief="flat", highlightthickness=1,
                                     highlightbackground=border)
    for key in (K_ATTACH, K_ATTACH_FOLDER):
        window[key].Widget.configure(pady=6, cursor="hand2", relief="flat", highlightthickness=1,
                                     highlightbackground=pal.border)
    for key in (K_THEME, K_NOTIFY, K_KEY_INFO, K_KEY_HIDE, K_SEARCH_CLOSE, K_DEVICES_HIDE, K_RECEIVED_DIR):
        if key in window.AllKeysDict:
            window[key].Widget.configure(padx=8, pady=1, cursor="hand2", relief="flat", highlightthickness=0)
    window[K_RECEIVED_DIR].Widget.configure(anchor="w", width=0)  # its text changes: left, under the checkboxes
    for key in (K_KEY_BANNER_TEXT, K_KEY_NOTICE_TEXT, K_KEY_PANEL_NOTE, K_DEVICES_NOTE, K_PEER_DEVICES):
        window[key].Widget.configure(wraplength=WRAP_PX, justify="left", width=0)
    # A room's prose wraps to the timeline's width: the members column beside it takes its own first.
    room_prose = [window[key].Widget for key in (K_INVITE_TEXT, K_ROOM_FORM_NOTE)]
    for widget in room_prose:
        widget.configure(wraplength=WRAP_PX, justify="left", width=0)
    window[K_TIMELINE].Widget.bind("<Configure>", lambda e: [
        widget.configure(wraplength=min(WRAP_PX, max(200, e.width - 100))) for widget in room_prose], add="+")
    log_widget = window[K_LOG].Widget
    log_widget.configure(highlightthickness=0, padx=0, pady=2, cursor="arrow")
    log_widget.tag_configure("time", foreground=pal.muted)
    style = ttk.Style()
    for key, width, last in ((K_PEERS, SIDEBAR_WIDTH - 16, 44), (K_ROOMS, SIDEBAR_WIDTH - 16, 44),
                             (K_MEMBERS, MEMBERS_WIDTH - 12, 64)):
        _style_list(window[key].Widget, style, pal, width, last)
    # sg packs expand_y columns with expand=True, which also widens them: keep the sidebar narrow.
    for key in (K_SIDEBAR, K_SIDEBAR_RULE):
        window[key].Widget.pack_configure(expand=False)
    style_room_widgets(window, pal, fonts)
    for key, trough in ((K_CONVERSATION, pal.chat_bg), (K_LOG, pal.log_bg)):
        _slim_scrollbar(style, window[key].vsb_style_name, trough, pal.border, pal.muted)


def _style_list(tree: ttk.Treeview, style: ttk.Style, pal: Palette, width: int, last: int) -> None:
    """A table as a flat list: a dot (or a mark) in the tree column, the name, a right-aligned last column."""
    tree.configure(show="tree", cursor="hand2")  # no headings: a list of people, not a spreadsheet
    tree.column("#0", width=DOT_COLUMN, minwidth=DOT_COLUMN, stretch=False)
    tree.column("#1", anchor="w", width=width - last - DOT_COLUMN, stretch=True)
    tree.column("#2", anchor="e", width=last, stretch=False)
    style_name = tree.cget("style")
    style.configure(style_name, borderwidth=0, relief="flat", highlightthickness=0, fieldbackground=pal.sidebar_bg)
    style.layout(style_name, [("Treeview.treearea", {"sticky": "nswe"})])  # drop the sunken border
    # Rows are flat: no expand/collapse indicator in front of the presence dot.
    style.layout(f"{style_name}.Item", [("Treeitem.padding", {"sticky": "nswe", "children": [
        ("Treeitem.image", {"side": "left", "sticky": ""}),
        ("Treeitem.text", {"side": "left", "sticky": ""})]})])


def dot_image(master: tk.Misc, colour: str, size: int = 10, margin: int = 6) -> tk.PhotoImage:
    """A filled circle with clear margins (Treeview rows take images, not per-cell colours)."""
    image = tk.PhotoImage(master=master, width=size + 2 * margin, height=size)
    r = size / 2
    for y in range(size):
        dy = y + 0.5 - r
        half = (r * r - dy * dy) ** 0.5
        x0, x1 = round(r - half), round(r + half)
        if x1 > x0:
            image.put(colour, to=(margin + x0, y, margin + x1, y + 1))
    return image


def _insert_newline(event: tk.Event) -> str:
    event.widget.insert("insert", "\n")
    event.widget.see("insert")
    return "break"  # stop the <Return> binding (send) from seeing this key


def _slim_scrollbar(style: ttk.Style, name: str, trough: str, thumb: str, hover: str) -> None:
    """A thin thumb without arrows, like a chat app's, instead of Tk's 1990s scrollbar."""
    style.layout(name, [("Vertical.Scrollbar.trough", {"sticky": "ns", "children": [
        ("Vertical.Scrollbar.thumb", {"expand": "1", "sticky": "nswe"})]})])
    style.configure(name, width=8, troughcolor=trough, background=thumb, borderwidth=0, relief="flat",
                    troughrelief="flat", gripcount=0, bordercolor=trough, lightcolor=thumb, darkcolor=thumb)
    style.map(name, background=[("active", hover), ("pressed", hover)])
