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

from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import BrokenError, ErrorCode, RemoteError
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


def logged(broker: BrokerProcess, text: str) -> int:
    return sum(text in line for line in list(broker.lines))


def worker_crashes(broker: BrokerProcess) -> list[str]:
    """The supervisor's lines about workers that exited on their own (it restarts them)."""
    return [line for line in list(broker.lines) if re.search(r"worker \d+ pid \d+ exited", line)]


def broker_pids(broker: BrokerProcess) -> dict[str, int]:
    """broker id (hex) -> worker pid, from the workers' start-up lines."""
    found = (re.search(r"as broker ([0-9a-f]+) pid (\d+)", line) for line in list(broker.lines))
    return {m.group(1): int(m.group(2)) for m in found if m}


def broker_of(r: redis.Redis, user: str) -> str | None:
    entry = r.hget(ONLINE, f"{user}/1")  # its first device's session ("broker/conn/token")
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
    proc = subprocess.run([os.sys.executable, "-m", "p2pchat.client.cli", "broker", "--workers", "2"], cwd=ROOT,
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
    # Everyone is back on live brokers (each client notices the death on its own heartbeat schedule)...
    wait_until(lambda: victim_broker not in {broker_of(r, u) for u in clients}, 20, "everyone off the dead broker")
    for client in clients.values():  # ...and every list agrees
        wait_peers(client, set(clients), timeout=20)
    assert len(worker_crashes(cluster)) == 1  # only the one we killed


def test_a_redis_restart_with_persistence_is_survived(tmp_path, redis_server, connect):
    cluster = start_cluster(tmp_path / "bh", redis_server.url, 2)
    try:
        alice = connect("alice", cluster.address)
        connect("bob", cluster.address).close()
        alice.send("bob", "queued before the restart", timeout=10)
        listener = listen_process("dave", cluster, tmp_path / "dave-home")
        wait_until(lambda: "dave" in online_users(redis_server.client()), 20, "dave online")

        redis_server.stop()  # append-only file on disk; the brokers keep serving their connections
        listener.kill()  # his session expires while Redis is down: a worker that crashed would be restarted
        listener.wait(10)
        wait_until(lambda: logged(cluster, "expired after") or worker_crashes(cluster), 10, "dave's session to expire")
        redis_server.start()
        # Meanwhile a worker that noticed refuses what needs Redis (storage_unavailable) until its probe.
        wait_until(lambda: logged(cluster, "redis unavailable") == logged(cluster, "redis is back"), 20,
                   "every worker to find Redis again")

        alice.send("bob", "sent after the restart", timeout=20)
        bob = connect("bob", cluster.address)
        assert texts(bob, 2) == {"queued before the restart", "sent after the restart"}
        carol = connect("carol", cluster.address)
        for client in (alice, bob, carol):
            wait_peers(client, {"alice", "bob", "carol"}, timeout=20)
        assert not worker_crashes(cluster)  # the supervisor restarting a crashed worker hides nothing
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


# --- Redis outages: brokers stay up, serve what they can, and reconcile ------------------------------------

@pytest.fixture
def cluster_broker(tmp_path: Path, redis_server: RedisProcess) -> Iterator[BrokerProcess]:
    """One cluster-mode broker process (no supervisor: its own exit is the failure)."""
    broker = BrokerProcess(tmp_path / "one-broker", free_ports(3), ["--cluster", redis_server.url]).start(timeout=20)
    yield broker
    assert broker.stop() == 0


def online_users(r: redis.Redis) -> set[str]:
    return {f.decode().partition("/")[0] for f in r.hkeys(ONLINE)}  # "user/dev"


def listen_process(user: str, broker: BrokerProcess, home: Path) -> subprocess.Popen:
    return subprocess.Popen([os.sys.executable, "-m", "p2pchat.client.cli", "listen", "--user", user,
                             "--server", f"127.0.0.1:{broker.port}"], cwd=ROOT,
                            env=dict(os.environ, P2PCHAT_HOME=str(home)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_broker_stays_up_and_local_chat_works_while_redis_is_down(cluster_broker, redis_server, connect):
    alice, bob = connect("alice", cluster_broker.address), connect("bob", cluster_broker.address)
    redis_server.stop()
    for n in range(3):  # relayed unstored to the online recipient here, and acknowledged
        alice.send("bob", f"during the outage {n}", timeout=10)
    assert texts(bob, 3) == {f"during the outage {n}" for n in range(3)}
    bob.send("alice", "and back", timeout=10)
    assert texts(alice, 1) == {"and back"}
    assert cluster_broker.alive()


def test_a_session_expiring_during_a_redis_outage_does_not_stop_the_broker(cluster_broker, redis_server,
                                                                            connect, tmp_path):
    alice, bob = connect("alice", cluster_broker.address), connect("bob", cluster_broker.address)
    listener = listen_process("carol", cluster_broker, tmp_path / "carol-home")
    r = redis_server.client()
    wait_until(lambda: "carol" in online_users(r), 20, "carol online")
    redis_server.stop()
    listener.kill()  # no UNREGISTER: her session expires on the broker's tick
    listener.wait(10)
    wait_until(lambda: any("user=carol" in line and "expired after" in line for line in list(cluster_broker.lines))
               or not cluster_broker.alive(), 10, "carol's session to expire")
    assert cluster_broker.alive()
    alice.send("bob", "still here", timeout=10)
    assert texts(bob, 1) == {"still here"}


def test_no_ghost_users_after_redis_returns(cluster_broker, redis_server, connect):
    alice, bob, carol = (connect(u, cluster_broker.address) for u in ("alice", "bob", "carol"))
    connect("dave", cluster_broker.address).close()  # bound to his key before the outage
    r = redis_server.client()
    wait_until(lambda: online_users(r) == {"alice", "bob", "carol"}, 10, "three online")
    redis_server.stop()
    carol.close()  # left during the outage: must not stay online in Redis
    dave = connect("dave", cluster_broker.address)  # came during the outage: must be online in Redis
    redis_server.start()
    r = redis_server.client()
    wait_until(lambda: online_users(r) == {"alice", "bob", "dave"}, 20, "presence reconciled")
    for client in (alice, bob, dave):
        wait_peers(client, {"alice", "bob", "dave"}, timeout=20)
    erin = connect("erin", cluster_broker.address)  # and the cluster is whole: new IDs register again
    wait_peers(erin, {"alice", "bob", "dave", "erin"}, timeout=20)


def test_a_broker_starts_degraded_without_redis_and_becomes_whole_when_it_appears(tmp_path, connect):
    redis_server = RedisProcess(tmp_path / "late-redis")  # not started yet
    broker = BrokerProcess(tmp_path / "bh", free_ports(3), ["--cluster", redis_server.url]).start(timeout=20)
    try:
        assert logged(broker, "DEGRADED")
        early = ChatClient("early", ClientConfig(server=broker.address, heartbeat_ivl=HEARTBEAT, history=False))
        with pytest.raises(BrokenError):  # a new ID cannot be bound without Redis: refused clearly
            early.connect(timeout=3)
        refusal = wait_for(early, lambda e: isinstance(e, ev.ErrorReported), 1)
        assert refusal.error.code is ErrorCode.STORAGE_UNAVAILABLE
        redis_server.start()
        wait_until(lambda: logged(broker, "redis is back"), 20, "the broker to find Redis")
        alice, bob = connect("alice", broker.address), connect("bob", broker.address)
        wait_peers(alice, {"alice", "bob"}, timeout=20)
        alice.send("bob", "whole again", timeout=10)
        assert texts(bob, 1) == {"whole again"}
        assert broker_of(redis_server.client(), "alice") is not None
    finally:
        assert broker.stop() == 0
        redis_server.stop()


def test_a_worker_restarted_during_an_outage_starts_degraded(tmp_path, redis_server, connect):
    cluster = start_cluster(tmp_path / "bh", redis_server.url, 2)
    try:
        alice = connect("alice", cluster.address)
        redis_server.stop()
        victim = next(iter(broker_pids(cluster).values()))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: listening(cluster) >= 3, 20, "the supervisor to restart the worker")
        assert len(worker_crashes(cluster)) == 1  # the one we killed: the restarted worker keeps running
        redis_server.start()
        wait_until(lambda: logged(cluster, "redis is back") >= 2, 20, "both workers to find Redis")
        bob = connect("bob", cluster.address)
        wait_peers(bob, {"alice", "bob"}, timeout=20)
        bob.send("alice", "after the outage", timeout=10)
        assert texts(alice, 1) == {"after the outage"}
        assert len(worker_crashes(cluster)) == 1
    finally:
        assert cluster.stop() == 0


def test_redis_out_of_memory_is_answered_with_storage_unavailable(cluster_broker, redis_server, connect):
    alice, bob = connect("alice", cluster_broker.address), connect("bob", cluster_broker.address)
    connect("carol", cluster_broker.address).close()
    r = redis_server.client()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write is refused: -OOM command not allowed
    with pytest.raises(RemoteError) as refused:  # carol is offline: her message needs the queue in Redis
        alice.send("carol", "to the queue", timeout=10)
    assert refused.value.code is ErrorCode.STORAGE_UNAVAILABLE
    alice.send("bob", "to bob, online here", timeout=10)
    assert texts(bob, 1) == {"to bob, online here"}
    recovered = logged(cluster_broker, "redis is back")
    r.config_set("maxmemory", 0)
    wait_until(lambda: logged(cluster_broker, "redis is back") > recovered, 20, "the broker to recover")
    alice.send("carol", "stored again", timeout=10)
    carol = connect("carol", cluster_broker.address)
    assert texts(carol, 1) == {"stored again"}
    assert cluster_broker.alive()


def test_a_hung_redis_never_blocks_the_broker_past_a_heartbeat(cluster_broker, redis_server, connect):
    alice, bob = connect("alice", cluster_broker.address), connect("bob", cluster_broker.address)
    recovered = logged(cluster_broker, "redis is back")
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        for n in range(5):
            alice.send("bob", f"while redis hangs {n}", timeout=10)
        assert texts(bob, 5) == {f"while redis hangs {n}" for n in range(5)}
        wait_until(lambda: logged(cluster_broker, "redis unavailable (Timeout"), 10, "a Redis call to time out")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: logged(cluster_broker, "redis is back") > recovered, 20, "the broker to recover")
    for client in (alice, bob):  # heartbeats were answered all along: nobody had to reconnect
        while not client.events.empty():
            assert not isinstance(client.events.get_nowait(), ev.Reconnecting)
    assert cluster_broker.alive()


def test_cross_broker_inboxes_are_bounded_in_entries_and_bytes(redis_server, tmp_path):
    from p2pchat.broker.backends.redis_cluster import ClusterBackend
    from p2pchat.broker.backends.redis_link import INBOX_MAX_BYTES, INBOX_MAXLEN
    r = redis_server.client()
    backend = ClusterBackend(redis_server.url, os.urandom(8), tmp_path, heartbeat_ivl=1.0, liveness=1,
                             wake=lambda: None)
    link = backend.link
    try:
        dead = os.urandom(8)  # a broker that never reads its inbox
        for _ in range(INBOX_MAXLEN + 50):
            link.forward(dead, "bob", [b"h" * 10])
        backend.commit()
        inbox = link.keys.inbox(dead.hex())
        assert r.xlen(inbox) == INBOX_MAXLEN
        r.delete(inbox, inbox + ":bytes")
        chunk = os.urandom(1024 * 1024)
        for _ in range(INBOX_MAX_BYTES // len(chunk) + 10):
            link.forward(dead, "bob", [b"h", chunk])
        backend.commit()
        assert int(r.get(inbox + ":bytes")) <= INBOX_MAX_BYTES
        assert r.xlen(inbox) < INBOX_MAX_BYTES // len(chunk)
    finally:
        backend.close()
