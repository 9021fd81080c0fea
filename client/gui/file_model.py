"""Files in the timeline, as plain data: a ``FileLine`` per transfer, its states, and the words a card shows.

No Tk here (like model.py, whose ``ChatModel`` takes the ``FileTimeline`` methods): a file goes one way between two
people, to someone offline through the broker (uploaded, then delivered), or to a room (uploaded once; each member
fetches it). A folder is one transfer and one line.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from p2pchat.client.gui.units import human_eta, human_size
from p2pchat.common.errors import ErrorCode, P2PChatError

if TYPE_CHECKING:
    from p2pchat.client.gui.model import Conversation, Key


class Transfer(enum.Enum):
    """A file in the timeline. DONE, FAILED, CANCELLED and TAKEN are final: a late event changes nothing."""

    OFFERING = "offering"  # ours: waiting for the receiver to take it (or, held or a room's, to start uploading)
    ACTIVE = "active"  # bytes moving, either way
    PAUSED = "paused"  # we disconnected: the library resumes it on the next connect
    UPLOADED = "uploaded"  # ours, for someone offline: the broker holds it until they fetch it (we may go)
    DONE = "done"  # verified and saved by the receiver (a room's: the room was told)
    FAILED = "failed"
    CANCELLED = "cancelled"
    TAKEN = "taken"  # offered to all our devices; another of ours took it (no error: it is there)


FINAL = frozenset({Transfer.DONE, Transfer.FAILED, Transfer.CANCELLED, Transfer.TAKEN})
WAITING = frozenset({Transfer.UPLOADED})  # not final, yet nothing moves here: no progress, nothing to pause


@dataclass(slots=True)
class FileLine:
    """A file message: one per transfer, in the conversation with the peer (or the room), whichever way it goes."""

    xfer: bytes
    peer: str  # the other side; in a room, the member who sent it (ourselves for ours)
    outgoing: bool
    name: str
    size: int
    ts_ms: int
    state: Transfer
    done: int = 0  # bytes the receiver has verified
    rate: float = 0.0  # bytes/s
    eta: float | None = None  # seconds
    path: Path | None = None  # where a received file (or folder) was saved
    failure: str = ""
    cancel_asked: bool = False  # we pressed Cancel: the CANCELLED that follows is ours, not the peer's
    room: bytes | None = None
    held: bool = False  # ours, left at the broker for someone offline (docs/PROTOCOL.md §8.2)
    folder: bool = False
    files: int | None = None  # a received folder's file count, when the library says
    thumbnail: bytes | None = None  # a received image's, as PNG (made off the Tk thread)

    @property
    def key(self) -> Key:
        return self.peer if self.room is None else self.room

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @property
    def fraction(self) -> float:
        if self.state in (Transfer.DONE, Transfer.UPLOADED):
            return 1.0
        return min(1.0, self.done / self.size) if self.size > 0 else 0.0

    @property
    def uploads(self) -> bool:
        """Ours, and going to the broker's store (a room's, or held for someone offline), not to a peer."""
        return self.outgoing and (self.held or self.room is not None)


def describe_transfer_failure(error: P2PChatError, line: FileLine) -> str:
    """Why a transfer stopped, from this side's point of view."""
    if error.code is ErrorCode.CANCELLED:
        return "Cancelled" if line.cancel_asked else f"Cancelled by {line.peer}"
    friendly = {
        ErrorCode.RECIPIENT_OFFLINE: f"{line.peer} is offline",
        ErrorCode.UNKNOWN_RECIPIENT: f"{line.peer} is not on this broker",
        ErrorCode.PEER_KEY_CHANGED: f"{line.peer}'s key changed; accept the new key first",
        ErrorCode.CLOSED: "disconnected before it finished",
        ErrorCode.BROKER_UNREACHABLE: "the connection to the broker was lost",
        ErrorCode.SOURCE_CHANGED: error.message,
        ErrorCode.TAKEN: "taken by another of your devices",
    }
    return friendly.get(error.code, error.message)


def transfer_status(line: FileLine) -> str:
    """The one line under a file's name: direction, progress, rate and time left, or how it ended."""
    if line.state is Transfer.OFFERING:
        return "Uploading…" if line.uploads else f"Waiting for {line.peer} to accept…"
    if line.state is Transfer.ACTIVE:
        verb = "Uploading" if line.uploads else "Sending" if line.outgoing else "Receiving"
        parts = [f"{verb} {round(line.fraction * 100)}%",
                 f"{human_size(line.done)} of {human_size(line.size)}"]
        if line.rate > 0:
            parts.append(f"{human_size(line.rate)}/s")
        if line.eta is not None and line.done < line.size:
            parts.append(human_eta(line.eta))
        return " · ".join(parts)
    if line.state is Transfer.PAUSED:
        return f"Paused at {round(line.fraction * 100)}% · resumes when you reconnect"
    if line.state is Transfer.UPLOADED:
        return f"Uploaded — waiting for {line.peer} · you can go offline"  # the broker keeps it for them
    if line.state is Transfer.DONE:
        if line.room is not None and line.outgoing:
            return "Sent ✓ · the room's members fetch it from the broker"
        if line.outgoing:
            return f"Delivered ✓ · {line.peer} verified and saved it" if line.held \
                else f"Sent ✓ · {line.peer} verified and saved it"
        if line.folder:
            count = f"{line.files} file{'' if line.files == 1 else 's'}, " if line.files is not None else ""
            return f"Received ✓ · folder, {count}verified and saved"
        return "Received ✓ · verified and saved"
    if line.state is Transfer.CANCELLED:
        return line.failure or "Cancelled"
    if line.state is Transfer.TAKEN:
        return "Taken by another of your devices"
    return f"Failed: {line.failure}" if line.failure else "Failed"


