"""Relay benchmark: alice -> bob through the broker, beside a bare ROUTER loop, in one run.

For each round and each server (the real broker, started by ``run_broker.py``,
and ``bare_router.py`` which only swaps routing ids), a fresh server process is
started on free 127.0.0.1 ports and two client processes, alice and bob, run
the same scripted DEALER code against it with the real codec
(``common.protocol.pack`` / ``decode``), over CURVE when the broker has it
(``--transport``; the bare loop then does CURVE too):

1. warm-up: ``--warmup`` messages, pipelined;
2. throughput: ``--messages`` messages, pipelined with at most ``--window`` not
   yet received by bob (so no queue overflows and nothing is dropped);
   msgs/s = messages / (first send -> last receive);
3. latency: ``--rate`` msg/s for ``--duration`` s, paced by alice; every body
   carries ``time.perf_counter_ns()`` taken before packing, bob records the
   one-way latency on arrival into an HdrHistogram.

Rounds interleave the servers (order alternating) and the table shows medians
over rounds, the ratio broker/bare, and the issue's targets: the broker
reaches >= 70% of the bare loop's msgs/s, and its p99 stays under 2 ms at
5,000 msg/s. See bench/README.md for what the bare loop does and does not do.

    .venv/bin/python bench/bench_relay.py [--rounds 5] [--messages 20000]
        [--rate 5000] [--duration 2] [--transport curve|plain] [--ack-baseline] [--json] [--check]

(Over 500 lines: one program, the broker and its bare-loop baseline driven by the same clients.)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.conftest's helpers
BARE_ROUTER = Path(__file__).resolve().with_name("bare_router.py")
RUN_BROKER = Path(__file__).resolve().with_name("run_broker.py")

P99_TARGET_US = 2000.0
RATIO_TARGET = 0.70
SERVER_START_TIMEOUT = 15.0
REGISTER_TIMEOUT = 10.0
DRAIN_TIMEOUT = 15.0  # for queued messages / ACKs to arrive after a phase
SEND_TIMEOUT_MS = 5000

WARMUP, THROUGHPUT, LATENCY = 0, 1, 2
BODY = struct.Struct("<BQq")  # phase, sequence number, perf_counter_ns at send

# HdrHistogram range: 1 ns .. 60 s, 3 significant digits.
HIST_ARGS = (1, 60 * 10**9, 3)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the two clients do in one run; built once in the parent, pickled to each."""

    endpoint: str
    server_key: bytes | None  # the server's CURVE public key (Z85), or None for plaintext
    warmup: int
    messages: int
    window: int
    rate: float
    duration: float
    size: int
    expect_acks: bool
    consume: bool  # bob tells a store-and-forward broker he has each message (CONSUME), as the client does
    budget: float  # seconds either client may take in all
    server_pid: int  # alice reads its CPU time around the throughput phase

    @property
    def paced(self) -> int:
        return max(1, round(self.rate * self.duration))

    @property
    def total(self) -> int:
        return self.warmup + self.messages + self.paced


class BenchError(Exception):
    """A run that did not measure what it should (lost messages, a dead server...)."""


# --- the clients (run in spawned processes) ----------------------------------
def _wall_ms() -> int:
    return int(time.time() * 1000)


def _dealer(ctx, plan: Plan, user: str):
    """A DEALER to the server, and the raw public key it connects with (its CURVE key, if CURVE is on)."""
    import zmq
    from zmq.utils import z85

    from p2pchat.client.broker_trust import ADMIT_TIMEOUT, admit
    from p2pchat.common.endpoints import ServerAddress

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)  # a blocked send fails instead of hanging
    public, secret = zmq.curve_keypair()
    if plan.server_key is not None:  # the broker admits only keys with an ID or a ticket (§10.1)
        server = ServerAddress.parse(plan.endpoint.removeprefix("tcp://"))
        admit(server, server.port + 2, user, z85.decode(public), ADMIT_TIMEOUT)
        sock.curve_serverkey = plan.server_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(plan.endpoint)
    return sock, z85.decode(public)


