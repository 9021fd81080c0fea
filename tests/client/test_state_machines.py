"""The sans-I/O cores driven by hypothesis with arbitrary inputs in arbitrary orders.

Each machine feeds one core (client transfers, client session, broker routing) frames
and ticks it could meet from a confused or hostile peer, in any order, and after every
step checks the invariants that must hold whatever came in: nothing raises, every frame
the core emits is valid on the wire, and each core's own promises (credit is respected,
a finished transfer stays quiet, a connection is one user, presence is sequenced +1, a
queued message is consumed only by its recipient). The pattern is h2's
test_state_machines.py; the rules are the table of inputs. The cores get deterministic id and key
sources, so hypothesis can replay any run it found.
(Over 500 lines: one machine per core and the plain tests they led to, sharing the helpers at the top.)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink, NoStore
from p2pchat.broker.core.actions import Publish, Relay, Send
from p2pchat.broker.core.ports import Kicked, LinkEvent, Refusal
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.e2e import NO_SEALING, EndToEnd, MemoryKeys
from p2pchat.client.core.session import ClientSession, State, validate_text
from p2pchat.client.core.transfer import REF_PREFIX, Phase, TransferConfig, TransferManager, frame_id
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.common.crypto import FileCipher
from p2pchat.common.errors import ErrorCode, P2PChatError, RemoteError
from p2pchat.common.protocol import MAX_INT, Ack, AckStatus, ChatMessage, Consume, Envelope, Error, FileCancel, FileChunk, FileCredit, FileDone, FileOffer, Heartbeat, KeyInfo, KeyRequest, PeerSync, PeerUpdate, Receipt, ReceiptStatus, Register, Registered, Snapshot, SnapshotRequest, Unregister, decode, pack
from tests.cores import KeyBook, id_source, identity
from tests.common.test_protocol import example_message as slow_example_message

MACHINE = settings(max_examples=100, stateful_step_count=50, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
ME = "me"
PEERS = ("ann", "bob")
CHUNK, WINDOW = 16, 4  # tiny chunks: a few bytes make a many-chunk file
MAX_FILE = 200
SIZES = [0, 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 3, 7 * CHUNK]  # empty, one chunk, more than a window
contents = st.builds(lambda size, seed: bytes((seed + i) % 256 for i in range(size)),
                     st.sampled_from(SIZES), st.integers(0, 255))
counts = st.sampled_from([0, 1, 2, 3, WINDOW, 7, 13, 2**31, MAX_INT]) | st.integers(0, 20)
codes = st.sampled_from(list(ErrorCode))
example_message = functools.cache(slow_example_message)  # it reads type hints on every call


def transmitted(actions) -> list[Envelope]:
    """The envelopes of every Transmit: the core must only ever emit valid frames."""
    return [decode(a.frames) for a in actions if type(a) is Transmit]


def emitted(actions) -> list[ev.Event]:
    return [a.event for a in actions if type(a) is Emit]


# --- client transfers ------------------------------------------------------------------------
class TransferMachine(RuleBasedStateMachine):
    """One TransferManager (``me``) sending files to and receiving files from two peers, plaintext (the
    unencrypted path checks CRCs and the whole-file SHA-256 itself; the sealed path is GCM's job)."""

    CHECK_WINDOW = False  # a sender keeps at most WINDOW chunks beyond the last confirmed one in flight
    SEALED = False  # end-to-end: offers sealed to us, chunks sealed with the file's key

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="p2pchat-machine-"))
        self.now = 0.0
        self.sources = self.root / "sources"
        self.sources.mkdir()
        self.inbox = self.root / "inbox"
        self.pinned = MemoryKeys()  # our peers' keys, known before any transfer (kept across restarts)
        self.peer_e2e = {}
        for peer in PEERS:
            self.pinned.put(peer, identity(peer).public)
            self.peer_e2e[peer] = EndToEnd(peer, identity(peer), MemoryKeys(), MemoryKeys())
            self.peer_e2e[peer].learn(ME, identity(ME).public)
        self.manager = self._manager()
        self.out_peer: dict[bytes, str] = {}  # outgoing transfers ever started, to whom
        self.granted: dict[bytes, int] = defaultdict(int)  # highest upto the right peer ever granted
        self.confirmed: dict[bytes, int] = defaultdict(int)  # highest next the right peer ever reported
        self.offers: dict[bytes, tuple[str, bytes]] = {}  # incoming transfers ever offered: sender, content
        self.finished: set[tuple[bytes, str]] = set()  # (xfer, "in"/"out") that emitted FileReceived/Sent/Failed
        self.received: set[Path] = set()  # files announced by FileReceived

    def _manager(self) -> TransferManager:
        config = TransferConfig(received_dir=self.inbox, max_file_size=MAX_FILE, chunk_size=CHUNK, window=WINDOW,
                                stall_timeout=3.0)
        e2e = (EndToEnd(ME, identity(ME), self.pinned, MemoryKeys(), random_bytes=lambda n: bytes(n))
               if self.SEALED else NO_SEALING)
        self.restarts = getattr(self, "restarts", 0) + 1  # each run of the client draws other ids
        return TransferManager(ME, config, e2e, wall_ms=lambda: 0, wall_time=lambda: 1_700_000_000.0,
                               new_id=id_source(f"run {self.restarts}"), files=LocalFiles(),
                               records=RecordDir(self.root / "state", ME))

    def teardown(self) -> None:
        self.manager.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- what every step must respect ---------------------------------------------------
    def apply(self, actions, credit: tuple[bytes, FileCredit] | None = None) -> None:
        for env in transmitted(actions):
            msg = env.message
            assert msg.sender == ME, msg
            if type(msg) is FileChunk:
                assert credit is not None and credit[0] == msg.xfer, f"chunk {msg.index} sent without a credit"
                assert (msg.xfer, "out") not in self.finished, f"chunk after the transfer ended: {msg}"
                assert msg.index < self.granted[msg.xfer], f"chunk {msg.index} beyond credit {self.granted[msg.xfer]}"
                if self.CHECK_WINDOW:
                    assert msg.index < self.confirmed[msg.xfer] + WINDOW, (
                        f"chunk {msg.index} with only {self.confirmed[msg.xfer]} confirmed and a window of {WINDOW}")
            elif type(msg) is FileOffer:
                assert (msg.xfer, "out") not in self.finished, f"offer after the transfer ended: {msg}"
            elif type(msg) is FileCredit:
                assert (msg.xfer, "in") not in self.finished, f"credit after the transfer ended: {msg}"
                assert msg.next <= msg.upto <= msg.next + WINDOW, msg
        for event in emitted(actions):
            direction = getattr(event, "direction", None)
            if type(event) in (ev.FileSent, ev.FileReceived, ev.FileFailed, ev.FileProgress):
                direction = direction or ("out" if type(event) is ev.FileSent else "in")
                assert (event.xfer, direction) not in self.finished, f"{event} after the transfer ended"
            if type(event) in (ev.FileSent, ev.FileReceived, ev.FileFailed):
                self.finished.add((event.xfer, direction))
            if type(event) in (ev.FileFailed, ev.FileIncoming):
                assert (event.xfer, "in") not in self.finished or type(event) is ev.FileFailed, event

            if type(event) is ev.FileReceived:  # damaged chunks may cost retries, never the content
                assert event.path.read_bytes() == self.offers[event.xfer][1], "received file differs from the sent one"
                self.received.add(event.path)

    @invariant()
    def files_appear_only_after_verification(self) -> None:
        if self.inbox.exists():
            visible = {p for p in self.inbox.iterdir() if not p.name.startswith(".")}
            assert visible == self.received, visible ^ self.received

    @invariant()
    def nothing_is_written_beyond_the_offered_size(self) -> None:
        for inc in self.manager.incoming.values():
            if inc.part.exists():
                assert inc.part.stat().st_size <= inc.size
            assert inc.next <= inc.chunks

    @invariant()
    def ended_transfers_are_forgotten(self) -> None:
        for direction, table in (("out", self.manager.outgoing), ("in", self.manager.incoming)):
            for xfer, item in table.items():
                assert (xfer, direction) not in self.finished and item.phase not in (Phase.DONE, Phase.FAILED)

    # --- sending ----------------------------------------------------------------------------
    @rule(peer=st.sampled_from(PEERS), content=contents)
    def send_file(self, peer, content):
        path = self.sources / f"file-{len(self.out_peer)}"
        path.write_bytes(content)
        xfer, actions = self.manager.send_file(peer, path, self.now)
        self.out_peer[xfer] = peer
        self.apply(actions)

    def _out_xfer(self, data) -> bytes:
        # Insertion order, never sorted: transfer ids are random, and hypothesis must replay the same draws.
        return data.draw(st.sampled_from(list(self.out_peer)) if self.out_peer and data.draw(st.booleans())
                         else st.binary(min_size=16, max_size=16))

    @rule(data=st.data(), right_peer=st.booleans(), next_=counts, upto=counts, restart=st.booleans())
    def credit(self, data, right_peer, next_, upto, restart):
        xfer = self._out_xfer(data)
        peer = self.out_peer.get(xfer, PEERS[0])
        sender = peer if right_peer else data.draw(st.sampled_from([p for p in (*PEERS, ME) if p != peer]))
        msg = FileCredit(sender, ME, xfer, next_, upto, restart)
        if sender == peer:
            self.granted[xfer] = max(self.granted[xfer], upto)
            self.confirmed[xfer] = max(self.confirmed[xfer], next_)
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, msg), self.now), credit=(xfer, msg))

    @precondition(lambda self: self.manager.outgoing)
    @rule(data=st.data(), restart=st.booleans())
    def honest_receiver(self, data, restart):
        """The receiver of a live transfer confirms what it was sent and grants the next window."""
        # In the order we started them: after a restart the manager's own order follows the random ids.
        xfer = data.draw(st.sampled_from([x for x in self.out_peer if x in self.manager.outgoing]))
        out = self.manager.outgoing[xfer]
        held = min(out.send_next, out.chunks)
        msg = FileCredit(out.peer, ME, xfer, held, held + WINDOW, restart)
        self.granted[xfer] = max(self.granted[xfer], msg.upto)
        self.confirmed[xfer] = max(self.confirmed[xfer], msg.next)
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, msg), self.now), credit=(xfer, msg))

    @rule(data=st.data(), right_peer=st.booleans())
    def done(self, data, right_peer):
        xfer = self._out_xfer(data)
        peer = self.out_peer.get(xfer, PEERS[0])
        sender = peer if right_peer else PEERS[1] if peer == PEERS[0] else PEERS[0]
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, FileDone(sender, ME, xfer)), self.now))

    @rule(data=st.data(), sender=st.sampled_from(PEERS), code=codes)
    def cancel_from_peer(self, data, sender, code):
        xfer = self._out_xfer(data) if data.draw(st.booleans()) else self._in_xfer(data)
        msg = FileCancel(sender, ME, xfer, code, "no")
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, msg), self.now))

    @rule(data=st.data())
    def cancel_by_me(self, data):
        xfer = self._out_xfer(data) if data.draw(st.booleans()) else self._in_xfer(data)
        self.apply(self.manager.cancel(xfer, self.now))

    @rule(data=st.data(), code=codes, exact=st.booleans())
    def error_from_broker(self, data, code, exact):
        xfer = self._out_xfer(data) if data.draw(st.booleans()) else self._in_xfer(data)
        ref = frame_id(xfer) if exact else xfer[:REF_PREFIX - 1] + bytes(16 - REF_PREFIX + 1)
        self.apply(self.manager.on_error(ref, RemoteError("broker says no", code), self.now) or [])

    @rule(data=st.data())
    def source_changes(self, data):
        """The file being sent is rewritten or deleted."""
        if not self.out_peer:
            return
        path = self.sources / f"file-{data.draw(st.integers(0, len(self.out_peer) - 1))}"
        if data.draw(st.booleans()):
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data.draw(st.binary(max_size=3 * CHUNK)))
            # A new modification time, always: the file system's clock ticks coarsely, and a rewrite it did
            # not see would make the run depend on timing (hypothesis could not replay it).
            self.rewrites = getattr(self, "rewrites", 0) + 1
            os.utime(path, ns=(self.rewrites, self.rewrites))

    # --- receiving --------------------------------------------------------------------------
    def _in_xfer(self, data) -> bytes:
        """Mostly a live incoming transfer, else any offered one, else an unknown id."""
        offered = list(self.offers)
        live = [x for x in offered if x in self.manager.incoming]
        pick = data.draw(st.sampled_from(["live", "live", "live", "offered", "unknown"]))
        if live and pick == "live":
            return data.draw(st.sampled_from(live))
        if offered and pick != "unknown":
            return data.draw(st.sampled_from(offered))
        return data.draw(st.binary(min_size=16, max_size=16))

    @rule(data=st.data(), sender=st.sampled_from(PEERS), content=contents,
          name=st.sampled_from(["a.txt", "../../etc/passwd", "", ".", "CON", "x" * 300, "é😀.bin"]),
          chunk_size=st.sampled_from([CHUNK, CHUNK, CHUNK, 0, 1, 2**31]),
          claimed_size=st.sampled_from([None, None, None, 0, MAX_FILE + 1, MAX_INT]), repeat=st.booleans())
    def offer(self, data, sender, content, name, chunk_size, claimed_size, repeat):
        if repeat and self.offers:  # the sender's stall timer, or the broker re-delivering: maybe after we failed it
            xfer = data.draw(st.sampled_from(list(self.offers)))
            sender, content = self.offers[xfer]
        else:
            xfer = hashlib.sha256(b"offer %d" % len(self.offers)).digest()[:16]
            self.offers[xfer] = (sender, content)
        size = len(content) if claimed_size is None else claimed_size
        if self.SEALED:
            meta = msgpack.packb({"name": name, "key": file_key(xfer)})
            body = self.peer_e2e[sender].seal(ME, xfer, 0, meta)
        else:
            body = msgpack.packb({"name": name})
        msg = FileOffer(sender, ME, xfer, size, chunk_size, body)
        self.apply(self.manager.on_message(Envelope(xfer, 0, msg), self.now))

    @rule(data=st.data(), which=st.sampled_from(["next", "next", "next", "other"]),
          damage=st.sampled_from(["none", "none", "none", "crc", "data", "size", "final", "sha", "sender"]),
          repeat=st.integers(1, 8))
    def chunks(self, data, which, damage, repeat):
        """``repeat`` chunks of one transfer, each the next one the receiver expects or any other."""
        xfer = self._in_xfer(data)
        live = xfer in self.manager.incoming
        for _ in range(repeat):
            if live and xfer not in self.manager.incoming:
                break  # it ended: one more would only repeat the first stray chunk's case
            self._chunk(data, xfer, which, damage)

    @precondition(lambda self: any(x in self.manager.incoming for x in self.offers))
    @rule(data=st.data())
    def honest_sender(self, data):
        """The sender of a live transfer sends the rest of it, as granted."""
        xfer = data.draw(st.sampled_from([x for x in self.offers if x in self.manager.incoming]))
        while xfer in self.manager.incoming:
            inc = self.manager.incoming[xfer]
            held = inc.next
            if held >= inc.granted:
                break  # the receiver's credit is used up
            self._chunk(data, xfer, "next", "none")
            if inc.next == held:
                break  # refused: the offer did not describe this content

    def _chunk(self, data, xfer, which, damage):
        sender, content = self.offers.get(xfer, (PEERS[0], b""))
        inc = self.manager.incoming.get(xfer)
        index = inc.next if inc is not None and which == "next" else data.draw(counts)
        piece = content[index * CHUNK:(index + 1) * CHUNK]
        chunks = max(1, -(-len(content) // CHUNK))
        final = index == chunks - 1
        sha = hashlib.sha256(content).digest() if final else None
        if damage == "data":
            piece = bytes(b ^ 0xFF for b in piece) or b"?"
        elif damage == "size":
            piece += b"!"
        elif damage == "final":
            final = not final
        elif damage == "sha":
            sha = bytes(32)
        elif damage == "sender":
            sender = PEERS[1] if sender == PEERS[0] else PEERS[0]
        crc = zlib.crc32(piece) if damage != "crc" else zlib.crc32(piece) ^ 1
        msg = FileChunk(sender, ME, xfer, index, final, crc, sha)
        if self.SEALED:  # the peer seals the true chunk; damage is done on the way, to the sealed bytes
            piece = FileCipher(file_key(xfer), xfer).seal(index, msg.final if damage == "final" else final,
                                                          content[index * CHUNK:(index + 1) * CHUNK])
            if damage in ("data", "crc"):
                piece = piece[:-1] + bytes([piece[-1] ^ 1])
            elif damage == "size":
                piece += b"!"
            msg = FileChunk(sender, ME, xfer, index, final)
        self.apply(self.manager.on_message(Envelope(frame_id(xfer), 0, msg, piece), self.now))

    # --- time, presence, connection -----------------------------------------------------------
    @rule(dt=st.sampled_from([0.0, 0.1, 1.0, 3.5, 60.0]))
    def tick(self, dt):
        self.now += dt
        self.apply(self.manager.on_tick(self.now))

    @rule(online=st.frozensets(st.sampled_from(PEERS)))
    def peers(self, online):
        self.apply(self.manager.on_peers(online, self.now))

    @rule()
    def reconnected(self):
        self.apply(self.manager.on_reconnected(self.now))

    @rule(peer=st.sampled_from(PEERS))
    def key_arrives(self, peer):
        self.apply(self.manager.on_key(peer, self.now))

    @rule(peer=st.sampled_from(PEERS))
    def peer_has_no_key(self, peer):
        self.apply(self.manager.fail_peer(peer, P2PChatError("no key", ErrorCode.UNKNOWN_RECIPIENT)))

    @rule()
    def restart(self):
        """The client stops and starts again: unfinished transfers resume from disk."""
        self.manager.close()
        self.manager = self._manager()
        self.apply(self.manager.resume_all(self.now))


TransferMachine.TestCase.settings = MACHINE
test_transfer_manager_keeps_its_promises_under_any_input = TransferMachine.TestCase


class SealedTransferMachine(TransferMachine):
    SEALED = True


SealedTransferMachine.TestCase.settings = MACHINE
test_sealed_transfers_keep_their_promises_under_any_input = SealedTransferMachine.TestCase


class TransferWindowMachine(TransferMachine):
    CHECK_WINDOW = True


TransferWindowMachine.TestCase.settings = MACHINE
test_a_sender_keeps_at_most_a_window_in_flight = TransferWindowMachine.TestCase


# --- broker routing ----------------------------------------------------------------------------
class MemoryStore(NoStore):
    """A MessageStore in memory that remembers who consumed what (NoStore's no-op commit and expiry)."""

    durable = True

    def __init__(self, max_per_user: int = 6) -> None:
        self.max_per_user = max_per_user
        self.queues: dict[str, dict[bytes, tuple[int, bytes, int]]] = defaultdict(dict)  # (seq, header, expires)
        self.seq = 0
        self.consumed: list[tuple[str, bytes]] = []

    def append(self, msg_id: bytes, sender: str, recipient: str, header: bytes, expires_ms: int) -> Refusal | None:
        queue = self.queues[recipient]
        if msg_id not in queue and len(queue) >= self.max_per_user:
            return Refusal.QUEUE_FULL
        if msg_id not in queue:
            self.seq += 1
            queue[msg_id] = (self.seq, header, expires_ms)
        return None

    def pending(self, recipient: str, now_ms: int, after: int, limit: int) -> list[tuple[int, bytes]]:
        return [(seq, header) for seq, header, expires in self.queues[recipient].values()
                if expires > now_ms and seq > after][:limit]

    def consume(self, recipient: str, msg_id: bytes) -> None:
        self.consumed.append((recipient, msg_id))
        self.queues[recipient].pop(msg_id, None)


class InjectedLink(LocalLink):
    """What another broker would send, injected by the test."""

    def __init__(self) -> None:
        self.events: list[LinkEvent] = []

    def receive(self, now: float) -> list[LinkEvent]:
        events, self.events = self.events, []
        return events


USERS = ("alice", "bob", "carol", "mallory")
# Connections and the CURVE key each proved: alice has two devices, mallory two connections.
CONNS = {b"a1": "alice", b"a2": "alice", b"b1": "bob", b"m1": "mallory", b"m2": "mallory"}
RELAYED_TYPES = [ChatMessage, Receipt, FileOffer, FileCredit, FileChunk, FileDone, FileCancel]
SERVER_ONLY = [Registered, Ack, Error, Snapshot, PeerUpdate, PeerSync, KeyInfo]
JUNK = [[b""], [b"\xc1"], [b"\x80"], [msgpack.packb({"v": 1, "t": "register"})], [pack(Heartbeat(), 0)[0]] * 3,
        [msgpack.packb({"v": 1, "t": {}, "id": b"i" * 16, "ts": 0})], [msgpack.packb([1, 2, 3])]]
conns = st.sampled_from(list(CONNS))
users = st.sampled_from(USERS)


def curve_key(user: str) -> bytes:
    return hashlib.sha256(user.encode()).digest()


class BrokerMachine(RuleBasedStateMachine):
    """One BrokerCore (in-memory directory, keys and store) and five connections sending anything."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.link = InjectedLink()
        self.core = BrokerCore(LocalDirectory(b"epoch-01"), broker_id=b"broker-1", heartbeat_ivl=1.0, liveness=3,
                               wall_ms=lambda: 0, new_id=id_source("broker"), keys=KeyBook(), store=self.store,
                               link=self.link)
        self.now = 0.0
        self.seq = 0  # the last presence update seen
        self.online: set[str] = set()  # presence as a subscriber sees it
        self.authentic: set[bytes] = set()  # ids of relayed frames sent by a connection registered as their sender
        self.ids = 0

    def step(self, conn: bytes | None, actions) -> None:
        """Check what the core asked its shell to do."""
        for action in actions:
            if type(action) is Publish:
                msg = decode(action.frames).message
                if type(msg) is PeerUpdate:
                    assert msg.seq == self.seq + 1, f"presence update {msg.seq} after {self.seq}"
                    self.seq = msg.seq
                    (self.online.add if msg.online else self.online.discard)(msg.user)
                else:
                    assert type(msg) is PeerSync and msg.seq == self.seq, msg
                continue
            assert type(action) in (Send, Relay), action
            env = decode(action.frames)
            msg = env.message
            if msg.RELAYED:
                assert self.core.user_of(action.conn) == msg.recipient, f"{msg} sent to {action.conn}"
                assert env.msg_id in self.authentic, f"{msg} was not sent by {msg.sender}"
            if type(action) is Relay:
                assert action.sender == conn and (action.on_success is None or decode(action.on_success))
                decode(action.on_failure())

    @invariant()
    def sessions_and_directory_agree(self) -> None:
        held = [self.core.user_of(conn) for conn in CONNS if self.core.user_of(conn) is not None]
        assert len(held) == len(set(held)), f"a user holds two connections: {held}"
        assert set(held) == set(self.core.directory.online()) == self.online
        for user in held:
            (where,) = self.core.directory.locate(user)  # one device per ID here: one session
            assert self.core.user_of(where.conn) == user

    def send(self, conn: bytes, frames) -> None:
        before = self.core.user_of(conn)
        consumed = len(self.store.consumed)
        actions = self.core.on_frames(conn, frames, self.now, lambda: curve_key(CONNS[conn]))
        self.step(conn, actions + self.core.on_commit())
        for recipient, _ in self.store.consumed[consumed:]:
            assert recipient == before, f"{conn} registered as {before} consumed {recipient}'s message"

    def new_id(self) -> bytes:
        self.ids += 1
        return hashlib.sha256(b"id %d" % self.ids).digest()[:16]

    @initialize()
    def everyone_registers(self):
        for conn in (b"a1", b"b1", b"m1"):
            self.register(conn, None, True, False)

    @rule(conn=conns, user=st.none() | users, own_key=st.booleans(), shared_token=st.booleans())
    def register(self, conn, user, own_key, shared_token):
        """As the connection's own user (None) or anyone, with the connection's key or the user's."""
        user = user or CONNS[conn]
        key = curve_key(CONNS[conn] if own_key else user)
        token = b"install-" + (CONNS[conn].encode() if shared_token else conn)
        self.send(conn, pack(Register(user, token, key), 0, self.new_id()))

    @rule(conn=conns, kind=st.sampled_from([Unregister, Heartbeat, SnapshotRequest]))
    def request(self, conn, kind):
        self.send(conn, pack(kind(), 0, self.new_id()))

    @rule(conn=conns, user=users | st.just("nobody"))
    def key_request(self, conn, user):
        self.send(conn, pack(KeyRequest(user), 0, self.new_id()))

    @rule(conn=conns, kind=st.sampled_from(RELAYED_TYPES), sender=st.none() | users,
          recipient=users | st.just("nobody"), count=counts)
    def relay(self, conn, kind, sender, recipient, count):
        """From the connection's user (None), or spoofing anyone."""
        sender = sender or self.core.user_of(conn) or CONNS[conn]
        msg_id = self.new_id()
        if self.core.user_of(conn) == sender:
            self.authentic.add(msg_id)
        msg = example_message(kind, sender=sender, recipient=recipient, index=count, next=count, upto=count,
                              size=count)
        self.send(conn, pack(msg, 0, msg_id, b"payload" if kind.HAS_PAYLOAD else None))

    @rule(conn=conns, data=st.data())
    def consume(self, conn, data):
        queued = [msg_id for queue in self.store.queues.values() for msg_id in queue]
        ref = data.draw(st.sampled_from(queued)) if queued and data.draw(st.booleans()) else self.new_id()
        self.send(conn, pack(Consume(ref), 0, self.new_id()))

    @rule(conn=conns, frames=st.sampled_from(JUNK) | st.sampled_from(SERVER_ONLY).map(
        lambda cls: pack(example_message(cls), 0)))
    def junk(self, conn, frames):
        self.send(conn, frames)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 1.0, 3.5]))
    def tick(self, dt):
        self.now += dt
        self.step(None, self.core.on_tick(self.now))

    @rule(user=users)
    def delivery_failed(self, user):
        self.core.on_delivery_failed(user)

    @rule(conn=conns, user=users)
    def kicked(self, conn, user):
        """Another broker took the session over: it ends here (a cluster's directory announces the move;
        this one, with no other broker, announces the user offline)."""
        self.link.events.append(Kicked(conn, user))
        self.step(None, self.core.on_tick(self.now))


