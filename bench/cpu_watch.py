"""CPU time of a benchmark's processes (psutil), and waiting until they are idle between phases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

SETTLE_POLL = 0.2  # s between looks at the processes' CPU
SETTLE_IDLE = 0.01  # CPU seconds all of them may use in one poll and still count as idle (heartbeats)


class Busy(Exception):
    """The processes did not settle in time."""


class CpuWatch:
    def __init__(self, pids: Callable[[], dict[str, int]], main_threads: tuple[str, ...] = ()) -> None:
        """``pids``: name -> pid of the processes to watch (this one is added as "bench"); of those named in
        ``main_threads``, the main thread's CPU is sampled apart too, as "NAME.main" (Python's share: the rest
        is libzmq's I/O threads)."""
        import psutil

        self.psutil, self.pids, self.main_threads = psutil, pids, main_threads

    def sample(self) -> dict[str, float]:
        """CPU seconds (user + system, all threads) each process has used so far, and the machine's busy time."""
        out = {}
        for name, pid in {**self.pids(), "bench": os.getpid()}.items():
            process = self.psutil.Process(pid)
            times = process.cpu_times()
            out[name] = times.user + times.system
            if name in self.main_threads:
                out[name + ".main"] = sum(t.user_time + t.system_time for t in process.threads() if t.id == pid)
        machine = self.psutil.cpu_times()
        out["machine"] = machine.user + machine.nice + machine.system
        return out

    @staticmethod
    def ours(sample: dict[str, float]) -> float:
        return sum(v for k, v in sample.items() if k != "machine" and not k.endswith(".main"))

    def settle(self, timeout: float) -> dict[str, float]:
        """Wait until the processes are idle (a phase's trailing acks, consumes and receipts done); the sample
        then."""
        before = self.sample()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(SETTLE_POLL)
            now = self.sample()
            if self.ours(now) - self.ours(before) < SETTLE_IDLE:
                return now
            before = now
        raise Busy(f"still busy {timeout:.0f} s after the phase")


def used(before: dict[str, float], after: dict[str, float], wall: float) -> tuple[dict[str, float], float]:
    """CPU seconds each process used between two samples, and how many CPUs other programs kept busy meanwhile."""
    delta = {k: after[k] - before[k] for k in after}
    return delta, max(0.0, delta["machine"] - CpuWatch.ours(delta)) / wall
