"""A file message in the timeline: icon, name and size, a progress bar, one status line, its actions, and a
received image's thumbnail.

Plain Tk, embedded in the conversation's ``Text`` like an avatar. It renders a
``FileLine`` and nothing else; its buttons (and a click on the thumbnail) only post
a window event (Cancel, Open, Show in folder) for ``ChatWindow.handle`` to act on.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable
from pathlib import PurePath

from p2pchat.client.gui.file_model import FileLine, Transfer, transfer_status
from p2pchat.client.gui.layout import FILE_CANCEL, FILE_OPEN, FILE_OPEN_FOLDER
from p2pchat.client.gui.units import human_size, short_path
from p2pchat.client.gui.theme import Fonts, Palette, avatar_colour

# A card fits a room's timeline beside its members column: about 450 px inside the text's margins.
BAR_WIDTH, BAR_HEIGHT = 350, 6
ICON_W, ICON_H, FOLD = 36, 44, 10
NAME_CHARS = 40
TEXT_WIDTH = BAR_WIDTH + 20  # px: every card is as wide, whatever its state (a progress line fits)

Action = Callable[[str, bytes], None]  # (window event key, transfer id)


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """Cut in the middle, so the extension stays readable."""
    if len(name) <= limit:
        return name
    keep = limit - 1
    return name[: keep - keep // 3] + "…" + name[-(keep // 3):]


def extension_label(name: str) -> str:
    suffix = PurePath(name).suffix[1:].upper()
    return suffix[:4] if suffix.isalnum() else "FILE"


class FileCard(tk.Frame):
    def __init__(self, master: tk.Text, line: FileLine, pal: Palette, fonts: Fonts, on_action: Action,
                 thumbnail: tk.PhotoImage | None = None) -> None:
        super().__init__(master, background=pal.card_bg, highlightthickness=1, highlightbackground=pal.border,
                         borderwidth=0, cursor="arrow")
        self.pal, self.fonts, self.xfer = pal, fonts, line.xfer
        self._on_action = on_action
        bg = pal.card_bg

        self.icon = tk.Canvas(self, width=ICON_W, height=ICON_H, background=bg, highlightthickness=0, borderwidth=0)
        self._draw_icon(line)
        self.icon.grid(row=0, column=0, rowspan=7, padx=(12, 12), pady=10, sticky="n")

        title = tk.Frame(self, background=bg)
        self.name = tk.Label(title, text=short_name(line.name), font=fonts.bold, foreground=pal.text,
                             background=bg, anchor="w")
        self.size = tk.Label(title, text="", font=fonts.small, foreground=pal.muted, background=bg, anchor="w")
        self.name.pack(side="left")
        self.size.pack(side="left", padx=(8, 0))
        title.grid(row=0, column=1, sticky="w", pady=(9, 0))

        self.bar = tk.Canvas(self, width=BAR_WIDTH, height=BAR_HEIGHT, background=bg, highlightthickness=0,
                             borderwidth=0)
        half = BAR_HEIGHT / 2
        self.bar.create_line(half, half, BAR_WIDTH - half, half, width=BAR_HEIGHT, capstyle="round",
                             fill=pal.border)
        self._fill = self.bar.create_line(half, half, half, half, width=BAR_HEIGHT, capstyle="round",
                                          fill=pal.accent, state="hidden")
        self.bar.grid(row=1, column=1, sticky="w", pady=(6, 2))

        self.status = tk.Label(self, text="", font=fonts.small, foreground=pal.muted, background=bg, anchor="w",
                               justify="left", wraplength=TEXT_WIDTH)
        self.status.grid(row=2, column=1, sticky="w", pady=(0, 9))
        self.saved = tk.Label(self, text="", font=fonts.small, foreground=pal.muted, background=bg, anchor="w",
                              justify="left", wraplength=TEXT_WIDTH)
        self.note = tk.Label(self, text="", font=fonts.small, foreground=pal.error, background=bg, anchor="w",
                             justify="left", wraplength=TEXT_WIDTH)
        # A received image, shown small; a click opens it.
        self.thumbnail = tk.Label(self, background=bg, borderwidth=0, cursor="hand2")
        self.thumbnail.bind("<Button-1>", lambda _e: self._on_action(FILE_OPEN, self.xfer))

        self._actions = tk.Frame(self, background=bg)
        self._buttons: list[tk.Button] = []
        self.columnconfigure(1, weight=1, minsize=TEXT_WIDTH)
        self.render(line)
        if thumbnail is not None:
            self.show_thumbnail(thumbnail)

    def render(self, line: FileLine) -> None:
        pal = self.pal
        self.size.configure(text=human_size(line.size) if line.size or line.state is not Transfer.FAILED else "")
        status_colour = {Transfer.FAILED: pal.error, Transfer.DONE: pal.ok}.get(line.state, pal.muted)
        self.status.configure(text=transfer_status(line), foreground=status_colour)
        if line.state is Transfer.DONE and line.path is not None:
            self.saved.configure(text=short_path(line.path))
            self.status.grid_configure(pady=0)
            self.saved.grid(row=3, column=1, sticky="w", pady=(0, 9))
            self._draw_icon(line)  # a folder is known as one once it is here
        if line.finished or line.state is Transfer.UPLOADED:
            self.bar.grid_remove()
        else:
            self.bar.grid()
            self._draw_fraction(line.fraction)
        if line.state in (Transfer.OFFERING, Transfer.ACTIVE):
            self._show_actions([(FILE_CANCEL, "Cancel", pal.muted)])
        elif line.state is Transfer.DONE and not line.outgoing and line.path is not None:
            self._show_actions([(FILE_OPEN, "Open", pal.accent), (FILE_OPEN_FOLDER, "Show in folder", pal.muted)])
        else:
            self._show_actions([])

    def show_thumbnail(self, image: tk.PhotoImage) -> None:
        self.thumbnail.configure(image=image)
        self.thumbnail.image = image  # type: ignore[attr-defined]  # the window owns it; this only shows it
        self.saved.grid_configure(pady=(0, 6))
        self.thumbnail.grid(row=5, column=1, sticky="w", pady=(0, 10))

    def show_note(self, text: str) -> None:
        """Why an action did nothing (no program opens files here, the file is gone), under the saved path."""
        self.note.configure(text=text)
        self.note.grid(row=4, column=1, sticky="w", pady=(0, 9))
        self.saved.grid_configure(pady=(0, 2))

    def _draw_icon(self, line: FileLine) -> None:
        """A page with a folded corner and the file's extension; a folder's outline for a folder."""
        icon, pal = self.icon, self.pal
        icon.delete("all")
        if line.folder:
            colour = pal.accent
            icon.create_polygon(0, 8, 14, 8, 18, 13, ICON_W, 13, ICON_W, ICON_H - 6, 0, ICON_H - 6, fill=colour,
                                outline="")
            icon.create_rectangle(0, 17, ICON_W, ICON_H - 6, fill=lighter(colour, 0.25), outline="")
            return
        ext = extension_label(line.name)
        colour = avatar_colour(pal, ext)
        icon.create_polygon(0, 0, ICON_W - FOLD, 0, ICON_W, FOLD, ICON_W, ICON_H, 0, ICON_H, fill=colour,
                            outline="")
        icon.create_polygon(ICON_W - FOLD, 0, ICON_W - FOLD, FOLD, ICON_W, FOLD, fill=lighter(colour),
                            outline="")
        icon.create_text(ICON_W // 2, ICON_H - 12, text=ext, fill="#FFFFFF", font=self.fonts.tiny_bold)

    def _draw_fraction(self, fraction: float) -> None:
        half = BAR_HEIGHT / 2
        if fraction <= 0:
            self.bar.itemconfigure(self._fill, state="hidden")
            return
        end = half + (BAR_WIDTH - BAR_HEIGHT) * fraction
        self.bar.coords(self._fill, half, half, end, half)
        self.bar.itemconfigure(self._fill, state="normal")

    def _show_actions(self, actions: list[tuple[str, str, str]]) -> None:
        """(window event key, label, colour) for each button, left to right, at the card's foot; none hides them."""
        if [b.cget("text") for b in self._buttons] == [text for _, text, _ in actions]:
            return
        for button in self._buttons:
            button.destroy()
        self._buttons = []
        pal = self.pal
        for key, text, colour in actions:
            button = tk.Button(self._actions, text=text, font=self.fonts.small_bold, relief="flat", borderwidth=0,
                               highlightthickness=1, highlightbackground=pal.border, background=pal.card_bg,
                               activebackground=pal.border, foreground=colour, activeforeground=colour, padx=10,
                               pady=3, cursor="hand2", command=lambda key=key: self._on_action(key, self.xfer))
            button.pack(side="left", padx=(0, 8))
            self._buttons.append(button)
        if actions:
            self._actions.grid(row=6, column=1, sticky="w", pady=(0, 10))
        else:
            self._actions.grid_remove()

    # --- what a user sees (tests) ------------------------------------------------------
    @property
    def actions(self) -> list[str]:
        """The buttons' labels, left to right."""
        return [str(b.cget("text")) for b in self._buttons]

    def button(self, text: str) -> tk.Button:
        return next(b for b in self._buttons if b.cget("text") == text)

    @property
    def status_text(self) -> str:
        return str(self.status.cget("text"))

    @property
    def note_text(self) -> str:
        return str(self.note.cget("text")) if self.note.grid_info() else ""

    @property
    def saved_text(self) -> str:
        return str(self.saved.cget("text")) if self.saved.grid_info() else ""

    @property
    def bar_shown(self) -> bool:
        return bool(self.bar.grid_info())

    @property
    def thumbnail_size(self) -> tuple[int, int] | None:
        """The thumbnail shown, (width, height) in pixels; None without one."""
        image = getattr(self.thumbnail, "image", None)
        return (image.width(), image.height()) if image is not None and self.thumbnail.grid_info() else None

    def bar_fraction(self) -> float:
        if self.bar.itemcget(self._fill, "state") == "hidden":
            return 0.0
        x0, _, x1, _ = self.bar.coords(self._fill)
        return (x1 - x0) / (BAR_WIDTH - BAR_HEIGHT)


def lighter(colour: str, amount: float = 0.45) -> str:
    """``colour`` mixed with white: the folded corner of the file icon."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02X}" for c in rgb)


def forward_wheel(widget: tk.Misc, text: tk.Text) -> None:
    """Wheel over an embedded widget scrolls the conversation, as it does over the text."""
    def scroll(units: int) -> str:
        text.yview_scroll(units, "units")
        return "break"

    widget.bind("<Button-4>", lambda _e: scroll(-3), add=True)
    widget.bind("<Button-5>", lambda _e: scroll(3), add=True)
    widget.bind("<MouseWheel>", lambda e: scroll(-1 if e.delta > 0 else 1) if e.delta else None, add=True)
    for child in widget.winfo_children():
        forward_wheel(child, text)
