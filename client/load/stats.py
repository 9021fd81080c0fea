"""What the load tool's scripted clients observe, per process, and how processes merge into one total.

Each worker process keeps one ``ProcessStats`` shared by all of its clients:
counters, HdrHistograms (one-way latency, ACK latency, time to register) and
two ledgers of sequence numbers, *acked* (kept by each sender) and *received*
(kept by whoever received from that sender). A message lives in exactly one
recipient, so merging is a sum of counters, an ``add`` of histograms and a
bitwise OR of ledgers; lost = acked and never received, per sender.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

# 1 us .. 1 hour, 3 significant digits: a message stored across a broker restart fits.
HIST_LOWEST_NS = 1_000
HIST_HIGHEST_NS = 3600 * 10**9
HIST_DIGITS = 3
LOST_SAMPLES = 10


def new_histogram():
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(HIST_LOWEST_NS, HIST_HIGHEST_NS, HIST_DIGITS)


def record_ns(hist, value_ns: int) -> None:
    hist.record_value(min(max(value_ns, HIST_LOWEST_NS), HIST_HIGHEST_NS))


class SeqSet:
    """Non-negative sequence numbers as a growable bitmap: O(1) add, cheap OR and count."""

    __slots__ = ("bits",)

    def __init__(self, bits: bytes | bytearray = b"") -> None:
        self.bits = bytearray(bits)

    def add(self, seq: int) -> bool:
        """Add ``seq``; False if it was already there."""
        byte, mask = seq >> 3, 1 << (seq & 7)
        bits = self.bits
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))
        if bits[byte] & mask:
            return False
        bits[byte] |= mask
        return True

    def __contains__(self, seq: int) -> bool:
        byte = seq >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (seq & 7)))

    def __len__(self) -> int:
        return self.as_int().bit_count()

    def as_int(self) -> int:
        return int.from_bytes(self.bits, "little")

    def pack(self) -> bytes:
        return zlib.compress(bytes(self.bits), 1)

    @classmethod
    def unpack(cls, data: bytes) -> SeqSet:
        return cls(zlib.decompress(data))


@dataclass
class ProcessStats:
    """One worker process's observations (its clients write here directly: no per-event objects)."""

    sent: dict[int, int] = field(default_factory=dict)  # sender index -> sequence numbers used (0..n-1)
    acked: dict[int, SeqSet] = field(default_factory=dict)  # sender index -> seqs the broker acknowledged
    received: dict[int, SeqSet] = field(default_factory=dict)  # sender index -> seqs received here
    counters: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error code -> count (unexpected ones only)
    error_samples: list[str] = field(default_factory=list)
    latency: object = field(default_factory=new_histogram)  # send -> receive, ns
    ack_latency: object = field(default_factory=new_histogram)  # send -> ACK, ns
    register_latency: object = field(default_factory=new_histogram)  # connect -> REGISTERED, ns
    file_latency: object = field(default_factory=new_histogram)  # file offered -> FILE_DONE at the sender, ns
    presence: dict[str, list[int]] = field(default_factory=dict)  # "user:online" -> arrival times (ns)
    first_send_ns: int = 0
    last_receive_ns: int = 0

    def error(self, code: str, detail: str) -> None:
        self.errors[code] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{code}: {detail}")

    def record_received(self, sender: int, seq: int) -> bool:
        """True if (sender, seq) is new here; False for a duplicate."""
        ledger = self.received.get(sender)
        if ledger is None:
            ledger = self.received[sender] = SeqSet()
        return ledger.add(seq)

    def record_acked(self, sender: int, seq: int) -> bool:
        ledger = self.acked.get(sender)
        if ledger is None:
            ledger = self.acked[sender] = SeqSet()
        return ledger.add(seq)

    def progress(self) -> dict:
        """The small figures the coordinator watches while the run goes on."""
        c = self.counters
        return {"sent": c["sent"], "acked": c["acked"], "received": c["received"],
                "outstanding": c["outstanding"], "registered": c["registered"], "ready": c["ready_now"],
                "subscribed": c["subscribed_now"], "down": c["down_now"], "senders_done": c["senders_done"],
                "files_open": c["files_open"], "file_bytes": c["file_bytes"],
                "errors": sum(self.errors.values()),
                "presence": {key: len(times) for key, times in self.presence.items()}}

    def export(self) -> dict:
        """A picklable report for the coordinator (histograms encoded, ledgers compressed)."""
        return {
            "sent": dict(self.sent),
            "acked": {k: v.pack() for k, v in self.acked.items()},
            "received": {k: v.pack() for k, v in self.received.items()},
            "counters": dict(self.counters),
            "errors": dict(self.errors),
            "error_samples": list(self.error_samples),
            "latency": self.latency.encode(),
            "ack_latency": self.ack_latency.encode(),
            "register_latency": self.register_latency.encode(),
            "file_latency": self.file_latency.encode(),
            "presence": {k: list(v) for k, v in self.presence.items()},
            "first_send_ns": self.first_send_ns,
            "last_receive_ns": self.last_receive_ns,
        }


