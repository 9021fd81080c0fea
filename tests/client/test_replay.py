"""A recorded session replayed through the cores: every frame they send must be the recorded one, byte for byte.

Two users' client cores (ClientSession with its TransferManager, a real history and real files in a
temporary directory) and a BrokerCore (in-memory directory, key book and message store) are wired in
memory, with a fixed clock, fixed identities and deterministic id and randomness sources. The
session: both register, chat both ways with receipts, alice sends bob a file that bob's client loses
mid-transfer (it crashes) and resumes after its restart, then bob reinstalls with a new key, the
broker's operator releases his ID, and alice, told his key changed, accepts it and writes to him.

``traces/session.jsonl`` holds, one line per step, which core got which input (a user's command, a
tick, or frames, hex) and every action it returned (frames hex; events as their fields). The test
feeds each core its recorded inputs and compares. It fails on any change of a wire byte: an id, a
timestamp, a field, a sealed body, the order of frames. After an intended change, record again and
review the diff of the trace:

    .venv/bin/python -m tests.client.test_replay
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from p2pchat.broker.backends.in_process import LocalDirectory, LocalLink
from p2pchat.broker.core.actions import Publish, Relay, Send
from p2pchat.broker.core.routing import BrokerCore
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.session import ClientSession, validate_text
from p2pchat.client.core.transfer import TransferConfig, TransferManager
from p2pchat.client.e2e import EndToEnd
from p2pchat.client.storage.history import History
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.client.storage.trust import KeyStore
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import P2PChatError
from tests.client.test_state_machines import MemoryStore
from tests.cores import KeyBook, id_source

TRACE = Path(__file__).parent / "traces" / "session.jsonl"
WALL_EPOCH = 1_700_000_000.0  # the wall clock at ``now`` 0
CHUNK, WINDOW = 256, 4
FILE = bytes(range(256)) * 9  # nine chunks: more than two windows
BROKER = "broker"


def seeded(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def random_source(label: str) -> Callable[[int], bytes]:
    """Deterministic "random" bytes (at most 32 a call), a new block each call: the e2e layer's file keys."""
    blocks = id_source(label)
    return lambda n: seeded(blocks().hex())[:n]


class OperatorKeyBook(KeyBook):
    """The broker's key registry, whose operator may release an ID (a user who lost their key)."""

    def release(self, user: str) -> None:
        del self._keys[user]


@dataclasses.dataclass
class Client:
    conn: bytes
    session: ClientSession
    history: History


class World:
    """The cores and what their shells would hold, rebuilt identically for recording and for replay."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = 0.0
        self.keys = OperatorKeyBook()
        self.broker = BrokerCore(LocalDirectory(b"epoch-01"), broker_id=b"broker-1", heartbeat_ivl=1.0, liveness=3,
                                 wall_ms=self.wall_ms, keys=self.keys, store=MemoryStore(), link=LocalLink(), require_key=False,
                                 new_id=id_source("broker"))
        self.clients: dict[str, Client] = {}
        self.runs: dict[str, int] = {}  # user -> client runs so far (a restart is a new run)
        self.installs: dict[str, int] = {}  # user -> installations (a reinstall is a new identity)
        source = root / "files"
        source.mkdir()
        (source / "report.bin").write_bytes(FILE)

    def wall_ms(self) -> int:
        return int((WALL_EPOCH + self.now) * 1000)

    def client(self, user: str) -> Client:
        """The user's next run, on the state their installation left."""
        self.installs.setdefault(user, 1)
        run = self.runs[user] = self.runs.get(user, 0) + 1
        install = f"{user}-{self.installs[user]}"
        home = self.root / install
        home.mkdir(exist_ok=True)
        e2e = EndToEnd(user, Identity.from_private_bytes(seeded(f"identity {install}")),
                       KeyStore(home / "peer_keys.json"), KeyStore(home / "peer_keys_changed.json"),
                       random_bytes=random_source(f"{user} random {run}"))
        new_id = id_source(f"{user} run {run}")
        transfers = TransferManager(user, TransferConfig(home / "inbox", chunk_size=CHUNK, window=WINDOW), e2e,
                                    wall_ms=self.wall_ms, wall_time=lambda: WALL_EPOCH + self.now, new_id=new_id,
                                    files=LocalFiles(), records=RecordDir(home / "transfers", user))
        history = History(home / "history.sqlite")
        session = ClientSession(user, wall_ms=self.wall_ms, e2e=e2e, transfers=transfers, history=history,
                                token=seeded(f"token {install}"), new_id=new_id)
        self.clients[user] = client = Client(f"{user}#{run}".encode(), session, history)
        return client

    # --- inputs, as recorded ------------------------------------------------------------------
    def to_client(self, user: str, what: str, arg) -> list:
        """One input to a user's cores; then, as the shell does, the history's commit and what waited for it."""
        if what == "run":  # the client starts (a first run, or a restart on what the last one left)
            return self.client(user).session.start(self.now)
        if what == "reinstall":  # the installation is lost: a new identity, an empty home
            self.installs[user] += 1
            return []
        client = self.clients[user]
        session = client.session
        if what == "crash":  # the process dies: its files close, nothing is sent
            session.transfers.close()
            client.history.close()
            del self.clients[user]
            return []
        if what == "frames":
            actions = session.on_frames(unhex(arg), self.now)
        elif what == "publish":
            actions = session.on_publish(unhex(arg), self.now)
        elif what == "tick":
            actions = session.on_tick(self.now)
        elif what == "send_text":
            actions = session.send_text(arg["to"], validate_text(arg["to"], arg["text"]), self.now)
        elif what == "send_file":
            actions = session.send_file(arg["to"], self.root / "files" / arg["name"], self.now)[1]
        elif what == "mark_read":
            actions = session.mark_read(arg, self.now)
        elif what == "accept_key":
            assert session.e2e.pending_key(arg) is not None, f"no key change of {arg} to accept"
            actions = session.accept_peer_key(arg, self.now)
        elif what == "close":
            actions = session.close(self.now)
            client.history.close()
            del self.clients[user]
            return actions
        else:
            raise ValueError(what)
        client.history.commit()
        return actions + session.history_saved() + session.end_batch(self.now)

    def to_broker(self, what: str, arg) -> list:
        if what == "frames":
            return self.broker.on_frames(bytes.fromhex(arg["conn"]), unhex(arg["frames"]), self.now) \
                + self.broker.on_commit()
        if what == "tick":
            return self.broker.on_tick(self.now)
        if what == "release":
            self.keys.release(arg)
            return []
        raise ValueError(what)

    def step(self, core: str, what: str, arg) -> list:
        return self.to_broker(what, arg) if core == BROKER else self.to_client(core, what, arg)


