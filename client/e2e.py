"""End-to-end sealing for one user: pinned peer keys, cached shared secrets, seal and open.

Peer keys are pinned on first contact (from the broker's KEY_INFO or a sealed
message). A different key later is never used silently: it is parked as
*pending* and sending to that peer is blocked until the user accepts it.

No I/O of its own: the pinned and pending keys live behind ``PeerKeys`` (the shell passes key files,
tests and load clients memory), and the randomness of new file keys comes from ``random_bytes``.
Sealing a message is deterministic (its key derives from the message id), so with fixed identities
and a fixed ``random_bytes`` a whole session seals to the same bytes every time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from p2pchat.common import crypto
from p2pchat.common.errors import ErrorCode, P2PChatError


class PeerKeys(Protocol):
    """Keys by user ID (``storage.trust.KeyStore`` keeps them in a file, ``MemoryKeys`` in memory)."""

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, key: bytes) -> None: ...

    def delete(self, name: str) -> None: ...


class PeerKeyChanged(P2PChatError):
    default_code = ErrorCode.PEER_KEY_CHANGED

    def __init__(self, user: str, old: bytes, new: bytes, kept: str = "") -> None:
        super().__init__(f"{user}'s key changed from {crypto.fingerprint(old)} to {crypto.fingerprint(new)}; "
                         f"verify it with them, then accept it (p2pchat trust --peer {user}){kept}")
        self.user, self.old, self.new = user, old, new


class MemoryKeys:
    """``PeerKeys`` in memory: nothing survives the process (load clients, tests)."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}

    def get(self, name: str) -> bytes | None:
        return self._keys.get(name)

    def put(self, name: str, key: bytes) -> None:
        self._keys[name] = key

    def delete(self, name: str) -> None:
        self._keys.pop(name, None)


def accept_pending(pinned: PeerKeys, pending: PeerKeys, user: str) -> bool:
    key = pending.get(user)
    if key is None:
        return False
    pinned.put(user, key)
    pending.delete(user)
    return True


class EndToEnd:
    enabled = True  # sealing on; ``NO_SEALING`` is the one way to turn it off

    def __init__(self, user: str, identity: crypto.Identity, pinned: PeerKeys, pending: PeerKeys,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.user = user
        self.identity = identity
        self._random_bytes = random_bytes
        self._pinned = pinned
        self._pending = pending  # changed keys awaiting the user's decision, kept across restarts
        self._shared: dict[bytes, bytes] = {}

    def key_of(self, user: str) -> bytes | None:
        """The pinned key, or None if we must ask the broker; raises while a change is unaccepted."""
        pending = self._pending.get(user)
        if pending is not None:
            raise PeerKeyChanged(user, self._pinned.get(user) or b"", pending)
        return self._pinned.get(user)

    def pinned_key(self, user: str) -> bytes | None:
        return self._pinned.get(user)

    def pending_key(self, user: str) -> bytes | None:
        return self._pending.get(user)

    def learn(self, user: str, key: bytes) -> None:
        """A key for ``user`` (from the broker or a message): pin it, or raise PeerKeyChanged."""
        pinned = self._pinned.get(user)
        if pinned is None:
            self._pinned.put(user, key)
        elif pinned != key:
            if self._pending.get(user) != key:
                self._pending.put(user, key)
            raise PeerKeyChanged(user, pinned, key)

    def accept(self, user: str) -> bool:
        return accept_pending(self._pinned, self._pending, user)

    def new_file_key(self) -> bytes:
        """A fresh key for one sending session of a file (never a (key, nonce) pair twice)."""
        return self._random_bytes(crypto.KEY_BYTES)

    def seal(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> bytes:
        key = self.key_of(recipient)
        assert key is not None, "the session fetches the key before sealing"
        return crypto.seal_message(self.identity, self._secret(key), self.user, recipient, msg_id, ts,
                                   plaintext)

    def open(self, sender: str, msg_id: bytes, ts: int, body: bytes) -> bytes:
        claimed = crypto.sealed_sender_key(body)
        # Authenticate first: a forged body must neither pin a key nor raise a key-change prompt.
        secret = self._shared.get(claimed) or self._exchange(claimed)
        plaintext = crypto.open_message(secret, sender, self.user, msg_id, ts, body)
        self.learn(sender, claimed)
        self._shared[claimed] = secret  # cached once pinned: junk claims must not grow the cache
        return plaintext

    def _secret(self, key: bytes) -> bytes:
        secret = self._shared.get(key)
        if secret is None:
            secret = self._shared[key] = self._exchange(key)
        return secret

    def _exchange(self, key: bytes) -> bytes:
        try:
            return self.identity.shared_secret(key)
        except ValueError:  # a low-order point: no usable shared secret
            raise crypto.IntegrityError("message claims an unusable sender key") from None


class NoSealing:
    """Sealing off (``ClientConfig.encrypt=False``, and the load tool, which measures the broker, not crypto):
    bodies travel as given, no peer key is asked for or pinned. Stateless, so one serves every session of a
    process; sessions using it register with their own ``key``."""

    enabled = False
    identity = None

    def key_of(self, user: str) -> bytes | None:
        return None

    def pinned_key(self, user: str) -> bytes | None:
        return None

    def pending_key(self, user: str) -> bytes | None:
        return None

    def learn(self, user: str, key: bytes) -> None:
        pass

    def accept(self, user: str) -> bool:
        return False

    def seal(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> bytes:
        return plaintext

    def open(self, sender: str, msg_id: bytes, ts: int, body: bytes) -> bytes:
        return body


NO_SEALING = NoSealing()
Sealing = EndToEnd | NoSealing  # what the cores take: sealing on, or off
