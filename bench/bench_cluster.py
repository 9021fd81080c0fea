"""Cluster benchmark: aggregate messages/s through 1, 2 and N workers behind one port, in one run.

For each worker count a fresh ``p2pchat broker --cluster redis://... --workers W`` is started
on free 127.0.0.1 ports against a private ``redis-server`` (append-only, flushed between runs).
``--procs`` load processes each open ``--pairs`` sender/receiver pairs of scripted DEALERs
(the real codec, REGISTER + MESSAGE + CONSUME, as the client library does); the kernel spreads
the connections over the workers, so with W workers about (W-1)/W of the messages cross brokers
through Redis. Each sender keeps at most ``--window`` messages unreceived. After a warm-up, every
process counts what its receivers got during ``--duration`` seconds: msgs/s is the sum.

CPU use of the workers, Redis and the load processes is sampled over the measured window, so
the table says where the time went (on a 2-core machine the answer is "everywhere at once").

    .venv/bin/python bench/bench_cluster.py [--workers 1 2 3] [--procs 2] [--pairs 4]
        [--duration 4] [--transport plain|curve] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_ports  # noqa: E402  (the tests' free-port helper)


# --- load process ---------------------------------------------------------------
def load(proc_index: int, endpoint: str, server_key: bytes | None, pairs: int, window: int, warmup: float,
         duration: float, result: mp.Queue) -> None:
    import zmq

    from p2pchat.common.protocol import Ack, ChatMessage, Consume, Error, Register, Registered, decode, pack

    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = []

    def dealer(user: str):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        public, secret = zmq.curve_keypair()
        key = os.urandom(32)
        if server_key is not None:
            from zmq.utils import z85

            from p2pchat.client.broker_trust import ADMIT_TIMEOUT, admit
            from p2pchat.common.endpoints import ServerAddress

            server = ServerAddress.parse(endpoint.removeprefix("tcp://"))
            admit(server, server.port + 2, user, z85.decode(public), ADMIT_TIMEOUT)
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
            key = z85.decode(public)
        sock.connect(endpoint)
        socks.append(sock)
        return sock, key

    senders, receivers, names = [], [], []
    for i in range(pairs):
        for role in ("s", "r"):
            user = f"p{proc_index}{role}{i}"
            sock, key = dealer(user)
            sock.send_multipart(pack(Register(user, os.urandom(16), key), 0))
            while True:
                env = decode(sock.recv_multipart())
                if isinstance(env.message, Registered):
                    break
                if isinstance(env.message, Error):
                    raise RuntimeError(env.message.message)
            (senders if role == "s" else receivers).append(sock)
            names.append(user)
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    inflight = [0] * pairs
    body = os.urandom(100)
    counting = [False]
    received = [0]
    start = time.monotonic()
    t_count = start + warmup
    t_end = t_count + duration
    index_of = {id(s): i for i, s in enumerate(senders)} | {id(r): i for i, r in enumerate(receivers)}
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        if not counting[0] and now >= t_count:
            counting[0] = True
            received[0] = 0
        for i, sock in enumerate(senders):
            while inflight[i] < window:
                sock.send_multipart(pack(ChatMessage(f"p{proc_index}s{i}", f"p{proc_index}r{i}", body), 0))
                inflight[i] += 1
        for sock, _ in poller.poll(100):
            i = index_of[id(sock)]
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                env = decode(frames)
                if isinstance(env.message, ChatMessage):
                    sock.send_multipart(pack(Consume(env.msg_id), 0))
                    inflight[i] -= 1
                    received[0] += 1
                elif isinstance(env.message, Ack | Error) and isinstance(env.message, Error):
                    raise RuntimeError(env.message.message)
    result.put(received[0])
    for sock in socks:
        sock.close(0)
    ctx.term()


# --- one run ------------------------------------------------------------------------
def run(workers: int, args, redis_url: str, redis_pid: int, tmp: Path) -> dict:
    port = free_ports(3)
    home = tmp / f"home-{workers}"
    cmd = [sys.executable, "-m", "p2pchat.client.cli", "--log-level", "WARNING", "broker", "--port", str(port),
           "--heartbeat", "5", "--rate-limit", "1e9", "--admit-rate", "1e9", "--admit-burst", "1e9", "--cluster", redis_url, "--workers", str(workers)]
    if args.transport == "plain":
        cmd.append("--insecure")
    env = dict(os.environ, P2PCHAT_HOME=str(home))
    broker = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(broker.pid)

        def brokers() -> list[psutil.Process]:  # one worker runs in the parent itself (no supervisor)
            return parent.children() if workers > 1 else [parent]

        deadline = time.monotonic() + 20
        while len(brokers()) < workers or not all(_listening(c, port) for c in brokers()):
            if time.monotonic() > deadline or broker.poll() is not None:
                raise RuntimeError("workers did not start:\n" + (broker.stderr.read() if broker.poll() else ""))
            time.sleep(0.05)
        server_key = None
        if args.transport == "curve":
            server_key = _fetch_key(port + 2)
        ctx = mp.get_context("spawn")
        result = ctx.Queue()
        procs = [ctx.Process(target=load, args=(i, f"tcp://127.0.0.1:{port}", server_key, args.pairs, args.window,
                                                args.warmup, args.duration, result)) for i in range(args.procs)]
        for p in procs:
            p.start()
        time.sleep(args.warmup + 1.0)  # loaders spawn and register (about a second), then warm up
        watched = {"workers": brokers(), "redis": [psutil.Process(redis_pid)],
                   "load": [psutil.Process(p.pid) for p in procs]}
        before = {k: sum(_cpu(p) for p in v) for k, v in watched.items()}
        t0 = time.monotonic()
        time.sleep(args.duration * 0.8)
        cpu = {k: (sum(_cpu(p) for p in v) - before[k]) / (time.monotonic() - t0) for k, v in watched.items()}
        total = sum(result.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        return {"workers": workers, "msgs_per_s": total / args.duration, "cpu": cpu}
    finally:
        broker.terminate()
        broker.wait(20)


def _listening(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.net_connections())
    except psutil.Error:
        return False


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _fetch_key(port: int) -> bytes:
    from zmq.utils import z85

    from p2pchat.client.broker_trust import fetch_broker_key
    from p2pchat.common.endpoints import ServerAddress

    key = fetch_broker_key(ServerAddress("127.0.0.1", port), port, 5.0)
    if key is None:
        raise RuntimeError(f"no broker key from the key service on port {port}")
    return z85.encode(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--procs", type=int, default=2, help="load processes")
    parser.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs per load process")
    parser.add_argument("--window", type=int, default=50, help="unreceived messages per sender")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--transport", choices=["plain", "curve"], default="plain")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    import redis

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rport = free_ports(1)
        rproc = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "yes", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        try:
            r = redis.Redis(port=rport)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            results = []
            for w in args.workers:
                r.flushall()
                results.append(run(w, args, f"redis://127.0.0.1:{rport}/0", rproc.pid, tmp))
        finally:
            rproc.terminate()
            rproc.wait(10)
    base = results[0]["msgs_per_s"]
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "results": results}, indent=2))
        return 0
    print(f"{os.cpu_count()} CPUs, {args.procs} load processes x {args.pairs} pairs, window {args.window}, "
          f"{args.transport}, {args.duration:.0f} s per run")
    print(f"{'workers':>7} {'msgs/s':>9} {'ratio':>6}   CPU cores busy: workers / redis / load")
    for res in results:
        c = res["cpu"]
        print(f"{res['workers']:>7} {res['msgs_per_s']:>9.0f} {res['msgs_per_s'] / base:>5.2f}x   "
              f"{c['workers']:.2f} / {c['redis']:.2f} / {c['load']:.2f}  (sum {sum(c.values()):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
