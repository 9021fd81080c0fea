"""Linking and unlinking devices (``p2pchat link``, ``devices``, ``unlink``; docs/PROTOCOL.md §10.2.1): the
shell that carries common/linking.py's messages through a link slot of the key service, and signs the
account key's proofs. Nothing here needs a broker session, so it works while the user's GUI is open.

Side A of a slot is the existing device E (it holds the phrase); side B the new device N. A0 is E's PAKE
message, B0 N's and B1 N's sealed key and name, A1 E's sealed verdict. N keeps nothing until E welcomed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pchat.broker.core.ports import Device, DeviceList
from p2pchat.client.broker_trust import KeyService, trusted_key_service
from p2pchat.client.chat_client import ClientConfig
from p2pchat.client.storage.account import save_account_key
from p2pchat.client.storage.phrase import PHRASE_FILE, save_phrase
from p2pchat.common.crypto import Identity, fingerprint
from p2pchat.common.errors import ErrorCode, P2PChatError, RemoteError
from p2pchat.common.linking import ExistingDevice, JoiningDevice, LinkCode, NewDevice, Welcome, WrongCode
from p2pchat.common.paths import ensure_private_dir, user_dir
from p2pchat.common.protocol import check_user_id
from p2pchat.common.recovery import PhraseError, RecoveryKey, normalise_phrase

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between looks at the slot while the other side is not there yet
REQUEST_TIMEOUT = 10.0  # seconds for one key service request


@dataclass(frozen=True, slots=True)
class Linking:
    """One user's linking, at one broker: where the user's state lives, the key service, the broker's key."""

    user: str
    state_dir: Path
    service: KeyService
    broker_key: bytes

    @classmethod
    def start(cls, user: str, config: ClientConfig, timeout: float) -> Linking:
        service, broker_key = trusted_key_service(config.server, config.key_port, config.server_key,
                                                  config.insecure, min(timeout, REQUEST_TIMEOUT))
        return cls(user, ensure_private_dir(config.state_dir or user_dir(check_user_id(user))), service, broker_key)

    def account(self, phrase: str | None = None) -> RecoveryKey:
        """The account key, from ``phrase`` or else the one stored here; PhraseError if there is none."""
        if phrase is None:
            try:
                phrase = (self.state_dir / PHRASE_FILE).read_text()
            except FileNotFoundError:
                raise PhraseError(f"this installation has no recovery phrase of {self.user}: use the device that "
                                  f"made {self.user} (or one linked with the phrase), or give the phrase with "
                                  "--recovery") from None
        return RecoveryKey.from_phrase(normalise_phrase(phrase), self.user)

    def new_identity(self) -> Identity:
        """A key for this new device, kept in memory until the link succeeded (a failed try leaves nothing)."""
        path = self.state_dir / "identity.key"
        if path.exists():
            raise P2PChatError(f"this installation has a key for {self.user} already ({path}): it is a device of "
                               f"{self.user}, or was; link from a fresh P2PCHAT_HOME (or recover {self.user} here)")
        return Identity.generate()

    def wait(self, slot: int, side: str, n: int, deadline: float) -> bytes:
        """Message ``n`` of ``side``, once the other device posted it."""
        while True:
            data = self.service.pake_get(slot, side, n)
            if data is not None:
                return data
            if time.monotonic() + POLL > deadline:
                raise P2PChatError("the other device did not answer in time; run link again", ErrorCode.TIMEOUT)
            time.sleep(POLL)


