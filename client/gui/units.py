"""Numbers and paths as people read them: sizes as file managers show them, time left, paths under home."""

from __future__ import annotations

from pathlib import Path


def human_size(n: float) -> str:
    """Decimal units, as file managers show them: 999 B, 1.2 KB, 34 MB, 1.5 GB."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":
            return f"{n:.1f} {unit}" if n < 99.95 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{max(s, 1)} s left"
    if s < 3600:
        return f"{round(s / 60)} min left"
    return f"{s // 3600} h {s % 3600 // 60} min left"


def short_path(path: Path | None) -> str:
    """``~/...`` for paths under the home directory: shorter, and the same on every machine."""
    if path is None:
        return ""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)
