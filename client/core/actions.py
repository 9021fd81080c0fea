"""What the client cores ask their shell to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pchat.client.events import Event


@dataclass(frozen=True, slots=True)
class Transmit:
    frames: list[Any]  # bytes, never changed once handed over (the shell may send them without copying)
    urgent: bool = False  # flow control: send at once, without waiting for the rest of the shell's batch


@dataclass(frozen=True, slots=True)
class Emit:
    event: Event


Action = Transmit | Emit