BrokerMachine.TestCase.settings = MACHINE
test_broker_core_keeps_sessions_presence_and_queues_consistent = BrokerMachine.TestCase



def file_key(xfer: bytes) -> bytes:
    return hashlib.sha256(b"file key " + xfer).digest()


# --- what the transfer machines found, as plain tests --------------------------------------------
def transfer_manager(root: Path) -> TransferManager:
    config = TransferConfig(received_dir=root / "inbox", chunk_size=CHUNK, window=WINDOW)
    return TransferManager(ME, config, NO_SEALING, wall_ms=lambda: 0, wall_time=lambda: 1_700_000_000.0,
                           new_id=id_source("manager"), files=LocalFiles(), records=RecordDir(root / "state", ME))


def test_a_credit_beyond_the_window_sends_only_a_window(tmp_path):
    manager = transfer_manager(tmp_path)
    source = tmp_path / "seven-chunks"
    source.write_bytes(bytes(7 * CHUNK))
    xfer, _ = manager.send_file("ann", source, 0.0)
    credit = FileCredit("ann", ME, xfer, 0, MAX_INT, False)
    sent = transmitted(manager.on_message(Envelope(frame_id(xfer), 0, credit), 0.0))
    assert [env.message.index for env in sent] == list(range(WINDOW))