def _register_frames(user: str, key: bytes) -> list[bytes]:
    """REGISTER for a scripted client. The protocol grows fields; one not filled here fails loudly."""
    import dataclasses

    from p2pchat.common.protocol import Register, pack

    # A throwaway ID: no recovery key, and the single-device protocol (no caps, no device name).
    values = {"user": user, "token": os.urandom(32), "key": key, "recovery": None, "caps": None, "name": None}
    missing = [f.name for f in dataclasses.fields(Register) if f.name not in values]
    if missing:
        raise BenchError(f"Register has fields {missing} that bench_relay._register_frames does not fill")
    return pack(Register(**{f.name: values[f.name] for f in dataclasses.fields(Register)}), _wall_ms())


def _register(sock, user: str, key: bytes) -> None:
    """REGISTER, then wait for REGISTERED (sent once: without IMMEDIATE it waits for the connection)."""
    from p2pchat.common.protocol import Error, Registered, decode

    sock.send_multipart(_register_frames(user, key))
    deadline = time.monotonic() + REGISTER_TIMEOUT
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = decode(sock.recv_multipart()).message
            if type(msg) is Registered:
                return
            if type(msg) is Error:
                raise BenchError(f"{user}: REGISTER refused: {msg.code.value}: {msg.message}")
    raise BenchError(f"{user}: no REGISTERED within {REGISTER_TIMEOUT}s")


def _worker(role: str, plan: Plan, received, bob_ready, result_pipe) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns shutdown
    import zmq

    ctx = zmq.Context()
    sock = None
    try:
        sock, key = _dealer(ctx, plan, role)
        _register(sock, role, key)
        body = _bob if role == "bob" else _alice
        result = body(sock, plan, received, bob_ready)
    except BaseException as exc:  # reported to the parent, never lost
        result = {"error": f"{role}: {exc!r}\n{traceback.format_exc()}"}
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()
    result["cpu_s"] = time.process_time()  # this whole process, for the parent's background-load estimate
    result_pipe.send(result)
    result_pipe.close()


def _bob(sock, plan: Plan, received, bob_ready) -> dict:
    import zmq
    from hdrh.histogram import HdrHistogram

    from p2pchat.common.protocol import ChatMessage, decode, pack

    if plan.consume:
        from p2pchat.common.protocol import Consume
    bob_ready.set()
    hist = HdrHistogram(*HIST_ARGS)
    expected_seq = [0, 0, 0]
    out_of_order = other = 0
    count = 0
    tp_start = tp_end = lat_first = lat_last = 0
    deadline = time.monotonic() + plan.budget
    while count < plan.total:
        if time.monotonic() > deadline:
            raise BenchError(f"bob: received {count} of {plan.total} messages within {plan.budget:.0f}s")
        if not sock.poll(100):
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            now = time.perf_counter_ns()
            env = decode(frames)
            msg = env.message
            if type(msg) is not ChatMessage:
                other += 1
                continue
            if plan.consume:
                sock.send_multipart(pack(Consume(env.msg_id), _wall_ms()))
            phase, seq, sent_ns = BODY.unpack_from(msg.body)
            if seq != expected_seq[phase]:
                out_of_order += 1
            expected_seq[phase] = seq + 1
            count += 1
            received.value = count
            if phase == LATENCY:
                hist.record_value(max(1, now - sent_ns))
                lat_first = lat_first or sent_ns
                lat_last = sent_ns
            elif phase == THROUGHPUT:
                if seq == 0:
                    tp_start = sent_ns
                if seq == plan.messages - 1:
                    tp_end = now
    return {
        "count": count,
        "out_of_order": out_of_order,
        "other_frames": other,
        "tp_seconds": (tp_end - tp_start) / 1e9,
        "lat_send_rate": (plan.paced - 1) / ((lat_last - lat_first) / 1e9) if lat_last > lat_first else 0.0,
        "hist": hist.encode().decode("ascii"),
    }


