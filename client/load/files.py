"""The load tool's file traffic: when a sender offers a file, and what the ends of transfers count.

With ``--files SECONDS`` every sender offers a file of ``--file-size`` bytes to
one of its peers about that often, one transfer at a time. The transfer is the
library's (``client/core/transfer.py`` through the client's ``ClientSession``):
credit, chunks with a CRC-32 each and the SHA-256 of the whole file, re-offers
and re-credits after a loss, resume after churn or a broker restart, the
``.part`` file and its verification. Transfers are unencrypted: sealing is off
in the load tool, which measures the broker, not client crypto.

The file is one random block repeated, written once per worker process (seeded
by the run). Each client's transfer state and received files live under the
worker's scratch directory (on /dev/shm where there is one, so no disk is
measured); a received file is deleted once it is verified. A transfer that
makes no progress for ``GIVE_UP_AFTER`` fails with ``timeout`` and is counted,
as is one whose peer the broker says is gone.

No sockets, no clock reads: ``now`` in, actions out, for ``client/load/script.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action
from p2pchat.client.core.transfer import CHUNK_SIZE, REF_PREFIX, TransferConfig, TransferManager
from p2pchat.client.e2e import NO_SEALING
from p2pchat.client.storage.transfers import LocalFiles, RecordDir
from p2pchat.client.load.plan import NEVER, NS, peer_of
from p2pchat.client.load.stats import record_ns
from p2pchat.common.errors import ErrorCode

if TYPE_CHECKING:
    from p2pchat.client.load.script import ScriptedClient

STALL_TIMEOUT = 3.0  # the real client's: three heartbeats of 1 s
GIVE_UP_AFTER = 30.0  # seconds a transfer may make no progress before it fails with timeout
PEER_GONE = (ErrorCode.RECIPIENT_OFFLINE, ErrorCode.RECIPIENT_BUSY, ErrorCode.UNKNOWN_RECIPIENT)


def write_source(directory: Path, size: int, seed: int) -> Path:
    """The run's file: one random block (the same in every worker process) repeated up to ``size`` bytes."""
    path = directory / f"load-{size}.bin"
    block = random.Random(seed).randbytes(min(size, CHUNK_SIZE))
    with open(path, "wb") as out:
        for offset in range(0, size, len(block) or 1):
            out.write(block[: size - offset])
    return path


LOCAL_FILES = LocalFiles()  # every client of a worker process shares it: no writer threads, no buffers of its own


def make_transfers(user: str, scratch: Path, wall_ms: Callable[[], int], wall_time: Callable[[], float],
                   new_id: Callable[[], bytes]) -> TransferManager:
    """The library's transfer core for one load client, its state under ``scratch``; no writer threads."""
    home = scratch / user
    config = TransferConfig(home / "received", stall_timeout=STALL_TIMEOUT, give_up_after=GIVE_UP_AFTER)
    return TransferManager(user, config, NO_SEALING, wall_ms=wall_ms, wall_time=wall_time, new_id=new_id,
                           files=LOCAL_FILES, records=RecordDir(home / "transfers", user))


class FileScript:
    """One scripted client's file traffic: its schedule of offers, and the accounting of its transfers' ends."""

    __slots__ = ("client", "sending", "next_offer_at", "xfer", "started")

    def __init__(self, client: ScriptedClient) -> None:
        self.client = client
        self.sending = False
        self.next_offer_at = NEVER
        self.xfer: bytes | None = None  # the transfer this client is sending (one at a time)
        self.started = 0

    def start(self, now: int) -> None:
        self.sending = True
        self._schedule(now)

    def stop(self) -> None:
        """No new offers; transfers under way go on."""
        self.sending = False
        self.next_offer_at = NEVER

    def next_deadline(self) -> int:
        return self.next_offer_at if self.xfer is None else NEVER

    def on_tick(self, now: int) -> list[Action]:
        if not self.sending or self.xfer is not None or now < self.next_offer_at:
            return []
        client = self.client
        crowd = client.crowd
        peer = crowd.names[peer_of(client.index, crowd.plan, crowd.rng)]
        self.xfer, actions = client.session.send_file(peer, crowd.file_source, now / NS)
        self.started = now
        self.next_offer_at = NEVER
        crowd.stats.counters["files_offered"] += 1
        crowd.stats.counters["files_open"] += 1  # until it ends one way or another: the drain waits for it
        return actions

    def owns(self, ref: bytes) -> bool:
        """Whether the broker's ACK ``ref`` is of our offer (a transfer's frames' ids start with its id)."""
        return self.xfer is not None and ref[:REF_PREFIX] == self.xfer[:REF_PREFIX]

    def on_event(self, event: ev.Event, now: int) -> None:
        stats = self.client.crowd.stats
        counters = stats.counters
        if type(event) is ev.FileSent and event.xfer == self.xfer:
            counters["files_done"] += 1
            record_ns(stats.file_latency, now - self.started)
            self._ended(now)
        elif type(event) is ev.FileReceived:
            counters["files_received"] += 1
            counters["file_bytes"] += event.size
            event.path.unlink(missing_ok=True)  # verified: its bytes are not needed
        elif type(event) is ev.FileFailed:
            code = event.error.code
            if code is ErrorCode.TIMEOUT:
                counters["files_timed_out"] += 1
            elif code in PEER_GONE:  # churn or a restart took the peer away
                counters["files_peer_gone"] += 1
            else:
                stats.error(code.value, f"{self.client.user}: file {event.direction} {event.peer}: "
                                        f"{event.error.message}")
            if event.xfer == self.xfer:
                self._ended(now)

    def _ended(self, now: int) -> None:
        self.xfer = None
        self.client.crowd.stats.counters["files_open"] -= 1
        self._schedule(now)

    def _schedule(self, now: int) -> None:
        if self.sending and self.xfer is None:
            every = self.client.crowd.plan.file_every * NS
            self.next_offer_at = now + int(every * (0.5 + self.client.crowd.rng.random()))
