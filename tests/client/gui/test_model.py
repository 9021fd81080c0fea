"""The rules behind the window, without a display: unread counts, delivery and transfer states, keys, wording."""

from __future__ import annotations

import pytest

from p2pchat.client.gui.delivery import MOVES, Delivery, delivery_style, delivery_text
from p2pchat.client.gui.file_model import Transfer, transfer_status
from p2pchat.client.gui.found import Search, match_spans, search_summary
from p2pchat.client.gui.model import ChatLine, ChatModel, KeyChange, Link, describe_failure, should_notify
from p2pchat.client.gui.units import human_eta, human_size
from p2pchat.client.storage.history import HistoryEntry
from p2pchat.common.errors import ErrorCode, RemoteError, TransferError


def test_unread_counts_and_roster_order():
    model = ChatModel("me")
    model.set_online(frozenset({"me", "zed", "amy"}))
    model.receive(b"1", "zed", "hi", 0)
    model.receive(b"2", "zed", "there", 0)
    model.receive(b"3", "gone", "bye", 0)  # talked to us, no longer online
    assert [(r.name, r.online, r.unread) for r in model.roster()] == [
        ("amy", True, 0), ("zed", True, 2), ("gone", False, 1)]
    model.open("zed")
    model.receive(b"4", "zed", "read at once", 0)
    assert model.conversation("zed").unread == 0


def test_delivery_only_moves_forward_and_a_failure_is_final():
    model = ChatModel("me")
    line = model.sending(b"a", "bob", "x", 0)
    assert model.acked(b"a") is line and line.delivery is Delivery.SENT
    assert model.failed(b"a", "late") is None and line.delivery is Delivery.SENT  # the broker has it
    assert model.receipt(b"a", "read") is line and line.delivery is Delivery.READ  # "delivered" may come later
    assert model.receipt(b"a", "delivered") is None and model.acked(b"a") is None and line.delivery is Delivery.READ
    failed = model.sending(b"b", "bob", "y", 0)
    assert model.failed(b"b", "recipient is offline") is failed and failed.delivery is Delivery.FAILED
    assert model.acked(b"b") is None and model.receipt(b"b", "delivered") is None
    refused = model.refused("bob", "z", 0, "message too large")
    assert refused.delivery is Delivery.FAILED and refused.failure == "message too large"
    model.receive(b"c", "bob", "theirs", 0)
    assert model.receipt(b"c", "read") is None  # receipts are about our messages only
    assert model.link is Link.OFFLINE


def entry(msg_id: bytes, peer: str, outgoing: bool, text: str, ts: int, state: str) -> HistoryEntry:
    return HistoryEntry(msg_id, peer, outgoing, text, ts, state)


def test_history_merges_with_what_this_run_already_shows():
    model = ChatModel("me")
    model.file_incoming(b"f", "bob", "f.bin", 10, 150)  # files are not in history
    mine = model.sending(b"2", "bob", "mine", 200)
    model.receive(b"3", "bob", "theirs", 300)
    history = [entry(b"1", "bob", False, "old", 100, "received"), entry(b"2", "bob", True, "mine", 200, "delivered"),
               entry(b"3", "bob", False, "theirs", 300, "received")]
    conv = model.load("bob", history)
    assert [line.text if isinstance(line, ChatLine) else line.name for line in conv.lines] == \
        ["old", "f.bin", "mine", "theirs"]
    assert conv.lines[2] is mine and mine.delivery is Delivery.DELIVERED
    assert conv.unread == 3  # the file, "theirs", and "old" from an earlier run
    model.load("bob", history)  # loading again, or an event arriving after the load, changes nothing
    assert model.receive(b"1", "bob", "old", 100) is None
    assert len(conv.lines) == 4 and conv.unread == 3
    model.load("bob", [entry(b"2", "bob", True, "mine", 200, "sent")])
    assert mine.delivery is Delivery.DELIVERED  # history read before a receipt never undoes it


def test_people_from_history_are_listed_offline_after_those_online():
    model = ChatModel("me")
    model.set_online(frozenset({"amy"}))
    model.load("zed", [entry(b"1", "zed", True, "hi", 0, "read")])
    model.load("bea", [entry(b"2", "bea", False, "yo", 0, "received"), entry(b"3", "bea", False, "?", 0, "read")])
    assert [(r.name, r.online, r.unread) for r in model.roster()] == [
        ("amy", True, 0), ("bea", False, 1), ("zed", False, 0)]


