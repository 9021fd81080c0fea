"""The transfer cores' files on a real disk: what they send, receive and remember (the ports in core.ports).

``LocalFiles``: sources read in place (checked unchanged before every read), ``.part`` files written
through ``PartFile`` (by the shell's ``WriterPool`` threads when it passes one), finished files published
without ever overwriting one; a folder sent and received as one stream through ``storage.folders``. ``RecordDir``: unfinished transfers as one JSON record each, done marks,
and the refused or failed ids in an append-only file, under the user's ``transfers`` directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO

from p2pchat.client.core.ports import Source, SourceFile
from p2pchat.client.core.transfer import REMEMBER_FAILED
from p2pchat.client.storage.filenames import publish_atomically
from p2pchat.client.storage.folders import FolderExtraction, FolderStream, staging_of, walk_folder
from p2pchat.client.storage.partfile import PartFile, WriterPool
from p2pchat.common.errors import ErrorCode, TransferError

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20


class LocalSource:
    """A file being sent: opened on the first read, checked unchanged (size, mtime, inode) before each."""

    __slots__ = ("_info", "_file")

    def __init__(self, info: Source) -> None:
        self._info = info
        self._file: BinaryIO | None = None

    def read(self, offset: int, length: int) -> bytes:
        info = self._info
        name = info.path.name
        try:
            st = os.stat(info.path)
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (info.size, info.mtime_ns, info.inode):
                raise TransferError(f"{name} changed while being sent", ErrorCode.SOURCE_CHANGED)
            if self._file is None:
                self._file = open(info.path, "rb")  # noqa: SIM115 - kept open across chunks, closed by close()
            self._file.seek(offset)
            return self._file.read(length)
        except FileNotFoundError:
            raise TransferError(f"{name} was deleted while being sent", ErrorCode.SOURCE_CHANGED) from None
        except OSError as exc:
            raise TransferError(f"cannot read {name}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LocalFiles:
    """``TransferFiles`` on the local disk; received chunks are written by ``writers`` (none: inline)."""

    __slots__ = ("_writers",)

    def __init__(self, writers: WriterPool | None = None) -> None:
        self._writers = writers

    def inspect(self, path: Path) -> Source:
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise TransferError(f"cannot read {path}: {exc.strerror}", ErrorCode.SOURCE_CHANGED) from None
        if path.is_dir():
            walk = walk_folder(path)
            return Source(path, walk.manifest.stream_size, st.st_mtime_ns, st.st_ino, walk.folder())
        if not path.is_file():
            raise TransferError(f"{path} is neither a regular file nor a folder")
        return Source(path, st.st_size, st.st_mtime_ns, st.st_ino)

    def open_source(self, info: Source) -> SourceFile:
        return LocalSource(info) if info.folder is None else FolderStream(info)

    def free_space(self, directory: Path) -> int:
        directory.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(directory).free

    def create_part(self, path: Path, chunk_size: int) -> PartFile:
        return PartFile.create(path, chunk_size, writers=self._writers)

    def resume_part(self, path: Path, chunk_size: int) -> PartFile:
        return PartFile.resume(path, chunk_size, writers=self._writers)

    def read_part(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as held:
            while block := held.read(READ_BLOCK):
                yield block

    def publish(self, part: Path, directory: Path, name: str) -> Path:
        return publish_atomically(part, directory, name)

    def extract_folder(self, part: Path, directory: Path, name: str) -> FolderExtraction:
        return FolderExtraction(part, directory, name)

    def remove(self, path: Path) -> None:
        _unlink(path)


class RecordDir:
    """``TransferRecords`` in ``root``: ``outgoing/`` and ``incoming/`` records, ``received/`` done marks,
    ``failed.ids`` (16 bytes per id, appended; rewritten with the ids still kept when it doubles, so a peer
    sending thousands of offers never leaves thousands of files)."""

    def __init__(self, root: Path, user: str) -> None:
        self.user = user
        self._dirs = {"outgoing": root / "outgoing", "incoming": root / "incoming"}
        self._done = root / "received"
        for d in (*self._dirs.values(), self._done):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._failed_log = root / "failed.ids"
        self._failed_logged = 0  # ids in the file, the stale ones included

    def records(self, direction: str) -> list[dict]:
        records = []
        for path in sorted(self._dirs[direction].glob("*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("ignoring unreadable transfer record %s", path)
        return records

    def save(self, direction: str, xfer: bytes, record: dict) -> None:
        directory = self._dirs[direction]
        tmp = directory / f"{xfer.hex()}.json.tmp"
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, directory / f"{xfer.hex()}.json")
        except OSError as exc:  # the transfer goes on; it just cannot resume after a restart
            log.warning("user=%s xfer=%s cannot remember the transfer for a restart: %s", self.user,
                        xfer.hex()[:8], exc)
            _unlink(tmp)

    def forget(self, direction: str, xfer: bytes) -> None:
        _unlink(self._dirs[direction] / f"{xfer.hex()}.json")

    def mark_done(self, xfer: bytes) -> None:
        try:
            (self._done / xfer.hex()).touch()
        except OSError as exc:  # saved all the same; only a lost FILE_DONE could not be answered again
            log.warning("user=%s xfer=%s cannot mark the transfer done: %s", self.user, xfer.hex()[:8], exc)

    def is_done(self, xfer: bytes) -> bool:
        return (self._done / xfer.hex()).exists()

    def failed_ids(self) -> list[bytes]:
        try:
            held = self._failed_log.read_bytes()
        except OSError:
            held = b""
        ids = [held[i:i + 16] for i in range(0, len(held) - len(held) % 16, 16)]
        self._failed_logged = len(ids)
        return ids[-REMEMBER_FAILED:]

    def add_failed(self, xfer: bytes, kept: Collection[bytes]) -> None:
        try:
            self._failed_logged += 1
            if self._failed_logged > 2 * REMEMBER_FAILED:
                tmp = self._failed_log.with_suffix(".tmp")
                tmp.write_bytes(b"".join(kept))
                os.replace(tmp, self._failed_log)
                self._failed_logged = len(kept)
            else:
                with open(self._failed_log, "ab") as log_file:
                    log_file.write(xfer)
        except OSError:  # a full disk: a stale offer after a restart may start the transfer again
            pass

    def prune(self, cutoff: float) -> None:
        for path in self._dirs["outgoing"].glob("*.json"):
            if _mtime(path) < cutoff:
                log.info("user=%s dropping unfinished outgoing transfer %s: too old", self.user, path.stem)
                _unlink(path)
        for record in self.records("incoming"):
            record_path = self._dirs["incoming"] / f"{record['xfer']}.json"
            if max(_mtime(record_path), _mtime(Path(record["part"]))) < cutoff:
                log.info("user=%s dropping unfinished incoming %r from %s: too old", self.user, record["name"],
                         record["peer"])
                _unlink(Path(record["part"]))
                shutil.rmtree(staging_of(Path(record["part"])), ignore_errors=True)  # a folder half made, if any
                _unlink(record_path)
        for path in self._done.iterdir():
            if _mtime(path) < cutoff:
                _unlink(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)
