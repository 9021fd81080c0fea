"""Many small files as one folder (issue 17, docs/PROTOCOL.md §8.3), beside one file of the same size, in one run.

    .venv/bin/python bench/bench_folders.py [--rounds 3] [--check] [--json]

Each round sends, through ``p2pchat broker`` (CURVE, sealed chunks: the defaults), from a ``ChatClient`` in its
own process to one receiving into a directory (another process), timed from ``send_file`` (the folder's walk and
hashing included) to the sender learning that the receiver verified and saved it (the folder extracted,
every file checked, the disk synced):
  * one file of 4 MiB (the baseline);
  * a folder of 1,000 files of 4 KiB (the same size);
  * a folder of 10,000 files of 1 KiB, in 100 directories;
while both clients' descriptors and threads are sampled every 10 ms. Prints medians and ratios; ``--check``
exits 1 if a target is missed: the 1,000 files in under 2 s and in at most 10 times the 4 MiB file, and the
10,000 files with no more descriptors or threads at their peak than the 4 MiB file had at its own (but the
receiver's extraction, which holds 3 descriptors: its stream, the staging folder and the file it writes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_files import _receive_files, _send_file  # noqa: E402  (it puts the repository on sys.path)

from p2pchat.client.core.transfer import CHUNK_SIZE, WINDOW  # noqa: E402
from tests.conftest import BrokerProcess, free_port_pair  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
TARGET_SECONDS, TARGET_RATIO = 2.0, 10.0
EXTRACTION_FDS = 3  # a receiver extracting a folder holds its stream, the staging folder and the file it writes


def make_payloads(work: Path) -> dict[str, tuple[Path, int]]:
    """What each round sends: name -> (path, files in it)."""
    work.mkdir(parents=True)
    single = work / "one-4MiB.bin"
    single.write_bytes(os.urandom(4 * MiB))
    small = work / "1000x4KiB"
    for i in range(1000):
        sub = small / f"d{i // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.bin").write_bytes(os.urandom(4 * KiB))
    tiny = work / "10000x1KiB"
    for i in range(10_000):
        sub = tiny / f"d{i // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.txt").write_bytes(os.urandom(KiB))
    return {"4 MiB file": (single, 1), "1,000 x 4 KiB": (small, 1000), "10,000 x 1 KiB": (tiny, 10_000)}


class Peaks:
    """The most descriptors and threads each watched process had while a transfer ran."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.fds = dict.fromkeys(pids, 0)
        self.threads = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                try:
                    self.fds[name] = max(self.fds[name], proc.num_fds())
                    self.threads[name] = max(self.threads[name], proc.num_threads())
                except psutil.NoSuchProcess:  # the sender is done
                    pass
            time.sleep(0.01)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"fds": self.fds, "threads": self.threads}


