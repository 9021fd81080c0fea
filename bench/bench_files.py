"""File transfer throughput through the broker, beside the bare relay ceilings, in one run.

    .venv/bin/python bench/bench_files.py [--size-mib 1024] [--rounds 3] [--chunk-kib 512] [--window 32] [--no-held]

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
  * held (``--no-held`` leaves it out): the same file left at the broker for a
    recipient who is offline (docs/PROTOCOL.md §8.2), defaults as in the first
    configuration: the upload (``send_file(later=True)`` until the broker holds the
    whole file; the sender then exits), then the fetch (the recipient's client
    starts, connects, fetches and verifies it), each beside the live relay's time;
while a probe process chats through the same broker at 100 msg/s and records
one-way latency, and the broker's RSS and CPU time are sampled. Prints medians and ratios.
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

from p2pchat.broker.core.ports import SEAL_TAG  # noqa: E402
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


def _send_file(port: int, home: str, path: str, chunk: int, curve: bool, sealed: bool, result,
               later: bool = False) -> None:
    """Send ``path`` to bob; put the seconds until he has it (``later``: until the broker holds it for him)."""
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client.chat_client import ChatClient
    from p2pchat.common.allocator import tune_for_bulk_transfer

    tune_for_bulk_transfer()
    try:
        with ChatClient("alice", _config(port, curve, sealed, chunk_size=chunk)) as client:
            client.connect(10)
            start = time.perf_counter()
            _, done = client.send_file("bob", path, later=later)
            done.result(600)
            result.put(time.perf_counter() - start)
    except Exception as exc:  # reported by the parent, which would otherwise wait for a figure
        result.put(repr(exc))


def _fetch_held(port: int, home: str, inbox: str, window: int, result) -> None:
    """bob comes online (his client starts and connects) and fetches what the broker holds for him; put the
    seconds until the file is verified and saved."""
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client import events as ev
    from p2pchat.client.chat_client import ChatClient
    from p2pchat.common.allocator import tune_for_bulk_transfer

    tune_for_bulk_transfer()
    outcome: list = []
    over = threading.Event()

    def on_event(event) -> None:
        if isinstance(event, (ev.FileReceived, ev.FileFailed)):
            outcome.append(event)
            over.set()

    start = time.perf_counter()
    with ChatClient("bob", _config(port, True, True, received_dir=Path(inbox), window=window),
                    on_event=on_event) as client:
        client.connect(10)
        got = over.wait(900)
        elapsed = time.perf_counter() - start
    if not got or not isinstance(outcome[0], ev.FileReceived):
        result.put(f"the fetch failed: {outcome[0].error!r}" if outcome else "no file in 900 s")
    else:
        result.put(elapsed)


def _chat_probe(port: int, home: str, curve: bool, sealed: bool, stop, next_leg, result) -> None:
    """pinger -> ponger at 100 msg/s; one-way latency on one clock (same process), a histogram for the messages
    sent before ``next_leg`` is set and one for those sent after."""
    os.environ["P2PCHAT_HOME"] = home
    from p2pchat.client import events as ev
    from p2pchat.client.chat_client import ChatClient

    hists = [HdrHistogram(1, 60_000_000, 3) for _ in range(2)]  # microseconds
    config = _config(port, curve, sealed)

    def on_event(event) -> None:
        if isinstance(event, ev.MessageReceived):
            leg, sent = event.text.split()
            hists[int(leg)].record_value(max(1, (time.perf_counter_ns() - int(sent)) // 1000))

    with ChatClient("pinger", config) as pinger, ChatClient("ponger", config, on_event=on_event) as ponger:
        ponger.connect(10)
        pinger.connect(10)
        result.put("ready")
        next_at = time.perf_counter()
        while not stop.is_set():
            pinger.send_async("ponger", f"{int(next_leg.is_set())} {time.perf_counter_ns()}")
            next_at += 0.01
            time.sleep(max(0.0, next_at - time.perf_counter()))
        time.sleep(0.2)
    result.put([{"count": h.get_total_count(), "p50_ms": h.get_value_at_percentile(50) / 1000,
                 "p99_ms": h.get_value_at_percentile(99) / 1000, "max_ms": h.get_max_value() / 1000}
                for h in hists if h.get_total_count()])


def _figure(out, proc: mp.Process, what: str) -> float:
    """A process's figure, once it has exited (a sender is gone before the next leg starts)."""
    value = out.get(timeout=900)
    if isinstance(value, str):
        raise RuntimeError(f"the {what} failed: {value}")
    proc.join(30)
    return value