class _Alice:
    """The sender: pipelined or paced sends, and draining whatever the server answers."""

    def __init__(self, sock, plan: Plan, received) -> None:
        self.sock, self.plan, self.received = sock, plan, received
        self.sent = self.acks = self.errors = self.other = 0
        self.error_samples: list[str] = []
        self.deadline = time.monotonic() + plan.budget
        self.padding = bytes(max(0, plan.size - BODY.size))

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise BenchError(f"alice: run exceeded {self.plan.budget:.0f}s (sent {self.sent}, "
                             f"bob has {self.received.value})")

    def _send(self, phase: int, seq: int) -> None:
        from p2pchat.common.protocol import ChatMessage, pack

        body = BODY.pack(phase, seq, time.perf_counter_ns()) + self.padding
        msg_id = struct.pack(">QQ", phase, seq)
        self.sock.send_multipart(pack(ChatMessage("alice", "bob", body), _wall_ms(), msg_id))
        self.sent += 1

    def drain(self) -> None:
        import zmq

        from p2pchat.common.protocol import Ack, Error, decode

        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode(frames).message
            if type(msg) is Ack:
                self.acks += 1
            elif type(msg) is Error:
                self.errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(f"{msg.code.value}: {msg.message}")
            else:
                self.other += 1

    def pipelined(self, phase: int, n: int) -> None:
        seq = 0
        while seq < n:
            self._check_deadline()
            self.drain()
            room = self.plan.window - (self.sent - self.received.value)
            if room <= 0:
                time.sleep(50e-6)  # bob is behind: let him catch up
                continue
            for _ in range(min(room, n - seq, 256)):
                self._send(phase, seq)
                seq += 1

    def paced(self, phase: int, n: int, rate: float) -> int:
        """Send ``n`` messages at ``rate``/s on a fixed schedule; return the worst lateness in ns."""
        interval = 1e9 / rate
        t0 = time.perf_counter_ns() + 1_000_000
        worst = 0
        for seq in range(n):
            due = t0 + int(seq * interval)
            while (wait := due - time.perf_counter_ns()) > 0:
                if wait > 2_000_000:
                    self.sock.poll((wait - 1_000_000) // 1_000_000)
                    self.drain()
                else:
                    time.sleep(wait / 1e9)
            worst = max(worst, -wait)
            self._send(phase, seq)
            self.drain()
            if seq % 1024 == 0:
                self._check_deadline()
        return worst

    def settle(self) -> None:
        """Wait until bob has everything sent so far and, against the broker, every ACK is in."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.received.value < self.sent or (self.plan.expect_acks and self.acks + self.errors < self.sent):
            if time.monotonic() > deadline:
                raise BenchError(f"alice: after {DRAIN_TIMEOUT}s bob has {self.received.value} of {self.sent}, "
                                 f"acks {self.acks}, errors {self.errors} {self.error_samples}")
            self.sock.poll(1)
            self.drain()


class _ServerCpu:
    """CPU seconds (user + system) the server process has used so far: (Python main thread, others)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._proc = psutil.Process(pid)

    def seconds(self) -> tuple[float, float]:
        main = other = 0.0
        for thread in self._proc.threads():
            if thread.id == self._proc.pid:
                main += thread.user_time + thread.system_time
            else:  # libzmq's I/O and reaper threads
                other += thread.user_time + thread.system_time
        return main, other


def _alice(sock, plan: Plan, received, bob_ready) -> dict:
    if not bob_ready.wait(REGISTER_TIMEOUT):
        raise BenchError("alice: bob never registered")
    alice = _Alice(sock, plan, received)
    alice.pipelined(WARMUP, plan.warmup)
    alice.settle()
    server = _ServerCpu(plan.server_pid)
    cpu_before = server.seconds()
    start = time.perf_counter_ns()
    alice.pipelined(THROUGHPUT, plan.messages)
    send_seconds = (time.perf_counter_ns() - start) / 1e9
    alice.settle()
    cpu_after = server.seconds()
    time.sleep(0.1)
    worst_late = alice.paced(LATENCY, plan.paced, plan.rate)
    alice.settle()
    return {
        "sent": alice.sent,
        "acks": alice.acks,
        "errors": alice.errors,
        "error_samples": alice.error_samples,
        "other_frames": alice.other,
        "tp_send_seconds": send_seconds,
        "tp_server_cpu_seconds": [after - before for after, before in zip(cpu_after, cpu_before)],
        "worst_late_us": worst_late / 1000,
    }


# --- servers (subprocesses) ------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies without cleaning up (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass




def free_ports() -> int:
    """A port P with P .. P+2 all free on 127.0.0.1 (the tests' helper)."""
    from tests.conftest import free_port_pair

    return free_port_pair()


def fetch_server_key(port: int, timeout: float = 5.0) -> bytes:
    """Ask the key service on ``port`` + 2 for the server's CURVE key, as a client does on first use."""
    from zmq.utils import z85

    from p2pchat.client.broker_trust import fetch_broker_key
    from p2pchat.common.endpoints import ServerAddress

    key = fetch_broker_key(ServerAddress("127.0.0.1", port), port + 2, timeout)
    if key is None:
        raise BenchError(f"no broker key from the key service on port {port + 2}")
    return z85.encode(key)


SERVERS = {
    "broker": "p2pchat broker",
    "bare": "bare ROUTER loop",
    "bare+ack": "bare loop + const ACK",
    "candidate": "candidate broker",
}


class ServerProcess:
    """One server under test, owned by a ``with`` block: started on entry, stopped on every exit."""

    def __init__(self, kind: str, port: int, home: Path, transport: str, store: str,
                 candidate_cmd: str | None = None) -> None:
        self.kind, self.port, self.home, self.transport, self.store = kind, port, home, transport, store
        self.candidate_cmd = candidate_cmd
        self.key: bytes | None = None  # CURVE public key (Z85), once started
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self.warnings = 0
        self._ready = threading.Event()
        self._pump: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "candidate":
            assert self.candidate_cmd is not None
            return shlex.split(self.candidate_cmd.format(python=sys.executable, port=self.port,
                                                         data_dir=self.home / "broker", transport=self.transport,
                                                         store=self.store))
        if self.kind == "broker":
            return [sys.executable, str(RUN_BROKER), "--port", str(self.port), "--data-dir", str(self.home / "broker"),
                    "--transport", self.transport, "--store", self.store]
        cmd = [sys.executable, str(BARE_ROUTER), "--port", str(self.port), "--transport", self.transport]
        return cmd + (["--ack"] if self.kind == "bare+ack" else [])

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ, P2PCHAT_HOME=str(self.home), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self._pump = threading.Thread(target=self._read_stderr, name=f"{self.kind}-stderr", daemon=True)
        self._pump.start()
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while not self._ready.wait(0.05):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{self.kind} did not start:\n" + "".join(self.lines))
            if self.transport == "curve":
                self.key = fetch_server_key(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:  # ends when the process closes stderr
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()
            benign = "PLAINTEXT" in line or "dropped=0" in line  # the --insecure notice; a clean bare loop exit
            if not benign and ("WARNING" in line or "ERROR" in line or "dropped" in line):
                self.warnings += 1

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._pump is not None:
            self._pump.join(2)
        if proc.stderr is not None:
            proc.stderr.close()


def _stop_process(proc) -> None:
    """End a client process we started: join, then terminate, then kill."""
    proc.join(1)
    if proc.is_alive():
        proc.terminate()
        proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join(2)


class _BackgroundLoad:
    """How many CPUs other processes kept busy during a run: machine-wide busy time minus ours.

    Other programs on the machine (a test suite, a build) skew both throughput and tail latency;
    the table reports this so a noisy run can be told from a slow broker.
    """

    def __init__(self, server_pid: int) -> None:
        import psutil

        self._psutil = psutil
        self._server = psutil.Process(server_pid)
        self._me = psutil.Process()
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system
        server, me = self._server.cpu_times(), self._me.cpu_times()
        return time.monotonic(), busy, server.user + server.system, me.user + me.system

    def cpus(self, clients_cpu: float) -> float:
        now, busy, server, me = self._snapshot()
        t0, busy0, server0, me0 = self._start
        ours = (server - server0) + (me - me0) + clients_cpu
        return max(0.0, (busy - busy0) - ours) / (now - t0)


def run_once(kind: str, args: argparse.Namespace) -> dict:
    """One server, one pair of clients, all three phases; every process ended on return or error."""
    ctx = mp.get_context("spawn")  # never fork a process that may hold ZeroMQ state
    with tempfile.TemporaryDirectory(prefix="p2pchat-bench-") as tmp, \
            ServerProcess(kind, free_ports(), Path(tmp), args.transport, args.store, args.broker_cmd) as server:
        plan = Plan(server.endpoint, server.key, args.warmup, args.messages, args.window, args.rate, args.duration,
                    args.size, expect_acks=kind != "bare",
                    consume=kind in ("broker", "candidate") and args.store == "on", budget=args.budget, server_pid=server.proc.pid)
        received = ctx.RawValue("q", 0)
        bob_ready = ctx.Event()
        procs, pipes = {}, {}
        load = _BackgroundLoad(server.proc.pid)
        try:
            for role in ("bob", "alice"):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(role, plan, received, bob_ready, writer),
                                   name=f"bench-{role}", daemon=True)
                proc.start()
                writer.close()
                procs[role], pipes[role] = proc, reader
            results = {}
            for role in ("bob", "alice"):
                if not pipes[role].poll(args.budget + 30):
                    raise BenchError(f"{role} ({kind}) sent no result")
                results[role] = pipes[role].recv()
            background_cpus = load.cpus(results["bob"]["cpu_s"] + results["alice"]["cpu_s"])
        finally:
            for proc in procs.values():
                _stop_process(proc)
            for pipe in pipes.values():
                pipe.close()
    bob, alice = results["bob"], results["alice"]
    for part in (bob, alice):
        if "error" in part:
            raise BenchError(f"{kind}: {part['error']}\nserver said:\n" + "".join(server.lines))
    problems = []
    if bob["count"] != plan.total or bob["out_of_order"]:
        problems.append(f"bob got {bob['count']}/{plan.total}, {bob['out_of_order']} out of order")
    if alice["errors"] or (plan.expect_acks and alice["acks"] != plan.total):
        problems.append(f"alice: {alice['acks']} acks, {alice['errors']} errors {alice['error_samples']}")
    if server.warnings:
        problems.append(f"server logged {server.warnings} warnings/drops")
    if problems:
        raise BenchError(f"{kind}: " + "; ".join(problems) + "\nserver said:\n" + "".join(server.lines))
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram.decode(bob["hist"].encode("ascii"))
    return {
        "kind": kind,
        "msgs_per_s": plan.messages / bob["tp_seconds"],
        "alice_send_msgs_per_s": plan.messages / alice["tp_send_seconds"],
        "server_cpu_us_per_msg": sum(alice["tp_server_cpu_seconds"]) * 1e6 / plan.messages,
        "server_main_thread_us_per_msg": alice["tp_server_cpu_seconds"][0] * 1e6 / plan.messages,
        "lat_send_rate": bob["lat_send_rate"],
        "alice_worst_late_us": alice["worst_late_us"],
        "p50_us": hist.get_value_at_percentile(50) / 1000,
        "p99_us": hist.get_value_at_percentile(99) / 1000,
        "p999_us": hist.get_value_at_percentile(99.9) / 1000,
        "max_us": hist.get_max_value() / 1000,
        "samples": hist.get_total_count(),
        "background_cpus": background_cpus,
        "hist": bob["hist"],
    }


# --- summary ---------------------------------------------------------------------
def summarize(runs: list[dict], kinds: list[str]) -> dict:
    from hdrh.histogram import HdrHistogram

    summary: dict = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        merged = HdrHistogram(*HIST_ARGS)
        for r in mine:
            merged.decode_and_add(r["hist"].encode("ascii"))
        med = {key: statistics.median(r[key] for r in mine)
               for key in ("msgs_per_s", "alice_send_msgs_per_s", "server_cpu_us_per_msg",
                           "server_main_thread_us_per_msg", "lat_send_rate",
                           "alice_worst_late_us", "p50_us", "p99_us", "p999_us", "max_us", "background_cpus")}
        summary[kind] = {
            "rounds": len(mine),
            "median": med,
            "msgs_per_s_all": [round(r["msgs_per_s"]) for r in mine],
            "p99_us_all": [round(r["p99_us"], 1) for r in mine],
            "merged_latency_us": {
                "p50": merged.get_value_at_percentile(50) / 1000,
                "p99": merged.get_value_at_percentile(99) / 1000,
                "p99.9": merged.get_value_at_percentile(99.9) / 1000,
                "max": merged.get_max_value() / 1000,
                "samples": merged.get_total_count(),
            },
        }
    broker, bare = summary["broker"]["median"], summary["bare"]["median"]
    ratio = broker["msgs_per_s"] / bare["msgs_per_s"]
    # The per-round ratio, against the bare run of the same round, shows how stable the median ratio is.
    per_round = [b["msgs_per_s"] / a["msgs_per_s"]
                 for b, a in zip([r for r in runs if r["kind"] == "broker"], [r for r in runs if r["kind"] == "bare"])]
    summary["ratio"] = {
        "broker_over_bare_msgs_per_s": ratio,
        "per_round": [round(x, 3) for x in per_round],
        "target": RATIO_TARGET,
        "ok": ratio >= RATIO_TARGET,
    }
    summary["background_cpus"] = {"median": statistics.median(r["background_cpus"] for r in runs),
                                  "max": max(r["background_cpus"] for r in runs)}
    summary["p99_target"] = {"broker_p99_us": broker["p99_us"], "target_us": P99_TARGET_US,
                             "ok": broker["p99_us"] < P99_TARGET_US}
    if "bare+ack" in summary:
        summary["ratio"]["broker_over_bare_ack"] = broker["msgs_per_s"] / summary["bare+ack"]["median"]["msgs_per_s"]
    if "candidate" in summary:
        summary["ratio"]["candidate_over_bare"] = summary["candidate"]["median"]["msgs_per_s"] / bare["msgs_per_s"]
    return summary


def print_table(summary: dict, kinds: list[str], args: argparse.Namespace) -> None:
    print(f"relay benchmark: alice -> bob over 127.0.0.1, transport {args.transport}, broker store {args.store}; "
          f"{args.rounds} rounds each, medians; {os.cpu_count()} CPUs")
    print(f"  throughput: {args.messages} msgs pipelined (window {args.window}, {args.size}-byte body); "
          f"latency: {args.rate:g} msg/s for {args.duration:g} s")
    print()
    head = (f"{'server':<22}{'msgs/s':>9}{'min..max':>16}{'cpu us/msg':>11}{'python':>8}"
            f"{'p50 us':>8}{'p99 us':>8}{'p99.9':>8}{'max us':>8}{'bg cpus':>8}")
    print(head)
    print("-" * len(head))
    for kind in kinds:
        m = summary[kind]["median"]
        lo, hi = min(summary[kind]["msgs_per_s_all"]), max(summary[kind]["msgs_per_s_all"])
        print(f"{SERVERS[kind]:<22}{m['msgs_per_s']:>9,.0f}{f'{lo:,}..{hi:,}':>16}"
              f"{m['server_cpu_us_per_msg']:>11.1f}{m['server_main_thread_us_per_msg']:>8.1f}"
              f"{m['p50_us']:>8.0f}{m['p99_us']:>8.0f}{m['p999_us']:>8.0f}{m['max_us']:>8.0f}"
              f"{m['background_cpus']:>8.2f}")
    print()
    print("  msgs/s: N / (alice's first send -> bob's last receive). cpu us/msg: the server process's CPU per")
    print("  message in that phase; python: its main thread alone (the rest is libzmq's I/O thread). Latency:")
    print("  one-way alice -> bob at the paced rate. bg cpus: CPUs other programs kept busy meanwhile.")
    print()
    ratio = summary["ratio"]
    print(f"broker / bare msgs/s : {ratio['broker_over_bare_msgs_per_s']:.2f}   "
          f"target >= {RATIO_TARGET:.2f}: {'PASS' if ratio['ok'] else 'FAIL'}   (per round {ratio['per_round']})")
    if "broker_over_bare_ack" in ratio:
        print(f"broker / bare+ack    : {ratio['broker_over_bare_ack']:.2f}   (both send an ACK per message)")
    if "candidate_over_bare" in ratio:
        print(f"candidate / bare     : {ratio['candidate_over_bare']:.2f}")
    p99 = summary["p99_target"]
    merged = summary["broker"]["merged_latency_us"]
    print(f"broker p99 at {args.rate:g}/s : {p99['broker_p99_us']:.0f} us   target < {P99_TARGET_US:.0f} us: "
          f"{'PASS' if p99['ok'] else 'FAIL'}   (rounds merged: p50 {merged['p50']:.0f}, p99 {merged['p99']:.0f}, "
          f"p99.9 {merged['p99.9']:.0f}, max {merged['max']:.0f} us, {merged['samples']} samples)")
    bg = summary["background_cpus"]
    if bg["max"] > 0.25:
        print(f"note: other programs kept {bg['median']:.2f} CPUs busy (max {bg['max']:.2f}) of {os.cpu_count()} "
              "during the runs; figures are noisier than on an idle machine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="alice -> bob through the broker, beside a bare ROUTER loop")
    parser.add_argument("--messages", type=int, default=20_000, help="messages in the throughput phase (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server, interleaved (default 5)")
    parser.add_argument("--rate", type=float, default=5000.0, help="msg/s in the latency phase (default 5000)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of the latency phase (default 2)")
    parser.add_argument("--warmup", type=int, default=2000, help="messages sent before measuring (default 2000)")
    parser.add_argument("--window", type=int, default=1000,
                        help="throughput: most messages sent but not yet received by bob (default 1000)")
    parser.add_argument("--size", type=int, default=64, help="message body bytes, at least %d (default 64)" % BODY.size)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds one run may take before it fails")
    parser.add_argument("--transport", choices=("curve", "plain"), default=None,
                        help="curve (the broker's default, when it has CURVE) or plain; the bare loop does the same")
    parser.add_argument("--store", choices=("on", "off"), default=None,
                        help="the broker's store-and-forward (default: its own default); with it on, bob sends "
                             "CONSUME for each message as the client does")
    parser.add_argument("--ack-baseline", action="store_true",
                        help="also run the bare loop answering each message with a constant ACK")
    parser.add_argument("--broker-cmd", metavar="CMD", default=None,
                        help="also run a candidate broker (A/B test a change), e.g. "
                             "'{python} bench/run_broker.py --port {port} --data-dir {data_dir} --transport {transport} "
                             "--store {store}'"
                             "; it must log 'listening on' to stderr when ready, and serve its key on port + 2 "
                             "with CURVE")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rounds < 1 or args.rate <= 0 or args.duration <= 0 or args.window < 1 \
            or args.size < BODY.size or args.warmup < 0:
        parser.error("--messages, --rounds, --window >= 1; --rate, --duration > 0; --size >= %d" % BODY.size)

    from run_broker import default_store, supports_curve  # this directory is sys.path[0] when run as a script

    args.transport = args.transport or ("curve" if supports_curve() else "plain")
    args.store = args.store or default_store()

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # unwind through every `finally` below
    kinds = ["bare", "broker"] + (["bare+ack"] if args.ack_baseline else []) + (["candidate"] if args.broker_cmd else [])
    runs: list[dict] = []
    started = time.monotonic()
    try:
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for kind in order:
                run = run_once(kind, args)
                runs.append(run)
                if not args.json:
                    print(f"  round {rnd + 1}/{args.rounds} {kind:<9} {run['msgs_per_s']:>9,.0f} msgs/s  "
                          f"p50 {run['p50_us']:>6.0f} us  p99 {run['p99_us']:>6.0f} us", file=sys.stderr)
    except BenchError as exc:
        print(f"bench_relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_relay: interrupted", file=sys.stderr)
        return 130
    summary = summarize(runs, kinds)
    summary["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        for run in runs:
            del run["hist"]
        print(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=2))
    else:
        print_table(summary, kinds, args)
        print(f"({summary['elapsed_s']} s)")
    ok = summary["ratio"]["ok"] and summary["p99_target"]["ok"]
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
