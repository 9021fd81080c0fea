"""Thumbnails of received images, without a display: scaled to fit, a bounded decode, and nothing for a damaged,
oversized or disguised file (never an exception)."""

from __future__ import annotations

import io
import queue
import struct
import threading
import zlib
from pathlib import Path

from PIL import Image

from p2pchat.client.gui.thumbnails import BOX, Thumbnail, ThumbnailMaker, thumbnail_png


def saved(path: Path, size: tuple[int, int], fmt: str, mode: str = "RGB") -> Path:
    Image.new(mode, size).save(path, fmt)
    return path


def size_of(png: bytes | None) -> tuple[int, int]:
    assert png is not None
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk claiming ``width`` × ``height``, with no pixels after it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_images_are_scaled_to_fit_the_box_keeping_their_shape(tmp_path):
    assert size_of(thumbnail_png(saved(tmp_path / "wide.jpg", (3000, 1000), "JPEG"))) == (240, 80)
    assert size_of(thumbnail_png(saved(tmp_path / "tall.PNG", (100, 400), "PNG"))) == (40, 160)
    assert size_of(thumbnail_png(saved(tmp_path / "anim.gif", (60, 30), "GIF", "P"))) == (60, 30)  # never enlarged
    assert BOX == (240, 160)


def test_a_header_claiming_too_many_pixels_is_refused_before_any_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(8000, 8000))  # 64 million pixels claimed: more than MAX_PIXELS
    assert thumbnail_png(bomb) is None
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(30000, 30000))  # so many that Pillow refuses it itself
    assert thumbnail_png(huge) is None


def test_damaged_disguised_or_other_files_have_no_thumbnail(tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(saved(tmp_path / "whole.png", (300, 300), "PNG").read_bytes()[:120])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all\n")
    bmp = saved(tmp_path / "old.png", (10, 10), "BMP")  # a format no decoder of ours reads, named .png
    image_named_txt = saved(tmp_path / "a.txt", (10, 10), "PNG")
    for path in (truncated, text, bmp, image_named_txt, tmp_path / "gone.png"):
        assert thumbnail_png(path) is None, path.name


def test_the_maker_delivers_each_result_from_its_own_thread_which_close_joins(tmp_path):
    results: queue.Queue[tuple[Thumbnail, str]] = queue.Queue()
    maker = ThumbnailMaker(lambda t: results.put((t, threading.current_thread().name)))
    maker.request(b"a", saved(tmp_path / "a.png", (50, 50), "PNG"))
    maker.request(b"b", tmp_path / "b.txt")  # not an image's name: nothing to do
    maker.request(b"c", tmp_path / "damaged.gif")
    got = [results.get(timeout=10), results.get(timeout=10)]
    maker.close()
    assert [(t.xfer, t.png is not None) for t, _ in got] == [(b"a", True), (b"c", False)] and results.empty()
    assert all(name.startswith("p2pchat-gui-thumbnails") for _, name in got)
    assert not [t for t in threading.enumerate() if t.name.startswith("p2pchat-gui-thumbnails")]
