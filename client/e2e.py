"""End-to-end sealing for one user: pinned peer keys, cached shared secrets, seal and open.

Peer keys are pinned on first contact (from the broker's KEY_INFO or a sealed
message). A different key later is never used silently: it is parked as
*pending* and sending to that peer is blocked until the user accepts it.

Several devices per user (docs/PROTOCOL.md §5.6): the pinned key is the user's primary device's; the
others come from the broker's ``devices`` and are used only if the user's account key (pinned on first
sight, like a device key) signed their link. A message is then sealed once per device.

No I/O of its own: the pinned and pending keys live behind ``PeerKeys`` (the shell passes key files,
tests and load clients memory), and the randomness of new file keys comes from ``random_bytes``.
Sealing a message is deterministic (its key derives from the message id), so with fixed identities
and a fixed ``random_bytes`` a whole session seals to the same bytes every time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from p2pchat.common import crypto
from p2pchat.common.errors import ErrorCode, P2PChatError
from p2pchat.common.protocol import Devices
from p2pchat.common.recovery import LINK_LABEL, verify_recovery


# Where the accounts store pins the key of our own first device, which carries no link proof: a name that is no
# user ID (they have no '/'), so it never stands for a peer.
OWN_FIRST_DEVICE = "/first-device"


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


class UnknownDevice(P2PChatError):
    """A body sealed by a key that is not among its sender's devices as last fetched: fetch them, then decide."""

    default_code = ErrorCode.DEVICES_CHANGED

    def __init__(self, user: str) -> None:
        super().__init__(f"{user} wrote from a device not in their device list: fetching it")
        self.user = user


class DeviceListRefused(P2PChatError):
    """A device list with a device its account key did not sign: the broker may be adding a device. Nothing is
    sealed to that user until the list is one we can check."""

    default_code = ErrorCode.INTEGRITY


