"""File transfer throughput through the broker, beside the bare relay ceilings, in one run.

    .venv/bin/python bench/bench_files.py [--size-mib 1024] [--rounds 3] [--chunk-kib 512] [--window 32]

Each round measures, on 127.0.0.1 only:
  * ceilings: a bare pyzmq ROUTER that only swaps frames, between a raw DEALER
    pushing chunk-sized frames under the same credit window and a raw DEALER that
    discards them (no hashing, no disk, no protocol): what the transport allows,
    once over plain TCP and once with CURVE on all three sockets, as p2pchat has;
  * p2pchat: the same size sent by ``ChatClient.send_file`` (its own process) to
    a ``ChatClient`` receiving into a directory (another process) through
    ``p2pchat broker``, timed from the offer to the sender learning that the
    receiver verified and saved it. Three configurations: the default (CURVE
    transport and end-to-end sealed chunks), sealed chunks over a plaintext
    transport (``--insecure``), and nothing encrypted (SHA-256 and CRC-32 instead);
while a probe process chats through the same broker at 100 msg/s and records
one-way latency, and the broker's RSS is sampled. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq
from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pchat.client.core.transfer import CHUNK_SIZE, WINDOW  # noqa: E402
from tests.conftest import BrokerProcess, free_port_pair  # noqa: E402  (the same broker fixture the tests use)

MiB = 1024 * 1024


# --- ceilings: bare relay -----------------------------------------------------------------
def _curve_server(sock: zmq.Socket, keys: tuple[bytes, bytes] | None) -> None:
    if keys is not None:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys


def _curve_client(sock: zmq.Socket, keys: tuple[bytes, bytes] | None) -> None:
    if keys is not None:
        sock.curve_serverkey = keys[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()


def _bare_relay(port: int, keys, ready) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    _curve_server(router, keys)  # no ZAP handler: it would only cost at the handshake
    router.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    peers: list[bytes] = []
    while True:
        parts = router.recv_multipart(copy=False)
        rid = parts[0].bytes
        if rid not in peers:
            peers.append(rid)
        if parts[1].bytes == b"quit":
            break
        if len(peers) == 2:  # swap: forward to the other peer, frames untouched
            other = peers[1] if rid == peers[0] else peers[0]
            router.send_multipart([other, *parts[1:]], copy=False)
    router.close(0)
    ctx.term()


def _bare_dealer(ctx: zmq.Context, port: int, keys) -> zmq.Socket:
    dealer = ctx.socket(zmq.DEALER)
    _curve_client(dealer, keys)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    return dealer


def _bare_receiver(port: int, keys, chunks: int, window: int, result) -> None:
    ctx = zmq.Context()
    dealer = _bare_dealer(ctx, port, keys)
    got = 0
    while got < chunks:
        dealer.recv_multipart(copy=False)
        got += 1
        if got % (window // 2) == 0:
            dealer.send(b"credit")
    result.put(got)
    dealer.close(0)
    ctx.term()


def bare_ceiling(size: int, chunk: int, window: int, curve: bool) -> float:
    """MiB/s of chunk frames through a relay that only swaps frames, with the same credit window."""
    port = free_port_pair()
    keys = zmq.curve_keypair() if curve else None
    spawn = mp.get_context("spawn")
    ready, result = spawn.Event(), spawn.Queue()
    relay = spawn.Process(target=_bare_relay, args=(port, keys, ready))
    relay.start()
    ready.wait(10)
    chunks = -(-size // chunk)
    receiver = spawn.Process(target=_bare_receiver, args=(port, keys, chunks, window, result))
    receiver.start()
    ctx = zmq.Context()
    dealer = _bare_dealer(ctx, port, keys)
    time.sleep(0.5)  # both peers known to the relay before timing starts
    payload = os.urandom(chunk)
    start = time.perf_counter()
    sent, allowed = 0, window
    while sent < chunks:
        while sent < min(allowed, chunks):
            dealer.send_multipart([b"chunk", payload], copy=False)
            sent += 1
        if sent < chunks:
            dealer.recv()
            allowed += window // 2
    result.get(timeout=120)
    elapsed = time.perf_counter() - start
    dealer.send(b"quit")
    receiver.join(10)
    relay.join(10)
    dealer.close(0)
    ctx.term()
    return size / MiB / elapsed


# --- p2pchat: real sender, receiver, broker -------------------------------------------------
VARIANTS = {  # name: (CURVE transport, end-to-end sealed chunks)
    "default": (True, True),
    "sealed, plain transport": (False, True),
    "nothing encrypted": (False, False),
}


def _config(port: int, curve: bool, sealed: bool, **extra):
    from p2pchat.client.chat_client import ClientConfig
    from p2pchat.common.endpoints import ServerAddress

    return ClientConfig(server=ServerAddress("127.0.0.1", port), insecure=not curve, encrypt=sealed, **extra)


def _receive_files(port: int, home: str, inbox: str, window: int, curve: bool, sealed: bool, ready, stop) -> None:
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client.chat_client import ChatClient
    from p2pchat.common.allocator import tune_for_bulk_transfer

    tune_for_bulk_transfer()  # as `p2pchat` does at start
    with ChatClient("bob", _config(port, curve, sealed, received_dir=Path(inbox), window=window)) as client:
        client.connect(10)
        ready.set()
        stop.wait(900)


def _send_file(port: int, home: str, path: str, chunk: int, curve: bool, sealed: bool, result) -> None:
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client.chat_client import ChatClient
    from p2pchat.common.allocator import tune_for_bulk_transfer

    tune_for_bulk_transfer()
    try:
        with ChatClient("alice", _config(port, curve, sealed, chunk_size=chunk)) as client:
            client.connect(10)
            start = time.perf_counter()
            _, done = client.send_file("bob", path)
            done.result(600)
            result.put(time.perf_counter() - start)
    except Exception as exc:  # reported by the parent, which would otherwise wait for a figure
        result.put(repr(exc))


def _chat_probe(port: int, home: str, curve: bool, sealed: bool, stop, result) -> None:
    """pinger -> ponger at 100 msg/s; one-way latency on one clock (same process)."""
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client import events as ev
    from p2pchat.client.chat_client import ChatClient

    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    config = _config(port, curve, sealed)

    def on_event(event) -> None:
        if isinstance(event, ev.MessageReceived):
            hist.record_value(max(1, (time.perf_counter_ns() - int(event.text)) // 1000))

    with ChatClient("pinger", config) as pinger, ChatClient("ponger", config, on_event=on_event) as ponger:
        ponger.connect(10)
        pinger.connect(10)
        result.put("ready")
        next_at = time.perf_counter()
        while not stop.is_set():
            pinger.send_async("ponger", str(time.perf_counter_ns()))
            next_at += 0.01
            time.sleep(max(0.0, next_at - time.perf_counter()))
        time.sleep(0.2)
    result.put({"count": hist.get_total_count(), "p50_ms": hist.get_value_at_percentile(50) / 1000,
                "p99_ms": hist.get_value_at_percentile(99) / 1000, "max_ms": hist.get_max_value() / 1000})


def p2pchat_round(src: Path, chunk: int, window: int, work: Path, curve: bool, sealed: bool) -> dict:
    broker = BrokerProcess(work / "broker-home", free_port_pair(), [] if curve else ["--insecure"]).start()
    inbox = work / "inbox"
    spawn = mp.get_context("spawn")
    stop, probe_out, send_out, bob_ready = spawn.Event(), spawn.Queue(), spawn.Queue(), spawn.Event()
    listener = spawn.Process(target=_receive_files, args=(broker.port, str(work / "bob-home"), str(inbox), window,
                                                          curve, sealed, bob_ready, stop))
    listener.start()
    probe = spawn.Process(target=_chat_probe, args=(broker.port, str(work / "probe-home"), curve, sealed, stop,
                                                    probe_out))
    broker_ps = psutil.Process(broker.proc.pid)
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], broker_ps.memory_info().rss)
            time.sleep(0.02)

    try:
        bob_ready.wait(30)
        probe.start()
        assert probe_out.get(timeout=30) == "ready"
        rss_before = broker_ps.memory_info().rss
        sampler = threading.Thread(target=sample)
        sampler.start()
        sender = spawn.Process(target=_send_file, args=(broker.port, str(work / "alice-home"), str(src), chunk,
                                                         curve, sealed, send_out))
        sender.start()
        elapsed = send_out.get(timeout=900)
        if isinstance(elapsed, str):
            raise RuntimeError(f"the transfer failed: {elapsed}")
        sender.join(30)
        stop.set()
        latency = probe_out.get(timeout=30)
        probe.join(30)
        sampling.set()
        sampler.join()
        rss_after = broker_ps.memory_info().rss
    finally:
        stop.set()
        listener.join(30)
        if listener.is_alive():
            listener.kill()
        broker.stop()
    saved = [p for p in inbox.iterdir() if not p.name.startswith(".")]
    assert len(saved) == 1 and saved[0].stat().st_size == src.stat().st_size, saved
    saved[0].unlink()
    return {"mib_s": src.stat().st_size / MiB / elapsed, "rss_before_mib": rss_before / MiB,
            "rss_peak_mib": peak[0] / MiB, "rss_after_mib": rss_after / MiB, "chat": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=CHUNK_SIZE // 1024, help="default: the client's")
    parser.add_argument("--window", type=int, default=WINDOW, help="default: the client's")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chunk, size = args.chunk_kib * 1024, args.size_mib * MiB
    ceilings: dict[str, list[float]] = {"plain": [], "curve": []}
    rounds: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="p2pchat-bench-") as tmp:
        work = Path(tmp)
        src = work / "payload.bin"
        with open(src, "wb") as f:
            block = os.urandom(MiB)
            for i in range(args.size_mib):
                f.write(block[i % 251:] + block[: i % 251])  # distinct blocks, cheap to make
        for r in range(args.rounds):
            for kind in ceilings:
                ceilings[kind].append(bare_ceiling(size, chunk, args.window, curve=kind == "curve"))
            for v, (name, (curve, sealed)) in enumerate(VARIANTS.items()):
                rounds[name].append(p2pchat_round(src, chunk, args.window, work / f"round{r}-{v}", curve, sealed))
            print(f"round {r + 1}: ceiling plain {ceilings['plain'][-1]:6.0f}  curve {ceilings['curve'][-1]:6.0f}"
                  + "".join(f"   {name} {rounds[name][-1]['mib_s']:5.0f}" for name in VARIANTS)
                  + f" MiB/s   chat p99 {rounds['default'][-1]['chat']['p99_ms']:.2f} ms", file=sys.stderr)
    med = statistics.median
    ceiling = {kind: med(values) for kind, values in ceilings.items()}
    rate = {name: med(r["mib_s"] for r in rs) for name, rs in rounds.items()}
    default = rounds["default"]
    report = {
        "size_mib": args.size_mib, "chunk_kib": args.chunk_kib, "window": args.window, "rounds": args.rounds,
        "ceiling_mib_s": ceiling["plain"], "curve_ceiling_mib_s": ceiling["curve"],
        "p2pchat_mib_s": rate["default"], "ratio_to_curve_ceiling": rate["default"] / ceiling["curve"],
        "ratio_to_plain_ceiling": rate["default"] / ceiling["plain"],
        "sealed_plain_transport_mib_s": rate["sealed, plain transport"],
        "sealed_plain_transport_ratio": rate["sealed, plain transport"] / ceiling["plain"],
        "plaintext_mib_s": rate["nothing encrypted"],
        "sealed_over_plaintext": rate["sealed, plain transport"] / rate["nothing encrypted"],
        "broker_rss_growth_mib": med(r["rss_peak_mib"] - r["rss_before_mib"] for r in default),
        "chat_p50_ms": med(r["chat"]["p50_ms"] for r in default),
        "chat_p99_ms": med(r["chat"]["p99_ms"] for r in default),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{args.size_mib} MiB, chunk {args.chunk_kib} KiB, window {args.window}, median of {args.rounds} rounds")
    print(f"  bare relay ceiling, plain TCP   {ceiling['plain']:7.1f} MiB/s")
    print(f"  bare relay ceiling, CURVE       {ceiling['curve']:7.1f} MiB/s")
    print(f"  p2pchat default (CURVE, sealed) {rate['default']:7.1f} MiB/s   {report['ratio_to_curve_ceiling']:.2f} of"
          f" the CURVE ceiling, {report['ratio_to_plain_ceiling']:.2f} of the plain one"
          "   (target >= 400 MiB/s and >= 0.50)")
    print(f"  sealed, plain transport         {rate['sealed, plain transport']:7.1f} MiB/s   "
          f"{report['sealed_plain_transport_ratio']:.2f} of the plain ceiling")
    print(f"  nothing encrypted               {rate['nothing encrypted']:7.1f} MiB/s   sealed/plaintext "
          f"{report['sealed_over_plaintext']:.2f}   (target >= 0.85)")
    print(f"  broker RSS growth               {report['broker_rss_growth_mib']:7.1f} MiB     (target < 32 MiB)")
    print(f"  chat during transfer            p50 {report['chat_p50_ms']:.2f} ms   p99 {report['chat_p99_ms']:.2f} ms"
          f"   (target p99 < 50 ms)")


if __name__ == "__main__":
    main()
