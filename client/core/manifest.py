"""A folder sent as one stream (docs/PROTOCOL.md §8.3): its manifest, read strictly, and its paths made safe.

    stream   = u32 BE manifest length || manifest || each regular file's bytes, in manifest order
    manifest = msgpack {"v": 1, "entries": [[path, kind, size, mode, sha256], ...]}

A manifest is hostile input until it is neutralised: ``ManifestReader`` takes only what the bounds allow, a few
entries at a time, and ``Placer`` gives every entry a relative path that stays inside the folder being made,
whatever it asked for.
Pure: bytes and entries in, bytes and safe paths out; the sender's walk and the receiver's extraction are
``storage.folders``.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass, field

import msgpack

from p2pchat.client.storage.filenames import NAME_MAX, WINDOWS_RESERVED, cut_utf8
from p2pchat.common.errors import ErrorCode, TransferError

VERSION = 1
LENGTH_BYTES = 4  # the manifest's length before it, big-endian
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_ENTRIES = 100_000
MAX_PATH_BYTES = 4096  # of a path as the manifest gives it
MAX_PLACED_BYTES = 4095  # of a path once neutralised: a relative path the kernel takes in one call (PATH_MAX)
MAX_FILE_BYTES = 1 << 62
FILE, DIRECTORY = 0, 1
SHA256_BYTES = 32
FILE_MODE, EXEC_MODE = 0o644, 0o755  # the only modes a receiver gives (then its umask)

_SEPARATORS = re.compile(r"[/\\]")  # a backslash separates too: a Windows path never smuggles a ".." in one name
_DRIVE = re.compile(r"^[A-Za-z]:")
_UNSAFE = re.compile(r'[<>:"|?*]')  # not allowed in a Windows name


class ManifestError(TransferError):
    """A manifest the receiver will not extract (the transfer fails with this error's code)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTEGRITY) -> None:
        super().__init__(f"folder refused: {message}", code)


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # "/"-separated, relative
    kind: int  # FILE or DIRECTORY
    size: int  # bytes in the stream; 0 for a directory
    mode: int  # permission bits (0o7777 at most)
    sha256: bytes  # of a file's bytes; b"" for a directory


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: tuple[Entry, ...]
    header_size: int = field(default=0, compare=False)  # LENGTH_BYTES + the encoded manifest, once encoded

    @property
    def files(self) -> int:
        return sum(e.kind == FILE for e in self.entries)

    @property
    def total(self) -> int:
        """Bytes of the files together."""
        return sum(e.size for e in self.entries)

    @property
    def stream_size(self) -> int:
        return self.header_size + self.total

    def header(self) -> bytes:
        """The stream's first bytes: the length, then the manifest. TransferError if over the bounds."""
        if len(self.entries) > MAX_ENTRIES:
            raise TransferError(f"a folder of {len(self.entries)} entries is over the limit of {MAX_ENTRIES}",
                                ErrorCode.TOO_LARGE)
        body = msgpack.packb({"v": VERSION, "entries": [[e.path, e.kind, e.size, e.mode, e.sha256]
                                                        for e in self.entries]}, use_bin_type=True)
        if len(body) > MAX_MANIFEST_BYTES:
            raise TransferError(f"the folder's list of files takes {len(body)} bytes, over the limit of "
                                f"{MAX_MANIFEST_BYTES}", ErrorCode.TOO_LARGE)
        return len(body).to_bytes(LENGTH_BYTES, "big") + body

    def file_starts(self) -> tuple[list[int], list[int]]:
        """For every file with bytes, in stream order: (where it starts in the stream, its index in ``entries``)."""
        starts, indexes, at = [], [], self.header_size
        for i, e in enumerate(self.entries):
            if e.size:
                starts.append(at)
                indexes.append(i)
                at += e.size
        return starts, indexes


class ManifestReader:
    """A manifest read a few entries at a time, strictly (a receiver makes each entry as it reads it, and never
    stops its client for long): ManifestError for anything but ``{"v": 1, "entries": [...]}``, keys in this
    order, every entry well formed, nothing after it."""

    def __init__(self, body: bytes) -> None:
        if len(body) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"a manifest of {len(body)} bytes is over {MAX_MANIFEST_BYTES}", ErrorCode.TOO_LARGE)
        # Bounds for what one unpack() may build: an entry, five short items (the entries' array is read by count).
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(1, len(body)), max_str_len=MAX_PATH_BYTES,
                                          max_bin_len=SHA256_BYTES, max_array_len=5, max_map_len=0, max_ext_len=0)
        self._unpacker.feed(body)
        self._size = len(body)
        self.count = self._read(self._header)
        self.read = 0  # entries read so far

    @property
    def done(self) -> bool:
        return self.read == self.count

    def next(self, n: int) -> list[Entry]:
        """Up to ``n`` more entries (none once ``done``)."""
        entries = []
        while self.read < self.count and len(entries) < n:
            entries.append(_entry(self._read(self._unpacker.unpack)))
            self.read += 1
        if self.done and self._unpacker.tell() != self._size:
            raise ManifestError("bytes after the manifest")
        return entries

    def _header(self) -> int:
        u = self._unpacker
        if u.read_map_header() != 2 or u.unpack() != "v":
            raise ManifestError("malformed manifest")
        version = u.unpack()
        if type(version) is not int or version != VERSION:
            raise ManifestError(f"manifest version {version!r} not understood")
        if u.unpack() != "entries":
            raise ManifestError("malformed manifest")
        count = u.read_array_header()
        if count > MAX_ENTRIES:
            raise ManifestError(f"{count} entries, over the limit of {MAX_ENTRIES}", ErrorCode.TOO_LARGE)
        return count

    @staticmethod
    def _read(what):
        try:
            return what()
        except ManifestError:
            raise
        except Exception:  # msgpack raises a zoo; see common.protocol.decode
            raise ManifestError("undecodable manifest") from None


