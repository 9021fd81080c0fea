"""The pre-fork pattern: N broker processes listening on one port (SO_REUSEPORT), supervised.

The kernel spreads new connections over the workers; they share state through Redis
(broker/backends/redis_cluster.py). The parent only supervises: it restarts a worker that dies, and SIGTERM or
SIGINT stops them all. Each worker dies with the parent (PR_SET_PDEATHSIG), so a killed supervisor
leaves no orphans.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds a worker gets to finish after SIGTERM
RESTART_MIN, RESTART_MAX = 0.2, 5.0  # restart back-off after a crash, doubling while it keeps crashing
STABLE_AFTER = 10.0  # a worker that lived this long resets its back-off


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def strip_workers(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--workers N`` / ``--workers=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


class _Worker:
    def __init__(self, index: int, cmd: list[str]) -> None:
        self.index, self.cmd = index, cmd
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = RESTART_MIN
        self.restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("worker %d pid %d started", self.index, self.proc.pid)


class WorkerPool:
    def __init__(self, broker_argv: Sequence[str], count: int, log_level: str | None = None) -> None:
        """``broker_argv``: the broker's own options (``--workers`` among them is dropped)."""
        level = ["--log-level", log_level] if log_level else []
        cmd = [sys.executable, "-m", "p2pchat.broker", *level, *strip_workers(broker_argv), "--reuse-port"]
        self._workers = [_Worker(i, cmd) for i in range(count)]
        self._stop = threading.Event()

    def stop(self) -> None:
        """Safe from a signal handler."""
        self._stop.set()

    def run(self) -> int:
        for worker in self._workers:
            worker.start()
        try:
            while not self._stop.wait(0.1):
                now = time.monotonic()
                for w in self._workers:
                    if w.restart_at is None and w.proc is not None and w.proc.poll() is not None:
                        if now - w.started > STABLE_AFTER:
                            w.backoff = RESTART_MIN
                        log.warning("worker %d pid %d exited with %s: restarting in %.1fs",
                                    w.index, w.proc.pid, w.proc.returncode, w.backoff)
                        w.restart_at = now + w.backoff
                        w.backoff = min(w.backoff * 2, RESTART_MAX)
                    elif w.restart_at is not None and now >= w.restart_at:
                        w.start()
        finally:
            self._stop_all()
        return 0

    def _stop_all(self) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d ignored SIGTERM: killing it", proc.pid)
                proc.kill()
                proc.wait()
        log.info("all workers stopped")
