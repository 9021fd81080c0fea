"""Fixtures: real brokers in subprocesses on free loopback ports, real clients, always cleaned up."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.common.endpoints import ServerAddress

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.2  # fast heartbeats keep expiry and reconnect tests short


def free_ports(count: int) -> int:
    """A port P with P .. P+count-1 all free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count > 65535:
            continue
        socks = []
        try:
            for i in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def free_port_pair() -> int:
    """A port P with P, P+1 and P+2 free: the broker's ROUTER, PUB and key port."""
    return free_ports(3)


class BrokerProcess:
    """``p2pchat broker`` in a subprocess; restartable on the same ports."""

    def __init__(self, home: Path, port: int, extra: list[str] | None = None) -> None:
        self.home, self.port, self.extra = home, port, extra or []
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    @property
    def address(self) -> ServerAddress:
        return ServerAddress("127.0.0.1", self.port)

    def start(self, timeout: float = 10.0) -> BrokerProcess:
        env = dict(os.environ, P2PCHAT_HOME=str(self.home), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "p2pchat.client.cli", "broker", "--port", str(self.port),
               "--heartbeat", str(HEARTBEAT), *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump(stream) -> None:
            for line in stream:
                self.lines.append(line)
                if "broker listening" in line:
                    ready.set()

        threading.Thread(target=pump, args=(self.proc.stderr,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("broker did not start:\n" + "".join(self.lines))
        return self

    @classmethod
    def launch(cls, home: Path, extra: list[str] | None = None, attempts: int = 5) -> BrokerProcess:
        """Start on free ports; a port can be taken between our check and the broker's bind (an
        outgoing connection's ephemeral port, say), so try fresh ports a few times."""
        for attempt in range(attempts):
            proc = cls(home, free_port_pair(), extra)
            try:
                return proc.start()
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("P2PCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker process; ``@pytest.mark.broker_args("--opt", "value")`` adds command-line options."""
    marker = request.node.get_closest_marker("broker_args")
    proc = BrokerProcess.launch(tmp_path / "broker-home", list(marker.args) if marker else [])
    yield proc
    proc.stop()


def clients(**defaults) -> Iterator[Callable[..., ChatClient]]:
    """For a fixture to yield from: ``make(user, connect=True, **config)`` makes a client (``ClientConfig`` fields
    over ``defaults``, fast heartbeats), connected unless told not to; every one is closed at the end."""
    made: list[ChatClient] = []

    def make(user: str, connect: bool = True, **config) -> ChatClient:
        client = ChatClient(user, ClientConfig(**{"heartbeat_ivl": HEARTBEAT, **defaults, **config}))
        made.append(client)
        if connect:
            client.connect(timeout=10)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def make_client(broker: BrokerProcess, home: Path) -> Iterator[Callable[..., ChatClient]]:
    yield from clients(server=broker.address)


def wait_for(client: ChatClient, predicate: Callable[[ev.Event], bool], timeout: float = 10.0) -> ev.Event:
    """The first event from ``client.events`` that satisfies ``predicate``; fail on timeout."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting; saw {seen[-10:]}")
        try:
            event = client.events.get(timeout=remaining)
        except queue.Empty:
            continue
        seen.append(event)
        if predicate(event):
            return event


def wait_peers(client: ChatClient, expected: set[str], timeout: float = 10.0) -> None:
    if client.peers() == expected:
        return
    wait_for(client, lambda e: isinstance(e, ev.PeersChanged) and e.peers == expected, timeout)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition that has no event to wait on (another process's output, a file)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