def _entry(item: object) -> Entry:
    if type(item) is not list or len(item) != 5:
        raise ManifestError("malformed manifest entry")
    path, kind, size, mode, digest = item
    if type(path) is not str or type(kind) is not int or type(size) is not int or type(mode) is not int \
            or type(digest) is not bytes:
        raise ManifestError("malformed manifest entry")
    if kind == FILE:
        if not 0 <= size <= MAX_FILE_BYTES or len(digest) != SHA256_BYTES:
            raise ManifestError(f"bad size or SHA-256 for {path[:100]!r}")
    elif kind == DIRECTORY:
        if size != 0 or digest != b"":
            raise ManifestError(f"a directory with a size or a SHA-256: {path[:100]!r}")
    else:  # a symlink, a device, a FIFO: never sent, never made
        raise ManifestError(f"an entry of kind {kind} (only files and directories are): {path[:100]!r}")
    if not 0 <= mode <= 0o7777:
        raise ManifestError(f"bad mode for {path[:100]!r}")
    return Entry(path, kind, size, mode, digest)


def locate(starts: list[int], offset: int) -> int:
    """The position in ``starts`` (``Manifest.file_starts``) of the file holding stream byte ``offset``."""
    return bisect_right(starts, offset) - 1


def safe_mode(entry: Entry) -> int:
    """The mode a receiver gives an entry: 0o755 for a directory or an executable file, else 0o644."""
    if entry.kind == DIRECTORY or entry.mode & 0o100:
        return EXEC_MODE
    return FILE_MODE


# --- neutralising -------------------------------------------------------------------------------------
def safe_component(raw: str) -> str | None:
    """One name of a path, made safe on any OS and at most NAME_MAX bytes; None if nothing is left of it."""
    name = unicodedata.normalize("NFC", raw)
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")  # NUL, control, format, surrogates
    name = _UNSAFE.sub("_", name).rstrip(" .")  # Windows drops trailing dots and spaces
    if not name:  # "", ".", ".." and anything made only of dots and spaces
        return None
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        name = "_" + name
    return cut_utf8(name, NAME_MAX).rstrip(" .") or None


def components(path: str) -> list[str]:
    """``path`` as the safe names of the directories it goes through and its own: never absolute, never up."""
    parts = _SEPARATORS.split(path)
    if parts and _DRIVE.match(parts[0]):
        parts[0] = parts[0][2:]
    return [c for c in map(safe_component, parts) if c is not None]


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name.casefold())


