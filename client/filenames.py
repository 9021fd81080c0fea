"""Safe names for received files: hostile names neutralised, nothing overwritten."""

from __future__ import annotations

import os
import re
import time
import unicodedata
from pathlib import Path

MAX_NAME_BYTES = 200  # leaves room for the timestamp prefix and a " (n)" suffix under 255
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def sanitize_filename(name: str) -> str:
    """The last path component of ``name``, made safe on any OS; never empty, never hidden."""
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]  # drop any directory part, Unix or Windows
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")  # control, format chars
    name = _UNSAFE.sub("_", name).strip(" .")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = "_" + stem
    ext = ext[:16]
    encoded = stem.encode("utf-8")[: MAX_NAME_BYTES - len(ext) - 1]
    stem = encoded.decode("utf-8", errors="ignore").rstrip(" .")
    name = f"{stem}.{ext}" if ext else stem
    return name or "file"


def received_name(sender: str, original: str, when: float | None = None) -> str:
    """``YYYYMMDD_HHMMSS_fromUser_originalName.ext``, as the prototype named them."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(when))
    return f"{stamp}_{sender}_{sanitize_filename(original)}"


def publish_atomically(part: Path, directory: Path, name: str) -> Path:
    """Give the finished ``part`` file its final name without ever overwriting one.

    A hard link fails if the name exists, so the file appears complete or not at all.
    """
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    for n in range(10_000):
        candidate = directory / (name if n == 0 else f"{stem} ({n}){dot}{ext}")
        try:
            os.link(part, candidate)
        except FileExistsError:
            continue
        os.unlink(part)
        return candidate
    raise FileExistsError(f"no free name for {name!r} in {directory}")
