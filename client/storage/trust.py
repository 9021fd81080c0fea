"""Keys we have decided to trust: brokers by address (like SSH's known_hosts) and peers by user ID, and the peer
keys the user has verified with their owners."""

from __future__ import annotations

import json
import os
from pathlib import Path

# A user's peer key files, in their state directory (docs/PROTOCOL.md §9).
PINNED_KEYS = "peer_keys.json"
CHANGED_KEYS = "peer_keys_changed.json"  # new keys waiting for the user to accept them
VERIFIED_KEYS = "peer_keys_verified.json"
VERIFIED_ACCOUNTS = "peer_accounts_verified.json"  # peers' account keys the user verified (one number per account)
PEER_ACCOUNTS = "peer_accounts.json"  # peers' account keys, which sign their linked devices (§5.6)


class KeyStore:
    """A small JSON map name -> hex key, written atomically with mode 0600. Read again when another process
    (``p2pchat trust`` while the GUI runs) has replaced the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, str] = {}
        self._version: tuple[int, int] | None = None
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_ino, st.st_mtime_ns) != self._version:  # every write replaces the file: a new inode
            self._keys = json.loads(self.path.read_text())
            self._version = (st.st_ino, st.st_mtime_ns)

    def get(self, name: str) -> bytes | None:
        self._refresh()
        value = self._keys.get(name)
        return bytes.fromhex(value) if value else None

    def put(self, name: str, key: bytes) -> None:
        self._refresh()
        self._keys[name] = key.hex()
        self._write()

    def delete(self, name: str) -> None:
        self._refresh()
        if self._keys.pop(name, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._keys, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        st = os.stat(self.path)
        self._version = (st.st_ino, st.st_mtime_ns)

    def items(self) -> list[tuple[str, bytes]]:
        self._refresh()
        return [(name, bytes.fromhex(v)) for name, v in sorted(self._keys.items())]


class VerifiedKeys:
    """The peer keys the user has verified (compared the safety number with their owner), by peer. A device key is
    verified only while the peer presents that very key: a key change makes it unverified again, and that is worth
    saying when the change is reported. A verified *account* key (the one safety number of all a peer's devices)
    vouches for every device it linked, so it stays verified while the peer links or unlinks devices. Account keys
    live in their own file beside the device keys' (files written before accounts existed read as they did)."""

    def __init__(self, path: Path) -> None:
        self._keys = KeyStore(path)
        self._accounts = KeyStore(path.parent / VERIFIED_ACCOUNTS)

    def is_verified(self, peer: str, key: bytes | None, account: bytes | None = None) -> bool:
        """``key`` is verified itself, or ``account`` is: pass ``account`` only where ``key`` is a device it linked
        (the pinned account key, for the key pinned under it)."""
        return key is not None and (self._keys.get(peer) == key or self.is_account_verified(peer, account))

    def is_account_verified(self, peer: str, account: bytes | None) -> bool:
        return account is not None and self._accounts.get(peer) == account

    def was_verified(self, peer: str) -> bool:
        """Whether some key of ``peer`` was verified (maybe one it no longer presents)."""
        return self._keys.get(peer) is not None or self._accounts.get(peer) is not None

    def mark(self, peer: str, key: bytes, account: bytes | None = None) -> None:
        """Verified by comparing the device safety number, or (``account``) the account's."""
        self._keys.put(peer, key)
        if account is not None:
            self._accounts.put(peer, account)

    def clear(self, peer: str) -> None:
        self._keys.delete(peer)
        self._accounts.delete(peer)
