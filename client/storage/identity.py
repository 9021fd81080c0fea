"""This installation's claim to a user ID: a persisted token and a one-process lock.

The token lets a client that crashed and restarted take over its own stale
session at the broker instead of being refused until it expires. The lock keeps
two live processes of the same user and home from taking the session from each
other: the second one registers with a throwaway token and is refused cleanly.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

TOKEN_BYTES = 32


class InstanceClaim:
    def __init__(self, state_dir: Path) -> None:
        self._lock_file = open(state_dir / "instance.lock", "a+b")  # noqa: SIM115 - held for our lifetime
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.exclusive = True
        except OSError:
            self.exclusive = False
        self.token = self._load_token(state_dir / "session.token") if self.exclusive else os.urandom(TOKEN_BYTES)

    @staticmethod
    def _load_token(path: Path) -> bytes:
        try:
            token = path.read_bytes()
            if len(token) == TOKEN_BYTES:
                return token
        except FileNotFoundError:
            pass
        token = os.urandom(TOKEN_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token)
        return token

    def release(self) -> None:
        if not self._lock_file.closed:
            self._lock_file.close()  # closing drops the flock
