"""Room files in a directory every broker of a cluster shares (the ``RoomFileStore``; docs/ROOMS-DESIGN.md §5).

Layout (every name is hex: nothing a client sends becomes a path but through ``bytes.hex()``)::

    <root>/.lock                  flock()ed around every creation, completion and deletion, by every broker
    <root>/usage.json             the store's totals {"bytes", "files", "unfinished": {user: n}}
    <root>/<rid>/usage.json       the room's totals, alike
    <root>/<rid>/<xfer>.meta      one transfer's record (JSON), replaced whole by a rename
    <root>/<rid>/<xfer>.chunks    its sealed chunks back to back, chunk i at i * (chunk_size + 16)

While a transfer uploads, its chunks on disk are counted from the length of ``.chunks`` (chunks are written in
order, whole, and a write the disk refused is cut off again) and its last activity is that file's mtime, set to
the core's clock: no record is rewritten per chunk, so a deletion by another broker is never undone by a late
write. Completion fsyncs the chunks before the record says "complete". The totals are counters shared under
the lock, so that admitting an upload reads two small files whatever the room holds (a crash can only leave them
too high: they are recounted when a store opens).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pchat.broker.core.ports import SEAL_TAG, RoomFile, RoomFileUsage, StoreUnavailable, UsageCheck
from p2pchat.common.errors import ErrorCode

log = logging.getLogger(__name__)

_HEX16 = re.compile(r"[0-9a-f]{32}")
_META, _CHUNKS, _TMP, _TOTALS = ".meta", ".chunks", ".tmp", "usage.json"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskRoomFileStore:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root
        self._fsync = fsync  # off only where durability against power loss does not matter (tests on tmpfs)
        self._walk_rooms: list[str] = []
        self._walk_files: list[tuple[bytes, bytes]] = []
        try:
            root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            with self._locked(read_totals=False):
                self._recount()
        except OSError as exc:
            raise _unavailable(exc, f"room files at {root}") from exc

    def close(self) -> None:
        os.close(self._lock_fd)

    # --- reads (no lock: a record is replaced whole, chunk files only grow while uploading) ------------------
    def get(self, rid: bytes, xfer: bytes) -> RoomFile | None:
        try:
            return self._load(rid, xfer)
        except OSError as exc:
            raise _unavailable(exc, _where(rid, xfer)) from exc

    def read_chunk(self, file: RoomFile, index: int) -> bytes | None:
        size = file.payload_size(index)
        try:
            fd = os.open(self._path(file.rid, file.xfer, _CHUNKS), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable(exc, _where(file.rid, file.xfer)) from exc
        try:
            data = os.pread(fd, size, file.offset(index))
        except OSError as exc:
            raise _unavailable(exc, f"{_where(file.rid, file.xfer)} chunk {index}") from exc
        finally:
            os.close(fd)
        if len(data) != size:
            log.warning("room=%s xfer=%s chunk %d is cut short on disk", file.rid.hex(), file.xfer.hex(), index)
            return None
        return data

    # --- writes ---------------------------------------------------------------------------------------------
    def create(self, file: RoomFile, admit: UsageCheck) -> RoomFile | ErrorCode:
        try:
            with self._locked():
                existing = self._load(file.rid, file.xfer)
                if existing is not None:
                    return existing
                refusal = admit(self._usage(file.rid, file.uploader))
                if refusal is not None:
                    return refusal
                (self.root / file.rid.hex()).mkdir(exist_ok=True)
                self._count(file, 1, 1)  # first: a crash past it leaves the counts high, never low
                try:
                    chunks = self._path(file.rid, file.xfer, _CHUNKS)
                    fd = os.open(chunks, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        _touch(fd, file.created_ms)
                    finally:
                        os.close(fd)
                    self._save_meta(file)
                except OSError:
                    self._count(file, -1, -1)
                    self._unlink(file.rid, file.xfer)
                    raise
                return file
        except OSError as exc:
            raise _unavailable(exc, _where(file.rid, file.xfer)) from exc

    def write_chunk(self, file: RoomFile, index: int, payload: Any, now_ms: int) -> bool:
        try:  # never O_CREAT: a transfer deleted meanwhile stays deleted
            fd = os.open(self._path(file.rid, file.xfer, _CHUNKS), os.O_WRONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _unavailable(exc, _where(file.rid, file.xfer)) from exc
        offset = file.offset(index)
        try:
            data = memoryview(payload)  # bytes, or a zmq.Frame: no copy
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            if self._fsync:  # start writing it back now (not blocking): the fsync at completion, on the broker's
                # loop, then waits for the last chunks only (512 MiB here: 40-50 ms instead of 160-200 ms)
                os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
            _touch(fd, now_ms)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)  # no partial chunk: the length of the file counts whole chunks
            raise _unavailable(exc, f"{_where(file.rid, file.xfer)} chunk {index}") from exc
        finally:
            os.close(fd)
        return True

    def complete(self, file: RoomFile, now_ms: int) -> RoomFile | None:
        try:
            with self._locked():
                current = self._load(file.rid, file.xfer)
                if current is None or current.uploader != file.uploader:
                    return None
                if current.complete:
                    return current
                if self._fsync:
                    fd = os.open(self._path(file.rid, file.xfer, _CHUNKS), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                done = replace(current, active_ms=now_ms, chunks=current.count, completed_ms=now_ms)
                self._save_meta(done)
                self._count(done, 0, -1)
                return done
        except OSError as exc:
            raise _unavailable(exc, _where(file.rid, file.xfer)) from exc

    def delete(self, rid: bytes, xfer: bytes) -> bool:
        try:
            with self._locked():
                return self._delete(rid, xfer)
        except OSError as exc:
            raise _unavailable(exc, _where(rid, xfer)) from exc

    def delete_room(self, rid: bytes) -> int:
        room = self.root / rid.hex()
        try:
            with self._locked():
                deleted = sum(self._delete(rid, xfer) for xfer in self._xfers(room))
                _remove_room(room)
                return deleted
        except OSError as exc:
            raise _unavailable(exc, f"room={rid.hex()}") from exc

    def sweep(self, limit: int) -> list[RoomFile]:
        found: list[RoomFile] = []
        try:
            if not self._walk_rooms and not self._walk_files:
                self._walk_rooms = sorted((name for name in _listdir(self.root) if _HEX16.fullmatch(name)),
                                          reverse=True)
            while len(found) < limit and (self._walk_files or self._walk_rooms):
                if not self._walk_files:
                    name = self._walk_rooms.pop()
                    with self._locked():  # as a creation is: a room found empty is removed before one can begin
                        self._walk_files = [(bytes.fromhex(name), xfer) for xfer in self._xfers(self.root / name)]
                        if not self._walk_files:  # left by a failed creation
                            _remove_room(self.root / name)
                    continue
                file = self._load(*self._walk_files.pop())
                if file is not None:
                    found.append(file)
        except OSError as exc:
            raise _unavailable(exc, "room files sweep") from exc
        return found

    def usage(self, rid: bytes, user: str) -> RoomFileUsage:
        """What a new upload of ``user`` to ``rid`` would join (as ``create`` asks its ``admit``)."""
        with self._locked():
            return self._usage(rid, user)

    # --- inside ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, read_totals: bool = True) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if read_totals:  # another broker may have changed them since
                self._totals = self._read_totals(self.root / _TOTALS, self._recount)
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _path(self, rid: bytes, xfer: bytes, suffix: str) -> Path:
        return self.root / rid.hex() / (xfer.hex() + suffix)

    def _xfers(self, room: Path) -> list[bytes]:
        return [bytes.fromhex(name[:-len(_META)]) for name in _listdir(room)
                if name.endswith(_META) and _HEX16.fullmatch(name[:-len(_META)])]

    def _load(self, rid: bytes, xfer: bytes) -> RoomFile | None:
        """The transfer as on disk, or None (a record without chunks is the remains of a deletion)."""
        try:
            record = json.loads(self._path(rid, xfer, _META).read_bytes())
            stat = os.stat(self._path(rid, xfer, _CHUNKS))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("room=%s xfer=%s: unreadable record, taken as no transfer", rid.hex(), xfer.hex())
            return None
        try:
            completed = record["completed_ms"]
            file = RoomFile(rid, xfer, str(record["uploader"]), int(record["size"]), int(record["chunk_size"]),
                            int(record["created_ms"]), 0, 0, None if completed is None else int(completed))
            if file.size < 0 or file.chunk_size < 1:
                raise ValueError("size")
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("room=%s xfer=%s: malformed record, taken as no transfer", rid.hex(), xfer.hex())
            return None
        if file.completed_ms is not None:
            return replace(file, active_ms=file.completed_ms, chunks=file.count)
        whole = stat.st_size // (file.chunk_size + SEAL_TAG) if stat.st_size < file.stored else file.count
        return replace(file, active_ms=max(file.created_ms, stat.st_mtime_ns // 1_000_000), chunks=whole)

    def _save_meta(self, file: RoomFile) -> None:
        record = {"rid": file.rid.hex(), "xfer": file.xfer.hex(), "uploader": file.uploader, "size": file.size,
                  "chunk_size": file.chunk_size, "chunks": file.chunks, "created_ms": file.created_ms,
                  "completed_ms": file.completed_ms, "state": "complete" if file.complete else "uploading"}
        self._replace(self._path(file.rid, file.xfer, _META), json.dumps(record).encode(), self._fsync)

    def _replace(self, path: Path, data: bytes, durable: bool) -> None:
        """Write ``path`` whole or not at all: a temporary file renamed over it."""
        tmp = path.with_name(path.name + _TMP)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _delete(self, rid: bytes, xfer: bytes) -> bool:
        file = self._load(rid, xfer)
        self._unlink(rid, xfer)
        if file is None:
            return False
        self._count(file, -1, 0 if file.complete else -1)
        with contextlib.suppress(OSError):  # the room's last transfer: its directory goes too (if empty)
            (self.root / rid.hex()).rmdir()
        return True

    def _unlink(self, rid: bytes, xfer: bytes) -> None:
        for suffix in (_CHUNKS, _META, _META + _TMP):
            self._path(rid, xfer, suffix).unlink(missing_ok=True)

    # --- the totals: under the lock ---------------------------------------------------------------------------
    def _usage(self, rid: bytes, user: str) -> RoomFileUsage:
        room = self._room_totals(rid.hex())
        return RoomFileUsage(room_bytes=room["bytes"], room_files=room["files"],
                             room_unfinished=sum(room["unfinished"].values()),
                             user_unfinished=self._totals["unfinished"].get(user, 0),
                             total_bytes=self._totals["bytes"], total_files=self._totals["files"])

    def _count(self, file: RoomFile, files: int, unfinished: int) -> None:
        """Add ``files`` (1, or -1) times ``file`` to the totals, and ``unfinished`` to its uploader's; save them."""
        _add(self._totals, file, files, unfinished)
        self._save_totals(self.root / _TOTALS, self._totals)
        room = self._room_totals(file.rid.hex())
        _add(room, file, files, unfinished)
        if room["files"]:
            self._save_totals(self.root / file.rid.hex() / _TOTALS, room)
        else:  # the room holds nothing more: its directory may go
            (self.root / file.rid.hex() / _TOTALS).unlink(missing_ok=True)

    def _room_totals(self, name: str) -> dict:
        return self._read_totals(self.root / name / _TOTALS, lambda: self._scan_room(name))

    def _scan_room(self, name: str) -> dict:
        totals = _empty()
        for xfer in self._xfers(self.root / name):
            file = self._load(bytes.fromhex(name), xfer)
            if file is not None:
                _add(totals, file, 1, 0 if file.complete else 1)
        return totals

    def _recount(self) -> dict:
        """Count every room again from its records, and the store as their sum; save them all."""
        self._totals = _empty()
        for name in _listdir(self.root):
            if _HEX16.fullmatch(name):
                room = self._scan_room(name)
                if room["files"]:
                    self._save_totals(self.root / name / _TOTALS, room)
                self._totals["bytes"] += room["bytes"]
                self._totals["files"] += room["files"]
                for user, count in room["unfinished"].items():
                    self._totals["unfinished"][user] = self._totals["unfinished"].get(user, 0) + count
        self._save_totals(self.root / _TOTALS, self._totals)
        return self._totals

    def _read_totals(self, path: Path, recount) -> dict:
        try:
            totals = json.loads(path.read_bytes())
            if type(totals.get("bytes")) is int and type(totals.get("files")) is int \
                    and type(totals.get("unfinished")) is dict:
                return totals
        except FileNotFoundError:
            return recount()  # a room with no files yet (or the remains of a crash)
        except (ValueError, AttributeError):
            pass
        log.warning("room files: %s unreadable, counted again", path)
        return recount()

    def _save_totals(self, path: Path, totals: dict) -> None:
        self._replace(path, json.dumps(totals).encode(), False)  # recounted after a crash: no fsync


