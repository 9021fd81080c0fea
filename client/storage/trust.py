"""Keys we have decided to trust: brokers by address (like SSH's known_hosts) and peers by user ID."""

from __future__ import annotations

import json
import os
from pathlib import Path


class KeyStore:
    """A small JSON map name -> hex key, written atomically with mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._keys: dict[str, str] = json.loads(path.read_text())
        except FileNotFoundError:
            self._keys = {}

    def get(self, name: str) -> bytes | None:
        value = self._keys.get(name)
        return bytes.fromhex(value) if value else None

    def put(self, name: str, key: bytes) -> None:
        self._keys[name] = key.hex()
        self._write()

    def delete(self, name: str) -> None:
        if self._keys.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._keys, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def items(self) -> list[tuple[str, bytes]]:
        return [(name, bytes.fromhex(v)) for name, v in sorted(self._keys.items())]
