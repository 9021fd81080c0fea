"""storage.folders on a real disk: the sender's walk and stream, the receiver's extraction (docs/PROTOCOL.md §8.3).
Hostile manifests are crafted here byte for byte, as a sender could."""

from __future__ import annotations

import gc
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from p2pchat.client.core.manifest import DIRECTORY, FILE, LENGTH_BYTES, Entry, Manifest, ManifestError
from p2pchat.client.core.ports import Extracted, Folder, Source
from p2pchat.client.storage import folders
from p2pchat.client.storage.folders import STEP_BYTES, STEP_ENTRIES, FolderExtraction, FolderStream, walk_folder
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.common.errors import ErrorCode, TransferError


def tree(root: Path) -> Path:
    """A small folder: nested directories, an empty one, a zero-byte file, an executable."""
    (root / "docs" / "deep" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"alpha" * 1000)
    (root / "docs" / "deep" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "docs" / "deep" / "deeper" / "c").write_bytes(b"c")
    (root / "zero").write_bytes(b"")
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: a file's bytes, None for a directory (symlinks are not followed)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = None if path.is_dir() and not path.is_symlink() else path.read_bytes()
    return found


def stream_of(walk) -> bytes:
    return walk.header + b"".join((walk.root / e.path).read_bytes() for e in walk.manifest.entries if e.kind == FILE)


def part_with(directory: Path, stream: bytes, name: str = ".folder.01234567.part") -> Path:
    directory.mkdir(exist_ok=True)
    part = directory / name
    part.write_bytes(stream)
    return part


def crafted(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A stream whose manifest lists ``(path, kind, content)`` as given, with the right sizes and hashes."""
    manifest = Manifest(tuple(Entry(p, k, len(c), 0o644 if k == FILE else 0o755,
                                    hashlib.sha256(c).digest() if k == FILE else b"") for p, k, c in entries))
    return manifest.header() + b"".join(c for _, k, c in entries if k == FILE)


def extract(part: Path, directory: Path, name: str, steps: list | None = None) -> Extracted:
    """Make the folder ``part`` holds, step after step as the receiver's ticks would; ``steps`` counts them."""
    extraction = FolderExtraction(part, directory, name)
    count = 1
    while (made := extraction.step()) is None:
        count += 1
    if steps is not None:
        steps.append(count)
    return made


def open_fds() -> set[str]:
    """This process's descriptors; garbage from earlier tests collected first, so that none closes meanwhile."""
    gc.collect()
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}  # not the listing's


# --- the sender's walk ----------------------------------------------------------------------------------
def test_a_walk_lists_directories_before_their_contents_in_name_order(tmp_path):
    walk = walk_folder(tree(tmp_path / "src"))
    assert [(e.path, e.kind, e.size) for e in walk.manifest.entries] == [
        ("docs", DIRECTORY, 0), ("docs/a.txt", FILE, 5000), ("docs/deep", DIRECTORY, 0),
        ("docs/deep/b.bin", FILE, 70_000), ("docs/deep/deeper", DIRECTORY, 0), ("docs/deep/deeper/c", FILE, 1),
        ("empty", DIRECTORY, 0), ("run.sh", FILE, 10), ("zero", FILE, 0)]
    run = walk.manifest.entries[7]
    assert run.mode == 0o750 and run.sha256 == hashlib.sha256(b"#!/bin/sh\n").digest()
    assert walk.manifest.header_size == len(walk.header) and walk.skipped == ()
    assert walk.folder().files == 5 and walk_folder(tmp_path / "src").digest == walk.digest  # the same twice


def test_symlinks_fifos_and_sockets_are_skipped_and_named_once(tmp_path, caplog):
    root = tree(tmp_path / "src")
    (root / "link").symlink_to(tmp_path)  # never followed: the walk must not list tmp_path's contents
    (root / "docs" / "to-file").symlink_to(root / "zero")
    os.mkfifo(root / "fifo")
    walk = walk_folder(root)
    assert walk.skipped == ("docs/to-file", "fifo", "link")
    assert all(e.path not in walk.skipped for e in walk.manifest.entries)
    [line] = [r.getMessage() for r in caplog.records if "without" in r.getMessage()]
    assert "3 entries" in line and "docs/to-file, fifo, link" in line