class Round:
    """One broker, the chat probe through it, and its RSS sampled every 20 ms while a configuration runs."""

    def __init__(self, work: Path, curve: bool, sealed: bool, extra: list[str] | None = None) -> None:
        self.work, self.curve, self.sealed = work, curve, sealed
        self.broker = BrokerProcess(work / "broker-home", free_port_pair(),
                                    ([] if curve else ["--insecure"]) + (extra or [])).start()
        self.spawn = mp.get_context("spawn")
        self.stop, self.next_leg, self.probe_out = self.spawn.Event(), self.spawn.Event(), self.spawn.Queue()
        self.broker_ps = psutil.Process(self.broker.proc.pid)
        self.peak, self._sampling = 0, threading.Event()
        self._sampler: threading.Thread | None = None
        self.procs: list[mp.Process] = []

    def start(self, what, *args) -> mp.Process:
        proc = self.spawn.Process(target=what, args=(self.broker.port, *args))
        proc.start()
        self.procs.append(proc)
        return proc

    def measure(self) -> None:
        """Start the probe and the sampling (once the processes that are not measured are ready)."""
        self.start(_chat_probe, str(self.work / "probe-home"), self.curve, self.sealed, self.stop, self.next_leg,
                   self.probe_out)
        assert self.probe_out.get(timeout=30) == "ready"
        self.rss_before = self.broker_ps.memory_info().rss
        self._sampler = threading.Thread(target=self._sample)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._sampling.is_set():
            self.peak = max(self.peak, self.broker_ps.memory_info().rss)
            time.sleep(0.02)

    def cpu(self) -> tuple[float, float]:
        """The broker's CPU seconds so far, all its threads (Python's and libzmq's I/O thread), and the system's
        share of them."""
        times = self.broker_ps.cpu_times()
        return times.user + times.system, times.system

    def finish(self) -> dict:
        """The broker's RSS; the chat's latency, one figure per leg (``next_leg``)."""
        self.stop.set()
        latency = self.probe_out.get(timeout=30)
        self._sampling.set()
        self._sampler.join()
        return {"rss_before_mib": self.rss_before / MiB, "rss_peak_mib": self.peak / MiB,
                "rss_after_mib": self.broker_ps.memory_info().rss / MiB, "chat": latency}

    def close(self) -> None:
        self.stop.set()
        self._sampling.set()
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        self.broker.stop()


def _take_saved(inbox: Path, src: Path) -> None:
    saved = [p for p in inbox.iterdir() if not p.name.startswith(".")]
    assert len(saved) == 1 and saved[0].stat().st_size == src.stat().st_size, saved
    saved[0].unlink()


def p2pchat_round(src: Path, chunk: int, window: int, work: Path, curve: bool, sealed: bool) -> dict:
    run = Round(work, curve, sealed)
    inbox, bob_ready, send_out = work / "inbox", run.spawn.Event(), run.spawn.Queue()
    try:
        run.start(_receive_files, str(work / "bob-home"), str(inbox), window, curve, sealed, bob_ready, run.stop)
        assert bob_ready.wait(30), "the receiver did not connect"
        run.measure()
        cpu0 = run.cpu()
        sender = run.start(_send_file, str(work / "alice-home"), str(src), chunk, curve, sealed, send_out)
        elapsed = _figure(send_out, sender, "transfer")
        cpu1 = run.cpu()
        figures = run.finish()
    finally:
        run.close()
    _take_saved(inbox, src)
    return {"mib_s": src.stat().st_size / MiB / elapsed, "seconds": elapsed, "broker_cpu_s": cpu1[0] - cpu0[0],
            "broker_sys_s": cpu1[1] - cpu0[1]} | figures


