"""The ID's account key as this installation knows it (docs/PROTOCOL.md §10.2.1): derived from the recovery
phrase where there is one, else the public key a device linked by code pinned (``account.pub``, raw 32 bytes,
written once when the existing device welcomed it through the code's channel)."""

from __future__ import annotations

import os
from pathlib import Path

from p2pchat.client.storage.phrase import ACCOUNT_FILE, PHRASE_FILE
from p2pchat.common.crypto import KEY_BYTES
from p2pchat.common.errors import StorageError
from p2pchat.common.recovery import RecoveryKey


def account_key(state_dir: Path, user: str) -> bytes | None:
    """The account public key of ``user`` (whose state directory is ``state_dir``), or None if unknown here."""
    try:
        return RecoveryKey.from_phrase((state_dir / PHRASE_FILE).read_text(), user).public
    except FileNotFoundError:
        pass
    try:
        raw = (state_dir / ACCOUNT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != KEY_BYTES:
        raise StorageError(f"{state_dir / ACCOUNT_FILE} is not an account key: link this device again")
    return raw


def linked_by_code(state_dir: Path) -> bool:
    """This installation has the account key, not the phrase."""
    return (state_dir / ACCOUNT_FILE).exists() and not (state_dir / PHRASE_FILE).exists()


def save_account_key(state_dir: Path, key: bytes) -> None:
    """Write ``key`` atomically (mode 0600, like the rest of the directory)."""
    path = state_dir / ACCOUNT_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, path)
