"""Folders sent as one stream (docs/PROTOCOL.md §8.3), on the local disk: the sender's walk and reads, the
receiver's extraction. What a manifest may say and where its entries may go is ``core.manifest``.

The sender walks the folder once before the offer (symlinks are never followed: they, devices, FIFOs and
sockets are skipped and named in one log line), hashing each file, and then reads the stream through
``FolderStream``, one file open at a time, each checked unchanged as it is read.

The receiver extracts a verified stream into a hidden staging folder it makes beside the target, a bounded step
at a time: every file is created anew under it (``O_CREAT | O_EXCL | O_NOFOLLOW``, never over anything), checked
against its SHA-256 as it is written, the file system synced once, and then the staging folder renamed to its
final name.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from p2pchat.client.core.manifest import (
    DIRECTORY,
    FILE,
    LENGTH_BYTES,
    MAX_ENTRIES,
    MAX_MANIFEST_BYTES,
    MAX_PATH_BYTES,
    Entry,
    Manifest,
    ManifestError,
    ManifestReader,
    Placer,
    locate,
    safe_mode,
)
from p2pchat.client.core.ports import Extracted, Folder, Source
from p2pchat.client.storage.filenames import publish_atomically
from p2pchat.common.errors import ErrorCode, TransferError

log = logging.getLogger(__name__)

BLOCK = 1 << 20
# A step of an extraction: a few tens of milliseconds on a slow disk (a file made costs up to 0.4 ms here), so a
# folder of 100,000 files never holds the client's loop for a heartbeat.
STEP_ENTRIES = 128
STEP_BYTES = 16 << 20
SKIPPED_NAMED = 10  # skipped entries named in the log line (the rest counted)
STAGING_SUFFIX = ".tree"  # the staging folder: the ``.part``'s name with this instead (as long: fits NAME_MAX)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)  # Linux: sync one file system, not all


@dataclass(frozen=True, slots=True, eq=False)
class FolderWalk:
    """A folder as the sender found it: the stream's header and, for each entry, where it is and what it was."""

    root: Path
    manifest: Manifest
    header: bytes
    # Per entry: a file's path under ``root`` as the disk has it (the manifest's may differ: not UTF-8), size,
    # mtime_ns and inode; None for a directory.
    files: tuple[tuple[str, int, int, int] | None, ...]
    skipped: tuple[str, ...]

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.header).digest()

    def folder(self) -> Folder:
        return Folder(self.digest, self.manifest.files, self.skipped, self)


