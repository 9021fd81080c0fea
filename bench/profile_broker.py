"""Where the broker's time goes: ``BrokerServer`` in this process under cProfile, driven by
``bench_relay.py``'s own alice and bob (spawned processes, same phases).

    .venv/bin/python bench/profile_broker.py [--messages 20000] [--duration 2] [--top 25]

Prints the functions with the most own time, then own time summed by where it
is spent (shell, routing core, codec, pyzmq, msgpack, ...). cProfile inflates
Python-heavy code relative to C calls; read the shares, not the microseconds.
For a sampling view of the broker in a normal run instead, point py-spy at it
(see bench/README.md).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import multiprocessing as mp
import pstats
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import bench_relay as bench  # this directory is sys.path[0] when run as a script
import run_broker

from p2pchat.broker.shell.server import BrokerServer

PLACES = (  # (label, substring of the profiler's file or function name), first match wins
    ("broker/shell/server.py (shell)", "broker/shell/server.py"),
    ("broker/core/ratelimit.py", "broker/core/ratelimit.py"),
    ("broker/core/ (routing core)", "broker/core/"),
    ("broker/backends/ (SQLite store, directory)", "broker/backends/"),
    ("sqlite3", "sqlite3"),
    ("common/protocol.py (codec)", "common/protocol.py"),
    ("msgpack", "msgpack"),
    ("pyzmq poll", "poll.py"),
    ("pyzmq send/recv/Frame", "zmq"),
    ("dataclasses/enum/typing", "dataclass"),
    ("logging", "logging"),
)


def _place(key: tuple[str, int, str]) -> str:
    text = f"{key[0]}:{key[2]}"
    for label, needle in PLACES:
        if needle in text:
            return label
    if key[0] == "~":
        return f"builtins ({key[2][:40]})"
    return key[0].rsplit("/", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--transport", choices=("curve", "plain"), default=None,
                        help="default: curve if the broker has it")
    parser.add_argument("--store", choices=("on", "off"), default=None,
                        help="store-and-forward (default: the broker's default)")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    args = parser.parse_args(argv)
    transport = args.transport or ("curve" if run_broker.supports_curve() else "plain")
    store = args.store or run_broker.default_store()

    with tempfile.TemporaryDirectory(prefix="p2pchat-profile-") as tmp:
        port = bench.free_ports()
        server = BrokerServer(run_broker.config(port, Path(tmp), transport, store))
        plan = bench.Plan(f"tcp://127.0.0.1:{port}", None, args.warmup, args.messages, args.window, args.rate,
                          args.duration, args.size, expect_acks=True, consume=store == "on", budget=120.0, server_pid=mp.current_process().pid)
        results: dict[str, dict] = {}
        driver = threading.Thread(target=_drive, args=(plan, transport, server, results), name="clients")
        # Thread CPU time, not wall time: idle waits in poll() don't count, nor do other threads.
        profiler = cProfile.Profile(time.thread_time)
        threads_before = _thread_cpu()
        driver.start()
        try:
            profiler.runcall(server.serve_forever)  # returns when the driver calls server.stop()
        finally:
            server.stop()
            driver.join()
        threads_after = results.pop("_threads", {})
    for role, result in results.items():
        if "error" in result:
            print(f"profile_broker: {role}: {result['error']}", file=sys.stderr)
            return 2
    bob = results["bob"]
    print(f"transport {transport}, store {store}; under cProfile: {args.messages / bob['tp_seconds']:,.0f} msgs/s pipelined; "
          f"{plan.total} messages relayed in all (throughput, then {args.rate:g} msg/s for {args.duration:g} s)\n")

    main_id = threading.main_thread().native_id
    print("CPU of this process's threads over the run, per relayed message (cProfile slows the main one):")
    for tid, seconds in sorted(threads_after.items(), key=lambda kv: -kv[1]):
        used = seconds - threads_before.get(tid, 0.0)
        if used > 0.01:
            name = "main (broker loop, profiled)" if tid == main_id else "other (libzmq I/O thread)"
            print(f"  thread {tid:>7}  {used:6.2f} s  {used * 1e6 / plan.total:6.2f} us/msg  {name}")
    print()

    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())
    by_place: dict[str, float] = defaultdict(float)
    for key, row in stats.stats.items():
        by_place[_place(key)] += row[2]
    print(f"own time by place ({total:.2f} s profiled, {total * 1e6 / plan.total:.1f} us per relayed message):")
    for label, seconds in sorted(by_place.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {seconds / total:6.1%}  {seconds * 1e6 / plan.total:6.2f} us/msg  {label}")
    print()
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


def _thread_cpu() -> dict[int, float]:
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def _drive(plan: bench.Plan, transport: str, server: BrokerServer, results: dict) -> None:
    """Run alice and bob against ``server``, collect their results, then stop the server."""
    ctx = mp.get_context("spawn")
    procs, pipes = {}, {}
    try:
        if transport == "curve":  # asked like a client, once the (profiled) broker loop runs
            port = int(plan.endpoint.rsplit(":", 1)[1])
            plan = dataclasses.replace(plan, server_key=bench.fetch_server_key(port))
        received, bob_ready = ctx.RawValue("q", 0), ctx.Event()
        for role in ("bob", "alice"):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=bench._worker, args=(role, plan, received, bob_ready, writer),
                               name=f"profile-{role}", daemon=True)
            proc.start()
            writer.close()
            procs[role], pipes[role] = proc, reader
        for role in ("bob", "alice"):
            if pipes[role].poll(plan.budget + 30):
                results[role] = pipes[role].recv()
            else:
                results[role] = {"error": "no result"}
    except BaseException as exc:
        results["driver"] = {"error": repr(exc)}
    finally:
        for proc in procs.values():
            bench._stop_process(proc)
        for pipe in pipes.values():
            pipe.close()
        time.sleep(0.1)
        results["_threads"] = _thread_cpu()  # before stop(): the libzmq threads end with the context
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
