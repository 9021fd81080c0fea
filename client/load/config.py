"""The load tool's configuration: one frozen dataclass, built once from the command line."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from p2pchat.client.load.worker import FDS_PER_SOCKET
from p2pchat.common.endpoints import ServerAddress

CLIENTS_PER_PROCESS = 2500  # a worker keeps up with about this many at low rates; fds are the other bound
FD_HEADROOM = 200


@dataclass(frozen=True, slots=True)
class LoadConfig:
    clients: int = 10
    duration: float = 10.0  # seconds of sending (an upper bound with ``count``)
    rate: float = 1.0  # messages per second per sender; 0: registered and idle
    flood: bool = False  # unpaced, ``window`` unacknowledged per sender
    window: int = 1000
    count: int = 0  # messages per sender; 0: send for ``duration``
    senders: int | None = None  # default: every client
    peers: str = "random"
    size: int = 32
    receipts: bool = False
    ramp: float = 0.0  # seconds over which clients connect
    processes: int | None = None
    server: ServerAddress | None = None  # None: start our own broker
    pub_port: int | None = None
    key_port: int | None = None
    server_key: str | None = None  # a fingerprint to pin
    insecure: bool = False
    subscribe: bool = False
    probes: int = 1
    drain: float = 10.0  # grace period after sending for the rest to arrive
    register_timeout: float | None = None
    soak: bool = False
    churn_every: float = 0.0
    churn_down: float = 0.5
    churn_crash: bool = False
    restart_every: float = 0.0
    restart_signal: str = "KILL"
    broker_cmd: str | None = None
    broker_args: tuple[str, ...] = ()
    broker_heartbeat: float = 1.0
    broker_rate_limit: float = 1_000_000.0
    broker_pid: int | None = None
    sample_every: float = 1.0
    nofile: int | None = None
    json: bool = False
    quiet: bool = False
    seed: int | None = None
    heartbeat: float = 0.0  # the clients' own interval cap; 0: follow the broker's REGISTERED heartbeat_ms
    inject_drop: int = -1  # test hook, see ScriptPlan
    inject_dup: int = -1  # test hook, see ScriptPlan
    files: float = 0.0  # seconds between a sender's file offers; 0: no file traffic
    file_size: int = 1024 * 1024
    max_rss_growth_mib: float | None = None

    @property
    def spawn_broker(self) -> bool:
        return self.server is None

    @property
    def sender_count(self) -> int:
        return self.clients if self.senders is None else min(self.senders, self.clients)

    @property
    def fds_per_client(self) -> int:
        return FDS_PER_SOCKET * (2 if self.subscribe else 1)

    def process_count(self, fd_limit: int) -> int:
        """Enough worker processes for the clients to fit each one's fd limit, and at most one per client."""
        if self.processes:
            return max(1, min(self.processes, self.clients))
        per_process = max(1, min(CLIENTS_PER_PROCESS, (fd_limit - FD_HEADROOM) // self.fds_per_client))
        wanted = max(math.ceil(self.clients / per_process), min(os.cpu_count() or 1, math.ceil(self.clients / 500)))
        return max(1, min(wanted, self.clients))

    def register_budget(self) -> float:
        """How long the ramp plus registration may take before the run fails."""
        if self.register_timeout is not None:
            return self.ramp + self.register_timeout
        return self.ramp + 30.0 + self.clients / 200.0