def offer_link(linking: Linking, timeout: float, show_code: Callable[[str, float], None]) -> NewDevice:
    """E: open a slot, show its code, and link the device that answers with it; returns that device.

    Raises PhraseError without a phrase here, WrongCode ("someone entered a wrong code") when the device that
    answered used another code, RemoteError when the broker refuses the link, P2PChatError(timeout).
    """
    account = linking.account()
    service = linking.service
    slot, ttl = service.pake_open()
    code = LinkCode.new(slot)
    existing = ExistingDevice(linking.user, code)
    service.pake_put(slot, "A", 0, existing.first)
    show_code(str(code), ttl)
    deadline = time.monotonic() + min(timeout, ttl)
    try:
        their_first = linking.wait(slot, "B", 0, deadline)
        device = existing.open_new_device(their_first, linking.wait(slot, "B", 1, deadline))
    except WrongCode:
        service.pake_close(slot)  # one guess per slot
        raise WrongCode("someone entered a wrong code; run link again") from None
    except P2PChatError:
        service.pake_close(slot)
        raise
    try:
        service.prove("LINK", linking.user, device.key, account, linking.broker_key, device.name)
    except RemoteError as exc:
        service.pake_put(slot, "A", 1, existing.refuse(exc.message))
        raise
    service.pake_put(slot, "A", 1, existing.welcome(account.public, linking.broker_key))
    log.warning("user=%s linked a device %s (%s) by code", linking.user, device.name, fingerprint(device.key))
    return device


def join_link(linking: Linking, code_text: str, name: str, timeout: float) -> Identity:
    """N: link this installation as a new device of the user with the code E shows; returns its new identity.

    Raises WrongCode (a wrong code, or someone else joined that slot first), LinkRefused (E could not link it),
    RemoteError, P2PChatError (a key here already; timeout).
    """
    code = LinkCode.parse(code_text)  # before anything is made or sent
    identity = linking.new_identity()
    service = linking.service
    deadline = time.monotonic() + timeout
    joining = JoiningDevice(linking.user, code)
    try:
        sealed = joining.join(linking.wait(code.slot, "A", 0, deadline), identity.public, name)
        service.pake_put(code.slot, "B", 0, joining.first)
        service.pake_put(code.slot, "B", 1, sealed)
        welcome = joining.open_verdict(linking.wait(code.slot, "A", 1, deadline))
    except RemoteError as exc:
        if exc.code is not ErrorCode.LINK_FAILED:
            raise
        raise WrongCode(f"wrong code ({exc.message})") from None
    except WrongCode:
        raise WrongCode("wrong code") from None
    service.pake_close(code.slot)
    _keep(linking, identity, welcome)
    return identity


def _keep(linking: Linking, identity: Identity, welcome: Welcome) -> None:
    if welcome.broker_key != linking.broker_key:  # E's proof names another broker: this one is not E's
        raise RemoteError(f"the other device links {linking.user} at a broker whose key is "
                          f"{fingerprint(welcome.broker_key)}, not this one's {fingerprint(linking.broker_key)}",
                          ErrorCode.BROKER_KEY_CHANGED)
    identity.save(linking.state_dir / "identity.key")
    save_account_key(linking.state_dir, welcome.account)
    log.warning("user=%s: this installation is now one of its devices (account key %s)", linking.user,
                fingerprint(welcome.account))


def link_with_phrase(linking: Linking, phrase: str, name: str) -> Identity:
    """N, with the phrase instead of a code: sign the link proof here; the phrase is kept like the first
    device keeps it. PhraseError for text that is no phrase (nothing sent), RemoteError if refused."""
    account = linking.account(phrase)
    identity = linking.new_identity()
    linking.service.prove("LINK", linking.user, identity.public, account, linking.broker_key, name)
    identity.save(linking.state_dir / "identity.key")
    save_phrase(linking.state_dir, phrase)
    return identity


def find_device(devices: DeviceList, which: str) -> Device:
    """The device numbered or named ``which``; P2PChatError if none is, or several are so named."""
    found = [d for d in devices.devices if (str(d.id) == which if which.isdigit() else d.name == which)]
    if len(found) != 1:
        listed = ", ".join(f"{d.id} ({d.name or 'unnamed'})" for d in devices.devices)
        raise P2PChatError(f"{'several devices are' if found else 'no device is'} {which!r}; the devices are "
                           f"{listed}: name one by its number")
    return found[0]


def unlink(linking: Linking, which: str, phrase: str | None) -> Device:
    """Remove the device numbered or named ``which`` with the account key's proof; returns it."""
    account = linking.account(phrase)
    device = find_device(linking.service.devices(linking.user), which)
    linking.service.prove("UNLINK", linking.user, device.key, account, linking.broker_key)
    log.warning("user=%s unlinked device %d (%s)", linking.user, device.id, fingerprint(device.key))
    return device
