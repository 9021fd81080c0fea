"""Cluster mode: several brokers behind one address, sharing state through a real Redis."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from client import events as ev
from client.client import ChatClient, ClientConfig
from common.endpoints import ServerAddress
from tests.conftest import HEARTBEAT, ROOT, BrokerProcess, free_ports, wait_for, wait_peers, wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]
ONLINE = "{p2p}:online"


class RedisProcess:
    """``redis-server`` with append-only persistence on a free port; restartable on the same data."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = directory, free_ports(1)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_until(up, 10, "redis-server to answer")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.stop()


def start_cluster(home: Path, redis_url: str, workers: int, port: int | None = None) -> BrokerProcess:
    broker = BrokerProcess(home, port or free_ports(3), ["--cluster", redis_url, "--workers", str(workers)])
    broker.start(timeout=20)
    wait_until(lambda: listening(broker) >= workers, 20, f"{workers} workers listening")
    return broker


def listening(broker: BrokerProcess) -> int:
    return sum("broker listening" in line for line in list(broker.lines))


def broker_pids(broker: BrokerProcess) -> dict[str, int]:
    """broker id (hex) -> worker pid, from the workers' start-up lines."""
    found = (re.search(r"as broker ([0-9a-f]+) pid (\d+)", line) for line in list(broker.lines))
    return {m.group(1): int(m.group(2)) for m in found if m}


def broker_of(r: redis.Redis, user: str) -> str | None:
    entry = r.hget(ONLINE, user)
    return entry.decode().split("/")[0] if entry else None


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisProcess) -> Iterator[BrokerProcess]:
    broker = start_cluster(tmp_path / "broker-home", redis_server.url, 3)
    yield broker
    assert broker.stop() == 0  # SIGTERM stops every worker and the supervisor cleanly


@pytest.fixture
def connect(home: Path, tmp_path: Path) -> Iterator[Callable[..., ChatClient]]:
    clients: list[ChatClient] = []

    def make(user: str, address: ServerAddress, **config) -> ChatClient:
        cfg = ClientConfig(server=address, heartbeat_ivl=HEARTBEAT, received_dir=tmp_path / "inbox" / user, **config)
        client = ChatClient(user, cfg)
        clients.append(client)
        client.connect(timeout=10)
        return client

    yield make
    for client in clients:
        client.close()


def texts(client: ChatClient, count: int, timeout: float = 30.0) -> set[str]:
    seen: set[str] = set()
    while len(seen) < count:  # at-least-once across a failover: count distinct texts
        seen.add(wait_for(client, lambda e: isinstance(e, ev.MessageReceived), timeout).text)
    return seen


def file_received(client: ChatClient, timeout: float = 30.0) -> ev.FileReceived:
    event = wait_for(client, lambda e: isinstance(e, (ev.FileReceived, ev.FileFailed)), timeout)
    assert isinstance(event, ev.FileReceived), event
    return event


