"""What the client cores ask their shell to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.events import Event


@dataclass(frozen=True, slots=True)
class Transmit:
    frames: list[Any]  # bytes; a file chunk's payload may be a memoryview


@dataclass(frozen=True, slots=True)
class Emit:
    event: Event


Action = Transmit | Emit
