"""What strangers and misbehaving connections can make a broker hold or do (issue 13, points 1, 7, 8, 10).

Real broker processes on loopback ports; the floods come from bench/more_flood.py, which sends
MORE-flagged parts that never end, the way a hostile peer would.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from zmq.utils import z85

from bench.more_flood import CappedRelay, flood, rss_mib
from p2pchat.broker.shell.connguard import GuardLimits
from p2pchat.broker.shell.server import BrokerConfig, BrokerServer
from p2pchat.broker.core.ports import Device, DeviceList
from p2pchat.broker.shell.keyservice_lines import MAX_REQUEST
from p2pchat.broker.shell.keyservice import KeyServiceConnection, KeyServiceCore, KeyServiceLimits
from p2pchat.client.broker_trust import admit, fetch_broker_key
from p2pchat.common import crypto
from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import ErrorCode, RemoteError
from p2pchat.common.protocol import Error, Heartbeat, Register, Registered, Unregister, decode, pack
from tests.conftest import ROOT, BrokerProcess, free_port_pair, wait_until
from tests.broker.test_fuzz import assert_broker_still_serves, recv

RSS_BOUND_MIB = 64  # issue 13: growth under a flood of unfinished multipart messages
PARTS = 200_000  # 195 MiB of 1 KiB parts: well past the bound, so holding them would fail the test


def _raw_dealer(ctx: zmq.Context, broker: BrokerProcess, identity: crypto.Identity,
                routing_id: bytes | None = None, reconnect: bool = True, deaf: bool = False) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if deaf:  # buffers as small as they go: what we do not read backs up into the broker at once
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    else:
        sock.setsockopt(zmq.RCVHWM, 0)  # read everything, so the broker never drops an answer to us
    if not reconnect:
        sock.setsockopt(zmq.RECONNECT_IVL, -1)  # a cut connection stays cut
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.curve_serverkey = z85.encode(fetch_broker_key(broker.address, broker.port + 2, 10.0))
    sock.curve_publickey, sock.curve_secretkey = identity.curve_public, identity.curve_secret
    sock.connect(broker.address.endpoint)
    return sock


def _register(sock: zmq.Socket, broker: BrokerProcess, user: str, identity: crypto.Identity) -> object:
    sock.send_multipart(pack(Register(user, os.urandom(16), identity.public), 0))
    return decode(recv(sock, broker)).message


def _conn_of(broker: BrokerProcess, user: str) -> bytes:
    pattern = re.compile(rf"user={user} conn=([0-9a-f]+) registered")
    wait_until(lambda: any(pattern.search(line) for line in broker.lines), 10, f"{user} registered")
    return bytes.fromhex(next(m.group(1) for line in broker.lines if (m := pattern.search(line))))


# --- point 1: unfinished multipart floods ------------------------------------------------------
@pytest.mark.parametrize("target", ["key", "router", "pub"])
def test_unfinished_multipart_flood_leaves_broker_memory_bounded(broker, make_client, target):
    before = rss_mib(broker.proc.pid)
    result = flood(target, broker.address, broker.port + 2, PARTS, 1024, "flooder", seconds=60)
    peak = rss_mib(broker.proc.pid)
    assert result.cut, f"the broker kept reading {result.bytes_forwarded} bytes of an unfinished message"
    assert peak - before < RSS_BOUND_MIB, f"broker RSS grew from {before:.0f} to {peak:.0f} MiB"
    assert_broker_still_serves(broker, make_client)


def test_many_small_unfinished_floods_on_the_pub_are_cut_too(broker, make_client):
    # Each stays under a session's 4 MiB, all together they would hold about 50 MiB.
    before = rss_mib(broker.proc.pid)
    results: list = []
    floods = [threading.Thread(target=lambda: results.append(
        flood("pub", broker.address, broker.port + 2, 2048, 1024, "flooder", seconds=20))) for _ in range(24)]
    for thread in floods:
        thread.start()
    for thread in floods:
        thread.join(60)
    assert len(results) == 24
    # The guard scans when RSS has grown a step since its last scan: what it has not cut yet holds less.
    held = sum(result.bytes_forwarded for result in results if not result.cut)
    assert sum(result.cut for result in results) >= 12 and held < GuardLimits().rss_step, results
    assert rss_mib(broker.proc.pid) - before < RSS_BOUND_MIB
    assert_broker_still_serves(broker, make_client)


def test_key_service_answers_key_and_closes_overlong_requests(broker):
    key = fetch_broker_key(broker.address, broker.port + 2, 10.0)
    assert key == crypto.Identity.load_or_create(broker.home / "broker" / "broker.key").public
    with socket.create_connection(("127.0.0.1", broker.port + 2), timeout=10.0) as sock:
        sock.sendall(b"K" * (MAX_REQUEST + 50))
        assert sock.makefile("rb").readline().startswith(b"ERR too_large ")
        try:
            assert sock.recv(1) == b""  # and closed
        except ConnectionResetError:  # closed with our unread excess: a reset
            pass


# --- point 1: admission --------------------------------------------------------------------------
def test_key_without_id_or_ticket_is_not_let_in(broker):
    ctx = zmq.Context()
    stranger = crypto.Identity.generate()
    try:
        sock = _raw_dealer(ctx, broker, stranger)
        sock.send_multipart(pack(Register("stranger", os.urandom(16), stranger.public), 0))
        assert not sock.poll(1500), "a key nobody admitted completed the CURVE handshake"
        sock.close(0)
        admit(broker.address, broker.port + 2, "stranger", stranger.public, 10.0)
        sock = _raw_dealer(ctx, broker, stranger)
        assert type(_register(sock, broker, "stranger", stranger)) is Registered
        sock.close(0)
    finally:
        ctx.destroy(0)


@pytest.mark.broker_args("--ids-per-key", "2")
def test_one_key_claims_at_most_ids_per_key(broker):
    ctx = zmq.Context()
    farmer = crypto.Identity.generate()
    try:
        for user in ("farm1", "farm2"):
            admit(broker.address, broker.port + 2, user, farmer.public, 10.0)
            sock = _raw_dealer(ctx, broker, farmer)
            assert type(_register(sock, broker, user, farmer)) is Registered
        with pytest.raises(RemoteError) as refused:
            admit(broker.address, broker.port + 2, "farm3", farmer.public, 10.0)
        assert refused.value.code is ErrorCode.TOO_MANY_IDS
        reply = _register(_raw_dealer(ctx, broker, farmer), broker, "farm3", farmer)  # bound key: let in
        assert type(reply) is Error and reply.code is ErrorCode.TOO_MANY_IDS
    finally:
        ctx.destroy(0)


def test_admission_of_an_id_bound_to_another_key_is_refused(broker, make_client):
    make_client("alice")
    with pytest.raises(RemoteError) as refused:
        admit(broker.address, broker.port + 2, "alice", crypto.Identity.generate().public, 10.0)
    assert refused.value.code is ErrorCode.ID_TAKEN


# --- point 8: connections that never register --------------------------------------------------
def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_connections_that_never_register_are_closed(broker):
    ctx = zmq.Context()
    try:
        baseline = _open_fds(broker.proc.pid)
        idle = crypto.Identity.generate()
        admit(broker.address, broker.port + 2, "idler", idle.public, 10.0)
        socks = [_raw_dealer(ctx, broker, idle, reconnect=False) for _ in range(100)]
        wait_until(lambda: sum("no session" in line for line in broker.lines) >= 100, 15,
                   "100 idle connections cut:\n" + "".join(broker.lines[-5:]))
        wait_until(lambda: _open_fds(broker.proc.pid) <= baseline + 2, 10, "their descriptors closed")
        assert len(socks) == 100  # held open on our side all along
    finally:
        ctx.destroy(0)


# --- point 7: a session is bound to its key on every frame; routing ids are unpredictable ---------
@pytest.mark.broker_args("--heartbeat", "5")  # the victim's session outlives its connection for 15 s
def test_knowing_a_victims_routing_id_does_not_give_its_session(broker):
    ctx = zmq.Context()
    try:
        victim, mallory = crypto.Identity.generate(), crypto.Identity.generate()
        admit(broker.address, broker.port + 2, "victim", victim.public, 10.0)
        sock = _raw_dealer(ctx, broker, victim)
        assert type(_register(sock, broker, "victim", victim)) is Registered
        conn = _conn_of(broker, "victim")
        assert conn[1:] != bytes.fromhex("6b8b4567"), "routing ids start at libc rand()'s unseeded first value"
        sock.close(0)  # the connection drops; the session lives until it expires
        admit(broker.address, broker.port + 2, "mallory", mallory.public, 10.0)
        thief = _raw_dealer(ctx, broker, mallory, routing_id=conn)
        deadline = time.monotonic() + 10
        while True:  # the old connection may take a moment to go: until then the id is still taken
            thief.send_multipart(pack(Heartbeat(), 0))
            if thief.poll(300):
                break
            assert time.monotonic() < deadline, "no answer on the victim's routing id"
        reply = decode(thief.recv_multipart()).message
        assert type(reply) is Error and reply.code is ErrorCode.KEY_MISMATCH, reply
    finally:
        ctx.destroy(0)


def test_two_brokers_start_their_routing_ids_apart(tmp_path):
    conns = []
    for name in ("one", "two"):
        other = BrokerProcess.launch(tmp_path / name)
        try:
            ctx = zmq.Context()
            me = crypto.Identity.generate()
            admit(other.address, other.port + 2, "probe", me.public, 10.0)
            assert type(_register(_raw_dealer(ctx, other, me), other, "probe", me)) is Registered
            conns.append(_conn_of(other, "probe"))
            ctx.destroy(0)
        finally:
            other.stop()
    assert conns[0] != conns[1]
    assert all(conn[1:] != bytes.fromhex("6b8b4567") for conn in conns)


# --- point 8: bad frames are logged aggregated ------------------------------------------------------
def test_two_thousand_junk_frames_do_not_write_two_thousand_log_lines(broker):
    ctx = zmq.Context()
    try:
        me = crypto.Identity.generate()
        admit(broker.address, broker.port + 2, "junker", me.public, 10.0)
        sock = _raw_dealer(ctx, broker, me)
        assert type(_register(sock, broker, "junker", me)) is Registered
        for i in range(2000):
            sock.send(b"\xc1junk" + i.to_bytes(4, "big"))
        for _ in range(2000):
            assert type(decode(recv(sock, broker)).message) is Error
        lines = [line for line in broker.lines if "bad frame" in line]
        assert 1 <= len(lines) <= 5, lines[:10]
    finally:
        ctx.destroy(0)


def test_replies_dropped_at_a_peers_high_water_mark_are_logged_aggregated(broker):
    """A client that asks and never reads fills its pipe and then its backlog at the broker: the frames
    past that are dropped, and each drop must not be a log line."""
    ctx = zmq.Context()
    try:
        me = crypto.Identity.generate()
        admit(broker.address, broker.port + 2, "deaf", me.public, 10.0)
        sock = _raw_dealer(ctx, broker, me, deaf=True)
        assert type(_register(sock, broker, "deaf", me)) is Registered
        sock.setsockopt(zmq.SNDHWM, 0)
        # Each answer is an error of about 1 KB naming the unknown field: 15 MB that nobody reads, past the
        # pipe (1,000 answers), the socket buffers and the backlog (8 MiB).
        bad = msgpack.packb({"v": 1, "t": "heartbeat", "id": bytes(16), "ts": 0, "x" * 900: 1})
        for _ in range(15_000):
            sock.send(bad)
        wait_until(lambda: any("frame dropped" in line for line in broker.lines), 30, "a drop logged")
        sock.send(pack(Unregister(), 0)[0])  # handled after every bad frame: then all drops have happened
        wait_until(lambda: any("deaf" in line and "unregistered" in line for line in broker.lines), 30, "unregistered")
        assert len([line for line in broker.lines if "frame dropped" in line]) <= 3
    finally:
        ctx.destroy(0)


# --- point 10: --insecure stays on loopback -------------------------------------------------------------
def test_insecure_broker_refuses_a_non_loopback_host(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "p2pchat.client.cli", "broker", "--insecure", "--host", "0.0.0.0",
                           "--port", "1", "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "--insecure" in proc.stderr and "loopback" in proc.stderr


def test_insecure_broker_on_loopback_warns_loudly(tmp_path):
    proc = BrokerProcess.launch(tmp_path / "insecure", ["--insecure"])
    try:
        assert any("PLAINTEXT" in line and "NOT FOR USE" in line for line in proc.lines)
    finally:
        proc.stop()


# --- the key service core, without sockets --------------------------------------------------------
class _Registry:
    """Just enough KeyRegistry for the key service: ``taken`` IDs belong to another key, ``bound`` to theirs."""

    def __init__(self, taken: set[str] = frozenset(), bound: dict[str, bytes] | None = None) -> None:
        self.taken, self.bound, self.tickets = taken, bound or {}, []

    def can_bind(self, user: str, key: bytes):
        return ErrorCode.ID_TAKEN if user in self.taken else None

    def devices(self, user: str, fresh: bool = False) -> DeviceList | None:
        return DeviceList(1, (Device(1, self.bound[user]),)) if user in self.bound else None

    def issue_ticket(self, key: bytes, now: float):
        self.tickets.append(key)
        return None


def _service(**limits) -> KeyServiceCore:
    return KeyServiceCore(b"\x01" * 32, _Registry({"alice"}), KeyServiceLimits(**limits))


def test_key_service_core_admits_a_bound_key_without_a_ticket():
    """A bound key is let in by its binding: no ticket, so no write a Redis outage could refuse."""
    core = KeyServiceCore(b"\x01" * 32, _Registry(bound={"carol": b"\xef" * 32}), KeyServiceLimits())
    reply, _ = KeyServiceConnection("127.0.0.1", 0.0).receive(b"ADMIT carol " + b"ef" * 32 + b"\n", core, 0.0)
    assert reply == b"OK\n" and core.keys.tickets == []


def test_key_service_core_answers_key_and_admit_lines():
    core, conn = _service(), KeyServiceConnection("127.0.0.1", 0.0)
    reply, close = conn.receive(b"KEY\nADMIT bob " + b"ab" * 32 + b"\nADMIT alice " + b"cd" * 32 + b"\n", core, 0.0)
    assert reply.split(b"\n")[:3] == [b"KEY " + b"01" * 32, b"OK", b"ERR id_taken user ID 'alice' belongs to another key"]
    assert not close
    assert core.keys.tickets == [b"\xab" * 32]


def test_key_service_core_closes_after_a_bad_or_overlong_line_or_four_requests():
    core = _service()
    reply, close = KeyServiceConnection("h", 0.0).receive(b"HELLO\n", core, 0.0)
    assert reply.startswith(b"ERR bad_frame ") and close
    reply, close = KeyServiceConnection("h", 0.0).receive(b"K" * MAX_REQUEST, core, 0.0)
    assert reply.startswith(b"ERR too_large ") and close
    reply, close = KeyServiceConnection("h", 0.0).receive(b"KEY\n" * 5, core, 0.0)
    assert reply.count(b"\n") == 4 and close
    assert KeyServiceConnection("h", 0.0).receive(b"KE", core, 0.0) == (b"", False)  # waits for the rest


def test_key_service_core_limits_admissions_per_source_address():
    core = _service(admit_rate=1.0, admit_burst=2.0)
    admit_line = b"ADMIT bob " + b"ab" * 32 + b"\n"
    answers = [KeyServiceConnection(source, 0.0).receive(admit_line, core, 0.0)[0]
               for source in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2")]
    assert answers[:2] == [b"OK\n", b"OK\n"]
    assert answers[2].startswith(b"ERR rate_limited ")
    assert answers[3] == b"OK\n"  # another address has its own bucket


# --- point 8: ZMTP heartbeats drop a peer that went silent under an open TCP connection ---------------
def test_zmtp_heartbeats_drop_a_peer_that_stopped_answering(tmp_path):
    # Application heartbeats (60 s) and the unregistered-connection timeout are out of the way: only
    # the ZMTP pings can notice this peer.
    config = BrokerConfig(port=free_port_pair(), data_dir=tmp_path / "broker", heartbeat_ivl=60.0,
                          zmtp_heartbeat_ivl=0.1)
    server = BrokerServer(config)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    ctx = zmq.Context()
    relay = CappedRelay(("127.0.0.1", config.port))
    try:
        me = crypto.Identity.generate()
        address = ServerAddress("127.0.0.1", config.port)
        admit(address, config.port + 2, "sleeper", me.public, 10.0)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = z85.encode(server.identity.public)
        sock.curve_publickey, sock.curve_secretkey = me.curve_public, me.curve_secret
        sock.connect(f"tcp://127.0.0.1:{relay.port}")
        sock.send_multipart(pack(Register("sleeper", os.urandom(16), me.public), 0))
        assert sock.poll(10_000) and type(decode(sock.recv_multipart()).message) is Registered
        relay.freeze()  # the peer's host vanished: its TCP connection stays open, nothing comes from it
        assert relay.cut.wait(10), "the broker kept a connection that stopped answering pings"
    finally:
        relay.close()
        ctx.destroy(0)
        server.stop()
        thread.join(10)
