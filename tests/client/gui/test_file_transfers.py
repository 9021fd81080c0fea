"""Files between windows: attach, progress in both directions, cancel, saved and shown in the file manager."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.file_model import Transfer  # noqa: E402
from tests.client.gui.conftest import pump, received_dir  # noqa: E402
from tests.client.gui.driving import FakeDesktop, act, attach, meet, moving, select_peer, shows, sparse  # noqa: E402


def test_a_file_attached_in_one_window_is_saved_and_listed_in_the_other(make_window, tmp_path):
    alice_desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice, bob = make_window("alice", desktop=alice_desktop), make_window("bob", desktop=bob_desktop)
    both = [alice, bob]
    pump(both, lambda: shows(alice, "bob", "●") and shows(bob, "alice", "●"), "each to see the other")
    select_peer(alice, "bob", both)
    source = tmp_path / "quarterly report.pdf"
    source.write_bytes(os.urandom(3_000_000))  # a dozen chunks

    sent = attach(alice, alice_desktop, source)
    card = alice.file_card(sent.xfer)
    assert card is not None and card.actions == ["Cancel"] and card.bar_shown
    assert not sent.finished and sent.outgoing and sent.name == "quarterly report.pdf"

    # bob has another conversation open (none): the file counts as unread, like a message
    pump(both, lambda: "●  alice  1" in bob.roster_text(), "the incoming file as unread at bob")
    pump(both, lambda: card.status_text.startswith("Sent ✓"), "alice's file to be verified by bob")
    assert card.actions == [] and not card.bar_shown and sent.done == sent.size == 3_000_000
    assert "bob received quarterly report.pdf" in alice.log_text()

    select_peer(bob, "alice", both)
    (got,) = bob.file_cards()
    line = bob.model.file(got.xfer)
    assert line is not None and line.state is Transfer.DONE and line.path is not None
    assert line.path.parent == received_dir(tmp_path, "bob") and line.path.name.endswith("quarterly report.pdf")
    assert line.path.read_bytes() == source.read_bytes()
    assert got.status_text == "Received ✓ · verified and saved"
    assert got.saved_text == f"{line.path.parent}/{line.path.name}"  # not under $HOME here: shown in full
    assert got.actions == ["Open", "Show in folder"] and got.bar_fraction() == 0 and not got.bar_shown

    act(bob, got.button("Show in folder").invoke)
    pump([bob], lambda: bob_desktop.opened != [], "the folder to be shown")
    act(bob, got.button("Open").invoke)
    pump([bob], lambda: len(bob_desktop.opened) == 2, "the file to be opened")
    assert bob_desktop.opened == [received_dir(tmp_path, "bob"), line.path]


def test_progress_rows_move_to_done_in_both_directions(make_window, tmp_path):
    alice_desktop, bob_desktop = FakeDesktop(), FakeDesktop()
    alice, bob = make_window("alice", desktop=alice_desktop), make_window("bob", desktop=bob_desktop)
    meet(alice, bob)
    big = sparse(tmp_path / "disk.img", 24 << 20)  # about a hundred chunks
    small = tmp_path / "notes.txt"
    small.write_text("the other way\n")
    out = attach(alice, alice_desktop, big)
    back = attach(bob, bob_desktop, small)
    seen: set[tuple[str, str]] = set()  # (window, status) as the rows changed

    def done() -> bool:
        for name, window in (("alice", alice), ("bob", bob)):
            for card in window.file_cards():
                seen.add((name, card.status_text.split(" ")[0]))
        lines = [alice.model.file(out.xfer), bob.model.file(out.xfer), bob.model.file(back.xfer),
                 alice.model.file(back.xfer)]
        return all(line is not None and line.state is Transfer.DONE for line in lines)

    pump([alice, bob], done, "both files to arrive")
    # "Delivered": the file went through the broker's store, when a busy machine had the peer's session
    # reconnecting (offline for a moment) just as it was attached; either way the row ends done.
    sent = {"Sent", "Delivered"}
    assert {("bob", "Received"), ("alice", "Received")} <= seen
    assert {w for n, w in seen if n == "alice"} & sent and {w for n, w in seen if n == "bob"} & sent
    assert [c.status_text.split(" ")[0] in sent for c in alice.file_cards()] == [True, False]
    assert [c.status_text.split(" ")[0] in sent for c in bob.file_cards()] == [False, True]
    assert [c.status_text.split(" ")[0] for c in alice.file_cards()][1] == "Received"
    assert [c.status_text.split(" ")[0] for c in bob.file_cards()][0] == "Received"
    assert (received_dir(tmp_path, "bob") / bob.model.file(out.xfer).path.name).stat().st_size == 24 << 20
    assert alice.transfers_status_text() == "" and bob.transfers_status_text() == ""


def test_cancel_in_the_window_stops_the_transfer_on_both_sides(make_window, tmp_path):
    alice_desktop = FakeDesktop()
    alice = make_window("alice", desktop=alice_desktop, slow_files=True)
    bob = make_window("bob", slow_files=True)
    meet(alice, bob)
    line = attach(alice, alice_desktop, sparse(tmp_path / "huge.img", 256 << 20))
    card = alice.file_card(line.xfer)
    pump([alice, bob], lambda: moving(card, "Sending") and moving(next(iter(bob.file_cards()), None), "Receiving"),
         "progress with rate and time left on both sides")
    assert 0 < card.bar_fraction() < 1 and alice.transfers_status_text().startswith("↑ huge.img ")
    assert bob.transfers_status_text().startswith("↓ huge.img ")

    act(alice, card.button("Cancel").invoke)
    pump([alice, bob], lambda: line.state is Transfer.CANCELLED, "alice's cancel")
    assert card.status_text == "Cancelled" and card.actions == [] and not card.bar_shown
    assert "Sending huge.img to bob: Cancelled" in alice.log_text() and alice.transfers_status_text() == ""
    pump([alice, bob], lambda: [c.status_text for c in bob.file_cards()] == ["Cancelled by alice"],
         "bob to see it cancelled")
    assert [c.actions for c in bob.file_cards()] == [[]]
    assert not any(received_dir(tmp_path, "bob").iterdir())  # no file, no leftover .part