def test_an_offer_repeated_after_the_receiver_cancelled_is_refused_again(tmp_path):
    # The sender's stall timer re-offers while our FILE_CANCEL is on its way (or lost to a broker restart).
    manager = transfer_manager(tmp_path)
    xfer = b"x" * 16
    offer = Envelope(xfer, 0, FileOffer("ann", ME, xfer, 5, CHUNK, msgpack.packb({"name": "a.txt"})))
    manager.on_message(offer, 0.0)
    manager.cancel(xfer, 0.0)
    actions = manager.on_message(offer, 1.0)
    assert emitted(actions) == [] and xfer not in manager.incoming
    [cancel] = [env.message for env in transmitted(actions)]
    assert type(cancel) is FileCancel and cancel.code is ErrorCode.CANCELLED
    assert not list((tmp_path / "inbox").iterdir())


def test_an_offer_refused_once_is_refused_again_without_a_second_failure_event(tmp_path):
    manager = transfer_manager(tmp_path)
    xfer = b"y" * 16
    offer = Envelope(xfer, 0, FileOffer("ann", ME, xfer, 5, 0, msgpack.packb({"name": "a.txt"})))  # chunk size 0
    assert [type(e) for e in emitted(manager.on_message(offer, 0.0))] == [ev.FileFailed]
    actions = manager.on_message(offer, 1.0)
    assert emitted(actions) == []
    assert [type(env.message) for env in transmitted(actions)] == [FileCancel]