def _percentiles_ms(hist) -> dict:
    if hist.get_total_count() == 0:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "count": 0}
    ms = lambda ns: round(ns / 1e6, 3)  # noqa: E731
    return {"p50": ms(hist.get_value_at_percentile(50)), "p90": ms(hist.get_value_at_percentile(90)),
            "p99": ms(hist.get_value_at_percentile(99)), "p999": ms(hist.get_value_at_percentile(99.9)),
            "max": ms(hist.get_max_value()), "count": hist.get_total_count()}


@dataclass
class MergedStats:
    """Every worker's report folded into one: the figures the report prints."""

    sent: int = 0
    acked: int = 0
    received: int = 0
    lost: int = 0
    lost_samples: list[tuple[int, int]] = field(default_factory=list)
    unacked_received: int = 0  # sent, never acknowledged, but received anyway (the ACK was lost)
    counters: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    latency: object = field(default_factory=new_histogram)
    ack_latency: object = field(default_factory=new_histogram)
    register_latency: object = field(default_factory=new_histogram)
    file_latency: object = field(default_factory=new_histogram)
    presence: dict[str, list[int]] = field(default_factory=dict)
    first_send_ns: int = 0
    last_receive_ns: int = 0

    @classmethod
    def merge(cls, reports: list[dict]) -> MergedStats:
        out = cls()
        sent: dict[int, int] = {}
        acked: dict[int, int] = {}
        received: dict[int, int] = {}
        for rep in reports:
            sent.update(rep["sent"])  # a sender lives in one process
            for k, v in rep["acked"].items():
                acked[k] = acked.get(k, 0) | SeqSet.unpack(v).as_int()
            for k, v in rep["received"].items():
                received[k] = received.get(k, 0) | SeqSet.unpack(v).as_int()
            out.counters.update(rep["counters"])
            out.errors.update(rep["errors"])
            out.error_samples += rep["error_samples"][: max(0, 20 - len(out.error_samples))]
            out.latency.decode_and_add(rep["latency"])
            out.ack_latency.decode_and_add(rep["ack_latency"])
            out.register_latency.decode_and_add(rep["register_latency"])
            out.file_latency.decode_and_add(rep["file_latency"])
            for key, times in rep["presence"].items():
                out.presence.setdefault(key, []).extend(times)
            if rep["first_send_ns"]:
                out.first_send_ns = min(out.first_send_ns or rep["first_send_ns"], rep["first_send_ns"])
            out.last_receive_ns = max(out.last_receive_ns, rep["last_receive_ns"])
        out.sent = sum(sent.values())
        out.acked = sum(v.bit_count() for v in acked.values())
        out.received = sum(v.bit_count() for v in received.values())
        for sender, bits in sorted(acked.items()):
            missing = bits & ~received.get(sender, 0)
            if missing:
                out.lost += missing.bit_count()
                while missing and len(out.lost_samples) < LOST_SAMPLES:
                    low = missing & -missing
                    out.lost_samples.append((sender, low.bit_length() - 1))
                    missing ^= low
        for sender, bits in received.items():
            out.unacked_received += (bits & ~acked.get(sender, 0)).bit_count()
        return out

    def latency_ms(self) -> dict:
        return _percentiles_ms(self.latency)

    def ack_latency_ms(self) -> dict:
        return _percentiles_ms(self.ack_latency)

    def register_latency_ms(self) -> dict:
        return _percentiles_ms(self.register_latency)

    def file_latency_ms(self) -> dict:
        return _percentiles_ms(self.file_latency)
