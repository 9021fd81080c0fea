"""What the chat window asks of the desktop: files (or a folder) to send, a folder to save into, and opening a
received file or its folder with the desktop's own opener.

All are injected into ``ChatWindow`` (``Desktop``) so tests can answer the dialogs without a modal window; the
opener is the real one in tests too, run against an ``xdg-open`` of the test's on ``PATH``, or none.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tkinter import filedialog

log = logging.getLogger(__name__)

# Tried in order on Linux and the BSDs: the freedesktop opener, then GLib's (``gio open``), which GNOME has
# without xdg-utils.
OPENERS = (("xdg-open",), ("gio", "open"))


class NoOpener(OSError):
    """This machine has no program that opens files for the desktop (the message says which were looked for)."""


def ask_files_to_send(parent: tk.Misc, title: str) -> list[str]:
    """Tk's own open dialog, several files at once, modal to the chat window; [] if the user closes it.

    Tk keeps servicing its event loop while the dialog is up, so client events
    still arrive; they are handled once the dialog returns.
    """
    chosen = filedialog.askopenfilenames(parent=parent, title=title)
    return list(chosen) if isinstance(chosen, (tuple, list)) else []  # Tk answers "" for Cancel


def ask_folder(parent: tk.Misc, title: str, start: str) -> str | None:
    """Tk's folder dialog (a folder to send, or the one received files go to); None if the user closes it."""
    chosen = filedialog.askdirectory(parent=parent, title=title, initialdir=start or None, mustexist=True)
    return chosen or None


def open_with_desktop(path: Path) -> None:
    """Open ``path`` (a file, or a folder in the file manager) as a double click would, without waiting.

    The opener is detached (its own session): it is the user's program, meant to outlive this window. Raises
    ``NoOpener`` when there is none, FileNotFoundError when ``path`` is gone, OSError if the opener cannot start.
    """
    if not path.exists():
        raise FileNotFoundError(2, "it is no longer there (moved or deleted)", str(path))
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]  # noqa: S606 - Windows' own opener
        return
    if sys.platform == "darwin":
        command = ["open"]
    else:
        command = next((list(opener) for opener in OPENERS if shutil.which(opener[0])), [])
        if not command:
            raise NoOpener("no program to open files is installed (looked for xdg-open and gio)")
    subprocess.Popen([*command, str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    log.info("opened %s with %s", path, " ".join(command))


@dataclass(frozen=True, slots=True)
class Desktop:
    choose_files: Callable[[tk.Misc, str], list[str]] = ask_files_to_send
    choose_folder: Callable[[tk.Misc, str, str], str | None] = ask_folder
    open_path: Callable[[Path], None] = open_with_desktop