def test_refused_offers_are_reported_once_per_sender_and_period_and_each_answered(tmp_path):
    from p2pchat.client.core.transfer import REFUSAL_PERIOD

    manager = transfer_manager(tmp_path)

    def offers(sender: str, first: int, count: int, now: float) -> list:
        actions = []
        for n in range(first, first + count):  # chunk size 0: refused
            xfer = hashlib.sha256(b"refused %d" % n).digest()[:16]
            body = msgpack.packb({"name": "a.txt"})
            actions += manager.on_message(Envelope(xfer, 0, FileOffer(sender, ME, xfer, 5, 0, body)), now)
        return actions

    flood = offers("ann", 0, 50, 0.0) + offers("bob", 50, 3, 0.0)
    assert [e.peer for e in emitted(flood)] == ["ann", "bob"]  # one report per sender, not one per offer
    assert [type(env.message) for env in transmitted(flood)] == [FileCancel] * 53  # every offer answered
    manager.on_tick(REFUSAL_PERIOD + 1)  # the period ends: the counts are logged
    assert [e.peer for e in emitted(offers("ann", 60, 2, REFUSAL_PERIOD + 2))] == ["ann"]


# --- client session ---------------------------------------------------------------------------
EPOCHS = (b"epoch-01", b"epoch-02")


