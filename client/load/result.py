"""What a load run found: the record the coordinator fills in and the report summarises, and how a run fails."""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pchat.client.load.broker import Sample
from p2pchat.client.load.config import LoadConfig


class RunFailed(Exception):
    """The run could not do what it was asked (the report says how far it got)."""


@dataclass
class RunResult:
    """What happened, for ``client/load/report.py`` to summarise."""

    config: LoadConfig
    processes: int = 0
    server: str = ""
    spawned: bool = False
    transport: str = "curve"
    reports: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    rss_baseline: int | None = None
    rss_registered: int | None = None
    rss_send_end: int | None = None
    broker_fd_limit: int | None = None
    broker_cpu_send_s: float | None = None
    broker_main_thread_cpu_send_s: float | None = None  # Python's share of it
    broker_warnings: int = 0
    broker_tail: str = ""
    restarts: int = 0
    restart_downtime_s: list[float] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)  # {"user", "online", "t0_ns", "subscribers"}
    registered: int = 0
    broker_stop_s: float | None = None  # SIGTERM to exit, for a broker we started
    broker_exit_code: int | None = None
    machine_busy_cpus: float | None = None  # all processes on the host, while sending (others' load skews figures)
