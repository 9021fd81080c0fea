"""Thumbnails of received images (PNG, JPEG, GIF) for their cards, made off the Tk thread with a bounded decode.

``thumbnail_png`` is a plain function (a file in, PNG bytes or None out); ``ThumbnailMaker`` runs it on one worker
thread it owns and joins, and hands each result to a callback (the window's bridge, which brings it to the Tk
thread, where it becomes a ``PhotoImage``: Tk reads PNG itself). A received file is hostile input: the size in its
header is checked before any pixel is decoded, a JPEG is decoded at a reduced scale, and a damaged or oversized
image simply has no thumbnail.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif"})
FORMATS = ("PNG", "JPEG", "GIF")  # the decoders Pillow may try: none other ever sees a received file
MAX_PIXELS = 50_000_000  # width × height in the header: a camera's photo passes, a decompression bomb does not
BOX = (240, 160)  # px: the largest a thumbnail is, on a card about 560 px wide


def thumbnail_png(path: Path, box: tuple[int, int] = BOX) -> bytes | None:
    """A PNG of ``path``'s image scaled to fit ``box``; None for what is no image of ours (damaged, too big)."""
    if path.suffix.lower() not in SUFFIXES:
        return None
    try:
        with Image.open(path, formats=FORMATS) as image:
            width, height = image.size
            if not 0 < width * height <= MAX_PIXELS:
                log.info("no thumbnail for %s: %d x %d pixels", path.name, width, height)
                return None
            image.draft("RGB", (box[0] * 2, box[1] * 2))  # JPEG: decode at 1/2…1/8 scale; the others ignore it
            image.thumbnail(box)
            out = io.BytesIO()
            image.convert("RGBA" if image.mode in ("RGBA", "LA", "P", "PA") else "RGB").save(out, "PNG")
            return out.getvalue()
    # Pillow raises many kinds on a damaged file (OSError, SyntaxError, ValueError, struct.error, EOFError…):
    # each only means "no thumbnail", never an error for the user.
    except Exception as exc:  # noqa: BLE001
        log.info("no thumbnail for %s: %s", path.name, exc)
        return None


@dataclass(frozen=True, slots=True)
class Thumbnail:
    xfer: bytes
    png: bytes | None  # None: none for this file


class ThumbnailMaker:
    """One worker thread for every thumbnail of a window, in order; ``close`` joins it."""

    def __init__(self, deliver: Callable[[Thumbnail], None]) -> None:
        self._deliver = deliver
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pchat-gui-thumbnails")

    def request(self, xfer: bytes, path: Path) -> None:
        if path.suffix.lower() in SUFFIXES:
            self._pool.submit(lambda: self._deliver(Thumbnail(xfer, thumbnail_png(path))))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