def held_round(src: Path, chunk: int, window: int, work: Path) -> dict:
    """The file left at the broker for bob, offline (§8.2), then fetched by him; defaults (CURVE, sealed)."""
    size = src.stat().st_size
    # What the broker reserves for it (the file and its seal tags): a --size-mib over the default quota (2 GiB per
    # inbox) would be refused, so the quota is raised to it.
    stored = size + -(-size // chunk) * SEAL_TAG
    run = Round(work, True, True, ["--room-quota", str(max(stored, 2 << 30))])
    inbox, bob_home, out = work / "inbox", str(work / "bob-home"), run.spawn.Queue()
    try:
        registered, gone = run.spawn.Event(), run.spawn.Event()
        gone.set()  # bob registers his ID once and goes
        bob = run.start(_receive_files, bob_home, str(inbox), window, True, True, registered, gone)
        assert registered.wait(30), "bob did not register"
        bob.join(30)
        run.measure()
        cpu0 = run.cpu()
        sender = run.start(_send_file, str(work / "alice-home"), str(src), chunk, True, True, out, True)
        upload = _figure(out, sender, "upload")
        cpu1 = run.cpu()
        run.next_leg.set()
        fetcher = run.start(_fetch_held, bob_home, str(inbox), window, out)
        fetch = _figure(out, fetcher, "fetch")
        cpu2 = run.cpu()
        figures = run.finish()
    finally:
        run.close()
    _take_saved(inbox, src)
    return {"upload_s": upload, "fetch_s": fetch, "broker_cpu_upload_s": cpu1[0] - cpu0[0],
            "broker_sys_upload_s": cpu1[1] - cpu0[1], "broker_cpu_fetch_s": cpu2[0] - cpu1[0],
            "broker_sys_fetch_s": cpu2[1] - cpu1[1]} | figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=CHUNK_SIZE // 1024, help="default: the client's")
    parser.add_argument("--window", type=int, default=WINDOW, help="default: the client's")
    parser.add_argument("--held", action=argparse.BooleanOptionalAction, default=True,
                        help="also leave the file at the broker for an offline recipient, who fetches it (default: on)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chunk, size = args.chunk_kib * 1024, args.size_mib * MiB
    ceilings: dict[str, list[float]] = {"plain": [], "curve": []}
    rounds: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    held: list[dict] = []
    load_before, busy_before = os.getloadavg()[0], _busy()
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
            if args.held:
                held.append(held_round(src, chunk, args.window, work / f"round{r}-held"))
            print(f"round {r + 1}: ceiling plain {ceilings['plain'][-1]:6.0f}  curve {ceilings['curve'][-1]:6.0f}"
                  + "".join(f"   {name} {rounds[name][-1]['mib_s']:5.0f}" for name in VARIANTS)
                  + f" MiB/s   chat p99 {rounds['default'][-1]['chat'][0]['p99_ms']:.2f} ms"
                  + (f"   held: upload {held[-1]['upload_s']:.2f} s, fetch {held[-1]['fetch_s']:.2f} s (live "
                     f"{rounds['default'][-1]['seconds']:.2f} s)" if args.held else ""), file=sys.stderr)
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
        "chat_p50_ms": med(r["chat"][0]["p50_ms"] for r in default),
        "chat_p99_ms": med(r["chat"][0]["p99_ms"] for r in default),
        "load_average": [load_before, os.getloadavg()[0]],  # 1 minute, this run's own processes included
        "bg_cpus": _background_cpus(busy_before, _busy()),
    }
    if held:
        report["held"] = held_report(held, default)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"\n{args.size_mib} MiB, chunk {args.chunk_kib} KiB, window {args.window}, median of {args.rounds} rounds; "
          f"{os.cpu_count()} CPUs, load average {load_before:.2f} before, {report['load_average'][1]:.2f} after; "
          f"other programs kept {report['bg_cpus']:.2f} CPUs busy meanwhile")
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
    if held:
        print_held(report["held"], args.size_mib)


