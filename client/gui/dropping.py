"""Files and folders dropped on the chat window, through the tkdnd Tk extension (XDND on X11, OLE on Windows,
Cocoa on macOS).

tkinterdnd2 ships tkdnd in its wheel. PySimpleGUI owns the Tk root, so the extension is loaded into that
interpreter with ``TkinterDnD.require`` (its way for a root it did not make) and the window's toplevel is
registered as a drop target for files: a drop anywhere on the window reaches it, since tkdnd looks for a target up
the widget hierarchy. Without the extension (a platform its wheel lacks, a broken install) the window works as
before, with Attach and Folder.
"""

from __future__ import annotations

import logging
import tkinter as tk
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def accept_drops(toplevel: tk.Toplevel, can_drop: Callable[[], bool], on_hover: Callable[[bool], None],
                 on_drop: Callable[[list[Path]], None]) -> bool:
    """Make ``toplevel`` take dropped files and folders; False (and logged) when tkdnd cannot be loaded.

    ``can_drop`` says whether the open conversation takes files now (else the drag shows a refusal),
    ``on_hover`` is told when a drag that may drop enters (True) or leaves (False), ``on_drop`` gets the paths.
    """
    try:
        from tkinterdnd2 import COPY, DND_FILES, REFUSE_DROP, TkinterDnD

        TkinterDnD.require(toplevel)
    except (ImportError, RuntimeError) as exc:  # RuntimeError: tkinterdnd2's "Unable to load tkdnd library"
        log.warning("dropping files on the window is off: %s", exc)
        return False

    def answer() -> str:
        return COPY if can_drop() else REFUSE_DROP

    def enter(_event: object) -> str:
        action = answer()
        on_hover(action == COPY)
        return action

    def leave(_event: object) -> str:
        on_hover(False)
        return REFUSE_DROP

    def drop(event: object) -> str:
        on_hover(False)
        if not can_drop():
            return REFUSE_DROP
        # A Tcl list of paths: braces around those with spaces, which splitlist undoes.
        paths = [Path(p) for p in toplevel.tk.splitlist(getattr(event, "data", "")) if p]
        if paths:
            on_drop(paths)
        return COPY

    toplevel.drop_target_register(DND_FILES)  # type: ignore[attr-defined]  # tkinterdnd2 adds it to every widget
    toplevel.dnd_bind("<<DropEnter>>", enter)  # type: ignore[attr-defined]
    toplevel.dnd_bind("<<DropPosition>>", lambda _e: answer())  # type: ignore[attr-defined]
    toplevel.dnd_bind("<<DropLeave>>", leave)  # type: ignore[attr-defined]
    toplevel.dnd_bind("<<Drop>>", drop)  # type: ignore[attr-defined]
    return True