def _numbered(name: str, n: int, is_file: bool) -> str:
    """``name`` with `` (n)`` before a file's extension, cut to stay within NAME_MAX bytes."""
    stem, dot, ext = name.rpartition(".") if is_file else ("", "", "")
    if not stem:  # no extension, a directory, or a name like ".profile"
        stem, dot, ext = name, "", ""
    suffix = f" ({n}){dot}{ext}"
    return cut_utf8(stem, NAME_MAX - len(suffix.encode("utf-8"))) + suffix


@dataclass(frozen=True, slots=True)
class Placed:
    """Where an entry goes: ``path`` under the new folder ("" for the folder itself), and how many directories
    at the end of it (its parents', and its own for a directory) are new, to be made before it, outermost first."""

    path: str
    new_dirs: int


class Placer:
    """Where each entry of a manifest goes under the new folder, entry after entry (``add``): every path
    neutralised (``components``), and no two entries in one place. An entry equal to an earlier one after NFC and
    case folding, or a file where a directory was (or the other way round), is renamed `` (2)`` (the later one;
    its contents follow it). A directory given twice is one directory. A file of which nothing is left is named
    "file"; such a directory is the folder itself. ManifestError if a path grows over MAX_PLACED_BYTES or there
    are over MAX_ENTRIES directories.

    The directories placed so far are numbered (0: the folder itself) in flat tables: a hostile manifest of many
    deep paths costs a few table entries per directory, never a copy of each path."""

    __slots__ = ("parent", "name", "taken", "dirs", "counters")

    def __init__(self) -> None:
        self.parent: list[int] = [-1]
        self.name: list[str] = [""]
        self.taken: set[tuple[int, str]] = set()  # (directory, folded name) of every entry placed in it
        self.dirs: dict[tuple[int, str], int] = {}  # (directory, name as given, neutralised): the same dir
        self.counters: dict[tuple[int, str], int] = {}  # the next " (n)" to try: never a quadratic search

    def free_name(self, parent: int, name: str, is_file: bool) -> str:
        key = (parent, _folded(name))
        if key not in self.taken:
            self.taken.add(key)
            return name
        n = self.counters.get(key, 2)
        candidate = _numbered(name, n, is_file)
        while (parent, _folded(candidate)) in self.taken:
            n += 1
            candidate = _numbered(name, n, is_file)
        self.counters[key] = n + 1
        self.taken.add((parent, _folded(candidate)))
        return candidate

    def subdir(self, parent: int, name: str) -> tuple[int, bool]:
        """The directory ``name`` in ``parent``, and whether it is new. New where a file (or a directory that
        differs only in case) has the name: renamed."""
        found = self.dirs.get((parent, name))
        if found is not None:
            return found, False
        if len(self.name) > MAX_ENTRIES:
            raise ManifestError(f"more than {MAX_ENTRIES} directories", ErrorCode.TOO_LARGE)
        self.dirs[(parent, name)] = len(self.name)
        self.name.append(self.free_name(parent, name, is_file=False))
        self.parent.append(parent)
        return len(self.name) - 1, True

    def path(self, directory: int) -> list[str]:
        names = []
        while directory > 0:
            names.append(self.name[directory])
            directory = self.parent[directory]
        return names[::-1]

    def add(self, entry: Entry) -> Placed:
        names = components(entry.path)
        if entry.kind == FILE and not names:
            names = ["file"]
        directory, new = 0, 0
        for name in names[:-1] if entry.kind == FILE else names:
            directory, made = self.subdir(directory, name)
            new = new + 1 if made else 0  # new directories are always the last ones of the chain
        path = self.path(directory)
        if entry.kind == FILE:
            path.append(self.free_name(directory, names[-1], is_file=True))
        joined = "/".join(path)
        if len(joined.encode("utf-8")) > MAX_PLACED_BYTES:
            raise ManifestError(f"a path over {MAX_PLACED_BYTES} bytes once made safe")
        return Placed(joined, new)
