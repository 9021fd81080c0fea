"""The window's remembered settings (``$P2PCHAT_HOME/gui.json``) and the connect form's validation."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import P2PChatError
from p2pchat.common.paths import home_dir
from p2pchat.common.protocol import USER_ID_MAX, check_user_id

log = logging.getLogger(__name__)

THEMES = ("light", "dark")


@dataclass(frozen=True, slots=True)
class GuiSettings:
    host: str = "127.0.0.1"
    port: int = 5555
    user: str = ""
    theme: str = "light"
    notifications: bool = True
    read_receipts: bool = True  # let senders see when we have read their messages (from the next connect)
    trust_key_changes: bool = False  # accept contacts' new keys at once, still telling the user (next connect)
    accept_files: bool = True  # False: this device refuses files, so another device of the user takes them
    received_dir: str = ""  # where received files go (from the next connect); "" for the default


def settings_path() -> Path:
    return home_dir() / "gui.json"


class SettingsStore:
    """Load and save ``GuiSettings``; a missing or damaged file means defaults, never a crash."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> GuiSettings:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return GuiSettings()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable GUI settings %s: %s", self.path, exc)
            return GuiSettings()
        if not isinstance(raw, dict):
            return GuiSettings()
        settings = GuiSettings()
        for f in fields(GuiSettings):
            value = raw.get(f.name)
            if type(value) is type(getattr(settings, f.name)):  # keep defaults for wrong types
                settings = replace(settings, **{f.name: value})
        if settings.theme not in THEMES:
            settings = replace(settings, theme="light")
        return settings

    def save(self, settings: GuiSettings) -> None:
        """Write atomically so a crash mid-write cannot leave half a file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:  # settings are a convenience: losing them must not stop the chat
            log.warning("could not save GUI settings to %s: %s", self.path, exc)


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    server: ServerAddress
    user: str


@dataclass(frozen=True, slots=True)
class FormError:
    field: str  # "host", "port" or "user": the input to point the user at
    message: str


def validate_connect(host: str, port: str, user: str) -> ConnectTarget | FormError:
    """Check the connect panel's three fields; the message says how to fix the first bad one."""
    host, port, user = host.strip(), port.strip(), user.strip()
    if not host:
        return FormError("host", "Enter the broker's host name or IP address.")
    if any(c.isspace() for c in host) or "/" in host:
        return FormError("host", f"“{host}” is not a host name or IP address.")
    if not port.isdigit() or not 0 < int(port) < 65535:
        return FormError("port", "Port must be a number from 1 to 65534.")
    if not user:
        return FormError("user", "Choose a user ID.")
    try:
        check_user_id(user)
    except P2PChatError:
        return FormError("user", f"User IDs are 1–{USER_ID_MAX} letters, digits, “_”, “.” or “-”, "
                                 "starting with a letter or digit.")
    return ConnectTarget(ServerAddress(host.strip("[]"), int(port)), user)
