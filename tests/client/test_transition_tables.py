"""Every (phase, input) pair of the transfer machines' transition tables, driven for real (h2's test_state_machines).

For each machine, phase and input: a transfer is brought to the phase through the manager (real
files, real records), the input is fed through the machine's own handler (or, for the inputs the
machine only raises itself, through its gate), and then:

* a pair in the table ends in the table's phase (or, IGNORE, in the same phase, quietly);
* a pair not in the table ends FAILED, reported (``file_cancel bad_frame`` to the peer, ``FileFailed``
  to the user), with nothing left behind: no open file, no ``.part``, no record, not tracked;
* a finished transfer (DONE, FAILED) takes anything and does nothing;
* nothing raises.

Hypothesis varies what the transfer went through to get there (sealed or not, file size, chunks
already received); the pairs are enumerated so that none is left to chance.
"""

from __future__ import annotations

import hashlib
import tempfile
import zlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.manifest import DIRECTORY, Entry, Manifest
from p2pchat.client.core.receiving import RECEIVER, Incoming
from p2pchat.client.core.sending import SENDER, Outgoing
from p2pchat.client.core.transfer import TransferConfig, TransferManager
from p2pchat.client.core.transfer_machine import IGNORE, Input, Phase, TransferMachine, frame_id
from p2pchat.client.e2e import NO_SEALING, EndToEnd, MemoryKeys
from p2pchat.client.storage.folders import STEP_ENTRIES
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.common.crypto import FileCipher
from p2pchat.common.errors import ErrorCode, RemoteError, TransferError
from p2pchat.common.protocol import Envelope, FileChunk, FileCredit, FileOffer, decode
from tests.cores import id_source, identity

ME, PEER = "me", "ann"
CHUNK, WINDOW = 16, 4
GATE_ONLY = {Input.NO_KEY, Input.VERIFIED, Input.UNREACHABLE, Input.EXTRACT}  # raised by the machine itself
PHASES = {"sender": (Phase.OFFERING, Phase.WAITING, Phase.SENDING, Phase.DONE, Phase.FAILED),
          "receiver": (Phase.QUEUED, Phase.RECEIVING, Phase.WAITING, Phase.EXTRACTING, Phase.DONE, Phase.FAILED)}
PAIRS = [(name, phase, what) for name, phases in PHASES.items() for phase in phases for what in Input]


