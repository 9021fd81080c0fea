"""Load-tool memory: RSS per idle, registered load client in one worker process.

One broker (started here, plaintext unless ``--curve``, heartbeat 5 s so idle
clients stay quiet) and, for each N, one load worker process (the real one,
``client/load/worker.py``, driven over its pipe as the coordinator drives it)
with N scripted clients that connect, register and stay idle. The worker's RSS
is read twice: once armed (client cores built, no sockets) and once every
client is registered and has been idle for ``--settle`` seconds. A worker with
N = 0 is the baseline, so

    per client = (RSS(N) - RSS(0)) / N        (KiB, "connected": core + DEALER)
    core only  = (RSS_armed(N) - RSS_armed(0)) / N

Each N runs ``--rounds`` times, interleaved with the baseline; the medians are
printed. ``--check`` fails (exit 1) when the connected figure at the largest N
is over ``TARGET_KIB``: 10% over what the load tool's own second protocol
client needed (``OLD_KIB``, measured with this program on the 2-CPU, 24 GiB
development machine before the load tool drove the library's session core; see
bench/README.md). Driving the library must not cost a worker clients; the 10%
covers run-to-run noise (under 1% here) and another machine's allocator.

    .venv/bin/python bench/bench_load_memory.py [--clients 2000,10000] [--rounds 1] [--settle 3]
        [--curve] [--json] [--check]

Needs 2 file descriptors per client in one process: an N over the hard limit
(RLIMIT_NOFILE, 20,000 on the development machine) is cut to what fits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from p2pchat.client.broker_trust import fetch_broker_key
from p2pchat.client.load.broker import BrokerCommand, SpawnedBroker, free_port_triple
from p2pchat.client.load.worker import FDS_PER_SOCKET, ScriptPlan, WorkerSpec, worker_main
from p2pchat.common.endpoints import ServerAddress

KIB = 1024
# The load tool's own protocol client (before it drove ClientSession), N = 9,850, plaintext, median of 3 rounds:
OLD_KIB = 36.3  # per idle connected client: the client core, its DEALER (libzmq's share is most of it)
OLD_CORE_KIB = 3.8  # the client core alone (armed, no socket)
TARGET_KIB = round(1.1 * OLD_KIB, 1)
BROKER_HEARTBEAT = 5.0
FD_HEADROOM = 300


class BenchError(Exception):
    pass


def nofile_for(clients: int) -> int:
    return clients * FDS_PER_SOCKET + FD_HEADROOM


def fitting(clients: int) -> int:
    """``clients``, or fewer: as many DEALERs as one process may hold (a privileged one raises its limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = nofile_for(clients)
    if hard == resource.RLIM_INFINITY or wanted <= hard:
        return clients
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))  # works with CAP_SYS_RESOURCE only
        return clients
    except (ValueError, OSError):
        return (hard - FD_HEADROOM) // FDS_PER_SOCKET


def _receive(conn, wanted: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(min(0.5, max(0.0, deadline - time.monotonic()))):
            msg = conn.recv()
            if msg["type"] == "crash":
                raise BenchError("worker crashed:\n" + msg["error"])
            if msg["type"] == wanted:
                return msg
    raise BenchError(f"no {wanted!r} from the worker within {timeout:.0f}s")


def measure(clients: int, broker: ServerAddress, server_key: bytes | None, settle: float, prefix: str) -> dict:
    """One worker with ``clients`` idle clients: its RSS armed and registered (bytes)."""
    plan = ScriptPlan(run_tag=1, clients=clients, senders=0, rate=0.0)
    spec = WorkerSpec(worker=0, indices=range(clients), plan=plan, user_prefix=prefix, endpoint=broker.endpoint,
                      pub_endpoint=broker.pub_endpoint, server_key=server_key,
                      key_service=ServerAddress(broker.host, broker.port + 2) if server_key else None,
                      subscribe=False, nofile=nofile_for(clients), progress_every=0.25)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=worker_main, args=(spec, child), name="bench-load-memory", daemon=True)
    proc.start()
    child.close()
    try:
        _receive(parent, "armed", 120 + clients / 100)
        ps = psutil.Process(proc.pid)
        armed = ps.memory_info().rss
        ramp = clients / 2000  # 2,000 registrations a second
        parent.send({"cmd": "ramp", "t0": time.monotonic_ns() + 50_000_000, "ramp": ramp})
        deadline = time.monotonic() + 60 + 4 * ramp
        registered = 0
        while registered < clients:
            registered = _receive(parent, "progress", deadline - time.monotonic())["registered"]
        settle_until = time.monotonic() + settle
        progress = {}
        while time.monotonic() < settle_until:  # idle: heartbeats only
            progress = _receive(parent, "progress", 10)
        rss = ps.memory_info().rss
        if progress.get("ready", clients) < clients:
            raise BenchError(f"only {progress['ready']} of {clients} clients stayed registered while idle")
        parent.send({"cmd": "exit"})
        _receive(parent, "bye", 60 + clients / 200)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    return {"armed": armed, "registered": rss}