def test_reading_a_conversation_is_news_once():
    model = ChatModel("me")
    model.sending(b"1", "bob", "mine", 0)
    assert not model.has_unread("bob") and not model.mark_read("bob")
    model.receive(b"2", "bob", "theirs", 0)
    assert model.has_unread("bob") and model.mark_read("bob")
    assert not model.has_unread("bob") and not model.mark_read("bob") and not model.has_unread(None)


def test_search_marks_the_words_the_query_starts():
    assert match_spans("Numbers for Thursday, thus", "thu num") == [(0, 3), (12, 15), (22, 25)]
    assert match_spans("re: the re-run, more", "re") == [(0, 2), (8, 10)] and match_spans("anything", "  ") == []
    one = entry(b"1", "bob", False, "hi", 0, "read")
    assert search_summary(Search("hi", (one,), 1)) == "1 message matching “hi”"
    assert search_summary(Search("hi", (one,), 1000, capped=True)) == "newest 1 of 1000+ messages matching “hi”"
    assert search_summary(Search("zz", (), 0)) == "nothing matches “zz”"


@pytest.mark.parametrize("enabled, focused, active, expected", [
    (True, True, "bob", False),  # already reading it
    (True, True, "carol", True),  # another conversation is open
    (True, True, None, True),
    (True, False, "bob", True),  # window in the background
    (False, False, "carol", False),  # turned off
])
def test_notification_rule(enabled, focused, active, expected):
    assert should_notify(enabled, focused, active, "bob") is expected


def test_failure_descriptions_speak_chat():
    assert describe_failure(RemoteError("x", ErrorCode.RECIPIENT_OFFLINE)) == "recipient is offline"
    assert describe_failure(RemoteError("odd thing", ErrorCode.BAD_FRAME)) == "odd thing"


def test_a_transfer_ends_once_and_late_events_change_nothing():
    model = ChatModel("me")
    line = model.file_sending(b"x1", "bob", "a.bin", 1000, 0)
    assert line.state is Transfer.OFFERING and transfer_status(line) == "Waiting for bob to accept…"
    model.file_progress(b"x1", "bob", "a.bin", True, 250, 1000, 125.0, 6.0, 0)
    assert line.state is Transfer.ACTIVE and line.fraction == 0.25
    assert transfer_status(line) == "Sending 25% · 250 B of 1.0 KB · 125 B/s · 6 s left"
    assert model.file_sent(b"x1") is line and line.state is Transfer.DONE and line.fraction == 1.0
    assert model.file_failed(b"x1", TransferError("late", ErrorCode.CANCELLED)) is None
    assert model.file_progress(b"x1", "bob", "a.bin", True, 10, 1000, 1.0, 1.0, 0) is None
    assert line.state is Transfer.DONE and model.active_transfers() == []


def test_who_cancelled_is_said_from_this_sides_point_of_view():
    model = ChatModel("me")
    mine = model.file_sending(b"a", "bob", "a.bin", 10, 0)
    mine.cancel_asked = True
    theirs, _ = model.file_incoming(b"b", "bob", "b.bin", 10, 0)
    model.file_failed(b"a", TransferError("cancelled by you", ErrorCode.CANCELLED))
    model.file_failed(b"b", RemoteError("bob: cancelled by you", ErrorCode.CANCELLED))
    assert (mine.state, transfer_status(mine)) == (Transfer.CANCELLED, "Cancelled")
    assert (theirs.state, transfer_status(theirs)) == (Transfer.CANCELLED, "Cancelled by bob")
    broken, _ = model.file_incoming(b"c", "bob", "c.bin", 10, 0)
    model.file_failed(b"c", TransferError("c.bin: chunk 0 failed authentication", ErrorCode.INTEGRITY))
    assert transfer_status(broken) == "Failed: c.bin: chunk 0 failed authentication"


def test_an_incoming_file_is_unread_once_even_if_offered_again():
    model = ChatModel("me")
    _, new = model.file_incoming(b"f", "bob", "f.bin", 10, 0)
    again, new_again = model.file_incoming(b"f", "bob", "f.bin", 10, 0)  # re-offered after a reconnect
    assert new and not new_again and model.conversation("bob").unread == 1
    assert [r.name for r in model.roster()] == ["bob"] and len(model.conversation("bob").lines) == 1
    model.open("bob")
    model.file_incoming(b"g", "bob", "g.bin", 10, 0)
    assert model.conversation("bob").unread == 0