class Bench:
    """One manager (``me``) and its peer ``ann``, whose key both sides know, in a temporary directory."""

    def __init__(self, root: Path, sealed: bool, max_incoming: int = 16) -> None:
        self.root = root
        pinned = MemoryKeys()
        pinned.put(PEER, identity(PEER).public)
        self.e2e = EndToEnd(ME, identity(ME), pinned, MemoryKeys(), random_bytes=lambda n: bytes(n)) if sealed else NO_SEALING
        self.peer_e2e = EndToEnd(PEER, identity(PEER), MemoryKeys(), MemoryKeys()) if sealed else NO_SEALING
        self.peer_e2e.learn(ME, identity(ME).public)
        config = TransferConfig(root / "inbox", chunk_size=CHUNK, window=WINDOW, max_incoming=max_incoming)
        self.manager = TransferManager(ME, config, self.e2e, wall_ms=lambda: 0, wall_time=lambda: 1_700_000_000.0,
                                       new_id=id_source("bench"), files=LocalFiles(),
                                       records=RecordDir(root / "state", ME))
        self.manager.on_peers(frozenset({PEER}), 0.0)
        self.sealed = sealed
        self.folder = False  # ann offers a folder (§8.3): ``content`` is its stream
        self.content = b""
        self.xfer = hashlib.sha256(b"ann's offer").digest()[:16]
        self.file_key = hashlib.sha256(b"ann's file key").digest()

    # --- the frames ann sends -----------------------------------------------------------------------
    def offer(self, xfer: bytes) -> Envelope:
        meta = {"name": "a.bin", **({"kind": "folder"} if self.folder else {}),
                **({"key": self.file_key, "session": 1} if self.sealed else {})}
        msg_id = xfer[:10] + b"offer!"
        body = self.peer_e2e.seal(ME, msg_id, 0, msgpack.packb(meta))
        return Envelope(msg_id, 0, FileOffer(PEER, ME, xfer, len(self.content), CHUNK, body))

    def chunk(self, xfer: bytes, index: int) -> tuple[FileChunk, bytes]:
        data = self.content[index * CHUNK:(index + 1) * CHUNK]
        final = index == max(1, -(-len(self.content) // CHUNK)) - 1
        if self.sealed:
            return FileChunk(PEER, ME, xfer, index, final), FileCipher(self.file_key, xfer).seal(index, final, data)
        sha = hashlib.sha256(self.content).digest() if final else None
        return FileChunk(PEER, ME, xfer, index, final, zlib.crc32(data), sha), data

    # --- a transfer in each phase ---------------------------------------------------------------------
    def sender_in(self, phase: Phase, size: int) -> Outgoing:
        self.content = bytes(i % 251 for i in range(size))
        path = self.root / "source.bin"
        path.write_bytes(self.content)
        xfer, _ = self.manager.send_file(PEER, path, 0.0)
        out = self.manager.outgoing[xfer]
        if phase is not Phase.OFFERING:
            out.on_credit(FileCredit(PEER, ME, xfer, 0, WINDOW, True), 0.1)  # SENDING, the file open
        if phase is Phase.WAITING:
            out.on_error(RemoteError("offline", ErrorCode.RECIPIENT_OFFLINE), 0.2)
        elif phase is Phase.DONE:
            out.on_done(0.2)
        elif phase is Phase.FAILED:
            out.fail(TransferError("given up"), tell_peer=True)
        assert out.phase is phase
        return out

    def receiver_in(self, phase: Phase, size: int, held: int) -> Incoming:
        self.content = bytes(i % 251 for i in range(size))
        if phase is Phase.EXTRACTING:  # a folder whose making takes more than the step its last chunk starts
            self.folder = True
            self.content = Manifest(tuple(Entry(f"d{i}", DIRECTORY, 0, 0o755, b"")
                                          for i in range(STEP_ENTRIES + 1))).header()
        self.manager.on_message(self.offer(self.xfer), 0.0)
        inc = self.manager.incoming.get(self.xfer) or self.manager.queued[self.xfer]
        for index in range(held if phase is not Phase.QUEUED else 0):  # chunks already in the .part
            inc.on_chunk(*self.chunk(self.xfer, index), 0.1)
        if phase is Phase.WAITING:
            inc.on_error(RemoteError("offline", ErrorCode.RECIPIENT_OFFLINE), 0.2)
        elif phase in (Phase.DONE, Phase.EXTRACTING):
            for index in range(inc.next, inc.chunks):
                inc.on_chunk(*self.chunk(self.xfer, index), 0.2)
        elif phase is Phase.FAILED:
            inc.fail(TransferError("given up"), tell_peer=True)
        assert inc.phase is phase
        return inc

    # --- an input, as the machine gets it -------------------------------------------------------------
    def drive(self, machine: TransferMachine, what: Input) -> list:
        now = 1.0
        xfer = machine.xfer
        if what in GATE_ONLY:
            return machine.enter(what) or []
        if what is Input.OFFER:
            return machine.on_offer(self.offer(xfer), now)
        if what is Input.CREDIT:
            return machine.on_credit(FileCredit(PEER, ME, xfer, 0, WINDOW, False), now)
        if what is Input.CHUNK:
            return machine.on_chunk(*self.chunk(xfer, getattr(machine, "next", 0)), now)
        if what is Input.DONE:
            return machine.on_done(now)
        if what is Input.CANCEL:
            return machine.on_cancel(RemoteError(f"{PEER}: no", ErrorCode.CANCELLED))
        if what is Input.START:
            return machine.start(now)
        if what is Input.ABORT:
            return machine.fail(TransferError("cancelled by you", ErrorCode.CANCELLED), tell_peer=True)
        return machine.on_signal(what, now)  # STALLED, RECONNECTED, PEER_BACK, KEY_ARRIVED


def left_behind(bench: Bench, machine: TransferMachine) -> list[str]:
    """What a failed transfer still holds."""
    manager, xfer = bench.manager, machine.xfer
    found = []
    if xfer in manager.outgoing or xfer in manager.incoming or xfer in manager.queued:
        found.append("still tracked")
    if getattr(machine, "reader", None) is not None or getattr(machine, "writer", None) is not None:
        found.append("file still open")
    if manager.on_error(frame_id(xfer), RemoteError("late", ErrorCode.RECIPIENT_OFFLINE), 2.0) is not None:
        found.append("errors about it still reach it")
    if list((bench.root / "state").rglob(f"{xfer.hex()}.json")):
        found.append("record still on disk")
    if type(machine) is Incoming and machine.part.exists():
        found.append(".part still on disk")
    if list((bench.root / "inbox").glob(".*.tree")):
        found.append("a folder half made")
    return found


def reported_failure(actions: list, xfer: bytes) -> tuple[list[ErrorCode], list[ErrorCode]]:
    """(codes of file_cancel sent, codes of FileFailed emitted) for ``xfer``."""
    cancels = [decode(a.frames).message.code for a in actions
               if type(a) is Transmit and type(decode(a.frames).message).__name__ == "FileCancel"
               and decode(a.frames).message.xfer == xfer]
    failures = [a.event.error.code for a in actions
                if type(a) is Emit and type(a.event) is ev.FileFailed and a.event.xfer == xfer]
    return cancels, failures


@pytest.mark.parametrize("name,phase,what", PAIRS, ids=[f"{n}-{p.value}-{w.name}" for n, p, w in PAIRS])
@settings(max_examples=6, deadline=None)
@given(sealed=st.booleans(), chunks=st.integers(4, 9), held=st.integers(0, 2))  # the next chunk is never the last
def test_every_phase_takes_every_input_as_its_table_says(name, phase, what, sealed, chunks, held):
    table = SENDER if name == "sender" else RECEIVER
    with tempfile.TemporaryDirectory(prefix="p2pchat-table-") as tmp:
        bench = Bench(Path(tmp), sealed, max_incoming=0 if phase is Phase.QUEUED else 16)
        size = chunks * CHUNK - 5
        machine = bench.sender_in(phase, size) if name == "sender" else bench.receiver_in(phase, size, held)
        try:
            actions = bench.drive(machine, what)
            target = table.get((phase, what))
            cancels, failures = reported_failure(actions, machine.xfer)
            if phase in (Phase.DONE, Phase.FAILED):
                assert actions == [] and machine.phase is phase, "a finished transfer acted"
            elif target is None:
                assert machine.phase is Phase.FAILED, f"{what.name} is not in the table, yet {machine.phase}"
                assert cancels == [ErrorCode.BAD_FRAME] and failures == [ErrorCode.BAD_FRAME], actions
            elif target is IGNORE:
                assert machine.phase is phase and not failures, actions
            else:
                assert machine.phase is target, f"{machine.phase}, not {target}"
            if machine.phase is Phase.FAILED and phase is not Phase.FAILED:
                assert failures, "failed without telling the user"
                assert left_behind(bench, machine) == []
        finally:
            bench.manager.close()


def test_the_tables_name_only_live_phases_and_every_live_phase_fails_cleanly_when_aborted():
    for table, live in ((SENDER, {Phase.OFFERING, Phase.WAITING, Phase.SENDING}),
                        (RECEIVER, {Phase.QUEUED, Phase.RECEIVING, Phase.WAITING, Phase.EXTRACTING})):
        assert {phase for phase, _ in table} == live
        for phase in live:
            assert table[(phase, Input.ABORT)] is Phase.FAILED and table[(phase, Input.CANCEL)] is Phase.FAILED


def test_a_frame_only_the_other_direction_sends_fails_the_transfer_and_a_strangers_is_ignored(tmp_path):
    bench = Bench(tmp_path, sealed=True)
    inc = bench.receiver_in(Phase.RECEIVING, 5 * CHUNK, held=1)
    xfer = inc.xfer
    stranger = FileCredit("mallory", ME, xfer, 0, WINDOW, False)
    assert bench.manager.on_message(Envelope(frame_id(xfer), 0, stranger), 1.0) == []
    assert inc.phase is Phase.RECEIVING
    credit = FileCredit(PEER, ME, xfer, 0, WINDOW, False)  # ann sends us this file: a credit is hers to get
    actions = bench.manager.on_message(Envelope(frame_id(xfer), 0, credit), 1.0)
    assert reported_failure(actions, xfer) == ([ErrorCode.BAD_FRAME], [ErrorCode.BAD_FRAME])
    assert left_behind(bench, inc) == []