# --- what a step looks like in the trace ---------------------------------------------------------
def unhex(frames: list[str]) -> list[bytes]:
    return [bytes.fromhex(f) for f in frames]


def hexed(frames) -> list[str]:
    return [bytes(f).hex() for f in frames]


def plain(value):
    """An event field as JSON: bytes in hex, sets sorted, tuples as lists, errors by class, code and message."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    if isinstance(value, Path):  # a received file: its name without the local-time prefix
        return "file " + re.sub(r"^\d{8}_\d{6}_", "", value.name)
    if isinstance(value, P2PChatError):
        return [type(value).__name__, value.code.value, value.message]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def outputs(actions: list) -> list[dict]:
    out: list[dict] = []
    for action in actions:
        if type(action) is Transmit:
            out.append({"transmit": hexed(action.frames)} | ({"urgent": True} if action.urgent else {}))
        elif type(action) is Emit:
            event = action.event
            out.append({"event": type(event).__name__,
                        **{f.name: plain(getattr(event, f.name)) for f in dataclasses.fields(event)}})
        elif type(action) is Send:
            out.append({"send": action.conn.hex(), "frames": hexed(action.frames)})
        elif type(action) is Relay:
            out.append({"relay": action.conn.hex(), "frames": hexed(action.frames), "sender": action.sender.hex(),
                        "on_success": hexed(action.on_success) if action.on_success is not None else None})
        elif type(action) is Publish:
            out.append({"publish": hexed(action.frames)})
        else:
            raise AssertionError(f"an action the trace cannot hold: {action!r}")
    return out


# --- recording: the scenario, routed like the shells and the sockets would -----------------------
class Recorder:
    def __init__(self, root: Path) -> None:
        self.world = World(root)
        self.steps: list[dict] = []
        self.queue: deque[tuple[str, dict]] = deque()  # (core, input) waiting for delivery

    def step(self, core: str, what: str, arg=None) -> None:
        actions = self.world.step(core, what, arg)
        self.steps.append({"t": self.world.now, "core": core, "in": {what: arg}, "out": outputs(actions)})
        if core == BROKER:
            self._from_broker(actions)
        else:
            conn = f"{core}#{self.world.runs.get(core, 0)}".encode()
            for action in actions:
                if type(action) is Transmit:
                    self.queue.append((BROKER, {"conn": conn.hex(), "frames": hexed(action.frames)}))

    def _from_broker(self, actions: list) -> None:
        for action in actions:
            if type(action) in (Send, Relay):
                self._to_conn(action.conn, "frames", action.frames)
                if type(action) is Relay and action.on_success is not None:
                    self._to_conn(action.sender, "frames", action.on_success)
            elif type(action) is Publish:
                for client in list(self.world.clients.values()):
                    self._to_conn(client.conn, "publish", action.frames)

    def _to_conn(self, conn: bytes, what: str, frames) -> None:
        self.queue.append((conn.decode(), {what: hexed(frames)}))

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Deliver until nothing is in flight (or ``until`` holds); frames for a dead connection are lost."""
        while self.queue and not until():
            target, message = self.queue.popleft()
            if target == BROKER:
                self.step(BROKER, "frames", message)
                continue
            user = target.split("#")[0]
            client = self.world.clients.get(user)
            if client is not None and client.conn.decode() == target:
                [(what, frames)] = message.items()
                self.step(user, what, frames)

    def tick(self, dt: float) -> None:
        self.world.now = round(self.world.now + dt, 6)
        self.step(BROKER, "tick")
        for user in list(self.world.clients):
            self.step(user, "tick")
        self.run()

    def do(self, user: str, what: str, arg=None) -> None:
        self.step(user, what, arg)
        self.run()


