"""Devices and accounts in words, for the Verify panel and the Devices panel. No Tk here.

Our own devices come from the broker's key service (``KeyService.devices``: number, key, name); a peer's from
what this run checked against their account key (``ChatClient.devices_of``: number and key, no names).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from p2pchat.common.crypto import fingerprint


class ListedDevice(Protocol):
    id: int
    key: bytes
    name: str


def own_device_lines(devices: Iterable[ListedDevice], mine: bytes | None) -> str:
    """One line per device of ours: number, name, key fingerprint, and which one this is."""
    return "\n".join(f"{d.id:>2}  {(d.name or '(unnamed)')[:24]:<24}  {fingerprint(d.key)}"
                     + ("  · this device" if d.key == mine else "") for d in devices)


def unlink_choices(devices: Iterable[ListedDevice], mine: bytes | None) -> list[str]:
    """The devices that can be unlinked from here (all but this one), as the Unlink box offers them."""
    return [f"{d.id} · {d.name or 'unnamed'}" for d in devices if d.key != mine]


def chosen_device(choice: str) -> str:
    """The device number in an Unlink choice ("" if none was chosen)."""
    return choice.split(" · ", 1)[0].strip()


def peer_device_lines(devices: Iterable[tuple[int, bytes]]) -> str:
    """A peer's devices as checked against their account key, the primary first."""
    return "\n".join(f"device {number} · {fingerprint(key)}" for number, key in devices)


def safety_note(peer: str, per_account: bool) -> str:
    """What the number in the Verify panel stands for, and what comparing it means."""
    if per_account:
        return (f"One safety number for your account and {peer}'s: it stays the same when either of you links or "
                f"unlinks a device, and changes only if an account key changes. If you both see the same digits, "
                f"what you send can only be read by the devices {peer}'s account linked (listed above). The device "
                f"number is this device's and {peer}'s: compare it when one of you has a new key to accept.")
    return (f"This number is per device: it changes when either of you uses another device or gets a new key. "
            f"Compare it with {peer} in person or on a call; if you both see the same digits, what you send can "
            f"only be read by {peer}.")
