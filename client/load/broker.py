"""The broker under load: one the tool started (and may kill and restart), and its resource samples.

``SpawnedBroker`` runs ``p2pchat broker`` (or ``--broker-cmd``) on free
loopback ports with its own data directory, reads its stderr on a pump thread
(which it joins), and can be killed and started again on the same ports and
data, so acknowledged messages must survive. ``ResourceSampler`` reads a
broker's RSS, CPU and open file descriptors with psutil, across restarts.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from p2pchat.client.load.worker import raise_nofile

ROOT = Path(__file__).resolve().parent.parent
READY_MARKERS = ("broker listening", "listening on")


class BrokerFailed(Exception):
    """The broker under test did not start, or died when it should not have."""


def free_port_triple() -> int:
    """A port P with P, P+1 and P+2 free on 127.0.0.1 (ROUTER, PUB, key service)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65533:
            continue
        held = []
        try:
            for p in (port, port + 1, port + 2):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise BrokerFailed("no three consecutive free ports on 127.0.0.1")


def _child_setup(nofile: int | None) -> None:
    """In the broker's process before exec: die with us (Linux), and have the file descriptors asked for."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    raise_nofile(nofile)


UNLIMITED_ADMISSIONS = 1e9


@dataclass(frozen=True, slots=True)
class BrokerCommand:
    port: int
    data_dir: Path
    heartbeat: float
    rate_limit: float
    insecure: bool
    template: str | None = None  # --broker-cmd, with {python} {port} {pub_port} {key_port} {data_dir} {heartbeat}
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        if self.template:
            return shlex.split(self.template.format(
                python=sys.executable, port=self.port, pub_port=self.port + 1, key_port=self.port + 2,
                data_dir=self.data_dir, heartbeat=self.heartbeat)) + list(self.extra)
        argv = [sys.executable, "-m", "p2pchat.client.cli", "broker", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--heartbeat", str(self.heartbeat),
                "--rate-limit", str(self.rate_limit),
                # every load client comes from this host: no per-address admission limit (docs/SECURITY.md)
                "--admit-rate", str(UNLIMITED_ADMISSIONS), "--admit-burst", str(UNLIMITED_ADMISSIONS)]
        return argv + (["--insecure"] if self.insecure else []) + list(self.extra)


class SpawnedBroker:
    def __init__(self, command: BrokerCommand, nofile: int | None) -> None:
        self.command = command
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.lines: deque[str] = deque(maxlen=300)
        self.warnings = 0
        self.starts = 0
        self._ready = threading.Event()
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, wait: float | None = 20.0) -> None:
        """Start it; with ``wait``, return once it says it is listening (BrokerFailed otherwise)."""
        self._ready.clear()
        self.command.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", P2PCHAT_HOME=str(self.command.data_dir.parent))
        self.proc = subprocess.Popen(self.command.argv(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     errors="replace", start_new_session=True,  # Ctrl-C is ours to handle
                                     preexec_fn=lambda: _child_setup(self.nofile))
        self.starts += 1
        self._pump = threading.Thread(target=self._read_stderr, args=(self.proc,), name="broker-stderr", daemon=True)
        self._pump.start()
        if wait is not None:
            self.wait_ready(wait)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self.alive() or time.monotonic() > deadline:
                raise BrokerFailed("broker did not start:\n" + self.tail())

    def check_started(self) -> bool:
        """Non-blocking: True once ready; BrokerFailed if it died instead."""
        if self._ready.is_set():
            return True
        if not self.alive():
            raise BrokerFailed("broker exited while starting:\n" + self.tail())
        return False

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends when the process closes stderr
            self.lines.append(line)
            if any(marker in line for marker in READY_MARKERS):
                self._ready.set()
            if " WARNING " in line or " ERROR " in line:
                self.warnings += 1

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        """Signal it and wait for it to exit (SIGKILL if it outlives ``timeout``); its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._pump is not None:
            self._pump.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.kill(signal.SIGTERM, timeout)

    def tail(self, lines: int = 30) -> str:
        return "".join(list(self.lines)[-lines:])


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the run started
    rss: int  # bytes
    cpu: float  # percent of one CPU since the previous sample
    fds: int
    pid: int


class ResourceSampler:
    """RSS, CPU and open fds of the broker (its process and any children), sampled by the coordinator's loop."""

    MAX_SAMPLES = 4000

    def __init__(self, t0: float) -> None:
        import psutil

        self._psutil = psutil
        self.t0 = t0
        self.samples: list[Sample] = []
        self._proc = None
        self._last: tuple[float, float] | None = None  # (monotonic, cpu seconds)
        self.cpu_seconds = 0.0  # all incarnations, as far as sampled
        self.fd_limit: int | None = None

    def sample(self, pid: int | None) -> Sample | None:
        if pid is None:
            return None
        psutil = self._psutil
        try:
            if self._proc is None or self._proc.pid != pid:
                self._proc = psutil.Process(pid)
                self._last = None
                try:
                    self.fd_limit = self._proc.rlimit(psutil.RLIMIT_NOFILE)[0]
                except (AttributeError, psutil.Error):
                    self.fd_limit = None
            rss = fds = 0
            cpu = 0.0
            for proc in self._tree():  # a broker with --workers is several processes
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss += proc.memory_info().rss
                        fds += proc.num_fds()
                        cpu += times.user + times.system
                except psutil.NoSuchProcess:
                    continue
        except psutil.Error:
            return None
        now = time.monotonic()
        percent = 0.0
        if self._last is not None and now > self._last[0]:
            self.cpu_seconds += max(0.0, cpu - self._last[1])
            percent = 100.0 * (cpu - self._last[1]) / (now - self._last[0])
        self._last = (now, cpu)
        sample = Sample(round(now - self.t0, 2), rss, round(percent, 1), fds, pid)
        self.samples.append(sample)
        if len(self.samples) > self.MAX_SAMPLES:  # a long soak: keep every other old sample
            self.samples = self.samples[: self.MAX_SAMPLES // 2: 2] + self.samples[self.MAX_SAMPLES // 2:]
        return sample

    def _tree(self) -> list:
        assert self._proc is not None
        try:
            return [self._proc, *self._proc.children(recursive=True)]
        except self._psutil.NoSuchProcess:
            return []

    def cpu_now(self, pid: int | None) -> tuple[float, float] | None:
        """The process's CPU seconds so far, and its main thread's (Python's share; the rest is mostly libzmq)."""
        if pid is None:
            return None
        try:
            proc = self._psutil.Process(pid)
            total = 0.0
            for member in [proc, *proc.children(recursive=True)]:
                times = member.cpu_times()
                total += times.user + times.system
            main = next((t.user_time + t.system_time for t in proc.threads() if t.id == pid), 0.0)
        except self._psutil.Error:
            return None
        return total, main