class FileTimeline:
    """``ChatModel``'s files (a mixin: the model holds ``_files``, ``active`` and the conversations)."""

    _files: dict[bytes, FileLine]
    active: Key | None
    conversation: Callable[[Key], Conversation]

    def file_sending(self, xfer: bytes, peer: str, name: str, size: int, ts_ms: int, room: bytes | None = None,
                     held: bool = False, folder: bool = False) -> FileLine:
        """Ours, offered: to ``peer``, left at the broker for them (``held``), or to ``room`` (``peer`` = us)."""
        return self._add_file(FileLine(xfer, peer, True, name, size, ts_ms, Transfer.OFFERING, room=room, held=held,
                                       folder=folder))

    def file_refused(self, peer: str, name: str, ts_ms: int, reason: str, room: bytes | None = None,
                     folder: bool = False) -> FileLine:
        """A file the client library refused before offering it (unreadable, not a file, ...)."""
        line = FileLine(os.urandom(8), peer, True, name, 0, ts_ms, Transfer.FAILED, failure=reason, room=room,
                        folder=folder)
        return self._add_file(line)

    def file_incoming(self, xfer: bytes, sender: str, name: str, size: int, ts_ms: int,
                      room: bytes | None = None) -> tuple[FileLine, bool]:
        """(line, is_new): an offer repeated after a reconnect is the same file, not another unread one."""
        line = self._files.get(xfer)
        if line is not None:
            if line.state is Transfer.PAUSED:
                line.state = Transfer.ACTIVE
            return line, False
        line = self._add_file(FileLine(xfer, sender, False, name, size, ts_ms, Transfer.ACTIVE, room=room))
        if line.key != self.active:
            self.conversation(line.key).unread += 1
        return line, True

    def file_progress(self, xfer: bytes, peer: str, name: str, outgoing: bool, done: int, size: int,
                      rate: float, eta: float | None, ts_ms: int,
                      room: bytes | None = None) -> tuple[FileLine, bool] | None:
        """(line, is_new), or None once final (or held at the broker). A transfer resumed after a restart starts
        with progress."""
        line = self._files.get(xfer)
        is_new = line is None
        if line is None:
            line = self._add_file(FileLine(xfer, peer, outgoing, name, size, ts_ms, Transfer.ACTIVE, room=room))
        elif line.finished or line.state in WAITING:
            return None
        line.state, line.done, line.size, line.rate, line.eta = Transfer.ACTIVE, done, size, rate, eta
        return line, is_new

    def file_received(self, xfer: bytes, sender: str, name: str, path: Path, size: int, ts_ms: int,
                      room: bytes | None = None, folder: bool = False, files: int | None = None) -> FileLine:
        line = self._files.get(xfer) or self._add_file(FileLine(xfer, sender, False, name, size, ts_ms,
                                                                Transfer.ACTIVE, room=room))
        if not line.finished:
            line.state, line.done, line.size, line.path, line.eta = Transfer.DONE, size, size, path, None
            line.folder, line.files = folder, files
        return line

    def file_uploaded(self, xfer: bytes) -> FileLine | None:
        """The broker holds our file for its offline recipient; the line if that is news."""
        line = self._files.get(xfer)
        if line is None or line.finished or line.state is Transfer.UPLOADED:
            return None
        line.state, line.held, line.done, line.rate, line.eta = Transfer.UPLOADED, True, line.size, 0.0, None
        return line

    def file_sent(self, xfer: bytes) -> FileLine | None:
        line = self._files.get(xfer)
        if line is None or line.finished:
            return None
        line.state, line.done, line.eta = Transfer.DONE, line.size, None
        return line

    def file_failed(self, xfer: bytes, error: P2PChatError) -> FileLine | None:
        line = self._files.get(xfer)
        if line is None or line.finished:
            return None
        line.state = {ErrorCode.CANCELLED: Transfer.CANCELLED, ErrorCode.TAKEN: Transfer.TAKEN}.get(
            error.code, Transfer.FAILED)
        line.failure, line.eta = describe_transfer_failure(error, line), None
        return line

    def pause_transfers(self) -> list[FileLine]:
        paused = self.active_transfers()
        for line in paused:
            line.state, line.rate, line.eta = Transfer.PAUSED, 0.0, None
        return paused

    def file(self, xfer: bytes) -> FileLine | None:
        return self._files.get(xfer)

    def active_transfers(self) -> list[FileLine]:
        """Transfers under way here (a file the broker holds for someone is not: it waits for them)."""
        return [line for line in self._files.values() if not line.finished and line.state not in WAITING]

    def _add_file(self, line: FileLine) -> FileLine:
        self.conversation(line.key).lines.append(line)
        self._files[line.xfer] = line
        return line