def test_workers_without_cluster_is_a_clear_error(tmp_path):
    proc = subprocess.run([os.sys.executable, "-m", "client.cli", "broker", "--workers", "2"], cwd=ROOT,
                          env=dict(os.environ, P2PCHAT_HOME=str(tmp_path)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--workers N needs --cluster" in proc.stderr


def test_twenty_clients_on_three_workers_share_one_peer_list_messages_and_files(cluster, redis_server, connect,
                                                                                 tmp_path):
    users = [f"user{i:02d}" for i in range(20)]
    clients = {u: connect(u, cluster.address) for u in users}
    r = redis_server.client()
    homes = {u: broker_of(r, u) for u in users}
    assert len(set(homes.values())) >= 2, f"the kernel put every client on one worker: {homes}"
    for client in clients.values():  # one list everywhere, whichever brokers a DEALER and a SUB landed on
        wait_peers(client, set(users), timeout=20)

    for i, user in enumerate(users):
        clients[user].send(users[(i + 7) % 20], f"hello from {user}", timeout=10)
    for i, user in enumerate(users):
        assert texts(clients[user], 1) == {f"hello from {users[(i - 7) % 20]}"}

    pairs = [(a, b) for a in users for b in users if homes[a] != homes[b]][:3]  # files across brokers
    sources = {}
    for n, (a, b) in enumerate(pairs):
        sources[(a, b)] = src = tmp_path / f"file{n}.bin"
        src.write_bytes(os.urandom(1024 * 1024 + 17 * n))
        clients[a].send_file(b, src)
    for (a, b), src in sources.items():
        assert file_received(clients[b]).path.read_bytes() == src.read_bytes()


def test_killed_worker_clients_move_to_the_others_and_nothing_acknowledged_is_lost(cluster, redis_server,
                                                                                    connect, tmp_path):
    r = redis_server.client()
    clients: dict[str, ChatClient] = {}
    for i in range(12):  # until at least two workers hold users
        user = f"u{i}"
        clients[user] = connect(user, cluster.address)
        if i >= 3 and len({broker_of(r, u) for u in clients}) >= 2:
            break
    homes = {u: broker_of(r, u) for u in clients}
    victim_broker = homes["u0"]
    sender = next(u for u in clients if homes[u] != victim_broker)
    for client in clients.values():
        wait_peers(client, set(clients), timeout=20)

    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))
    clients["u0"].send_file(sender, src)
    before = {f"before {n}" for n in range(10)}
    for text in sorted(before):
        assert clients[sender].send("u0", text, timeout=10)  # acknowledged: stored in Redis
    wait_for(clients[sender], lambda e: isinstance(e, ev.FileProgress) and e.direction == "in", 20)

    os.kill(broker_pids(cluster)[victim_broker], signal.SIGKILL)
    after = {f"after {n}" for n in range(10)}
    for text in sorted(after):  # sent while u0 is moving: stored, then delivered wherever it lands
        clients[sender].send("u0", text, timeout=20)

    got, moved = set(), False
    deadline = time.monotonic() + 30
    while not (moved and got >= before | after):  # at-least-once: duplicates are fine, gaps are not
        event = wait_for(clients["u0"], lambda e: isinstance(e, (ev.MessageReceived, ev.Registered)),
                         deadline - time.monotonic())
        if isinstance(event, ev.Registered):
            moved = moved or event.reconnect
        else:
            got.add(event.text)
    assert broker_of(r, "u0") not in (None, victim_broker)
    assert file_received(clients[sender], 60).path.read_bytes() == src.read_bytes()
    for client in clients.values():  # everyone is back, on live brokers, and every list agrees
        wait_peers(client, set(clients), timeout=20)
    assert victim_broker not in {broker_of(r, u) for u in clients}


def test_a_redis_restart_with_persistence_is_survived(tmp_path, redis_server, connect):
    cluster = start_cluster(tmp_path / "bh", redis_server.url, 2)
    try:
        alice = connect("alice", cluster.address)
        connect("bob", cluster.address).close()
        alice.send("bob", "queued before the restart", timeout=10)

        redis_server.stop()  # append-only file on disk; the brokers keep serving their connections
        redis_server.start()

        alice.send("bob", "sent after the restart", timeout=20)
        bob = connect("bob", cluster.address)
        assert texts(bob, 2) == {"queued before the restart", "sent after the restart"}
        carol = connect("carol", cluster.address)
        for client in (alice, bob, carol):
            wait_peers(client, {"alice", "bob", "carol"}, timeout=20)
    finally:
        assert cluster.stop() == 0


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_in_front_of_two_brokers_passes_a_message(tmp_path, redis_server, connect):
    brokers = [BrokerProcess(tmp_path / f"b{i}", free_ports(3), ["--cluster", redis_server.url]).start()
               for i in range(2)]
    front = free_ports(3)
    env = dict(os.environ, P2P_BIND="127.0.0.1", P2P_PORT=str(front), P2P_PUB_PORT=str(front + 1),
               P2P_KEY_PORT=str(front + 2))
    for i, b in enumerate(brokers, 1):
        env.update({f"P2P_B{i}_ROUTER": f"127.0.0.1:{b.port}", f"P2P_B{i}_PUB": f"127.0.0.1:{b.port + 1}",
                    f"P2P_B{i}_KEYS": f"127.0.0.1:{b.port + 2}"})
    config = tmp_path / "haproxy.cfg"
    config.write_text((ROOT / "deploy" / "haproxy.cfg").read_text())
    proxy = subprocess.Popen(["haproxy", "-f", str(config), "-db"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        def accepting() -> bool:
            assert proxy.poll() is None, proxy.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", front), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 10, "haproxy to listen")
        address = ServerAddress("127.0.0.1", front)
        alice, bob = connect("alice", address), connect("bob", address)
        wait_peers(alice, {"alice", "bob"})
        alice.send("bob", "through the proxy", timeout=10)
        assert texts(bob, 1) == {"through the proxy"}
    finally:
        proxy.terminate()
        proxy.wait(10)
        for b in brokers:
            b.stop()