class PipeResult:
    """The sender's figure through a pipe: a queue's ``put`` would start a feeder thread the sampling would count."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def put(self, value) -> None:
        self.conn.send(value)


def send_one(port: int, home: Path, path: Path, bob_pid: int) -> dict:
    spawn = mp.get_context("spawn")
    out, into = spawn.Pipe(duplex=False)
    sender = spawn.Process(target=_send_file, args=(port, str(home), str(path), CHUNK_SIZE, True, True,
                                                     PipeResult(into)))
    sender.start()
    peaks = Peaks({"sender": sender.pid, "receiver": bob_pid})
    try:
        if not out.poll(600):
            raise RuntimeError(f"no figure for {path.name} in 600 s")
        elapsed = out.recv()
    finally:
        sampled = peaks.stop()
        sender.join(30)
    if isinstance(elapsed, str):
        raise RuntimeError(f"the transfer of {path.name} failed: {elapsed}")
    return {"seconds": elapsed} | sampled


def run_round(payloads: dict[str, tuple[Path, int]], work: Path) -> dict[str, dict]:
    broker = BrokerProcess(work / "broker-home", free_port_pair()).start()
    inbox = work / "inbox"
    spawn = mp.get_context("spawn")
    stop, ready = spawn.Event(), spawn.Event()
    receiver = spawn.Process(target=_receive_files, args=(broker.port, str(work / "bob-home"), str(inbox), WINDOW,
                                                          True, True, ready, stop))
    receiver.start()
    results = {}
    try:
        assert ready.wait(30), "the receiver did not connect"
        for name, (path, files) in payloads.items():
            results[name] = send_one(broker.port, work / "alice-home", path, receiver.pid)
            [saved] = [p for p in inbox.iterdir() if not p.name.startswith(".")]
            count = sum(1 for p in saved.rglob("*") if p.is_file()) if saved.is_dir() else 1
            assert count == files, f"{name}: {count} files arrived"
            (os.unlink if saved.is_file() else shutil.rmtree)(saved)
    finally:
        stop.set()
        receiver.join(30)
        if receiver.is_alive():
            receiver.kill()
        broker.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="p2pchat-bench-folders-") as tmp:
        work = Path(tmp)
        payloads = make_payloads(work / "payloads")
        for r in range(args.rounds):
            rounds.append(run_round(payloads, work / f"round{r}"))
            print(f"round {r + 1}: " + "   ".join(f"{name} {res['seconds']:.2f} s" for name, res in rounds[-1].items()),
                  file=sys.stderr)
    med = statistics.median
    seconds = {name: med(r[name]["seconds"] for r in rounds) for name in payloads}
    peak = {name: {what: {side: max(r[name][what][side] for r in rounds) for side in ("sender", "receiver")}
                   for what in ("fds", "threads")} for name in payloads}
    base, small, tiny = "4 MiB file", "1,000 x 4 KiB", "10,000 x 1 KiB"
    report = {
        "rounds": args.rounds, "seconds": seconds,
        "files_per_s": {small: 1000 / seconds[small], tiny: 10_000 / seconds[tiny]},
        "ratio_1000_to_file": seconds[small] / seconds[base], "peaks": peak,
    }
    missed = []
    if seconds[small] >= TARGET_SECONDS:
        missed.append(f"1,000 x 4 KiB took {seconds[small]:.2f} s (target < {TARGET_SECONDS} s)")
    if report["ratio_1000_to_file"] > TARGET_RATIO:
        missed.append(f"1,000 x 4 KiB took {report['ratio_1000_to_file']:.1f}x the 4 MiB file (target <= 10x)")
    for what in ("fds", "threads"):
        for side in ("sender", "receiver"):
            allowed = peak[base][what][side] + (EXTRACTION_FDS if (what, side) == ("fds", "receiver") else 0)
            if peak[tiny][what][side] > allowed:
                missed.append(f"10,000 x 1 KiB: {side} peaked at {peak[tiny][what][side]} {what}, the 4 MiB file "
                              f"at {peak[base][what][side]} (allowed {allowed})")
    report["missed"] = missed
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"\nmedian of {args.rounds} rounds (CURVE transport, sealed chunks of {CHUNK_SIZE // KiB} KiB)")
        for name in payloads:
            rate = f"   {report['files_per_s'][name]:7.0f} files/s" if name in report["files_per_s"] else ""
            print(f"  {name:16} {seconds[name]:6.2f} s{rate}   peak fds/threads: sender "
                  f"{peak[name]['fds']['sender']}/{peak[name]['threads']['sender']}, receiver "
                  f"{peak[name]['fds']['receiver']}/{peak[name]['threads']['receiver']}")
        print(f"  1,000 x 4 KiB / 4 MiB file: {report['ratio_1000_to_file']:.2f}x   (targets: < {TARGET_SECONDS} s, "
              f"<= {TARGET_RATIO:.0f}x)")
        print("  " + ("; ".join(missed) if missed else "every target met"))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
