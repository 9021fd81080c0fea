"""The rules of files in the timeline, without a display: held files (uploaded, then delivered), room files, folders,
and what each card says."""

from __future__ import annotations

from pathlib import Path

from p2pchat.client.gui.file_model import Transfer, transfer_status
from p2pchat.client.gui.model import ChatModel
from p2pchat.common.errors import ErrorCode, TransferError

ROOM = b"r" * 16


def test_a_held_file_is_uploaded_then_delivered_and_never_paused_while_it_waits():
    model = ChatModel("me")
    line = model.file_sending(b"h", "bob", "slides.pdf", 1000, 0, held=True)
    assert transfer_status(line) == "Uploading…"
    model.file_progress(b"h", "bob", "slides.pdf", True, 400, 1000, 100.0, 6.0, 0)
    assert transfer_status(line) == "Uploading 40% · 400 B of 1.0 KB · 100 B/s · 6 s left"
    assert model.file_uploaded(b"h") is line and line.state is Transfer.UPLOADED and not line.finished
    assert transfer_status(line) == "Uploaded — waiting for bob · you can go offline"
    assert model.file_uploaded(b"h") is None  # told twice: no news
    assert model.active_transfers() == [] and model.pause_transfers() == [] and line.state is Transfer.UPLOADED
    assert model.file_progress(b"h", "bob", "slides.pdf", True, 1000, 1000, 1.0, 0.0, 0) is None
    assert model.file_sent(b"h") is line and transfer_status(line) == "Delivered ✓ · bob verified and saved it"


def test_the_library_may_hold_a_file_the_window_thought_would_go_live():
    model = ChatModel("me")
    line = model.file_sending(b"l", "bob", "a.bin", 10, 0)  # bob went offline as it was offered
    assert model.file_uploaded(b"l") is line and line.held
    model.file_sent(b"l")
    assert transfer_status(line) == "Delivered ✓ · bob verified and saved it"


def test_room_files_are_in_the_rooms_conversation_with_their_sender_and_unread_there():
    model = ChatModel("me")
    ours = model.file_sending(b"o", "me", "plan.pdf", 10, 0, room=ROOM)
    assert ours.key == ROOM and transfer_status(ours) == "Uploading…"
    model.file_sent(b"o")
    assert transfer_status(ours) == "Sent ✓ · the room's members fetch it from the broker"
    theirs, new = model.file_incoming(b"t", "alice", "notes.txt", 10, 0, room=ROOM)
    assert new and theirs.peer == "alice" and model.conversation(ROOM).lines == [ours, theirs]
    assert model.conversation(ROOM).unread == 1 and model.conversation("alice").lines == []
    assert [r.name for r in model.roster()] == []  # a room's files make nobody a contact
    resumed, _ = model.file_progress(b"u", "carol", "old.bin", False, 5, 10, 1.0, 5.0, 0, room=ROOM)
    assert resumed.key == ROOM
    refused = model.file_refused("me", "x.bin", 0, "not a regular file", room=ROOM)
    assert refused.key == ROOM and transfer_status(refused) == "Failed: not a regular file"


def test_a_received_folder_says_so_with_its_file_count_when_known():
    model = ChatModel("me")
    line = model.file_received(b"f", "alice", "photos", Path("/r/photos"), 4096, 0, folder=True, files=12)
    assert line.folder and transfer_status(line) == "Received ✓ · folder, 12 files, verified and saved"
    one = model.file_received(b"g", "alice", "one", Path("/r/one"), 1, 0, folder=True, files=1)
    assert transfer_status(one) == "Received ✓ · folder, 1 file, verified and saved"
    unknown = model.file_received(b"h", "alice", "tree", Path("/r/tree"), 1, 0, folder=True)
    assert transfer_status(unknown) == "Received ✓ · folder, verified and saved"


def test_a_room_upload_the_broker_refuses_says_why():
    model = ChatModel("me")
    line = model.file_sending(b"x", "me", "big.iso", 10, 0, room=ROOM)
    model.file_failed(b"x", TransferError("the room's file store is full", ErrorCode.ROOM_QUOTA))
    assert transfer_status(line) == "Failed: the room's file store is full"
