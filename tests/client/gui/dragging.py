"""Dragging files onto a chat window for real: XDND between two X clients, driven by the pointer.

A drag source process (drag_source.py, a file manager's stand-in) offers the files; xdotool presses button 1 on
it, moves the pointer onto the window and releases it there; the window's tkdnd drop target takes the drop as it
would from any file manager. Between pointer moves the test steps the windows, so the chat window answers the
protocol's messages from its own read loop; it says a drag is over it (``drag_over``) before the button is let go.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pchat.client.gui.layout import K_CONVERSATION
from p2pchat.client.gui.window import ChatWindow
from tests.client.gui.conftest import STEP_MS, pump

SOURCE = (0, 0, 120, 60)  # where the drag source's window is: x, y, width, height (the chat window is centred)


def xdotool(*args: object) -> None:
    subprocess.run(["xdotool", *map(str, args)], check=True, timeout=10)


class DragSource:
    def __init__(self, paths: tuple[Path, ...]) -> None:
        script = Path(__file__).with_name("drag_source.py")
        self.proc = subprocess.Popen([sys.executable, str(script), str(SOURCE[0]), str(SOURCE[1]),
                                      *(path.absolute().as_uri() for path in paths)],
                                     stdout=subprocess.PIPE, text=True)

    def said(self, windows: list[ChatWindow], line: str) -> None:
        """Step the windows until the source prints ``line``."""
        stdout = self.proc.stdout
        assert stdout is not None
        got: list[str] = []

        def printed() -> bool:
            if select.select([stdout], [], [], 0)[0]:
                got.append(stdout.readline().strip())
            if self.proc.poll() is not None and not got:
                raise AssertionError(f"the drag source exited with {self.proc.returncode}")
            return line in got

        pump(windows, printed, f"the drag source to say {line!r}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def drag_onto(window: ChatWindow, others: list[ChatWindow], *paths: Path, timeout: float = 10.0) -> None:
    """Drag ``paths`` from the source onto ``window``'s timeline and drop them there."""
    if shutil.which("xdotool") is None:
        pytest.skip("xdotool is not installed: no pointer to drag with (apt-get install xdotool)")
    root = window.window.TKroot
    root.lift()  # the windows are all centred: this one on top takes the drop
    root.update()
    x, y, w, h = SOURCE
    assert root.winfo_rootx() >= x + w or root.winfo_rooty() >= y + h, "the chat window covers the drag source"
    view = window.window[K_CONVERSATION].Widget
    tx, ty = view.winfo_rootx() + view.winfo_width() // 2, view.winfo_rooty() + view.winfo_height() // 2
    everyone = [window, *others]
    source = DragSource(paths)
    try:
        source.said(everyone, "ready")
        xdotool("mousemove", "--sync", x + w // 2, y + h // 2)
        xdotool("mousedown", 1)
        xdotool("mousemove", "--sync", x + w // 2 + 10, y + h // 2 + 10)  # past tkdnd's threshold: the drag starts
        deadline, nudge = time.monotonic() + timeout, 0
        while not window.drag_over:  # each move is an XdndPosition the window answers from its loop
            if time.monotonic() > deadline:
                raise AssertionError("the window never saw the drag over it")
            nudge = 1 - nudge
            xdotool("mousemove", "--sync", tx + nudge, ty)
            for each in everyone:
                each.step(STEP_MS)
        xdotool("mouseup", 1)
        source.said(everyone, "dropped copy")
    finally:
        xdotool("mousemove", 0, root.winfo_screenheight() - 1)  # out of the way of tooltips and later drags
        source.close()
