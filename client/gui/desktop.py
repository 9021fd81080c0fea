"""What the chat window asks of the desktop: a file to send, and a folder shown in the file manager.

Both are injected into ``ChatWindow`` so tests can answer the file dialog and
see which folder would have opened, without a modal dialog or a file manager.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tkinter import filedialog

log = logging.getLogger(__name__)


def ask_file_to_send(parent: tk.Misc, peer: str) -> str | None:
    """Tk's own open dialog, modal to the chat window; None if the user closes it.

    Tk keeps servicing its event loop while the dialog is up, so client events
    still arrive; they are handled once the dialog returns.
    """
    chosen = filedialog.askopenfilename(parent=parent, title=f"Send a file to {peer}")
    return chosen or None  # Tk answers "" or () for Cancel


def open_in_file_manager(folder: Path) -> None:
    """Show ``folder`` in the desktop's file manager, without waiting for it.

    The opener is detached (its own session): it is the user's file manager,
    meant to outlive this window. Raises OSError if there is no opener.
    """
    if sys.platform == "win32":
        os.startfile(folder)  # type: ignore[attr-defined]  # noqa: S606 - Windows' own opener
        return
    opener = "open" if sys.platform == "darwin" else "xdg-open"
    subprocess.Popen([opener, str(folder)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    log.info("opened %s with %s", folder, opener)


@dataclass(frozen=True, slots=True)
class Desktop:
    choose_file: Callable[[tk.Misc, str], str | None] = ask_file_to_send
    open_folder: Callable[[Path], None] = open_in_file_manager
