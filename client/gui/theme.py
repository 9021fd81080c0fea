"""Light and dark palettes and the fonts of the chat window.

Colours are named for their role, so the layout never mentions a hex value and
a theme switch is "build the window again with the other palette".
"""

from __future__ import annotations

import sys
import tkinter.font
import zlib
from dataclasses import dataclass
from typing import Any

import PySimpleGUI as sg


@dataclass(frozen=True, slots=True)
class Palette:
    name: str
    chat_bg: str
    text: str
    muted: str
    border: str
    sidebar_bg: str
    sidebar_text: str
    sidebar_muted: str
    sidebar_field: str  # the search box and the check box on the sidebar
    select_bg: str
    select_text: str
    accent: str
    accent_text: str
    accent_hover: str
    input_bg: str
    input_text: str
    own_name: str
    status_bg: str
    status_text: str
    log_bg: str
    log_text: str
    ok: str
    warn: str
    error: str
    offline: str
    card_bg: str  # a file in the timeline
    warn_bg: str  # the banner of a changed key
    warn_text: str
    warn_border: str
    info: str  # the notice of a key change accepted automatically
    info_bg: str
    info_text: str
    info_border: str
    found_bg: str  # a search match, and the message a search result opened
    avatars: tuple[str, ...]


# Each role's colour as (light, dark): side by side, so the two themes stay a matched pair.
_ROLE_COLOURS: dict[str, tuple[str, str]] = {
    "chat_bg": ("#FFFFFF", "#1E2227"),
    "text": ("#1F2328", "#E6E8EB"),
    "muted": ("#6B7280", "#8B949E"),
    "border": ("#E3E6EA", "#30363D"),
    "sidebar_bg": ("#F4F5F7", "#16191D"),
    "sidebar_text": ("#1F2328", "#D7DADF"),
    "sidebar_muted": ("#6B7280", "#8B949E"),
    "sidebar_field": ("#FFFFFF", "#262B31"),
    "select_bg": ("#2F6FEB", "#2F6FEB"),
    "select_text": ("#FFFFFF", "#FFFFFF"),
    "accent": ("#2F6FEB", "#3B7BF0"),
    "accent_text": ("#FFFFFF", "#FFFFFF"),
    "accent_hover": ("#2558C5", "#5A90F2"),
    "input_bg": ("#F6F7F9", "#262B31"),
    "input_text": ("#1F2328", "#E6E8EB"),
    "own_name": ("#2F6FEB", "#6EA2FF"),
    "status_bg": ("#ECEEF1", "#121417"),
    "status_text": ("#4B5563", "#9AA3AD"),
    "log_bg": ("#FAFAFB", "#191C20"),
    "log_text": ("#57606A", "#9AA3AD"),
    "ok": ("#1A7F37", "#3FB950"),
    "warn": ("#B35900", "#E3A008"),
    "error": ("#CF222E", "#F85149"),
    "offline": ("#8C959F", "#6E7681"),
    "card_bg": ("#F7F8FA", "#252A30"),
    "warn_bg": ("#FFF5E1", "#35290F"),
    "warn_text": ("#5C3400", "#F3D58E"),
    "warn_border": ("#F0C36D", "#6B5220"),
    "info": ("#2F6FEB", "#6EA2FF"),
    "info_bg": ("#EAF2FE", "#16263B"),
    "info_text": ("#173B73", "#BFD6FA"),
    "info_border": ("#A9C7F5", "#2B4A73"),
    "found_bg": ("#FFF1B8", "#4D3F12"),
}
_AVATARS = (
    ("#E8590C", "#2F9E44", "#1C7ED6", "#9C36B5", "#C2255C", "#0C8599", "#5F3DC4", "#E67700"),
    ("#F76707", "#37B24D", "#339AF0", "#AE3EC9", "#E64980", "#15AABF", "#7950F2", "#F59F00"),
)


def _theme(name: str, column: int) -> Palette:
    return Palette(name=name, avatars=_AVATARS[column],
                   **{role: colours[column] for role, colours in _ROLE_COLOURS.items()})


LIGHT = _theme("light", 0)
DARK = _theme("dark", 1)

PALETTES = {p.name: p for p in (LIGHT, DARK)}


def palette(name: str) -> Palette:
    return PALETTES.get(name, LIGHT)


def avatar_colour(pal: Palette, name: str) -> str:
    """Stable per name across runs (``hash()`` is salted per process)."""
    return pal.avatars[zlib.crc32(name.encode()) % len(pal.avatars)]


def apply_sg_theme(pal: Palette) -> None:
    """PySimpleGUI reads its global theme while building a layout: set it first."""
    theme_name = f"p2pchat-{pal.name}"
    sg.theme_add_new(theme_name, {
        "BACKGROUND": pal.chat_bg, "TEXT": pal.text, "INPUT": pal.input_bg, "TEXT_INPUT": pal.input_text,
        "SCROLL": pal.border, "BUTTON": (pal.accent_text, pal.accent), "PROGRESS": (pal.accent, pal.border),
        "BORDER": 0, "SLIDER_DEPTH": 0, "PROGRESS_DEPTH": 0,
    })
    sg.theme(theme_name)


@dataclass(frozen=True, slots=True)
class Fonts:
    base: tuple[Any, ...]
    bold: tuple[Any, ...]
    small: tuple[Any, ...]
    small_bold: tuple[Any, ...]
    title: tuple[Any, ...]
    display: tuple[Any, ...]
    heading: tuple[Any, ...]
    avatar: tuple[Any, ...]
    tiny_bold: tuple[Any, ...]
    mono: tuple[Any, ...]
    mono_large: tuple[Any, ...]


_UI_FAMILIES = {
    "win32": ("Segoe UI",),
    "darwin": ("SF Pro Text", "Helvetica Neue"),
}
_LINUX_UI = ("Inter", "Cantarell", "Ubuntu", "Noto Sans", "DejaVu Sans", "Liberation Sans")
_MONO = ("Cascadia Mono", "Consolas", "Menlo", "JetBrains Mono", "Noto Sans Mono", "DejaVu Sans Mono")


def pick_fonts() -> Fonts:
    """The first installed family of each kind; Tk falls back to its default otherwise."""
    sg.Window.get_screen_size()  # creates PySimpleGUI's hidden root, which font.families() needs
    installed = set(tkinter.font.families())
    ui = next((f for f in _UI_FAMILIES.get(sys.platform, _LINUX_UI) if f in installed), "TkDefaultFont")
    mono = next((f for f in _MONO if f in installed), "TkFixedFont")
    return Fonts(
        base=(ui, 10), bold=(ui, 10, "bold"), small=(ui, 9), small_bold=(ui, 9, "bold"),
        title=(ui, 13, "bold"), display=(ui, 18, "bold"), heading=(ui, 12, "bold"), avatar=(ui, 11, "bold"),
        tiny_bold=(ui, 7, "bold"), mono=(mono, 9), mono_large=(mono, 11, "bold"),
    )