def test_an_unreadable_file_fails_the_walk_with_its_name(tmp_path):
    root = tree(tmp_path / "src")
    secret = root / "docs" / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0)
    if os.access(secret, os.R_OK):
        pytest.skip("running as root: nothing is unreadable")
    with pytest.raises(TransferError, match="secret"):
        walk_folder(root)


@pytest.mark.parametrize("bound, value, why", [("MAX_ENTRIES", 5, "over 5 files and folders"),
                                               ("MAX_PATH_BYTES", 12, "a path over 12 bytes")])
def test_a_folder_over_a_receivers_bounds_is_refused_while_walking_it(tmp_path, monkeypatch, bound, value, why):
    monkeypatch.setattr(folders, bound, value)  # the real bounds want 100,000 files or 4 KiB paths on disk
    with pytest.raises(TransferError, match=why) as caught:
        walk_folder(tree(tmp_path / "src"))
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_a_name_that_is_not_utf8_is_sent_with_a_replacement_character(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    fd = os.open(os.fsencode(root) + b"/caf\xe9.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"latin-1")
    os.close(fd)
    walk = walk_folder(root)
    assert [e.path for e in walk.manifest.entries] == ["caf\ufffd.txt"]
    assert stream_of_read(walk, walk.manifest.stream_size).endswith(b"latin-1")


def stream_of_read(walk, size: int, step: int = 4096) -> bytes:
    source = Source(walk.root, size, 0, 0, walk.folder())
    reader = FolderStream(source)
    try:
        return b"".join(reader.read(at, step) for at in range(0, size, step))
    finally:
        reader.close()


# --- the sender's stream -----------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 7, 4096, 65536, 1 << 20])
def test_the_stream_is_the_header_then_each_file_in_order(tmp_path, step):
    walk = walk_folder(tree(tmp_path / "src"))
    expected = stream_of(walk)
    assert len(expected) == walk.manifest.stream_size
    assert stream_of_read(walk, len(expected), step if step > 1 else 997) == expected


def test_the_stream_holds_one_descriptor_at_most(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(300):
        (root / f"f{i:03}").write_bytes(os.urandom(100))
    walk = walk_folder(root)
    source = Source(root, walk.manifest.stream_size, 0, 0, walk.folder())
    reader = FolderStream(source)
    before = open_fds()
    seen = set()
    for at in range(0, source.size, 1000):  # every read spans ten files
        reader.read(at, 1000)
        seen |= open_fds() - before
        assert len(open_fds() - before) <= 1
    reader.close()
    assert open_fds() <= before and len(seen) >= 1


def test_a_file_changed_after_the_walk_stops_the_stream(tmp_path):
    walk = walk_folder(tree(tmp_path / "src"))
    reader = FolderStream(Source(walk.root, walk.manifest.stream_size, 0, 0, walk.folder()))
    reader.read(0, len(walk.header) + 10)  # in docs/a.txt
    os.utime(walk.root / "docs" / "deep" / "b.bin", ns=(1, 1))
    with pytest.raises(TransferError, match="b.bin changed") as caught:
        reader.read(len(walk.header) + 5000, 100)
    assert caught.value.code is ErrorCode.SOURCE_CHANGED
    reader.close()


def test_after_a_restart_the_folder_is_walked_again_and_must_be_the_same(tmp_path):
    root = tree(tmp_path / "src")
    walk = walk_folder(root)
    remembered = Source(root, walk.manifest.stream_size, 0, 0, Folder(walk.digest, walk.folder().files))
    same = FolderStream(remembered)
    assert same.read(0, walk.manifest.stream_size) == stream_of(walk)
    same.close()
    (root / "docs" / "a.txt").write_bytes(b"ALPHA" * 1000)  # same size, other bytes: another manifest
    changed = FolderStream(remembered)
    with pytest.raises(TransferError, match="changed since the transfer began") as caught:
        changed.read(0, 10)
    assert caught.value.code is ErrorCode.SOURCE_CHANGED


def test_local_files_inspects_a_folder_as_its_stream(tmp_path):
    root = tree(tmp_path / "src")
    source = LocalFiles().inspect(root)
    assert source.folder is not None and source.folder.files == 5
    assert source.size == walk_folder(root).manifest.stream_size
    with pytest.raises(TransferError, match="neither a regular file nor a folder"):
        os.mkfifo(tmp_path / "fifo")
        LocalFiles().inspect(tmp_path / "fifo")


# --- the receiver's extraction ---------------------------------------------------------------------------
def test_a_folder_is_made_identical_from_its_stream(tmp_path):
    src = tree(tmp_path / "src")
    inbox = tmp_path / "inbox"
    part = part_with(inbox, stream_of(walk_folder(src)))
    made = extract(part, inbox, "20240101_000000_alice_src")
    assert made.path == inbox / "20240101_000000_alice_src" and not part.exists()
    assert (made.files, made.content_bytes) == (5, 5000 + 70_000 + 1 + 10)
    assert snapshot(made.path) == snapshot(src)
    assert sorted(os.listdir(inbox)) == ["20240101_000000_alice_src"]  # no staging folder, no .part
    assert stat.S_IMODE((made.path / "run.sh").stat().st_mode) & 0o100
    assert not stat.S_IMODE((made.path / "docs" / "a.txt").stat().st_mode) & 0o111


def test_an_existing_folder_of_that_name_is_never_touched(tmp_path):
    src = tree(tmp_path / "src")
    inbox = tmp_path / "inbox"
    (inbox / "name").mkdir(parents=True)
    (inbox / "name" / "mine").write_bytes(b"keep")
    made = extract(part_with(inbox, stream_of(walk_folder(src))), inbox, "name")
    assert made.path == inbox / "name (1)" and snapshot(inbox / "name") == {"mine": b"keep"}


def test_hostile_paths_land_inside_the_new_folder_and_nothing_outside_changes(tmp_path):
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"root")
    stream = crafted([("../outside/passwd", FILE, b"evil 1"), ("/tmp/evil", FILE, b"evil 2"),
                      ("C:\\Windows\\evil", FILE, b"evil 3"), ("a\x00b\nc", FILE, b"evil 4"), ("CON", FILE, b"5"),
                      ("x" * 300, FILE, b"6"), ("Dup", FILE, b"7"), ("dup", FILE, b"8"), ("d", FILE, b"9"),
                      ("d/inner", FILE, b"10"), ("..", DIRECTORY, b""), ("empty/..", DIRECTORY, b"")])
    made = extract(part_with(inbox, stream), inbox, "got")
    assert (outside / "passwd").read_bytes() == b"root" and sorted(os.listdir(tmp_path)) == ["inbox", "outside"]
    assert sorted(os.listdir(inbox)) == ["got"]
    assert snapshot(made.path) == {
        "outside": None, "outside/passwd": b"evil 1", "tmp": None, "tmp/evil": b"evil 2", "Windows": None,
        "Windows/evil": b"evil 3", "abc": b"evil 4", "_CON": b"5", "x" * 255: b"6", "Dup": b"7", "dup (2)": b"8",
        "d": b"9", "d (2)": None, "d (2)/inner": b"10", "empty": None}


@pytest.mark.parametrize("stream, why", [
    (b"\x00\x00", "shorter than its manifest"),
    ((100).to_bytes(LENGTH_BYTES, "big") + b"\x90", "shorter than its manifest"),
    ((1 << 31).to_bytes(LENGTH_BYTES, "big") + b"\x00" * 100, "shorter than its manifest"),
    (crafted([("a", FILE, b"abc")]) + b"more", "stream holds"),
    (crafted([("a", FILE, b"abc")])[:-1], "more bytes than the stream holds"),
    (crafted([("a", FILE, b"abc"), ("b", FILE, b"")])[:-1], "more bytes than the stream holds"),
    (crafted([("a", FILE, b"abc")])[:-3] + b"abd", "failed its SHA-256"),
])
def test_a_stream_that_does_not_hold_what_its_manifest_says_makes_nothing(tmp_path, stream, why):
    inbox = tmp_path / "inbox"
    part = part_with(inbox, stream)
    with pytest.raises(TransferError, match=why) as caught:
        extract(part, inbox, "got")
    assert caught.value.code is ErrorCode.INTEGRITY
    assert os.listdir(inbox) == [part.name]  # the .part goes with the failed transfer; no folder, no staging


def test_a_manifest_listing_a_symlink_is_refused(tmp_path):
    body = b"\x82\xa1v\x01\xa7entries\x91\x95\xa4link\x02\x00\xcd\x01\xff\xc4\x00"  # [["link", 2, 0, 0o777, b""]]
    inbox = tmp_path / "inbox"
    with pytest.raises(ManifestError, match="kind 2"):
        extract(part_with(inbox, len(body).to_bytes(LENGTH_BYTES, "big") + body), inbox, "got")
    assert not (inbox / "got").exists() and not (inbox / "link").exists()


def test_an_extraction_a_crash_interrupted_is_done_again_from_the_start(tmp_path):
    src = tree(tmp_path / "src")
    inbox = tmp_path / "inbox"
    part = part_with(inbox, stream_of(walk_folder(src)))
    stale = inbox / ".folder.01234567.tree"
    (stale / "docs").mkdir(parents=True)
    (stale / "docs" / "a.txt").write_bytes(b"half")
    made = extract(part, inbox, "got")
    assert snapshot(made.path) == snapshot(src) and not stale.exists()


def test_a_folder_larger_than_the_free_space_is_refused_before_anything_is_written(small_disk):
    stream = crafted([("big", FILE, b"\x00" * (3 * 1024 * 1024))])  # the 3 MiB .part fits; the folder would not
    part = part_with(small_disk, stream)
    with pytest.raises(TransferError, match="free space") as caught:
        extract(part, small_disk, "got")
    assert caught.value.code is ErrorCode.NO_SPACE and os.listdir(small_disk) == [part.name]


def test_extraction_holds_a_few_descriptors_whatever_the_number_of_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2000):
        (src / f"f{i:04}").write_bytes(b"%d" % i)
    inbox = tmp_path / "inbox"
    part = part_with(inbox, stream_of(walk_folder(src)))
    before = open_fds()
    made = extract(part, inbox, "got")
    assert open_fds() <= before and made.files == 2000 and (made.path / "f1999").read_bytes() == b"1999"


def test_a_large_folder_is_made_in_bounded_steps(tmp_path):
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    for i in range(3 * STEP_ENTRIES):
        (src / "many" / f"{i}").write_bytes(b"x")
    (src / "big").write_bytes(os.urandom(2 * STEP_BYTES + 5))
    inbox = tmp_path / "inbox"
    steps: list[int] = []
    made = extract(part_with(inbox, stream_of(walk_folder(src))), inbox, "got", steps)
    assert snapshot(made.path) == snapshot(src)
    assert steps[0] >= 3 + 3  # 3 steps of entries, and the big file's bytes in 3 steps more


def test_an_extraction_stopped_midway_leaves_only_the_part(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3 * STEP_ENTRIES):
        (src / f"{i}").write_bytes(b"x")
    inbox = tmp_path / "inbox"
    part = part_with(inbox, stream_of(walk_folder(src)))
    before = open_fds()
    extraction = FolderExtraction(part, inbox, "got")
    assert extraction.step() is None and len(os.listdir(inbox)) == 2  # the .part and the staging folder
    extraction.abort()
    extraction.abort()
    assert os.listdir(inbox) == [part.name] and open_fds() <= before
    assert snapshot(extract(part, inbox, "got").path) == snapshot(src)  # and it can be made again


def test_an_unfinished_folder_too_old_to_keep_is_dropped_with_what_was_made_of_it(tmp_path):
    records = RecordDir(tmp_path / "state", "bob")
    inbox = tmp_path / "inbox"
    part = part_with(inbox, b"stream")
    (inbox / ".folder.01234567.tree" / "half").mkdir(parents=True)
    records.save("incoming", b"x" * 16, {"xfer": (b"x" * 16).hex(), "part": str(part), "name": "folder",
                                         "peer": "alice"})
    records.prune(time.time() + 1)
    assert os.listdir(inbox) == [] and records.records("incoming") == []