def run(args: argparse.Namespace) -> dict:
    asked = sorted({int(n) for n in args.clients.split(",")})
    sizes = sorted({fitting(n) for n in asked})
    cut = [n for n in asked if n not in sizes]
    with tempfile.TemporaryDirectory(prefix="bench-load-memory-") as tmp:
        port = free_port_triple()
        command = BrokerCommand(port, Path(tmp) / "broker", BROKER_HEARTBEAT, 1_000_000.0, insecure=not args.curve)
        broker = SpawnedBroker(command, nofile_for(max(sizes)))
        broker.start(wait=30.0)
        address = ServerAddress("127.0.0.1", port)
        try:
            server_key = fetch_broker_key(address, port + 2, timeout=5.0) if args.curve else None
            if args.curve and server_key is None:
                raise BenchError("no broker key from the key port")
            runs: dict[int, list[dict]] = {0: []}
            runs.update({n: [] for n in sizes})
            for rnd in range(args.rounds):
                for n in [0, *sizes]:
                    m = measure(n, address, server_key, args.settle, prefix=f"m{rnd}n{n}-")
                    runs[n].append(m)
                    print(f"  round {rnd + 1}/{args.rounds} N={n:>6}: armed {m['armed'] / 2**20:7.1f} MiB, "
                          f"registered {m['registered'] / 2**20:7.1f} MiB", file=sys.stderr)
        finally:
            broker.stop()
    base = {key: statistics.median(r[key] for r in runs[0]) for key in ("armed", "registered")}
    out: dict = {"baseline_mib": {k: round(v / 2**20, 1) for k, v in base.items()}, "sizes": {}}
    for n in sizes:
        med = {key: statistics.median(r[key] for r in runs[n]) for key in ("armed", "registered")}
        out["sizes"][n] = {"rss_mib": round(med["registered"] / 2**20, 1),
                           "per_client_kib": round((med["registered"] - base["registered"]) / n / KIB, 2),
                           "core_only_kib": round((med["armed"] - base["armed"]) / n / KIB, 2)}
    largest = out["sizes"][max(sizes)]["per_client_kib"]
    out["target"] = {"clients": max(sizes), "per_client_kib": largest, "target_kib": TARGET_KIB,
                     "old_kib": OLD_KIB, "old_core_kib": OLD_CORE_KIB, "ok": largest <= TARGET_KIB}
    if cut:
        out["cut"] = f"N={cut} over the file descriptor hard limit: measured at N={max(sizes)} instead"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="2000,10000", help="comma-separated N (default 2000,10000)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle after the last registration")
    parser.add_argument("--curve", action="store_true", help="CURVE transport (default plaintext: faster set-up)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if over {TARGET_KIB} KiB per client")
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except BenchError as exc:
        print(f"bench_load_memory: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"args": vars(args), "summary": out}, indent=2))
    else:
        print(f"load worker RSS, {args.rounds} round(s), medians; baseline (N=0) "
              f"{out['baseline_mib']['registered']} MiB; {'CURVE' if args.curve else 'plaintext'}")
        print(f"{'clients':>8}{'RSS MiB':>10}{'KiB/client':>12}{'core only':>11}")
        for n, s in out["sizes"].items():
            print(f"{n:>8}{s['rss_mib']:>10.1f}{s['per_client_kib']:>12.2f}{s['core_only_kib']:>11.2f}")
        t = out["target"]
        print(f"\nper idle client at N={t['clients']}: {t['per_client_kib']} KiB (the load tool's own client: "
              f"{OLD_KIB} KiB, {OLD_CORE_KIB} KiB core only); target <= {TARGET_KIB} KiB: "
              f"{'PASS' if t['ok'] else 'FAIL'}")
        if "cut" in out:
            print(out["cut"])
    return 1 if args.check and not out["target"]["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
