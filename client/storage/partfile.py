"""A transfer's ``.part`` file: whole chunks appended in order, optionally written behind.

Writing received data through the page cache costs this VM between 0.2 and 3 s
of system time per GiB, depending on whether the kernel hands out pages the
hypervisor has backed before (bench/README.md). Where the file system allows it,
chunks are therefore written with ``O_DIRECT`` from page-aligned buffers: about
0.25 s of CPU per GiB, whatever the state of the page cache, and a huge download
does not push everything else out of it. Elsewhere (tmpfs, unaligned chunk
sizes) the same code writes through the page cache.

With a ``WriterPool`` the pool's few threads do the writes, shared by every
``.part`` file (one file's writes stay in order), so the agent thread can take
the next chunk off the socket meanwhile and a thousand transfers never mean a
thousand threads; a write error is raised by the next call instead. The client's
shell owns the pool; without one nothing here starts a thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections import deque
from pathlib import Path

ALIGN = 4096  # O_DIRECT needs buffer address, length and file offset aligned to the block size
DEPTH = 4  # chunk buffers per file: how far the writer may fall behind before the agent waits

WRITER_THREADS = 2  # the agent decrypts on one CPU; two writers keep a disk busy without a thread per file


class WriterPool:
    """A fixed set of writer threads for every ``.part`` file of one client; its owner closes it."""

    def __init__(self, threads: int = WRITER_THREADS) -> None:
        self._jobs: queue.SimpleQueue[PartFile | None] = queue.SimpleQueue()
        self._size = threads
        self._threads: list[threading.Thread] = []  # started with the first write

    def submit(self, part: PartFile) -> None:
        """Called by the one thread that appends chunks (the agent)."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._work, name=f"p2pchat-part-writer-{i}", daemon=True)
                             for i in range(self._size)]
            for thread in self._threads:
                thread.start()
        self._jobs.put(part)

    def close(self) -> None:
        """Stop the threads once the jobs queued so far are done. Idempotent."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _work(self) -> None:
        while (part := self._jobs.get()) is not None:
            part._write_queued()


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PartFile:
    """Appends chunks of one transfer to its ``.part`` file."""

    def __init__(self, fd: int, size: int, chunk_size: int, *, direct: bool, writers: WriterPool | None) -> None:
        self._fd = fd
        self._end = size  # where the next chunk goes: file length once every queued write is done
        self._appended = self._written = 0  # chunks; each counter has one writer thread at a time
        self._direct = direct
        self._error: OSError | None = None
        slot = _round_up(chunk_size)
        self._buffers = [mmap.mmap(-1, slot) for _ in range(DEPTH if writers else 1)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._current: int | None = None
        self._writers = writers
        self._queued: deque[tuple[int, int, int]] = deque()  # writes for the pool, in order
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._scheduled = False  # a pool thread has this file's writes in hand (at most one does)

    # --- opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, chunk_size: int, *, writers: WriterPool | None = None) -> PartFile:
        """A new, empty ``.part`` file (never an existing one)."""
        # Created first, then opened for writing: a file system without O_DIRECT may refuse that
        # flag only after it has made the file.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        fd, direct = _open(path, os.O_WRONLY, chunk_size)
        return cls(fd, 0, chunk_size, direct=direct, writers=writers)

    @classmethod
    def resume(cls, path: Path, chunk_size: int, *, writers: WriterPool | None = None) -> PartFile:
        """Reopen a ``.part`` file, cut back to its last whole chunk."""
        fd, direct = _open(path, os.O_WRONLY, chunk_size)
        try:
            size = os.fstat(fd).st_size // chunk_size * chunk_size
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return cls(fd, size, chunk_size, direct=direct, writers=writers)

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
        if self._writers is None:
            try:
                self._write(index, size, offset)
            finally:
                self._free.put(index)
            return
        with self._lock:
            self._queued.append((index, size, offset))
            submit, self._scheduled = not self._scheduled, True
        if submit:
            self._writers.submit(self)

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
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # the descriptor is released anyway; a write error was already reported
                pass
        self._buffers = []  # unmapped once the last view of them is gone

    # --- internals ----------------------------------------------------------------
    def _drain(self) -> None:
        with self._lock:
            while self._scheduled:
                self._idle.wait()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_queued(self) -> None:
        """On a pool thread: write what is queued, in order, then hand the file back."""
        while True:
            with self._lock:
                if not self._queued:
                    self._scheduled = False
                    self._idle.notify_all()
                    return
                index, size, offset = self._queued.popleft()
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