def record(root: Path) -> list[dict]:
    rec = Recorder(root)
    rec.do("alice", "run")
    rec.do("bob", "run")
    rec.tick(0.5)
    # chat both ways, with delivery and read receipts
    rec.do("alice", "send_text", {"to": "bob", "text": "hello bob"})
    rec.do("bob", "mark_read", "alice")
    rec.do("bob", "send_text", {"to": "alice", "text": "hi alice ✓"})
    rec.tick(0.5)
    # a file, interrupted: bob's client dies after three chunks, then resumes from its .part
    rec.step("alice", "send_file", {"to": "bob", "name": "report.bin"})
    bob = rec.world.clients["bob"].session
    rec.run(until=lambda: any(inc.next >= 3 for inc in bob.transfers.incoming.values()))
    rec.do("bob", "crash")
    rec.tick(0.5)
    rec.do("bob", "run")
    for _ in range(4):
        rec.tick(0.5)
    # a key change: bob reinstalls, the operator releases his ID, alice accepts his new key
    rec.do("bob", "close")
    rec.do(BROKER, "release", "bob")
    rec.do("bob", "reinstall")
    rec.do("bob", "run")
    rec.tick(0.5)
    rec.do("bob", "send_text", {"to": "alice", "text": "it's me, with a new key"})
    rec.do("alice", "accept_key", "bob")
    rec.do("alice", "send_text", {"to": "bob", "text": "welcome back"})
    rec.tick(1.0)
    rec.do("alice", "close")
    rec.do("bob", "close")
    return rec.steps


def write_trace(steps: list[dict], path: Path = TRACE) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(step, ensure_ascii=False, sort_keys=True) + "\n" for step in steps))


def read_trace(path: Path = TRACE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the tests ---------------------------------------------------------------------------------------
def test_the_recorded_session_replays_byte_for_byte(tmp_path):
    steps = read_trace()
    world = World(tmp_path)
    for number, step in enumerate(steps, 1):
        world.now = step["t"]
        [(what, arg)] = step["in"].items()
        got = outputs(world.step(step["core"], what, arg))
        assert got == step["out"], (
            f"step {number} of {len(steps)} ({step['core']} <- {what} at t={step['t']}) differs from the recording")


def test_the_trace_holds_the_whole_session():
    """A regression guard only guards what was recorded: each part of the session is in the trace."""
    events = [(step["core"], out["event"]) for step in read_trace() for out in step["out"] if "event" in out]
    assert ("bob", "MessageReceived") in events and ("alice", "MessageReceived") in events
    assert ("alice", "Receipt") in events
    assert ("bob", "FileReceived") in events and ("alice", "FileSent") in events
    assert ("alice", "PeerKeyChanged") in events
    resumes = [step for step in read_trace() if step["core"] == "bob" and "run" in step["in"]]
    assert len(resumes) == 3  # the first run, the restart that resumes the file, the new installation


def test_recording_again_gives_the_same_trace(tmp_path):
    """The recording is deterministic: re-recording after an intended change shows only that change."""
    recorded, kept = record(tmp_path), read_trace()
    for number, (new, old) in enumerate(zip(recorded, kept), 1):
        assert new == old, f"step {number} was recorded otherwise"
    assert len(recorded) == len(kept)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recorded = record(Path(tmp))
    write_trace(recorded)
    print(f"recorded {len(recorded)} steps in {TRACE}", file=sys.stderr)
