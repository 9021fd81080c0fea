"""Where local state lives. ``P2PCHAT_HOME`` relocates all of it."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    configured = os.environ.get("P2PCHAT_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".p2pchat"


def user_dir(user: str) -> Path:
    """A user's keys, history and settings (user IDs are path-safe by protocol)."""
    return home_dir() / "users" / user


def broker_dir() -> Path:
    return home_dir() / "broker"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
