"""What the user does with received files: open one, show it in its folder, see an image's thumbnail, and choose the
folder they are saved in.

A mixin of ``ChatWindow`` (window.py holds its state and dispatches). Opening goes through the desktop's opener
(desktop.py); when there is none, the card and the log say exactly that. Thumbnails are made on the
``ThumbnailMaker``'s thread and become ``PhotoImage``s here, on the Tk thread, which owns and deletes them. The
received folder is a setting: the client library takes it when it connects, so a new one applies from the next
connection, and the sidebar says so.
"""

from __future__ import annotations

import tkinter as tk
from pathlib import Path

from p2pchat.client.gui.file_model import FileLine
from p2pchat.client.gui.layout import K_RECEIVED_DIR
from p2pchat.client.gui.thumbnails import Thumbnail
from p2pchat.client.gui.units import short_path

DIR_CHARS = 20  # the sidebar's button for the received folder: "Save files in …" and a tail of the path


class ReceivedFiles:
    _thumbnail_images: dict[bytes, tk.PhotoImage]

    def open_received(self, xfer: bytes) -> None:
        """The card's Open: the file (or folder) itself, with the program the desktop opens it with."""
        line = self.model.file(xfer)
        if line is not None and line.path is not None:
            self._open_path(line, line.path)

    def show_in_folder(self, xfer: bytes) -> None:
        line = self.model.file(xfer)
        if line is not None and line.path is not None:
            self._open_path(line, line.path.parent)

    def _open_path(self, line: FileLine, path: Path) -> None:
        try:
            self.desktop.open_path(path)
        except OSError as exc:  # desktop.NoOpener says there is no opener; a gone file says so too
            why = f"Cannot open {short_path(path)}: {exc.strerror or exc}"
            self._log(why)
            card = self._view().card(line.xfer)
            if card is not None:
                card.show_note(why)

    # --- thumbnails ---------------------------------------------------------------------------------------------
    def _on_thumbnail(self, thumbnail: Thumbnail) -> None:
        line = self.model.file(thumbnail.xfer)
        if line is None or thumbnail.png is None:
            return
        line.thumbnail = thumbnail.png
        image = self._thumbnail_image(line)
        if image is not None and self._showing(line.key):
            self._view().show_thumbnail(line.xfer, image)

    def _thumbnail_image(self, line: FileLine) -> tk.PhotoImage | None:
        """The card's image for ``line`` (made once; cards come and go with the conversation shown)."""
        if line.thumbnail is None:
            return None
        image = self._thumbnail_images.get(line.xfer)
        if image is None:
            image = tk.PhotoImage(master=self.window.TKroot, data=line.thumbnail)  # Tk decodes PNG itself
            self._thumbnail_images[line.xfer] = image
        return image

    def _drop_thumbnails(self) -> None:
        """Deleted here, on the Tk thread, as the presence dots are (window.py: ``_drop_dots``)."""
        for image in self._thumbnail_images.values():
            image.tk.call("image", "delete", image.name)
            image.name = ""
        self._thumbnail_images.clear()

    # --- the received folder ------------------------------------------------------------------------------------
    def choose_received_dir(self) -> None:
        current = self._received_dir()
        chosen = self.desktop.choose_folder(self.window.TKroot, "Save received files in",
                                            str(current) if current is not None else "")
        if chosen:
            self._update_settings(received_dir=chosen)
            self._log(f"Received files will be saved in {short_path(Path(chosen))} from the next connection")
            self._render_status()

    def _received_dir(self) -> Path | None:
        """Where files go (the user's choice, else this connection's folder); None before any connection."""
        if self.settings.received_dir:
            return Path(self.settings.received_dir)
        return self.client.config.received_dir if self.client is not None else self.options.received_dir

    def _received_dir_pending(self) -> bool:
        """The user chose a folder the connection does not use yet (the library takes it when it connects)."""
        return self.client is not None and bool(self.settings.received_dir) and \
            self.client.config.received_dir != Path(self.settings.received_dir)

    def _render_received_dir(self) -> None:
        """The sidebar's button says where files go (the path's end, when long; the whole in its tooltip)."""
        folder = self._received_dir()
        shown = short_path(folder) if folder is not None else "the default folder"
        if len(shown) > DIR_CHARS:  # its last folders that fit, whole
            tail = shown[-(DIR_CHARS - 2):]
            shown = "…/" + tail.split("/", 1)[1] if "/" in tail[:-1] else "…" + tail
        self.window[K_RECEIVED_DIR].update(f"Save files in {shown}")
        self.window[K_RECEIVED_DIR].set_tooltip(f" Received files are saved in {folder}. Click to choose another "
                                                "folder. " if folder is not None else " Choose a folder ")
