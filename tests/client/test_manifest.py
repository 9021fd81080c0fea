"""core.manifest without a disk: a folder's manifest read strictly, and every hostile path made safe
(docs/PROTOCOL.md §8.3)."""

from __future__ import annotations

import hashlib
import unicodedata

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    components,
    locate,
    safe_mode,
)
from p2pchat.common.errors import ErrorCode, TransferError

SHA = hashlib.sha256(b"").digest()


def f(path: str, size: int = 0, mode: int = 0o644) -> Entry:
    return Entry(path, FILE, size, mode, SHA)


def d(path: str) -> Entry:
    return Entry(path, DIRECTORY, 0, 0o755, b"")


def body(entries: list, **extra) -> bytes:
    return msgpack.packb({"v": 1, "entries": entries, **extra}, use_bin_type=True)


def parse(body: bytes) -> list[Entry]:
    """Every entry of a manifest, read as a receiver reads it, a few at a time."""
    reader = ManifestReader(body)
    entries = []
    while batch := reader.next(3):
        entries += batch
    assert reader.done
    return entries


def place(entries) -> list:
    placer = Placer()
    return [placer.add(e) for e in entries]


def paths(*entries: Entry) -> list[str]:
    return [p.path for p in place(entries)]


# --- the manifest, both ways ----------------------------------------------------------------------------
entries = st.lists(st.builds(Entry, st.text(max_size=40), st.just(FILE), st.integers(0, 2**40),
                             st.integers(0, 0o7777), st.binary(min_size=32, max_size=32))
                   | st.builds(Entry, st.text(max_size=40), st.just(DIRECTORY), st.just(0), st.integers(0, 0o7777),
                               st.just(b"")), max_size=30)


@given(entries)
def test_a_manifest_reads_back_as_it_was_written(items):
    header = Manifest(tuple(items)).header()
    length = int.from_bytes(header[:LENGTH_BYTES], "big")
    assert length == len(header) - LENGTH_BYTES
    assert parse(header[LENGTH_BYTES:]) == items
    assert Manifest(tuple(items), len(header)).stream_size == len(header) + sum(e.size for e in items)


@given(st.binary(max_size=200))
def test_any_bytes_are_a_manifest_or_a_clean_refusal(data):
    try:
        parse(data)
    except ManifestError as exc:
        assert exc.code in (ErrorCode.INTEGRITY, ErrorCode.TOO_LARGE)