def test_disconnecting_pauses_transfers_and_progress_resumes_them():
    model = ChatModel("me")
    line = model.file_sending(b"p", "bob", "p.bin", 100, 0)
    model.file_progress(b"p", "bob", "p.bin", True, 40, 100, 10.0, 6.0, 0)
    assert model.pause_transfers() == [line] and line.state is Transfer.PAUSED
    assert transfer_status(line) == "Paused at 40% · resumes when you reconnect"
    model.file_progress(b"p", "bob", "p.bin", True, 60, 100, 10.0, 4.0, 0)
    assert line.state is Transfer.ACTIVE
    resumed, new = model.file_progress(b"q", "carol", "q.bin", False, 5, 10, 1.0, 5.0, 0)  # from an earlier run
    assert new and not resumed.outgoing and model.conversation("carol").lines == [resumed]


def test_a_key_change_marks_the_peer_until_accepted():
    model = ChatModel("me")
    change = KeyChange("aaaa", "bbbb")
    assert model.peer_key_changed("bob", change) and not model.peer_key_changed("bob", change)  # news once
    assert [(r.name, r.key_changed) for r in model.roster()] == [("bob", True)]
    model.peer_key_accepted("bob")
    assert model.roster() == []


def test_messages_waiting_for_a_key_are_held_and_go_once_it_is_accepted():
    model = ChatModel("me")
    early = model.sending(b"a", "bob", "written before the change was known", 0)
    assert model.peer_key_changed("bob", KeyChange("aaaa", "bbbb"))
    assert model.hold_unsent("bob") == [early] and early.delivery is Delivery.HELD
    late = model.sending(b"b", "bob", "written since", 1)
    assert model.send_state(b"b", "held") is late and model.waiting_to_send("bob") == 2
    assert model.peer_key_accepted("bob") == [early, late] and late.delivery is Delivery.SENDING
    assert model.acked(b"b") is late and late.delivery is Delivery.SENT


def test_a_refused_message_is_resealed_once_then_delivered_or_failed():
    model = ChatModel("me")
    line = model.sending(b"a", "bob", "x", 0)
    model.acked(b"a")
    assert model.send_state(b"a", "undecryptable") is line and model.waiting_to_send("bob") == 1
    assert model.receipt(b"a", "delivered") is None  # a refused message is not delivered until it goes again
    assert model.send_state(b"a", "resealed") is line and model.acked(b"a") is line
    assert model.send_state(b"a", "undecryptable") is None  # history reseals once: a second refusal fails it
    assert model.send_state(b"a", "failed") is line and line.failure == "bob still couldn't open it"
    assert model.receipt(b"a", "delivered") is None and line.delivery is Delivery.FAILED
    other = model.sending(b"b", "bob", "y", 0)
    model.send_state(b"b", "held")
    assert model.failed(b"b", "recipient is busy") is other  # not with the broker yet: it may still fail to send


def test_history_shows_a_key_changes_states_and_never_undoes_what_events_said():
    model = ChatModel("me")
    model.load("bob", [entry(b"1", "bob", True, "refused", 1, "undecryptable"),
                       entry(b"2", "bob", True, "sealed again", 2, "resealed")])
    refused, again = model.conversation("bob").lines
    assert (refused.delivery, again.delivery) == (Delivery.UNDECRYPTABLE, Delivery.RESEALED)
    assert model.send_state(b"2", "undecryptable") is None  # resealed already, from an earlier run
    model.send_state(b"1", "resealed")
    model.acked(b"1")
    model.load("bob", [entry(b"1", "bob", True, "refused", 1, "undecryptable")])  # read before the events
    assert refused.delivery is Delivery.SENT


def test_every_state_reads_in_plain_words():
    words = {state: delivery_text(state, "bob") for state in MOVES if state is not Delivery.RECEIVED}
    assert words[Delivery.HELD] == "waiting — accept bob's new key to send"
    assert words[Delivery.UNDECRYPTABLE] == \
        "bob couldn't open this — it will be re-sent when you accept bob's new key"
    assert words[Delivery.RESEALED] == "re-sent to bob's new key…"
    refused = "bob still couldn't open it"
    assert delivery_text(Delivery.FAILED, "bob", refused) == f"failed — {refused}"
    assert all(words.values()) and len(set(words.values())) == len(words)
    assert {delivery_style(s) for s in (Delivery.HELD, Delivery.UNDECRYPTABLE)} == {"meta-warn"}


