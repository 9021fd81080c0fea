"""The load run's conductor: the broker, the worker processes, the phases, restarts and samples.

Phases, each bounded in time:

1. reach the broker (or start one on free ports with its own data directory)
   and learn its CURVE key from the key port, as a client does on first use;
2. spawn the worker processes (``multiprocessing``, spawn) and wait until armed;
3. connection ramp, until every client has registered;
4. with ``subscribe``: subscribe every SUB, then time presence probes;
5. send phase, for ``duration`` seconds or ``count`` messages per sender,
   killing and restarting a broker we started every ``restart_every`` seconds;
6. stop and drain: until everything sent has arrived and nothing is
   unacknowledged, or the grace period ends;
7. collect every worker's report, make the clients leave, stop the broker.

Whatever fails, every process started here is ended before ``execute`` returns.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import zmq

from p2pchat.client.broker_trust import fetch_broker_key
from p2pchat.client.load.broker import BrokerCommand, BrokerFailed, ResourceSampler, Sample, SpawnedBroker, free_port_triple
from p2pchat.client.load.config import LoadConfig
from p2pchat.client.load.plan import ScriptPlan
from p2pchat.client.load.probe import ProbeClient
from p2pchat.client.load.result import RunFailed, RunResult
from p2pchat.client.load.worker import WorkerSpec, raise_nofile, user_name, worker_main
from p2pchat.common.crypto import fingerprint
from p2pchat.common.endpoints import ServerAddress

log = logging.getLogger(__name__)

PROGRESS_PRINT_EVERY = 2.0
DRAIN_CAP_EXTRA = 120.0  # the drain never takes longer than its grace period plus this (and clients/100 s)
STOP_TIMEOUT = 15.0  # seconds a broker we started may take to exit on SIGTERM before it is killed
PROBE_WAIT = 5.0  # seconds a presence change may take to reach every subscriber before we stop waiting


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole host has been busy (every process, ours and others')."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


@dataclass
class WorkerHandle:
    index: int
    proc: mp.process.BaseProcess
    conn: multiprocessing.connection.Connection
    clients: int
    armed: bool = False
    progress: dict = field(default_factory=dict)
    report: dict | None = None
    bye: bool = False
    closed: bool = False


class LoadRun:
    def __init__(self, config: LoadConfig, progress: TextIO | None = sys.stderr) -> None:
        self.config = config
        self.out = None if config.quiet else progress
        self.result = RunResult(config=config)
        self.t0 = time.monotonic()
        self.workers: list[WorkerHandle] = []
        self.broker: SpawnedBroker | None = None
        self.sampler: ResourceSampler | None = None
        self.ctx: zmq.Context | None = None
        self.server: ServerAddress | None = None
        self.pub_endpoint = ""
        self.server_key: bytes | None = None
        self.key_service: ServerAddress | None = None  # host and key port, with CURVE
        self.prefix = ""
        self.phase = "start"
        self._next_sample = 0.0
        self._next_print = 0.0
        self._restarts_enabled = False
        self._next_restart = 0.0
        self._restarting_since: float | None = None

    # --- the run --------------------------------------------------------------------
    def execute(self) -> RunResult:
        config = self.config
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "big")
        self.prefix = f"ld{seed & 0xFFFFFF:06x}-"
        self.plan = ScriptPlan(
            run_tag=seed & 0xFFFFFFFF, clients=config.clients, senders=config.sender_count, peers=config.peers,
            rate=config.rate, flood=config.flood, window=config.window, count=config.count, size=config.size,
            heartbeat=config.heartbeat, receipts=config.receipts, churn_every=config.churn_every,
            churn_down=config.churn_down, churn_crash=config.churn_crash, inject_drop=config.inject_drop,
            inject_dup=config.inject_dup, file_every=config.files, file_size=config.file_size, seed=seed)
        tmp = tempfile.TemporaryDirectory(prefix="p2pchat-load-") if config.spawn_broker else None
        self.ctx = zmq.Context()
        try:
            self._phase("broker")
            self._reach_broker(Path(tmp.name) if tmp else None)
            self._phase("workers")
            self._start_workers()
            self._phase("ramp")
            self._ramp()
            if config.subscribe:
                self._phase("presence")
                self._presence_probes()
            self._phase("send")
            self._send_phase()
            self._phase("drain")
            self._drain()
        except (RunFailed, BrokerFailed) as exc:
            self.result.failures.append(str(exc))
        except KeyboardInterrupt:
            self.result.failures.append("interrupted")
        finally:
            self._finish()
            if tmp is not None:
                tmp.cleanup()
        return self.result

    def _phase(self, name: str) -> None:
        self.phase = name
        self.result.timings[name + "_start_s"] = round(time.monotonic() - self.t0, 3)
        log.info("load phase %s", name)

    # --- 1. the broker ----------------------------------------------------------------
    def _reach_broker(self, tmp: Path | None) -> None:
        config, result = self.config, self.result
        raise_nofile(config.nofile)
        self.sampler = self._make_sampler()
        if tmp is not None:
            port = free_port_triple()
            command = BrokerCommand(port, tmp / "broker", config.broker_heartbeat, config.broker_rate_limit,
                                    config.insecure, config.broker_cmd, config.broker_args)
            self.broker = SpawnedBroker(command, config.nofile)
            self.broker.start(wait=30.0)
            self.server = ServerAddress("127.0.0.1", port)
            pub_port, key_port = port + 1, port + 2
            result.spawned = True
        else:
            assert config.server is not None
            self.server = config.server
            pub_port = config.pub_port or config.server.port + 1
            key_port = config.key_port or config.server.port + 2
        self.pub_endpoint = ServerAddress(self.server.host, self.server.port, pub_port).pub_endpoint
        result.server = str(self.server)
        result.transport = "plaintext" if config.insecure else "curve"
        if not config.insecure:
            self.server_key = self._broker_key(key_port)
            self.key_service = ServerAddress(self.server.host, key_port)
        sample = self._sample()
        if sample is not None:
            result.rss_baseline = sample.rss
            result.broker_fd_limit = self.sampler.fd_limit if self.sampler else None
            need = config.clients * (2 if config.subscribe else 1) + 100
            if result.broker_fd_limit and result.broker_fd_limit < need:
                result.notes.append(f"the broker may run out of file descriptors: {config.clients} clients need "
                                    f"about {need}, its limit is {result.broker_fd_limit}")

    def _make_sampler(self) -> ResourceSampler | None:
        try:
            return ResourceSampler(self.t0)
        except ImportError:
            self.result.notes.append("psutil is not installed: no broker RSS/CPU samples")
            return None

    def _broker_pid(self) -> int | None:
        if self.broker is not None:
            return self.broker.pid if self.broker.alive() else None
        return self.config.broker_pid

    def _broker_key(self, key_port: int) -> bytes:
        assert self.ctx is not None and self.server is not None
        deadline = time.monotonic() + 15.0
        key = None
        while key is None and time.monotonic() < deadline:
            key = fetch_broker_key(self.server, key_port, timeout=1.0)
        if key is None:
            raise RunFailed(f"no answer from the key port {self.server.host}:{key_port} (is the broker running "
                            "with CURVE? use --insecure for a plaintext one)")
        pin = self.config.server_key
        if pin and "".join(fingerprint(key).split()) != "".join(pin.lower().split()):
            raise RunFailed(f"broker key {fingerprint(key)} is not the pinned {pin}: refusing to load it")
        if not pin and not self.config.spawn_broker:
            log.warning("trusting broker %s key %s on first use (pin it with --server-key)",
                        self.server, fingerprint(key))
        return key

    # --- 2. workers ---------------------------------------------------------------------
    def _start_workers(self) -> None:
        config, result = self.config, self.result
        assert self.server is not None
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        processes = config.process_count(fd_limit)
        result.processes = processes
        per_process = -(-config.clients // processes)
        if per_process * config.fds_per_client + 200 > fd_limit:
            result.notes.append(f"{per_process} clients per process need about "
                                f"{per_process * config.fds_per_client} file descriptors, the limit is {fd_limit}: "
                                "use more --processes or raise --nofile")
        ctx = mp.get_context("spawn")  # never fork a process that holds ZeroMQ state
        for w in range(processes):
            spec = WorkerSpec(worker=w, indices=range(w, config.clients, processes), plan=self.plan,
                              user_prefix=self.prefix, endpoint=self.server.endpoint, pub_endpoint=self.pub_endpoint,
                              server_key=self.server_key, key_service=self.key_service,
                              subscribe=config.subscribe, nofile=config.nofile)
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, args=(spec, child), name=f"p2pchat-load-{w}", daemon=True)
            proc.start()
            child.close()
            self.workers.append(WorkerHandle(w, proc, parent, len(spec.indices)))
        budget = 60.0 + config.clients / 200.0
        if not self._pump(lambda: all(w.armed for w in self.workers), budget):
            raise RunFailed(f"worker processes not ready within {budget:.0f}s")

    # --- 3. ramp --------------------------------------------------------------------------
    def _ramp(self) -> None:
        config = self.config
        t0 = time.monotonic_ns() + 50_000_000
        self._broadcast({"cmd": "ramp", "t0": t0, "ramp": config.ramp})
        budget = config.register_budget()
        ok = self._pump(lambda: self.total("registered") >= config.clients, budget)
        self.result.registered = self.total("registered")
        self.result.timings["registered_after_s"] = round((time.monotonic_ns() - t0) / 1e9, 3)
        sample = self._sample()
        if sample is not None:
            self.result.rss_registered = sample.rss
        if not ok:
            raise RunFailed(f"only {self.result.registered} of {config.clients} clients registered within "
                            f"{budget:.0f}s")

    # --- 4. presence ------------------------------------------------------------------------
    def _presence_probes(self) -> None:
        config = self.config
        assert self.ctx is not None and self.server is not None
        users = [user_name(self.prefix, f"probe{k}") for k in range(config.probes)]  # type: ignore[arg-type]
        self._broadcast({"cmd": "subscribe", "watch": users})
        budget = 15.0 + config.clients / 500.0
        if not self._pump(lambda: self.total("subscribed") >= config.clients, budget):
            raise RunFailed(f"only {self.total('subscribed')} of {config.clients} subscriptions took effect "
                            f"within {budget:.0f}s")
        subscribers = self.total("subscribed")
        for user in users:
            probe = ProbeClient(self.ctx, self.server.endpoint, self.server_key, user, self.key_service)
            try:
                t_on = probe.register()
                self._pump(lambda: self._presence_seen(f"{user}:1") >= subscribers, PROBE_WAIT, tick=probe.keep_alive)
                t_off = probe.unregister()
                self._pump(lambda: self._presence_seen(f"{user}:0") >= subscribers, PROBE_WAIT)
            finally:
                probe.close()
            self.result.probes += [{"user": user, "online": True, "t0_ns": t_on, "subscribers": subscribers},
                                   {"user": user, "online": False, "t0_ns": t_off, "subscribers": subscribers}]

    def _presence_seen(self, key: str) -> int:
        return sum(w.progress.get("presence", {}).get(key, 0) for w in self.workers)

    # --- 5. send ------------------------------------------------------------------------------
    def _send_phase(self) -> None:
        config = self.config
        pid = self._broker_pid()
        cpu0 = self.sampler.cpu_now(pid) if self.sampler else None
        cpu_seconds0 = self.sampler.cpu_seconds if self.sampler else 0.0
        busy0 = _machine_busy_seconds()
        start = time.monotonic()
        self._broadcast({"cmd": "go"})
        if config.restart_every > 0:
            self._restarts_enabled = True
            self._next_restart = start + config.restart_every
        count_done = (lambda: self.total("senders_done") >= config.clients) if config.count else (lambda: False)
        self._pump(count_done, config.duration)
        self._restarts_enabled = False
        sample = self._sample()
        if sample is not None:
            self.result.rss_send_end = sample.rss
        self._broadcast({"cmd": "stop"})
        elapsed = time.monotonic() - start
        self.result.timings["send_s"] = round(elapsed, 3)
        busy1 = _machine_busy_seconds()
        if busy0 is not None and busy1 is not None and elapsed > 0:
            self.result.machine_busy_cpus = round((busy1 - busy0) / elapsed, 2)
        if self._restarting_since is not None:
            self._pump(lambda: self._restarting_since is None, 60.0)
        if self.sampler is not None:
            if self.result.restarts == 0:
                cpu1 = self.sampler.cpu_now(self._broker_pid())
                if cpu0 is not None and cpu1 is not None:
                    self.result.broker_cpu_send_s = cpu1[0] - cpu0[0]
                    self.result.broker_main_thread_cpu_send_s = cpu1[1] - cpu0[1]
            else:  # several incarnations: what the samples saw
                self._sample()
                self.result.broker_cpu_send_s = self.sampler.cpu_seconds - cpu_seconds0

    # --- 6. drain -------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Until everything sent has arrived, or nothing new has for ``drain`` s with every client back."""
        config = self.config
        progress = {"received": -1, "since": time.monotonic()}

        def settled() -> bool:
            if not all(w.progress.get("stopped") for w in self.workers):
                return False
            everyone = self.total("ready") >= config.clients
            received, now = self.total("received"), time.monotonic()
            files_open = self.total("files_open")
            if everyone and self.total("outstanding") == 0 and received >= self.total("sent") and not files_open:
                return True  # all of it arrived
            arriving = (received, self.total("file_bytes"))  # file data arriving is progress too
            if arriving != progress["received"] or not everyone:
                progress.update(received=arriving, since=now)  # still arriving, or someone still away
                return False
            return now - progress["since"] >= config.drain  # quiet for the grace period

        start = time.monotonic()
        cap = config.drain + DRAIN_CAP_EXTRA + config.clients / 100.0
        settled_in_time = self._pump(settled, cap)
        self.result.timings["drain_s"] = round(time.monotonic() - start, 3)
        self.result.timings["drained"] = settled_in_time
        away = config.clients - self.total("ready")
        if away > 0:
            self.result.failures.append(f"{away} clients were not registered when the drain ended ({cap:.0f} s): "
                                        "messages queued for them could not be delivered, so loss is not measured")

    # --- 7. the end -------------------------------------------------------------------------------
    def _finish(self) -> None:
        try:
            live = [w for w in self.workers if not w.closed]
            if live:
                self._broadcast({"cmd": "report"})
                self._pump(lambda: all(w.report is not None or w.closed for w in self.workers),
                           30.0 + self.config.clients / 500.0, fail_on_crash=False)
                self._broadcast({"cmd": "exit"})
                self._pump(lambda: all(w.bye or w.closed for w in self.workers), 20.0, fail_on_crash=False)
        except KeyboardInterrupt:
            self.result.failures.append("interrupted")
        finally:
            for w in self.workers:
                w.proc.join(5)
                if w.proc.is_alive():
                    w.proc.terminate()
                    w.proc.join(5)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(5)
                w.conn.close()
            self.result.reports = [w.report for w in self.workers if w.report is not None]
            missing = [w.index for w in self.workers if w.report is None]
            if missing and self.workers:
                self.result.failures.append(f"no report from worker processes {missing}")
            self._sample()
            if self.sampler is not None:
                self.result.samples = list(self.sampler.samples)
            if self.broker is not None:
                if self.broker.alive():
                    began = time.monotonic()
                    code = self.broker.stop()
                    self.result.broker_stop_s = round(time.monotonic() - began, 3)
                    self.result.broker_exit_code = code
                    if code == -signal.SIGKILL:
                        self.result.notes.append(f"the broker did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM and "
                                                 "was killed")
                else:
                    self.broker.stop()
                self.result.broker_warnings = self.broker.warnings
                self.result.broker_tail = self.broker.tail(20)
            if self.ctx is not None:
                self.ctx.term()

    # --- the coordinator's loop -------------------------------------------------------------------------
    def total(self, key: str) -> int:
        return sum(w.progress.get(key, 0) for w in self.workers)

    def _broadcast(self, command: dict) -> None:
        for w in self.workers:
            if not w.closed:
                try:
                    w.conn.send(command)
                except (OSError, ValueError):
                    w.closed = True

    def _pump(self, until: Callable[[], bool], timeout: float, tick: Callable[[], None] | None = None,
              fail_on_crash: bool = True) -> bool:
        """Serve the workers, samples, progress and restarts until ``until()`` or ``timeout``; True if ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return False
            conns = [w.conn for w in self.workers if not w.closed]
            ready = multiprocessing.connection.wait(conns, timeout=min(deadline - now, 0.05)) if conns else []
            if not conns:
                time.sleep(min(deadline - now, 0.05))  # nothing to wait on but the clock (and the broker)
            for conn in ready:
                self._from_worker(next(w for w in self.workers if w.conn is conn), fail_on_crash)
            if tick is not None:
                tick()
            self._housekeeping()
        return True

    def _from_worker(self, w: WorkerHandle, fail_on_crash: bool) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.closed = True
            if not w.bye and fail_on_crash:
                w.proc.join(1)
                raise RunFailed(f"worker process {w.index} exited unexpectedly (exit code {w.proc.exitcode})")
            return
        kind = msg["type"]
        if kind == "progress":
            w.progress = msg
        elif kind == "armed":
            w.armed = True
        elif kind == "report":
            w.report = msg
        elif kind == "bye":
            w.bye = True
        elif kind == "crash":
            w.closed = True
            self.result.failures.append(f"worker process {w.index} crashed:\n{msg['error']}")
            if fail_on_crash:
                raise RunFailed(f"worker process {w.index} crashed")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + self.config.sample_every
            self._sample()
        if self.broker is not None:
            self._restart_step(now)
        if self.out is not None and now >= self._next_print:
            self._next_print = now + PROGRESS_PRINT_EVERY
            self._print_progress(now)

    def _restart_step(self, now: float) -> None:
        broker = self.broker
        assert broker is not None
        if self._restarting_since is not None:
            if broker.check_started():
                self.result.restart_downtime_s.append(round(now - self._restarting_since, 3))
                self._restarting_since = None
                log.info("broker restarted (%d)", self.result.restarts)
            elif now - self._restarting_since > 60.0:
                raise RunFailed("the broker did not come back within 60 s of a restart:\n" + broker.tail())
            return
        if not broker.alive():
            raise RunFailed("the broker died:\n" + broker.tail())
        if self._restarts_enabled and now >= self._next_restart:
            self._next_restart = now + self.config.restart_every
            self._sample()
            broker.kill(getattr(signal, "SIG" + self.config.restart_signal.upper()))
            self._restarting_since = time.monotonic()
            self.result.restarts += 1
            broker.start(wait=None)

    def _sample(self) -> Sample | None:
        if self.sampler is None:
            return None
        return self.sampler.sample(self._broker_pid())

    def _print_progress(self, now: float) -> None:
        assert self.out is not None
        line = (f"[{now - self.t0:7.1f}s] {self.phase:<8} registered {self.total('registered')}/{self.config.clients} "
                f"ready {self.total('ready')} sent {self.total('sent')} acked {self.total('acked')} "
                f"received {self.total('received')} unacked {self.total('outstanding')} errors {self.total('errors')}")
        if self.sampler is not None and self.sampler.samples:
            last = self.sampler.samples[-1]
            line += f" | broker rss {last.rss / 2**20:.1f} MiB cpu {last.cpu:.0f}% fds {last.fds}"
        if self.result.restarts:
            line += f" restarts {self.result.restarts}"
        print(line, file=self.out, flush=True)
