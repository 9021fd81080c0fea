"""A transfer's ``.part`` file: whole chunks appended in order, optionally written behind.

Writing received data through the page cache costs this VM between 0.2 and 3 s
of system time per GiB, depending on whether the kernel hands out pages the
hypervisor has backed before (bench/README.md). Where the file system allows it,
chunks are therefore written with ``O_DIRECT`` from page-aligned buffers: about
0.25 s of CPU per GiB, whatever the state of the page cache, and a huge download
does not push everything else out of it. Elsewhere (tmpfs, unaligned chunk
sizes) the same code writes through the page cache.

With ``write_behind`` a writer thread does the writes, so the agent thread can
take the next chunk off the socket meanwhile; a write error is raised by the
next call instead. The client's shell turns it on (``TransferConfig.write_behind``);
without it nothing here starts a thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path

ALIGN = 4096  # O_DIRECT needs buffer address, length and file offset aligned to the block size
DEPTH = 4  # chunk buffers per file: how far the writer may fall behind before the agent waits

_STOP = None


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PartFile:
    """Appends chunks of one transfer to its ``.part`` file."""

    def __init__(self, fd: int, size: int, chunk_size: int, *, direct: bool, write_behind: bool) -> None:
        self._fd = fd
        self._end = size  # where the next chunk goes: file length once every queued write is done
        self._appended = self._written = 0  # chunks; each counter has one writer thread
        self._direct = direct
        self._error: OSError | None = None
        slot = _round_up(chunk_size)
        self._buffers = [mmap.mmap(-1, slot) for _ in range(DEPTH if write_behind else 1)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._current: int | None = None
        self._queue: queue.Queue[tuple[int, int, int] | None] | None = None
        self._thread: threading.Thread | None = None
        if write_behind:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._writer, name="p2pchat-part-writer", daemon=True)
            self._thread.start()

    # --- opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, chunk_size: int, *, write_behind: bool = False) -> PartFile:
        """A new, empty ``.part`` file (never an existing one)."""
        # Created first, then opened for writing: a file system without O_DIRECT may refuse that
        # flag only after it has made the file.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        fd, direct = _open(path, os.O_WRONLY, chunk_size)
        return cls(fd, 0, chunk_size, direct=direct, write_behind=write_behind)

    @classmethod
    def resume(cls, path: Path, chunk_size: int, *, write_behind: bool = False) -> PartFile:
        """Reopen a ``.part`` file, cut back to its last whole chunk."""
        fd, direct = _open(path, os.O_WRONLY, chunk_size)
        try:
            size = os.fstat(fd).st_size // chunk_size * chunk_size
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, size, chunk_size, direct=direct, write_behind=write_behind)

    @property
    def size(self) -> int:
        """The file's length once every chunk appended so far is written."""
        return self._end

    @property
    def pending(self) -> int:
        """Chunks appended but not written yet: lost if the process dies now."""
        return self._appended - self._written

    @property
    def direct(self) -> bool:
        return self._direct

    # --- writing ------------------------------------------------------------------
    def buffer(self, size: int) -> memoryview:
        """A buffer of ``size`` bytes to fill with the next chunk, then hand to ``append``."""
        self._raise_error()
        if self._current is None:
            self._current = self._free.get()  # waits while every buffer is queued for writing
            self._raise_error()
        return memoryview(self._buffers[self._current])[:size]

    def append(self, size: int) -> None:
        """Write the first ``size`` bytes of the buffer ``buffer`` gave; raises an earlier write's error."""
        assert self._current is not None, "append without buffer"
        index, self._current = self._current, None
        offset, self._end = self._end, self._end + size
        self._appended += 1
        if self._queue is None:
            try:
                self._write(index, size, offset)
            finally:
                self._free.put(index)
        else:
            self._queue.put((index, size, offset))

    def finish(self) -> None:
        """Every chunk on disk and synced; closes the file. Raises the first write error."""
        try:
            self._drain()
            self._raise_error()
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        """Stop writing (what is queued is still written) and close the file. Idempotent."""
        self._drain()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buffers = []  # unmapped once the last view of them is gone

    # --- internals ----------------------------------------------------------------
    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _writer(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            index, size, offset = item
            if self._error is None:  # after an error, only hand buffers back: the agent stops at its next call
                try:
                    self._write(index, size, offset)
                except OSError as exc:
                    self._error = exc
                except Exception as exc:  # never die silently: the agent would wait for buffers forever
                    self._error = OSError(errno.EIO, f"writer failed: {exc!r}")
            self._free.put(index)

    def _write(self, index: int, size: int, offset: int) -> None:
        view = memoryview(self._buffers[index])
        # O_DIRECT writes whole blocks: a short final chunk goes out padded, then the file is cut to size.
        length = _round_up(size) if self._direct else size
        done = 0
        while done < length:
            done += os.pwrite(self._fd, view[done:length], offset + done)
        if length != size:
            os.ftruncate(self._fd, offset + size)
        self._written += 1


def _open(path: Path, flags: int, chunk_size: int) -> tuple[int, bool]:
    """Open with O_DIRECT where the file system and the chunk size allow it; (fd, direct)."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct and chunk_size % ALIGN == 0:
        try:
            return os.open(path, flags | direct | os.O_CLOEXEC), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs)
                raise
    return os.open(path, flags | os.O_CLOEXEC), False