def walk_folder(root: Path) -> FolderWalk:
    """Walk ``root`` (not following symlinks), hashing each regular file: the manifest and what to check later.
    TransferError if a file or directory cannot be read, or the folder is over a receiver's bounds."""
    entries: list[Entry] = []
    files: list[tuple[str, int, int, int] | None] = []
    skipped: list[str] = []
    stack = [(_listing(root), "")]
    while stack:
        listing, parent = stack[-1]
        if not listing:
            stack.pop()
            continue
        item = listing.pop()
        rel = f"{parent}/{item.name}" if parent else item.name
        wire = _wire_path(rel)
        try:
            st = item.stat(follow_symlinks=False)
        except OSError as exc:
            raise TransferError(f"cannot read {item.path}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(wire, DIRECTORY, 0, stat.S_IMODE(st.st_mode), b""))
            files.append(None)
            stack.append((_listing(Path(item.path)), rel))
        elif stat.S_ISREG(st.st_mode):
            size, mtime_ns, inode, digest = _hash(Path(item.path))
            entries.append(Entry(wire, FILE, size, stat.S_IMODE(st.st_mode), digest))
            files.append((rel, size, mtime_ns, inode))
        else:
            skipped.append(wire)
        if len(entries) > MAX_ENTRIES:
            raise TransferError(f"{root} holds over {MAX_ENTRIES} files and folders: too many for one transfer",
                                ErrorCode.TOO_LARGE)
        if len(wire.encode("utf-8")) > MAX_PATH_BYTES:
            raise TransferError(f"{item.path}: a path over {MAX_PATH_BYTES} bytes", ErrorCode.TOO_LARGE)
    if skipped:
        named = ", ".join(skipped[:SKIPPED_NAMED]) + (f" and {len(skipped) - SKIPPED_NAMED} more"
                                                        if len(skipped) > SKIPPED_NAMED else "")
        log.warning("sending %s without %d entries that are neither files nor folders (symlinks, devices, FIFOs, "
                    "sockets): %s", root, len(skipped), named)
    manifest = Manifest(tuple(entries))
    header = manifest.header()
    return FolderWalk(root, Manifest(manifest.entries, len(header)), header, tuple(files), tuple(skipped))


def _listing(directory: Path) -> list[os.DirEntry]:
    """A directory's entries, last name first (popped in name order); the directory is closed at once."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda d: d.name, reverse=True)
    except OSError as exc:
        raise TransferError(f"cannot read {directory}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None


def _wire_path(rel: str) -> str:
    """A relative path as the manifest says it: a name that is not UTF-8 gets U+FFFD where its bytes were not."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _hash(path: Path) -> tuple[int, int, int, bytes]:
    """(size, mtime_ns, inode, SHA-256) of a regular file, read once; TransferError if it changed meanwhile."""
    try:
        fd = os.open(path, _READ)
        try:
            before = os.fstat(fd)
            hasher = hashlib.sha256()
            while block := os.read(fd, BLOCK):
                hasher.update(block)
            after = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
    if _identity(before) != _identity(after) or not stat.S_ISREG(after.st_mode):
        raise TransferError(f"{path} changed while being read", ErrorCode.SOURCE_CHANGED)
    return after.st_size, after.st_mtime_ns, after.st_ino, hasher.digest()


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class FolderStream:
    """``SourceFile`` over a folder's stream: its header, then its files' bytes, one file open at a time, each
    checked unchanged (size, mtime, inode) at every read. After a restart the folder is walked again first, and
    must give the very manifest the transfer began with."""

    __slots__ = ("_source", "_walk", "_starts", "_indexes", "_fd", "_open")

    def __init__(self, source: Source) -> None:
        assert source.folder is not None
        self._source = source
        self._walk: FolderWalk | None = source.folder.walk  # type: ignore[assignment]
        self._starts: list[int] = []
        self._indexes: list[int] = []
        self._fd = -1
        self._open = -1  # the entry whose file ``_fd`` is

    def read(self, offset: int, length: int) -> bytes:
        walk = self._walked()
        end = min(offset + length, self._source.size)
        parts = []
        if offset < len(walk.header):
            parts.append(walk.header[offset:end])
            offset = min(end, len(walk.header))
        while offset < end:
            k = locate(self._starts, offset)
            index, start = self._indexes[k], self._starts[k]
            entry = walk.manifest.entries[index]
            n = min(end, start + entry.size) - offset
            data = self._pread(walk, index, n, offset - start)
            parts.append(data)
            offset += n
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd, self._open = -1, -1

    def _walked(self) -> FolderWalk:
        walk = self._walk
        if walk is None or not self._starts:
            if walk is None:
                log.info("walking %s again to resume sending it", self._source.path)
                walk = walk_folder(self._source.path)
            if walk.digest != self._source.folder.digest or walk.manifest.stream_size != self._source.size:
                raise TransferError(f"{self._source.path.name} changed since the transfer began",
                                    ErrorCode.SOURCE_CHANGED)
            self._walk = walk
            self._starts, self._indexes = walk.manifest.file_starts()
        return walk

    def _pread(self, walk: FolderWalk, index: int, n: int, at: int) -> bytes:
        rel, *identity = walk.files[index]
        path = walk.root / rel
        try:
            if self._open != index:
                self.close()
                self._fd, self._open = os.open(path, _READ), index
            if list(_identity(os.fstat(self._fd))) != identity:
                raise TransferError(f"{path} changed while being sent", ErrorCode.SOURCE_CHANGED)
            data = os.pread(self._fd, n, at)
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
        if len(data) != n:
            raise TransferError(f"{path} shrank while being sent", ErrorCode.SOURCE_CHANGED)
        return data


# --- receiving ------------------------------------------------------------------------------------------
class FolderExtraction:
    """Making the folder a verified stream holds (``TransferFiles.extract_folder``), a bounded step at a time
    (``step``), so that the client's loop (heartbeats, other transfers) goes on in between. Opening reads and
    checks the manifest's header and the free space, and makes the staging folder; every failure removes it."""

    def __init__(self, part: Path, directory: Path, name: str) -> None:
        self._part, self._directory, self._name = part, directory, name
        self._staging = staging_of(part)
        self._stream = open(part, "rb")  # noqa: SIM115 - held across steps, closed by _close
        self._root = -1
        self._published = False
        self._file: _Writing | None = None
        self._files = self._bytes = 0
        try:
            size = os.fstat(self._stream.fileno()).st_size
            head = self._stream.read(LENGTH_BYTES)
            length = int.from_bytes(head, "big")
            if len(head) < LENGTH_BYTES or LENGTH_BYTES + length > size:
                raise ManifestError("the stream is shorter than its manifest")
            if length > MAX_MANIFEST_BYTES:  # before reading it
                raise ManifestError(f"a manifest of {length} bytes is over {MAX_MANIFEST_BYTES}", ErrorCode.TOO_LARGE)
            self._reader = ManifestReader(self._stream.read(length))
            self._content = size - LENGTH_BYTES - length  # what the files must add up to
            if shutil.disk_usage(directory).free < self._content:
                raise TransferError(f"not enough free space to make {name}", ErrorCode.NO_SPACE)
            self._placer = Placer()
            shutil.rmtree(self._staging, ignore_errors=True)  # left by an extraction a crash interrupted
            os.mkdir(self._staging, 0o755)
            self._root = os.open(self._staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            self.abort()
            raise

    def step(self) -> Extracted | None:
        """Make up to STEP_ENTRIES entries, or STEP_BYTES of one file's bytes; the folder once it is whole."""
        try:
            entries, budget = STEP_ENTRIES, STEP_BYTES
            while budget > 0:
                if self._file is None:
                    if not entries:
                        break
                    found = self._reader.next(1)
                    if not found:
                        return self._finish()
                    entries -= 1
                    self._make(found[0])
                    if self._file is None:  # a directory, or an empty file
                        continue
                budget -= self._file.write(self._stream, budget)
                if self._file.left == 0:
                    self._file.finish()
                    self._file = None
            return None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop and remove what was made (the ``.part`` stays: the transfer decides). Idempotent."""
        self._close()
        if not self._published:
            shutil.rmtree(self._staging, ignore_errors=True)

    def _make(self, entry: Entry) -> None:
        where = self._placer.add(entry)
        names = where.path.split("/") if entry.kind == DIRECTORY else where.path.split("/")[:-1]
        for depth in range(len(names) - where.new_dirs, len(names)):  # outermost first
            os.mkdir("/".join(names[:depth + 1]), 0o755, dir_fd=self._root)
        if entry.kind == FILE:
            self._files += 1
            self._bytes += entry.size
            if self._bytes > self._content:
                raise ManifestError("the manifest lists more bytes than the stream holds")
            self._file = _Writing(os.open(where.path, _CREATE, safe_mode(entry), dir_fd=self._root), where.path,
                                  entry)
            if entry.size == 0:
                self._file.finish()
                self._file = None

    def _finish(self) -> Extracted:
        if self._bytes != self._content:
            raise ManifestError(f"the manifest lists {self._bytes} bytes of files, the stream holds {self._content}")
        _sync(self._root)  # every file on disk before the folder appears and the .part goes
        self._close()
        path = publish_atomically(self._staging, self._directory, self._name)
        self._published = True
        os.unlink(self._part)
        return Extracted(path, self._files, self._bytes)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
        self._stream.close()


class _Writing:
    """One file being made: its bytes copied from the stream, hashed as they go."""

    __slots__ = ("fd", "path", "entry", "left", "hasher")

    def __init__(self, fd: int, path: str, entry: Entry) -> None:
        self.fd, self.path, self.entry, self.left = fd, path, entry, entry.size
        self.hasher = hashlib.sha256()

    def write(self, stream, budget: int) -> int:
        """Copy up to ``budget`` bytes (at least one block); how many."""
        done = 0
        while self.left and done < budget:
            block = stream.read(min(self.left, BLOCK))
            if not block:
                raise ManifestError("the stream ended inside a file")
            self.hasher.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(self.fd, view):]
            self.left -= len(block)
            done += len(block)
        return done

    def finish(self) -> None:
        self.close()
        if self.hasher.digest() != self.entry.sha256:
            raise TransferError(f"{self.path[:200]} failed its SHA-256 check", ErrorCode.INTEGRITY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def staging_of(part: Path) -> Path:
    """Where the folder a ``.part`` holds is made before it gets its name: hidden, beside it, named after it."""
    return part.with_name(part.name.removesuffix(".part") + STAGING_SUFFIX)


def _sync(fd: int) -> None:
    if _syncfs is None or _syncfs(fd) != 0:
        os.sync()