def _empty() -> dict:
    return {"bytes": 0, "files": 0, "unfinished": {}}


def _add(totals: dict, file: RoomFile, files: int, unfinished: int) -> None:
    totals["bytes"] = max(0, totals["bytes"] + files * file.stored)
    totals["files"] = max(0, totals["files"] + files)
    left = totals["unfinished"].get(file.uploader, 0) + unfinished
    if left > 0:
        totals["unfinished"][file.uploader] = left
    else:
        totals["unfinished"].pop(file.uploader, None)


def _remove_room(room: Path) -> None:
    """A room directory without transfers: what a crash or the counts left in it goes, and then it."""
    for leftover in _listdir(room):
        (room / leftover).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        room.rmdir()


def _touch(fd: int, now_ms: int) -> None:
    """The chunks' mtime is the upload's last activity, on the core's clock."""
    os.utime(fd, ns=(now_ms * 1_000_000, now_ms * 1_000_000))


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _where(rid: bytes, xfer: bytes) -> str:
    return f"room={rid.hex()} xfer={xfer.hex()}"


def _unavailable(exc: OSError, where: str) -> StoreUnavailable:
    if exc.errno in _FULL:
        return StoreUnavailable(f"{where}: disk full ({exc.strerror})", ErrorCode.STORAGE_FULL)
    return StoreUnavailable(f"{where}: {exc.strerror or exc}", ErrorCode.STORAGE_UNAVAILABLE)
