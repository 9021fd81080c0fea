"""A file manager's stand-in for the drop tests: a small window, its own X client, that drags files with XDND.

``python drag_source.py X Y URI...`` shows a window at (X, Y) whose label, dragged with mouse button 1, offers the
URIs as ``text/uri-list``, as a file manager does (percent-encoded ``file://`` URIs). It prints ``ready`` once
mapped, then ``dropped ACTION`` when a drag ends. The drag is done by xdotool (dragging.py); the window that
receives it is the chat window, with its real tkdnd drop target.

tkdnd as a drag *source* answers a ``text/uri-list`` request with the wrong selection format (the type's own
name, which Tk sends as a list of 32-bit numbers: the target reads "0x0"); a file manager answers it as text. The
one fix below makes this source do the same. Nothing on the receiving side is changed.
"""

from __future__ import annotations

import sys
import tkinter as tk

from tkinterdnd2 import COPY, DND_FILES, TkinterDnD


def main(x: int, y: int, uris: list[str]) -> None:
    root = TkinterDnD.Tk()
    root.tk.eval("""
        rename ::tkdnd::xdnd::getFormatForType ::tkdnd::xdnd::_getFormatForType
        proc ::tkdnd::xdnd::getFormatForType {type} {
            if {[string match text/uri-list* $type]} { return UTF8_STRING }
            return [::tkdnd::xdnd::_getFormatForType $type]
        }""")
    root.geometry(f"120x60+{x}+{y}")
    label = tk.Label(root, text="files", background="#F2C94C")
    label.pack(fill="both", expand=True)
    label.drag_source_register(1, DND_FILES)
    label.dnd_bind("<<DragInitCmd>>", lambda _e: (COPY, DND_FILES, tuple(uris)))
    label.dnd_bind("<<DragEndCmd>>", lambda e: print("dropped", e.action, flush=True))
    root.bind("<Map>", lambda e: e.widget is root and print("ready", flush=True), add="+")
    root.mainloop()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