def _busy() -> tuple[float, float, float]:
    """(wall clock, CPU seconds the machine was busy, CPU seconds of this process and its children that ended)."""
    machine, own = psutil.cpu_times(), os.times()
    return (time.monotonic(), machine.user + machine.nice + machine.system,
            own.user + own.system + own.children_user + own.children_system)


def _background_cpus(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """How many CPUs other programs kept busy on average over the run (every process of ours has ended by then)."""
    wall, machine, ours = (b - a for a, b in zip(before, after))
    return max(0.0, machine - ours) / wall


def held_report(held: list[dict], live: list[dict]) -> dict:
    """Medians of the held rounds' legs beside those of the live relay (the default configuration, same rounds)."""
    med = statistics.median
    legs = {"live": [(r["seconds"], r["broker_cpu_s"], r["broker_sys_s"]) for r in live]}
    for leg in ("upload", "fetch"):
        legs[leg] = [(r[f"{leg}_s"], r[f"broker_cpu_{leg}_s"], r[f"broker_sys_{leg}_s"]) for r in held]
    legs["total"] = [tuple(u + f for u, f in zip(up, fetch)) for up, fetch in zip(legs["upload"], legs["fetch"])]
    out: dict = {}
    for leg, figures in legs.items():
        for i, key in enumerate(("s", "broker_cpu_s", "broker_sys_s")):
            out[f"{leg}_{key}"] = med(f[i] for f in figures)
    for leg in ("upload", "fetch", "total"):
        out[f"{leg}_over_live"] = out[f"{leg}_s"] / out["live_s"]
        out[f"{leg}_cpu_over_live"] = out[f"{leg}_broker_cpu_s"] / out["live_broker_cpu_s"]
    chat = {"live": [r["chat"][0] for r in live], "upload": [r["chat"][0] for r in held],
            "fetch": [r["chat"][-1] for r in held]}
    for leg, figures in chat.items():
        out[f"{leg}_chat_p99_ms"] = med(f["p99_ms"] for f in figures)
        out[f"{leg}_chat_max_ms"] = med(f["max_ms"] for f in figures)
    out["broker_rss_growth_mib"] = med(r["rss_peak_mib"] - r["rss_before_mib"] for r in held)
    return out


def print_held(h: dict, size_mib: int) -> None:
    print("  held at the broker for an offline recipient (docs/PROTOCOL.md §8.2; CURVE, sealed), beside the live relay")
    print(f"    {'':26}{'seconds':>8}{'MiB/s':>7}{'x live':>8}{'broker CPU s':>14}{'(sys)':>7}{'x live':>8}"
          f"{'chat p99/max ms':>17}")
    for leg, name in (("live", "live relay (default)"), ("upload", "upload, then sender exits"),
                      ("fetch", "fetch, recipient comes"), ("total", "upload + fetch")):
        x, x_cpu = ("", "") if leg == "live" else (f"{h[f'{leg}_over_live']:.2f}", f"{h[f'{leg}_cpu_over_live']:.2f}")
        chat = "" if leg == "total" else f"{h[f'{leg}_chat_p99_ms']:.1f} / {h[f'{leg}_chat_max_ms']:.0f}"
        print(f"    {name:26}{h[f'{leg}_s']:8.2f}{size_mib / h[f'{leg}_s']:7.0f}{x:>8}{h[f'{leg}_broker_cpu_s']:14.2f}"
              f"{h[f'{leg}_broker_sys_s']:7.2f}{x_cpu:>8}{chat:>17}")
    print(f"    broker RSS growth {h['broker_rss_growth_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
