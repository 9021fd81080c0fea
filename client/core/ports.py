"""The narrow ports through which the client cores reach storage; the shell implements them.

The cores read no clock and open no file: what they must persist or read goes through these
interfaces, handed in by the shell (``client.storage``: SQLite, files in the user's directory),
by tests, or by the load tool (synthetic files, nothing persisted). Each method is one step the
core needs, never a general file system.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


# --- the session's conversations (storage.history.History) ---------------------------------------
class OutboxEntry(Protocol):
    msg_id: bytes
    peer: str
    text: str
    ts: int


class Conversations(Protocol):
    """Messages in and out. Writes join the shell's open batch; the shell commits it before it carries out
    the actions that depend on it (``ClientSession.history_saved``)."""

    def outbox(self) -> Iterable[OutboxEntry]: ...

    def add_outgoing(self, msg_id: bytes, peer: str, text: str, ts: int) -> None: ...

    def add_incoming(self, msg_id: bytes, peer: str, text: str, ts: int) -> bool:
        """False if this message was received before (a redelivery)."""

    def advance(self, msg_id: bytes, state: str) -> bool:
        """Move an outgoing message forward to ``state``; False if it was already there or beyond."""

    def fail(self, msg_id: bytes) -> None: ...

    def mark_read(self, peer: str) -> list[bytes]:
        """Mark ``peer``'s received messages read; their ids."""


# --- the transfers' files (storage.transfers.LocalFiles) ------------------------------------------
@dataclass(frozen=True, slots=True)
class Folder:
    """A folder sent as one stream (docs/PROTOCOL.md §8.3), as the sender's walk found it."""

    digest: bytes  # SHA-256 of the stream's manifest part: a resumed sending checks the folder is still this
    files: int  # regular files in it
    skipped: tuple[str, ...] = ()  # what was not sent: symlinks, devices, FIFOs, sockets (relative paths)
    walk: object | None = field(default=None, compare=False)  # the shell's own (None after a restart: walked again)


@dataclass(frozen=True, slots=True)
class Source:
    """A file to send as it was when offered: a read finds it changed if any of these differ. A folder: its
    stream's size, the folder's own mtime and inode (the files' are checked as they are read), and ``folder``."""

    path: Path  # resolved
    size: int
    mtime_ns: int
    inode: int
    folder: Folder | None = None

    def same(self, other: Source) -> bool:
        """The same file as it was (path, size, mtime), or the same folder with the same contents (its digest)."""
        def key(s: Source) -> tuple:
            return s.path, s.size, s.mtime_ns, s.folder.digest if s.folder else None
        return key(self) == key(other)


@dataclass(frozen=True, slots=True)
class Extracted:
    """A received folder, made from its verified stream."""

    path: Path
    files: int
    content_bytes: int  # of its files together (the stream has the manifest besides)


class SourceFile(Protocol):
    """A file being sent, opened on its first read."""

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; TransferError (source_changed) if the file changed, went or
        cannot be read."""

    def close(self) -> None: ...


class Extraction(Protocol):
    """A received folder being made from its verified stream (storage.folders.FolderExtraction)."""

    def step(self) -> Extracted | None:
        """Make a bounded part of it (a few tens of milliseconds of work); the folder once it is whole.
        TransferError for a manifest refused or a file that fails its check (what was made is removed)."""

    def abort(self) -> None:
        """Stop, and remove what was made (the ``.part`` stays). Idempotent."""


class PartWriter(Protocol):
    """A transfer's ``.part`` file, whole chunks appended in order (storage.partfile.PartFile)."""

    @property
    def size(self) -> int: ...

    @property
    def pending(self) -> int:
        """Chunks appended but not yet on disk."""

    def buffer(self, size: int) -> memoryview: ...

    def append(self, size: int) -> None: ...

    def finish(self) -> None:
        """Everything on disk and synced; closes the file."""

    def close(self) -> None: ...


class TransferFiles(Protocol):
    """The files a transfer reads and writes. OSError from any of them fails the transfer concerned."""

    def inspect(self, path: Path) -> Source:
        """The regular file or the folder at ``path`` (a folder walked and its files hashed: its manifest is the
        stream's start); TransferError if it is missing, unreadable, or neither."""

    def open_source(self, source: Source) -> SourceFile: ...

    def free_space(self, directory: Path) -> int:
        """Bytes free in ``directory``, made first if missing."""

    def create_part(self, path: Path, chunk_size: int) -> PartWriter: ...

    def resume_part(self, path: Path, chunk_size: int) -> PartWriter:
        """Reopen a ``.part`` file cut back to its last whole chunk."""

    def read_part(self, path: Path) -> Iterator[bytes]: ...

    def publish(self, part: Path, directory: Path, name: str) -> Path:
        """Give a finished ``.part`` its final name in ``directory``, never overwriting one; the path."""

    def extract_folder(self, part: Path, directory: Path, name: str) -> Extraction:
        """Begin making the folder a finished ``.part`` holds a stream of, in ``directory`` under ``name`` (never
        over anything), every path neutralised and every file's SHA-256 checked; the ``.part`` is deleted once it
        is made. TransferError if its manifest's header or the free space refuses it at once."""

    def remove(self, path: Path) -> None:
        """Delete if present; never raises."""


# --- what the transfers remember across restarts (storage.transfers.RecordDir) -------------------------
class TransferRecords(Protocol):
    """Unfinished transfers by direction ("outgoing", "incoming"), finished ones, refused or failed ids.
    Failures to write are logged by the shell: the transfer goes on, it only cannot resume."""

    def records(self, direction: str) -> list[dict]: ...

    def save(self, direction: str, xfer: bytes, record: dict) -> None: ...

    def forget(self, direction: str, xfer: bytes) -> None: ...

    def mark_done(self, xfer: bytes) -> None: ...

    def is_done(self, xfer: bytes) -> bool: ...

    def failed_ids(self) -> list[bytes]:
        """Refused or failed incoming ids of earlier runs, oldest first."""

    def add_failed(self, xfer: bytes, kept: Collection[bytes]) -> None:
        """Remember ``xfer`` as failed; ``kept`` is every id still remembered (for compaction)."""

    def prune(self, cutoff: float) -> None:
        """Forget unfinished transfers (and their ``.part``) and done marks untouched since ``cutoff``
        (wall-clock seconds)."""


class NoRecords:
    """Nothing remembered: no resume after a restart (load clients, tests)."""

    __slots__ = ()

    def records(self, direction: str) -> list[dict]:
        return []

    def save(self, direction: str, xfer: bytes, record: dict) -> None:
        pass

    def forget(self, direction: str, xfer: bytes) -> None:
        pass

    def mark_done(self, xfer: bytes) -> None:
        pass

    def is_done(self, xfer: bytes) -> bool:
        return False

    def failed_ids(self) -> list[bytes]:
        return []

    def add_failed(self, xfer: bytes, kept: Collection[bytes]) -> None:
        pass

    def prune(self, cutoff: float) -> None:
        pass


NO_RECORDS = NoRecords()
