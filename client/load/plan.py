"""What every scripted client of a load run does: the plan, the topology, the message body's stamp."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

BODY = struct.Struct(">IIQq")  # run tag, sender index, sequence number, send time (CLOCK_MONOTONIC ns)
NS = 1_000_000_000
NEVER = 1 << 62

PEER_MODES = ("random", "ring", "pairs")


@dataclass(frozen=True, slots=True)
class ScriptPlan:
    """What every scripted client of a run does; built once by the coordinator, pickled to workers."""

    run_tag: int
    clients: int
    senders: int  # clients 0 .. senders-1 send; every client receives
    peers: str = "random"  # random | ring | pairs
    rate: float = 1.0  # messages per second per sender; 0 (and not flood): no messages
    flood: bool = False  # unpaced: keep ``window`` messages unacknowledged
    window: int = 1000  # most messages one client has unacknowledged
    count: int = 0  # messages per sender; 0: until told to stop
    size: int = BODY.size  # body bytes
    heartbeat: float = 0.0  # seconds; 0: the broker's REGISTERED heartbeat_ms (1 s until known), else min of both
    liveness: int = 3
    receipts: bool = False  # send a DELIVERED receipt per message, as the real client does
    churn_every: float = 0.0  # mean seconds between a client's reconnects; 0: no churn
    churn_down: float = 0.5  # seconds a churned client stays away
    churn_crash: bool = False  # churn without UNREGISTER (a crash), coming back with the same token
    inject_drop: int = -1  # TEST HOOK: client 0 pretends its message with this seq was acked, never sends it
    inject_dup: int = -1  # TEST HOOK: client 0 sends its message with this seq twice (fresh message ids)
    file_every: float = 0.0  # seconds between a sender's file offers, on average; 0: no file traffic
    file_size: int = 1024 * 1024
    seed: int = 0

    @property
    def sends(self) -> bool:
        return self.flood or self.rate > 0


def peer_of(index: int, plan: ScriptPlan, rng: random.Random) -> int:
    """The recipient of ``index``'s next message under the plan's topology."""
    n = plan.clients
    if plan.peers == "ring":
        return (index + 1) % n
    if plan.peers == "pairs":
        partner = index ^ 1
        return partner if partner < n else (index + 1) % n  # odd count: the last one talks to 0
    other = rng.randrange(n - 1)
    return other + (other >= index)
