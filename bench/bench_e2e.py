"""End-to-end chat through the real client library, in three configurations, in one run.

    .venv/bin/python bench/bench_e2e.py [--messages 5000] [--rounds 3] [--rate 1000] [--duration 3]

alice and bob are ``ChatClient``s in their own processes; the broker is ``p2pchat broker``.

  plain      : plaintext transport (--insecure), no end-to-end sealing, no store (--no-store)
  secure     : CurveZMQ + end-to-end sealing (the default client), no store
  durable    : secure + the broker's SQLite store-and-forward (the default broker)

Throughput: alice queues --messages messages at once (the outbox and the library pipeline
them); msgs/s = N / (first send -> bob's last MessageReceived). Latency: alice sends at --rate
msg/s for --duration s; bob records one-way latency (same host clock) in an HdrHistogram.
Ratios answer two targets: secure/plain (encryption must cost < 25% of message throughput) and
durable/secure (durability must keep >= 50% of the non-durable throughput).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import BrokerProcess, free_port_pair  # noqa: E402

CONFIGS = {
    "plain": dict(broker=["--insecure", "--no-store"], insecure=True, encrypt=False),
    "secure": dict(broker=["--no-store"], insecure=False, encrypt=True),
    "durable": dict(broker=[], insecure=False, encrypt=True),
}


def _client(user: str, home: str, port: int, insecure: bool, encrypt: bool, on_event=None):
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client.chat_client import ChatClient, ClientConfig
    from p2pchat.common.endpoints import ServerAddress

    config = ClientConfig(server=ServerAddress("127.0.0.1", port), insecure=insecure, encrypt=encrypt,
                          history=True, send_timeout=60)
    client = ChatClient(user, config, on_event=on_event)
    client.connect(15)
    return client


def _bob(home: str, port: int, insecure: bool, encrypt: bool, expect: int, ready, result) -> None:
    from p2pchat.client import events as ev
    hist = HdrHistogram(1, 60_000_000, 3)
    state = {"count": 0, "first": None, "last": None}

    def on_event(event) -> None:
        if isinstance(event, ev.MessageReceived):
            now = time.perf_counter_ns()
            kind, _, stamp = event.text.partition(" ")
            if kind == "lat":
                hist.record_value(max(1, (now - int(stamp)) // 1000))
            else:
                state["count"] += 1
                state["last"] = now
                if state["count"] == expect:
                    result.put(("throughput", state["last"]))

    client = _client("bob", home, port, insecure, encrypt, on_event)
    ready.set()
    result.put(("latency", _wait_for_latency_end(hist)))
    client.close()


def _wait_for_latency_end(hist: HdrHistogram, quiet: float = 1.5, limit: float = 300) -> dict:
    """Return once no latency sample has arrived for ``quiet`` seconds (after at least one)."""
    start, seen, changed = time.monotonic(), -1, time.monotonic()
    while time.monotonic() - start < limit:
        count = hist.get_total_count()
        if count != seen:
            seen, changed = count, time.monotonic()
        elif count and time.monotonic() - changed > quiet:
            break
        time.sleep(0.05)
    return {"count": hist.get_total_count(), "p50_ms": hist.get_value_at_percentile(50) / 1000,
            "p99_ms": hist.get_value_at_percentile(99) / 1000}


def _alice(home: str, port: int, insecure: bool, encrypt: bool, messages: int, rate: float, duration: float,
           go, result) -> None:
    client = _client("alice", home, port, insecure, encrypt)
    client.send("bob", "warm-up")  # keys fetched, pinned, everything connected
    go.wait(30)
    result.put(("start", time.perf_counter_ns()))
    futures = [client.send_async("bob", f"tp {i}")[1] for i in range(messages)]
    for f in futures:
        f.result(120)
    time.sleep(0.5)
    interval, next_at = 1.0 / rate, time.perf_counter()
    end = next_at + duration
    while next_at < end:
        client.send_async("bob", f"lat {time.perf_counter_ns()}")
        next_at += interval
        time.sleep(max(0.0, next_at - time.perf_counter()))
    time.sleep(0.5)
    client.close()


def run_config(name: str, args, work: Path) -> dict:
    cfg = CONFIGS[name]
    broker = BrokerProcess(work / "broker", free_port_pair(), cfg["broker"]).start()
    spawn = mp.get_context("spawn")
    ready, go, results = spawn.Event(), spawn.Event(), spawn.Queue()
    common = (broker.port, cfg["insecure"], cfg["encrypt"])
    bob = spawn.Process(target=_bob, args=(str(work / "bob"), *common, args.messages, ready, results))
    alice = spawn.Process(target=_alice, args=(str(work / "alice"), *common, args.messages, args.rate,
                                               args.duration, go, results))
    try:
        bob.start()
        ready.wait(30)
        alice.start()
        time.sleep(1.0)  # alice registered and warmed up
        go.set()
        got: dict = {}
        while len(got) < 3:
            kind, value = results.get(timeout=300)
            got[kind] = value
        alice.join(30)
        bob.join(30)
    finally:
        for proc in (alice, bob):
            if proc.is_alive():
                proc.kill()
        broker.stop()
    elapsed = (got["throughput"] - got["start"]) / 1e9
    return {"msgs_per_s": args.messages / elapsed, "p50_ms": got["latency"]["p50_ms"],
            "p99_ms": got["latency"]["p99_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="p2pchat-e2e-") as tmp:
        for r in range(args.rounds):
            for name in (CONFIGS if r % 2 == 0 else reversed(list(CONFIGS))):
                result = run_config(name, args, Path(tmp) / f"{name}-{r}")
                figures[name].append(result)
                print(f"round {r + 1} {name:8s} {result['msgs_per_s']:8.0f} msgs/s  p50 {result['p50_ms']:.2f} ms"
                      f"  p99 {result['p99_ms']:.2f} ms", file=sys.stderr)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in figures.items()}
    report = {"medians": med, "secure_over_plain": med["secure"]["msgs_per_s"] / med["plain"]["msgs_per_s"],
              "durable_over_secure": med["durable"]["msgs_per_s"] / med["secure"]["msgs_per_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{args.messages} messages, latency at {args.rate:g} msg/s, median of {args.rounds} rounds")
    for name, m in med.items():
        print(f"  {name:8s} {m['msgs_per_s']:8.0f} msgs/s   p50 {m['p50_ms']:6.2f} ms   p99 {m['p99_ms']:6.2f} ms")
    print(f"  encryption (secure/plain)   {report['secure_over_plain']:.2f} of plaintext throughput"
          f"  (target >= 0.75)")
    print(f"  durability (durable/secure) {report['durable_over_secure']:.2f} of non-durable throughput"
          f"  (target >= 0.50)")


if __name__ == "__main__":
    main()