@dataclass(frozen=True, slots=True)
class DeviceSet:
    """A user's devices as verified: ``(number, key)`` in ascending number, the primary first."""

    ver: int
    devices: tuple[tuple[int, bytes], ...]

    def has(self, key: bytes) -> bool:
        return any(k == key for _, k in self.devices)


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
                 random_bytes: Callable[[int], bytes] = os.urandom, accounts: PeerKeys | None = None,
                 broker_key: bytes | None = None) -> None:
        self.user = user
        self.identity = identity
        self._random_bytes = random_bytes
        self._pinned = pinned
        self._pending = pending  # changed keys awaiting the user's decision, kept across restarts
        self._shared: dict[bytes, bytes] = {}
        self._accounts = accounts if accounts is not None else MemoryKeys()  # account keys, pinned on first sight
        self.broker_key = broker_key  # link proofs name it; None (no CURVE): the broker is not authenticated anyway
        self.device_aware = False  # the broker granted CAPS_DEVICES: seal per device (the session sets it)
        self._devices: dict[str, DeviceSet] = {}  # this run's verified lists, fetched when first needed

    def key_of(self, user: str) -> bytes | None:
        """The pinned key, or None if we must ask the broker; raises while a change is unaccepted."""
        if user == self.user:
            return self.identity.public  # a note to ourselves
        pending = self._pending.get(user)
        if pending is not None:
            raise PeerKeyChanged(user, self._pinned.get(user) or b"", pending)
        return self._pinned.get(user)

    def pinned_key(self, user: str) -> bytes | None:
        return self._pinned.get(user)

    def pending_key(self, user: str) -> bytes | None:
        return self._pending.get(user)

    def learn(self, user: str, key: bytes) -> None:
        """A key for ``user`` (from the broker or a message): pin it, or raise PeerKeyChanged. One of their
        verified devices' keys is no change."""
        pinned = self._pinned.get(user)
        if pinned is None:
            self._pinned.put(user, key)
        elif pinned != key and not self._known_device(user, key):
            if self._pending.get(user) != key:
                self._pending.put(user, key)
            raise PeerKeyChanged(user, pinned, key)

    def accept(self, user: str) -> bool:
        """The user accepts ``user``'s new key: pinned, and their account key pinned afresh with the next list
        (a reinstall without the phrase brings a new one; the user has just accepted that change)."""
        if not accept_pending(self._pinned, self._pending, user):
            return False
        self._devices.pop(user, None)
        self._accounts.delete(user)
        return True

    # --- devices ----------------------------------------------------------------------------------
    def devices_of(self, user: str) -> DeviceSet | None:
        return self._devices.get(user)

    def forget_devices(self, user: str | None = None) -> None:
        """The broker says a list changed (``user``'s, or some): fetch it again when next needed."""
        if user is None:
            self._devices.clear()
        else:
            self._devices.pop(user, None)

    def set_devices(self, msg: Devices) -> None:
        """The broker's list of ``msg.user``'s devices. Every device but the primary must carry a link proof by the
        user's account key (pinned on first sight); the primary must be the pinned key, or a device the account
        key linked (the first device was unlinked). Raises DeviceListRefused, or PeerKeyChanged (the primary is a
        new key: reinstalled, recovered or moved; the list is fetched again once the user accepted it)."""
        user = msg.user
        pinned_account = self._accounts.get(user)
        account = pinned_account or msg.account
        proofs = {dev: (gen, sig) for dev, gen, sig in msg.proofs or ()}
        primary_key = msg.devices[0][1]
        checked = [(dev, key) for dev, key, _, _ in msg.devices[1:] if self._linked(user, account, proofs.get(dev), key)]
        if len(checked) != len(msg.devices) - 1:
            raise DeviceListRefused(f"{user}'s device list has a device their account key did not link: not sealing "
                                    "to them (the broker may be adding a device)")
        if msg.account is not None and pinned_account is None:
            self._accounts.put(user, msg.account)
        entries = DeviceSet(msg.ver, ((msg.devices[0][0], primary_key), *checked))
        if user == self.user:
            self._check_own(msg, account, proofs)
        pinned = self._pinned.get(user)
        if user != self.user and pinned != primary_key:  # our own devices are never pinned as a peer's
            if pinned is not None and self._linked(user, account, proofs.get(msg.devices[0][0]), primary_key):
                self._pinned.put(user, primary_key)  # their first device left; the next one is theirs as well
            else:
                self._devices.pop(user, None)
                self.learn(user, primary_key)  # pins a first key; a new one is a change for the user to accept
        self._devices[user] = entries

    def _check_own(self, msg: Devices, account: bytes | None, proofs: dict[int, tuple[int, bytes]]) -> None:
        """Our own list carries this device, and a first device that no link proof covers (it has none) is the
        one we saw first: else the broker would get our echoes sealed to a key of its choosing."""
        own = self.identity.public
        if not any(key == own for _, key, _, _ in msg.devices):
            raise DeviceListRefused(f"the broker's list of {self.user}'s devices lacks this device: not using it")
        first, key = msg.devices[0][0], msg.devices[0][1]
        if key == own or self._linked(self.user, account, proofs.get(first), key):
            return
        seen = self._accounts.get(self.user + OWN_FIRST_DEVICE)
        if seen is None:
            self._accounts.put(self.user + OWN_FIRST_DEVICE, key)
        elif seen != key:
            raise DeviceListRefused(f"the broker's list of {self.user}'s devices has another key for the first "
                                    f"device ({crypto.fingerprint(key)}, was {crypto.fingerprint(seen)}): not using it")

    def _linked(self, user: str, account: bytes | None, proof: tuple[int, bytes] | None, key: bytes) -> bool:
        """``key`` carries a link proof by ``user``'s account key (checked when we know the broker's key, which the
        proof names; without CURVE nothing is authenticated, but a device without any proof is still no link)."""
        if proof is None:
            return False
        if self.broker_key is None:
            return True
        return account is not None and verify_recovery(
            account, proof[1], self.broker_key, user, proof[0], key, LINK_LABEL)

    def _known_device(self, user: str, key: bytes) -> bool:
        devices = self._devices.get(user)
        return devices is not None and devices.has(key)

    def seal_copies(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes
                    ) -> tuple[bytes, tuple | None, tuple | None] | str:
        """``plaintext`` for ``recipient``: ``(body, None, None)`` for one device on each side, else ``(b"", copies,
        echo)``, a body per device of theirs and per other device of ours; or the user whose list is missing."""
        sealed = self.seal_each(recipient, msg_id, ts, plaintext)
        if type(sealed) is str or not self.device_aware:
            return sealed if type(sealed) is str else (*sealed, None)
        ours = self._devices.get(self.user)
        if ours is None:
            return self.user
        own = self.identity.public
        echo = tuple((dev, self.seal_to(key, recipient, msg_id, ts, plaintext)) for dev, key in ours.devices
                     if key != own)
        if not echo:
            return (*sealed, None)
        body, copies = sealed
        if copies is None:  # their one device, and ours to echo to: in the per-device form
            copies = ((self._devices[recipient].devices[0][0], body),)
        return b"", copies, echo

    def seal_each(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes
                  ) -> tuple[bytes, tuple | None] | str:
        """``(body, None)`` for a recipient with one device, else ``(b"", copies)``, one body per device; or the
        recipient, whose list is missing."""
        if not self.device_aware:
            return self.seal(recipient, msg_id, ts, plaintext), None
        theirs = self._devices.get(recipient)
        if theirs is None:
            return recipient
        if len(theirs.devices) == 1:
            return self.seal(recipient, msg_id, ts, plaintext), None
        return b"", tuple((dev, self.seal_to(key, recipient, msg_id, ts, plaintext)) for dev, key in theirs.devices)

    def seal_to(self, key: bytes, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> bytes:
        """Sealed to the device with ``key``; ``recipient`` is the frame's (ours for an echo to our own device)."""
        return crypto.seal_message(self.identity, self._secret(key), self.user, recipient, msg_id, ts, plaintext)

    def new_file_key(self) -> bytes:
        """A fresh key for one sending session of a file (never a (key, nonce) pair twice)."""
        return self._random_bytes(crypto.KEY_BYTES)

    def seal(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> bytes:
        key = self.key_of(recipient)
        assert key is not None, "the session fetches the key before sealing"
        return crypto.seal_message(self.identity, self._secret(key), self.user, recipient, msg_id, ts,
                                   plaintext)

    def open(self, sender: str, msg_id: bytes, ts: int, body: bytes, recipient: str | None = None,
             refetched: bool = False) -> bytes:
        """``recipient``: the frame's, if not us (an echo of what our other device sent). A sender's device not in
        their list raises UnknownDevice unless ``refetched`` (the list was fetched after the body came)."""
        claimed = crypto.sealed_sender_key(body)
        # Authenticate first: a forged body must neither pin a key nor raise a key-change prompt.
        secret = self._shared.get(claimed) or self._exchange(claimed)
        plaintext = crypto.open_message(secret, sender, recipient or self.user, msg_id, ts, body)
        if self.device_aware and not refetched and claimed != self._pinned.get(sender) and not self._known_device(
                sender, claimed):
            raise UnknownDevice(sender)
        if sender == self.user:  # an echo: from one of our own devices, never pinned as a peer
            if not self._known_device(sender, claimed):
                raise crypto.IntegrityError("an echo from a device that is not one of ours")
            return plaintext
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

    def seal_copies(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> tuple[bytes, None, None]:
        return plaintext, None, None

    def seal_each(self, recipient: str, msg_id: bytes, ts: int, plaintext: bytes) -> tuple[bytes, None]:
        return plaintext, None

    def open(self, sender: str, msg_id: bytes, ts: int, body: bytes, recipient: str | None = None,
             refetched: bool = False) -> bytes:
        return body

    def devices_of(self, user: str) -> None:
        return None

    def forget_devices(self, user: str | None = None) -> None:
        pass


NO_SEALING = NoSealing()
Sealing = EndToEnd | NoSealing  # what the cores take: sealing on, or off
