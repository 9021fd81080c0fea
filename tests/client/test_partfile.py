"""client.partfile without ZeroMQ: real files, real O_DIRECT where the file system has it."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from p2pchat.client.storage.partfile import ALIGN, WRITER_THREADS, PartFile, WriterPool

CHUNK = 64 * 1024


def _chunks(total: int, chunk: int = CHUNK) -> list[bytes]:
    data = os.urandom(total)
    return [data[i:i + chunk] for i in range(0, total, chunk)]


def _append_all(part: PartFile, chunks: list[bytes]) -> None:
    for data in chunks:
        part.buffer(len(data))[:] = data
        part.append(len(data))


def _takes_o_direct(directory) -> bool:
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("p2pchat-part-writer")]


@pytest.fixture
def pool():
    writers = WriterPool()
    yield writers
    writers.close()
    assert _writers() == []


@pytest.mark.parametrize("write_behind", [False, True], ids=["inline", "write-behind"])
@pytest.mark.parametrize("total", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 7 * CHUNK + 4097])
def test_chunks_land_in_order_with_the_exact_length(tmp_path, write_behind, total, pool):
    chunks = _chunks(total)
    path = tmp_path / "f.part"
    part = PartFile.create(path, CHUNK, writers=pool if write_behind else None)
    assert part.direct == _takes_o_direct(tmp_path)  # if direct, the padded final block must be cut off
    _append_all(part, chunks)
    assert part.size == total
    part.finish()
    assert path.read_bytes() == b"".join(chunks)
    assert len(_writers()) <= WRITER_THREADS  # the pool's, never one per file


def test_an_existing_file_is_never_opened_as_new(tmp_path):
    path = tmp_path / "f.part"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        PartFile.create(path, CHUNK)
    assert path.read_bytes() == b"keep me"


def test_resume_cuts_back_to_the_last_whole_chunk_and_appends(tmp_path, pool):
    chunks = _chunks(5 * CHUNK)
    path = tmp_path / "f.part"
    path.write_bytes(b"".join(chunks[:2]) + chunks[2][:100])  # a torn third chunk
    part = PartFile.resume(path, CHUNK, writers=pool)
    assert part.size == 2 * CHUNK
    _append_all(part, chunks[2:])
    part.finish()
    assert path.read_bytes() == b"".join(chunks)


def test_close_writes_what_was_queued_for_a_later_resume(tmp_path, pool):
    chunks = _chunks(6 * CHUNK)
    path = tmp_path / "f.part"
    part = PartFile.create(path, CHUNK, writers=pool)
    _append_all(part, chunks)
    part.close()
    part.close()  # idempotent
    assert path.read_bytes() == b"".join(chunks)
    assert len(_writers()) <= WRITER_THREADS  # the pool's, never one per file


def test_unaligned_chunk_size_writes_through_the_page_cache(tmp_path, pool):
    chunks = _chunks(10_000, chunk=1000)
    path = tmp_path / "f.part"
    part = PartFile.create(path, 1000, writers=pool)
    assert not part.direct and 1000 % ALIGN
    _append_all(part, chunks)
    part.finish()
    assert path.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("write_behind", [False, True], ids=["inline", "write-behind"])
def test_a_full_disk_is_reported_by_a_later_call_and_nothing_hangs(small_disk, write_behind, pool):
    path = small_disk / "f.part"
    part = PartFile.create(path, CHUNK, writers=pool if write_behind else None)
    chunks = _chunks(8 * 1024 * 1024)  # twice the tmpfs
    with pytest.raises(OSError) as err:
        _append_all(part, chunks)
        part.finish()
    assert err.value.errno == errno.ENOSPC
    part.close()
    assert len(_writers()) <= WRITER_THREADS  # the pool's, never one per file


def test_pending_counts_chunks_not_yet_written(tmp_path, pool):
    inline = PartFile.create(tmp_path / "a.part", CHUNK)
    _append_all(inline, _chunks(3 * CHUNK))
    assert inline.pending == 0  # written before append returned
    inline.finish()
    behind = PartFile.create(tmp_path / "b.part", CHUNK, writers=pool)
    _append_all(behind, _chunks(3 * CHUNK))
    assert 0 <= behind.pending <= 3
    behind.close()
    assert behind.pending == 0


def test_many_part_files_share_the_pool_s_threads(tmp_path, pool):
    parts = [PartFile.create(tmp_path / f"{i}.part", CHUNK, writers=pool) for i in range(100)]
    chunks = _chunks(3 * CHUNK)
    for part in parts:
        _append_all(part, chunks)
    assert len(_writers()) <= WRITER_THREADS  # the pool's, never one per file
    for part in parts:
        part.finish()
    assert all((tmp_path / f"{i}.part").read_bytes() == b"".join(chunks) for i in range(100))