@pytest.mark.parametrize("doc, why", [
    (b"\xc1", "undecodable"),
    (b"", "undecodable"),
    (msgpack.packb([1, []]), "undecodable"),
    (msgpack.packb({"v": 1, "files": []}), "malformed manifest"),
    (msgpack.packb({"entries": [], "v": 1}), "malformed manifest"),  # keys in their order
    (msgpack.packb({"v": 1, "entries": {}}), "undecodable"),
    (body([], extra=1), "malformed manifest"),
    (msgpack.packb({"v": 2, "entries": []}), "version"),
    (msgpack.packb({"v": True, "entries": []}), "version"),
    (body([["a", 0, 1, 0o644]]), "malformed manifest entry"),
    (body([["a", 0, 1, 0o644, SHA, 1]]), "undecodable"),  # an entry of six: over msgpack's bound
    (body([{"path": "a"}]), "undecodable"),
    (body([["a", 0, "1", 0o644, SHA]]), "malformed manifest entry"),
    (body([[b"a", 0, 1, 0o644, SHA]]), "malformed manifest entry"),
    (body([["a", 2, 0, 0o777, b""]]), "kind 2"),  # a symlink: never in a manifest
    (body([["a", 3, 0, 0o644, b""]]), "kind 3"),  # a device or a FIFO
    (body([["a", 0, 1, 0o644, SHA[:31]]]), "SHA-256"),
    (body([["a", 0, -1, 0o644, SHA]]), "size"),
    (body([["a", 1, 5, 0o755, b""]]), "directory with a size"),
    (body([["a", 0, 1, 0o10000, SHA]]), "mode"),
    (body([["a" * (MAX_PATH_BYTES + 1), 0, 1, 0o644, SHA]]), "undecodable"),  # over msgpack's own bound
    (body([["é" * (MAX_PATH_BYTES // 2 + 1), 0, 1, 0o644, SHA]]), "undecodable"),
    (body([["a", 0, 1, 0o644, SHA]]) + b"\x00", "bytes after the manifest"),
    (body([["a", 0, 1, 0o644, SHA]])[:-1], "undecodable"),  # cut short
])
def test_a_malformed_manifest_is_refused_with_a_clear_error(doc, why):
    with pytest.raises(ManifestError, match=why) as caught:
        parse(doc)
    assert caught.value.code is ErrorCode.INTEGRITY and caught.value.message.startswith("folder refused: ")


def test_a_manifest_over_the_entry_bound_is_refused_either_way():
    items = [["a", 1, 0, 0o755, b""]] * (MAX_ENTRIES + 1)
    with pytest.raises(ManifestError, match="over the limit") as caught:
        ManifestReader(body(items))  # said by the count, before any entry is read
    assert caught.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(TransferError, match="over the limit") as caught:
        Manifest(tuple(d("a") for _ in range(MAX_ENTRIES + 1))).header()
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_a_manifest_over_16_mib_is_refused_either_way():
    with pytest.raises(ManifestError, match="over") as caught:
        ManifestReader(b"\x00" * (MAX_MANIFEST_BYTES + 1))
    assert caught.value.code is ErrorCode.TOO_LARGE
    big = Manifest(tuple(f("x" * 4000 + str(i)) for i in range(4300)))  # 4300 paths of 4 KB: over 16 MiB
    with pytest.raises(TransferError, match="over the limit") as caught:
        big.header()
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_files_are_found_by_their_place_in_the_stream():
    m = Manifest((d("a"), f("a/x", 3), f("a/empty", 0), f("y", 5)), header_size=10)
    starts, indexes = m.file_starts()
    assert (starts, indexes) == ([10, 13], [1, 3])  # the empty file has no bytes to find
    assert [indexes[locate(starts, at)] for at in (10, 12, 13, 17)] == [1, 1, 3, 3]


def test_modes_are_limited_to_owner_bits():
    assert safe_mode(f("a", mode=0o4777)) == 0o755  # setuid, world-writable: only "executable" survives
    assert safe_mode(f("a", mode=0o666)) == 0o644
    assert safe_mode(f("a", mode=0o000)) == 0o644
    assert safe_mode(Entry("d", DIRECTORY, 0, 0o000, b"")) == 0o755


# --- every rule of neutralising ---------------------------------------------------------------------
@pytest.mark.parametrize("hostile, safe", [
    ("../../etc/passwd", "etc/passwd"),  # never up
    ("a/../../b", "a/b"),
    ("./a/./b", "a/b"),
    ("/etc/passwd", "etc/passwd"),  # never absolute
    ("//server/share/x", "server/share/x"),
    ("C:/Windows/x", "Windows/x"),  # no drive letters
    ("c:evil", "evil"),
    ("..\\..\\evil.txt", "evil.txt"),  # a backslash separates
    ("a\\b", "a/b"),
    ("a\x00b/c\nd\x07e", "ab/cde"),  # no NUL or control characters
    ("x\u202etxt.exe", "xtxt.exe"),  # nor format characters (right-to-left override)
    ("CON", "_CON"), ("nul.txt", "_nul.txt"), ("dir/COM1.tar.gz", "dir/_COM1.tar.gz"), ("LPT9 .x", "_LPT9 .x"),
    ('a<b>c:d"e|f?g*h', "a_b_c_d_e_f_g_h"),
    ("trailing. . ", "trailing"),  # Windows would drop these
    (".hidden", ".hidden"),  # inside a received folder a dot file stays one
    ("e\u0301", "\u00e9"),  # NFC
])
def test_each_hostile_path_is_neutralised(hostile, safe):
    assert paths(f(hostile)) == [safe]


def test_an_overlong_name_is_cut_on_a_character_boundary():
    [path] = paths(f("é" * 200 + "/" + "x" * 300))
    first, second = path.split("/")
    assert len(first.encode()) == 254 and first == "é" * 127  # 255 would split a character
    assert second == "x" * 255


def test_a_path_with_nothing_left_is_a_file_named_file_or_the_folder_itself():
    assert paths(f(".."), f("/"), d(".."), d("")) == ["file", "file (2)", "", ""]


def test_names_equal_after_nfc_and_case_folding_get_a_number_before_the_extension():
    assert paths(f("Report.txt"), f("report.TXT"), f("re\u0301sume\u0301.md"), f("\u00e9sum\u00e9.md"),
                 f("r\u00c9sum\u00c9.md"), f("STRASSE"), f("straße")) == [
        "Report.txt", "report (2).TXT", "résumé.md", "ésumé.md", "rÉsumÉ (2).md", "STRASSE", "straße (2)"]


def test_a_name_already_like_a_numbered_one_is_numbered_on():
    assert paths(f("a.txt"), f("a (2).txt"), f("A.txt"), f("a.TXT")) == ["a.txt", "a (2).txt", "A (3).txt",
                                                                        "a (4).TXT"]


def test_a_file_where_a_directory_is_and_the_other_way_round_the_later_is_renamed():
    assert paths(f("a"), f("a/b"), d("a/c"), d("x"), f("x")) == ["a", "a (2)/b", "a (2)/c", "x", "x (2)"]


def test_a_directory_differing_only_in_case_is_another_directory_and_takes_its_contents_along():
    assert paths(d("Docs"), f("Docs/a"), d("docs"), f("docs/a"), f("Docs/b")) == [
        "Docs", "Docs/a", "docs (2)", "docs (2)/a", "Docs/b"]


def test_a_directory_given_twice_is_one_directory_and_a_file_given_twice_two_files():
    assert paths(d("a"), d("a"), f("a/x"), f("a/x")) == ["a", "a", "a/x", "a/x (2)"]


def test_directories_to_make_are_counted_outermost_first():
    placed = place([f("a/b/c/x"), f("a/b/y"), d("a/b/d/e"), d("a"), f("z")])
    assert [(p.path, p.new_dirs) for p in placed] == [("a/b/c/x", 3), ("a/b/y", 0), ("a/b/d/e", 2), ("a", 0),
                                                       ("z", 0)]


def test_a_numbered_name_stays_within_255_bytes():
    long = "n" * 250 + ".txt"
    first, second = paths(f(long), f(long.upper()))
    assert second.endswith(" (2).TXT") and len(second.encode()) == 255


def test_a_path_that_grows_too_long_once_made_safe_is_refused():
    deep = "/".join(["con"] * 1365)  # 4094 bytes; each "_con" one byte more
    with pytest.raises(ManifestError, match="once made safe"):
        place([f(deep)])


def test_a_hundred_thousand_equal_names_place_in_linear_time():
    placed = place(f("same") for _ in range(MAX_ENTRIES))
    assert placed[-1].path == f"same ({MAX_ENTRIES})" and len({p.path for p in placed}) == MAX_ENTRIES


def test_deep_hostile_trees_cost_a_bounded_number_of_directories():
    chains = [f(f"{i}/" + "/".join(["d"] * 2000)) for i in range(51)]  # 51 × 2001 directories
    with pytest.raises(ManifestError, match="directories") as caught:
        place(chains)
    assert caught.value.code is ErrorCode.TOO_LARGE


names = st.lists(st.text(st.characters(codec="utf-8"), max_size=4)
                 | st.sampled_from(["/", "\\", ".", "..", "C:", "CON", "a", "A", "a.txt", "A.TXT", "e\u0301"]),
                 max_size=8).map("".join)


@settings(max_examples=300)
@given(st.lists(st.tuples(names, st.booleans()), max_size=25))
def test_whatever_a_manifest_says_its_paths_stay_inside_and_never_meet(items):
    placed = place(d(p) if is_dir else f(p) for p, is_dir in items)
    taken: dict[str, str] = {}  # folded path -> kind
    for (_, is_dir), where in zip(items, placed, strict=True):
        if where.path == "":
            assert is_dir
            continue
        parts = where.path.split("/")
        assert all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)
        assert not any(unicodedata.category(ch)[0] == "C" or ch in '\\:<>"|?*' for ch in where.path)
        assert all(components(p) == [p] for p in parts)  # neutralising again changes nothing
        folded = unicodedata.normalize("NFC", where.path.casefold())
        kind = "dir" if is_dir else "file"
        assert taken.get(folded, kind) == kind == "dir" or folded not in taken, f"{where.path} placed twice"
        taken[folded] = kind
        for depth in range(1, len(parts)):  # every parent is a directory, never a file
            assert taken.setdefault(unicodedata.normalize("NFC", "/".join(parts[:depth]).casefold()), "dir") == "dir"