def test_a_key_accepted_automatically_is_a_notice_until_seen():
    model = ChatModel("me")
    change = KeyChange("aaaa", "bbbb")
    assert model.peer_key_auto_accepted("bob", change) and not model.peer_key_auto_accepted("bob", change)
    assert "bob" in model.key_notices and "bob" not in model.key_changed
    model.dismiss_key_notice("bob")
    assert model.key_notices == {}


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1_234_567, "1.2 MB"),
                                     (150_000_000, "150 MB"), (3 * 10**12, "3.0 TB")])
def test_sizes_read_like_a_file_manager(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize("seconds, text", [(None, ""), (0.2, "1 s left"), (42, "42 s left"), (150, "2 min left"),
                                           (3 * 3600 + 5 * 60, "3 h 5 min left")])
def test_time_left_reads_naturally(seconds, text):
    assert human_eta(seconds) == text


def test_what_another_device_of_ours_sent_is_our_own_line_and_its_receipts_move_it():
    model = ChatModel("bob")
    model.receive(b"1", "alice", "hi bob", 10)
    line = model.echoed(b"2", "alice", "sent from my desktop", 5)
    assert line is not None and line.outgoing and line.delivery is Delivery.SENT
    assert [getattr(x, "text") for x in model.conversation("alice").lines] == ["sent from my desktop", "hi bob"]
    assert model.conversation("alice").unread == 1  # ours: nothing new to read
    assert model.echoed(b"2", "alice", "sent from my desktop", 5) is None  # history showed it first
    assert model.receipt(b"2", "delivered") is line and model.receipt(b"2", "read") is line
    assert delivery_text(line.delivery, "alice") == "read ✓✓"


def test_read_on_another_device_clears_the_unread_count_once_all_is_read():
    model = ChatModel("bob")
    model.receive(b"1", "alice", "one", 0)
    model.receive(b"2", "alice", "two", 0)
    assert model.read_elsewhere(b"1") is model.conversation("alice") and model.conversation("alice").unread == 1
    assert model.read_elsewhere(b"2").unread == 0 and not model.has_unread("alice")
    assert model.read_elsewhere(b"2") is None and model.read_elsewhere(b"unknown") is None
    model.sending(b"3", "alice", "mine", 0)
    assert model.read_elsewhere(b"3") is None  # a read receipt for ours is a Receipt, not this


def test_a_file_another_device_took_is_no_error():
    model = ChatModel("bob")
    line, _ = model.file_incoming(b"f", "alice", "photo.jpg", 300_000, 0)
    assert model.file_failed(b"f", RemoteError("another device of bob's took this file", ErrorCode.TAKEN)) is line
    assert line.state is Transfer.TAKEN and line.finished and model.active_transfers() == []
    assert transfer_status(line) == "Taken by another of your devices"
    assert model.file_failed(b"f", TransferError("late", ErrorCode.CANCELLED)) is None


def test_devices_read_as_number_name_and_fingerprint_and_this_one_cannot_be_unlinked_from_itself():
    from p2pchat.broker.core.ports import Device
    from p2pchat.client.gui.accounts import chosen_device, own_device_lines, peer_device_lines, unlink_choices
    from p2pchat.common.crypto import fingerprint

    desk, laptop = Device(1, b"\1" * 32, "desk"), Device(2, b"\2" * 32, "")
    assert own_device_lines([desk, laptop], desk.key).splitlines() == [
        f" 1  desk                      {fingerprint(desk.key)}  · this device",
        f" 2  (unnamed)                 {fingerprint(laptop.key)}"]
    assert unlink_choices([desk, laptop], desk.key) == ["2 · unnamed"]
    assert chosen_device("2 · unnamed") == "2" and chosen_device("") == ""
    assert peer_device_lines([(1, desk.key), (3, laptop.key)]) == (
        f"device 1 · {fingerprint(desk.key)}\ndevice 3 · {fingerprint(laptop.key)}")