class SessionMachine(RuleBasedStateMachine):
    """One ClientSession (``me``, end-to-end on, with transfers) fed anything a broker or a forger could send."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="p2pchat-session-"))
        self.now = 0.0
        e2e = EndToEnd(ME, identity(ME), MemoryKeys(), MemoryKeys(), random_bytes=lambda n: bytes(n))
        config = TransferConfig(received_dir=self.root / "inbox", chunk_size=CHUNK, window=WINDOW)
        new_id = id_source("session")
        transfers = TransferManager(ME, config, e2e, wall_ms=lambda: 0, wall_time=lambda: 1_700_000_000.0,
                                    new_id=new_id, files=LocalFiles(), records=RecordDir(self.root / "state", ME))
        self.session = ClientSession(ME, wall_ms=lambda: 0, heartbeat_ivl=1.0, e2e=e2e, transfers=transfers,
                                     token=b"token of me", new_id=new_id)
        self.peers = {user: EndToEnd(user, identity(user), MemoryKeys(), MemoryKeys()) for user in PEERS}
        for e2e_of_peer in self.peers.values():
            e2e_of_peer.learn(ME, identity(ME).public)
        self.sent_to_me: dict[bytes, str] = {}  # ids of authentic messages to me -> their text
        self.held: dict[str, dict[bytes, tuple[str, bytes]]] = {}  # under a new key: sender -> id -> (text, key)
        self.received: set[bytes] = set()
        self.refs: list[bytes] = []  # ids the session transmitted: what acks, errors and receipts refer to
        self.ids = 0
        self.closed = False
        self.state = State.CONNECTING  # as of the last step
        self.apply(self.session.start(self.now))

    def teardown(self) -> None:
        self.session.close(self.now)
        shutil.rmtree(self.root, ignore_errors=True)

    def new_id(self) -> bytes:
        self.ids += 1
        return hashlib.sha256(b"id %d" % self.ids).digest()[:16]

    def apply(self, actions) -> None:
        if self.closed:
            assert actions == [], f"a closed session acted: {actions}"
        published = self.session.peers
        for action in actions:
            if type(action) is Transmit:
                env = decode(action.frames)
                self.refs.append(env.msg_id)
                if env.message.RELAYED:
                    assert env.message.sender == ME, env
                if type(env.message) is ChatMessage:  # only over a registered session: never lost to a stale one
                    assert State.READY in (self.state, self.session.state), env
            else:
                event = action.event
                if type(event) is ev.MessageReceived:
                    assert self.sent_to_me.get(event.msg_id) == event.text, f"not sent to me: {event}"
                    assert event.msg_id not in self.received, f"delivered twice: {event}"
                    self.received.add(event.msg_id)
                elif type(event) is ev.PeersChanged:
                    assert not event.joined & event.left
                    assert event.peers == (published | event.joined) - event.left, event
                    published = event.peers
        assert published == self.session.peers
        self.state = self.session.state
        self.closed = self.state is State.CLOSED

    @invariant()
    def a_synced_session_shows_its_tracker(self) -> None:
        if self.session.presence.synced and self.session.state is State.READY:
            assert self.session.peers == frozenset(self.session.presence.peers)

    def from_broker(self, message, msg_id: bytes | None = None, ts: int = 0, payload=None) -> None:
        self.apply(self.session.on_frames(pack(message, ts, msg_id or self.new_id(), payload), self.now))

    def a_ref(self, data) -> bytes:
        return data.draw(st.sampled_from(self.refs)) if self.refs and data.draw(st.booleans()) else self.new_id()

    # --- the broker's answers ------------------------------------------------------------------
    @rule(heartbeat_ms=st.sampled_from([0, 1, 200, 1000, MAX_INT]), epoch=st.sampled_from(EPOCHS))
    def registered(self, heartbeat_ms, epoch):
        self.from_broker(Registered(ME, epoch, heartbeat_ms))

    @rule(data=st.data(), code=codes, with_ref=st.booleans())
    def error(self, data, code, with_ref):
        self.from_broker(Error(code, "no", self.a_ref(data) if with_ref else None))

    @rule(data=st.data(), status=st.sampled_from(list(AckStatus)))
    def ack(self, data, status):
        self.from_broker(Ack(self.a_ref(data), status))

    @rule(user=st.sampled_from((*PEERS, ME, "nobody")), true_key=st.booleans())
    def key_info(self, user, true_key):
        self.from_broker(KeyInfo(user, identity(user).public if true_key else identity("forger").public))

    @rule(epoch=st.sampled_from(EPOCHS), seq=st.integers(0, 6), peers=st.frozensets(st.sampled_from((*PEERS, ME))))
    def snapshot(self, epoch, seq, peers):
        self.from_broker(Snapshot(epoch, seq, tuple(sorted(peers))))

    @rule()
    def heartbeat(self):
        self.from_broker(Heartbeat())

    # --- peers' messages, honest and not ----------------------------------------------------------
    @rule(sender=st.sampled_from(PEERS), text=st.sampled_from(["hi", "", "é😀"]), redeliver=st.booleans(),
          forged=st.sampled_from(["no", "no", "key", "body", "recipient"]))
    def chat(self, sender, text, redeliver, forged):
        """A message from a peer: honest, sealed by another key, tampered with, or addressed to someone else."""
        msg_id = next(iter(self.sent_to_me)) if redeliver and self.sent_to_me else self.new_id()
        text = self.sent_to_me.get(msg_id, text)
        signer = identity(sender if forged != "key" else "forger")
        sealer = EndToEnd(sender, signer, MemoryKeys(), MemoryKeys())
        sealer.learn(ME, identity(ME).public)
        body = sealer.seal(ME, msg_id, 0, text.encode())
        if forged == "body":
            body = body[:-1] + bytes([body[-1] ^ 1])
        pinned = self.session.e2e.pinned_key(sender)
        authentic = forged in ("no", "key") and pinned in (None, signer.public)  # trust on first use
        if authentic and not self.closed:
            self.sent_to_me.setdefault(msg_id, text)
        elif forged in ("no", "key") and not self.closed:  # opens under a key change: held until accepted
            self.held.setdefault(sender, {}).setdefault(msg_id, (text, signer.public))
        self.from_broker(ChatMessage(sender, "bob" if forged == "recipient" else ME, body), msg_id)

    @rule(data=st.data(), sender=st.sampled_from(PEERS), status=st.sampled_from(list(ReceiptStatus)))
    def receipt(self, data, sender, status):
        key = identity(sender).public if status is ReceiptStatus.UNDECRYPTABLE else None
        self.from_broker(Receipt(sender, ME, self.a_ref(data), status, key))

    @rule(data=st.data(), kind=st.sampled_from([FileOffer, FileCredit, FileChunk, FileDone, FileCancel]),
          sender=st.sampled_from(PEERS), count=counts)
    def file_frame(self, data, kind, sender, count):
        msg = example_message(kind, sender=sender, recipient=ME, xfer=self.a_ref(data), index=count, next=count,
                              upto=count, size=count, chunk_size=CHUNK)
        self.from_broker(msg, payload=b"p" * CHUNK if kind.HAS_PAYLOAD else None)

    @rule(frames=st.sampled_from(JUNK))
    def junk(self, frames):
        self.apply(self.session.on_frames(list(frames), self.now))

    # --- presence ------------------------------------------------------------------------------
    @rule(epoch=st.sampled_from(EPOCHS), step=st.sampled_from([1, 1, 1, 0, 2, -1]), user=st.sampled_from(PEERS),
          online=st.booleans())
    def peer_update(self, epoch, step, user, online):
        tracker = self.session.presence
        before = (tracker.synced, tracker.epoch, tracker.seq)
        seq = max(0, tracker.seq + step)
        self.apply(self.session.on_publish(pack(PeerUpdate(epoch, seq, user, online), 0), self.now))
        if before[0] and tracker.synced and tracker.epoch == before[1]:
            assert tracker.seq - before[2] in (0, 1), "an update skipped a sequence number"

    @rule(epoch=st.sampled_from(EPOCHS), step=st.sampled_from([0, 0, 1, -1]))
    def peer_sync(self, epoch, step):
        seq = max(0, self.session.presence.seq + step)
        self.apply(self.session.on_publish(pack(PeerSync(epoch, seq), 0), self.now))

    @rule(frames=st.sampled_from(JUNK))
    def junk_published(self, frames):
        self.apply(self.session.on_publish(list(frames), self.now))

    # --- the user and the clock ------------------------------------------------------------------
    @rule(recipient=st.sampled_from((*PEERS, "nobody")), text=st.sampled_from(["yo", "é" * 100]))
    def send_text(self, recipient, text):
        if self.closed:
            return
        self.apply(self.session.send_text(recipient, validate_text(recipient, text), self.now))

    @rule(peer=st.sampled_from(PEERS))
    def accept_key(self, peer):
        pending = self.session.e2e.pending_key(peer)
        if pending is not None and not self.closed:  # what was held under that key shows now
            for msg_id, (text, key) in self.held.get(peer, {}).items():
                if key == pending:
                    self.sent_to_me.setdefault(msg_id, text)
        self.apply(self.session.accept_peer_key(peer, self.now))

    @rule(dt=st.sampled_from([0.0, 0.02, 0.5, 1.0, 3.5, 6.0]))
    def tick(self, dt):
        self.now += dt
        self.apply(self.session.on_tick(self.now))

    @rule()
    def close(self):
        if not self.closed:
            self.session.close(self.now)
            self.closed = True


SessionMachine.TestCase.settings = MACHINE
test_client_session_stays_consistent_under_any_broker_input = SessionMachine.TestCase
