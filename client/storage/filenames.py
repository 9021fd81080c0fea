"""Safe names for received files: hostile names neutralised, nothing overwritten."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import time
import unicodedata
from pathlib import Path

NAME_MAX = 255  # bytes per path component (ext4, XFS, btrfs, APFS; FAT and NTFS count 255 UTF-16 units)
PART_SUFFIX_BYTES = len(".01234567.part")  # a .part name is "." + final name + this
MAX_RECEIVED_NAME_BYTES = NAME_MAX - 1 - PART_SUFFIX_BYTES  # 240: room for the .part name and a " (n)" suffix
MAX_NAME_BYTES = 200  # of the offered name, after the timestamp and sender prefix
MAX_EXT_BYTES = 16
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def sanitize_filename(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """The last path component of ``name``, made safe on any OS, at most ``max_bytes`` of UTF-8;
    never empty, never hidden."""
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]  # drop any directory part, Unix or Windows
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")  # control, format chars
    name = _UNSAFE.sub("_", name).strip(" .")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.split(".")[0].upper() in WINDOWS_RESERVED:
        stem = "_" + stem
    ext = cut_utf8(ext, MAX_EXT_BYTES)
    stem = cut_utf8(stem, max_bytes - len(ext.encode("utf-8")) - 1).rstrip(" .")
    name = f"{stem}.{ext}" if ext and stem else stem or ext
    return name or "file"


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_bytes`` in UTF-8 (whole characters only)."""
    return text.encode("utf-8")[:max(0, max_bytes)].decode("utf-8", errors="ignore")


def received_name(sender: str, original: str, when: float | None = None) -> str:
    """``YYYYMMDD_HHMMSS_fromUser_originalName.ext``, as the prototype named them."""
    prefix = f'{time.strftime("%Y%m%d_%H%M%S", time.localtime(when))}_{sender}_'
    budget = min(MAX_NAME_BYTES, MAX_RECEIVED_NAME_BYTES - len(prefix.encode("utf-8")))
    return prefix + sanitize_filename(original, budget)


def part_name(final_name: str, xfer: bytes) -> str:
    """The hidden name a transfer's data has until it is complete: fits NAME_MAX like the final name."""
    return f".{final_name}.{xfer.hex()[:8]}.part"


def publish_atomically(part: Path, directory: Path, name: str) -> Path:
    """Give the finished ``part`` file its final name without ever overwriting one.

    A hard link fails if the name exists, so the file appears complete or not at all. Where the
    file system has no hard links (FAT, SMB), a rename that refuses to replace does the same.
    """
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    for n in range(10_000):
        candidate = directory / (name if n == 0 else f"{stem} ({n}){dot}{ext}")
        try:
            _move_noreplace(part, candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free name for {name!r} in {directory}")


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # Linux, glibc >= 2.28


def _move_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if ``dst`` exists (then ``src`` stays)."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        _rename_noreplace(src, dst)
        return
    os.unlink(src)


def _rename_noreplace(src: Path, dst: Path) -> None:
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # EINVAL: no RENAME_NOREPLACE here
            raise OSError(err, os.strerror(err), str(dst))
    # Last resort: claim the name with an exclusive create, then replace our own empty claim.
    if os.path.isdir(src):  # a received folder (an empty directory may be renamed over)
        os.mkdir(dst, 0o700)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        os.replace(src, dst)
    except OSError:
        (os.rmdir if os.path.isdir(dst) else os.unlink)(dst)
        raise
