"""Connection guard: what libzmq does not bound, watched from outside and cut at the TCP level.

libzmq keeps the parts of an unfinished multipart message without limit (outside the high-water
mark; ``ZMQ_MAXMSGSIZE`` is per frame), and keeps a connection that never registers for ever. The
guard learns each accepted connection's descriptor from the socket monitor, maps ROUTER routing ids
to descriptors (the ``SRCFD`` property of received frames) and counts what the application received
from each. When the process RSS climbs past a watermark it asks the kernel how many bytes each
connection delivered (``TCP_INFO`` ``tcpi_bytes_received``). A connection that delivered more bytes
the application has not received than it may (``max_unread`` with a session, ``stranger_unread``
for a subscriber or a connection without one), and that hands the application nothing
for ``STRIKES`` checks in a row, is stuck inside a message that never ends (a connection that is
only behind on whole messages delivers some): it is cut with ``shutdown()`` on its descriptor
(libzmq then tears the pipe down and frees the parts), and glibc gives the memory back. ROUTER connections without a session after
``unregistered_beats`` heartbeat intervals are cut the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import zmq

log = logging.getLogger(__name__)

STRIKES = 2  # checks in a row a suspect may deliver nothing before it is cut
TCPI_BYTES_RECEIVED = 128  # offset of the u64 in struct tcp_info (Linux >= 4.1)
PONG_ALLOWANCE = 16  # bytes/s a subscriber sends that we never read (ZMTP PONGs to our PINGs)
WIRE_OVERHEAD = 48  # ZMTP + CURVE bytes per frame on top of its payload, rounded up: over-counting is safe
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class GuardLimits:
    check_every: float = 0.01  # seconds between RSS reads (one pread of /proc/self/statm)
    rss_step: int = 16 * 2**20  # RSS growth since the last scan that triggers a scan of every connection
    max_unread: int = 4 * 2**20  # bytes a session's connection may have delivered that we have not received
    stranger_unread: int = 64 * 2**10  # the same for a subscriber or a ROUTER connection without a session
    unregistered_beats: float = 10.0  # heartbeat intervals a ROUTER connection may stay without a session
    trim_threshold: int = 8 * 2**20  # free heap top glibc keeps (see _Libc.cap_trim_threshold)


def pick_culprits(excess: dict[int, int]) -> list[int]:
    """The descriptors holding more unreceived bytes than they may (excess > 0), worst first."""
    return sorted((fd for fd, n in excess.items() if n > 0), key=lambda fd: -excess[fd])


class _Libc:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or None)

    def trim(self) -> None:
        trim = getattr(self._libc, "malloc_trim", None)
        if trim is not None:  # glibc only
            trim(0)

    def cap_trim_threshold(self, size: int) -> None:
        """glibc shrinks a thread arena's heap only when its free top exceeds M_TRIM_THRESHOLD, and
        malloc_trim never does: with common/allocator.py's 64 MiB, what a cut connection held (freed on
        libzmq's I/O thread) stayed in the broker, 20 MiB more per flood."""
        mallopt = getattr(self._libc, "mallopt", None)
        if mallopt is not None:
            mallopt(ctypes.c_int(-1), ctypes.c_int(size))  # M_TRIM_THRESHOLD

    def seed_rand(self) -> None:
        """libzmq starts a ROUTER's routing ids at libc ``rand()``: unseeded, 0x6b8b4567 in every process."""
        self._libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "big")))


LIBC = _Libc()


class ConnectionGuard:
    """Descriptors of a ROUTER's and a PUB's accepted connections, and what the application read from them."""

    def __init__(self, limits: GuardLimits, heartbeat_ivl: float, registered: Callable[[bytes], bool]) -> None:
        self.limits = limits
        self.unregistered_timeout = limits.unregistered_beats * heartbeat_ivl
        self._registered = registered  # routing id -> has a session
        self._router: dict[int, list] = {}  # fd -> [accepted at (or last seen registered), routing id or None]
        self._read: dict[bytes, int] = {}  # routing id -> bytes the application received from it (over-counted)
        self._suspects: dict[int, list] = {}  # fd -> [bytes read when suspected, checks without progress]
        self._pub: dict[int, float] = {}  # fd -> accepted at
        LIBC.cap_trim_threshold(limits.trim_threshold)
        self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        self._watermark = self.rss() + limits.rss_step
        self._next_check = 0.0
        self._next_sweep = 0.0
        self._trims = 0  # trims still to do after a cut: libzmq frees the parts on its I/O thread, later

    def rss(self) -> int:
        return int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE

    # --- events from the shell ---------------------------------------------------------
    def accepted(self, fd: int, pub: bool, now: float) -> None:
        if pub:
            self._pub[fd] = now
        else:
            self.disconnected(fd, False)
            self._router[fd] = [now, None]

    def disconnected(self, fd: int, pub: bool) -> None:
        self._suspects.pop(fd, None)
        if pub:
            self._pub.pop(fd, None)
            return
        entry = self._router.pop(fd, None)
        if entry is not None and entry[1] is not None:
            self._read.pop(entry[1], None)

    def received(self, conn: bytes, parts: list) -> None:
        """A message the application received from ``conn`` (``parts`` as received, routing id first)."""
        size = sum(map(len, parts)) + WIRE_OVERHEAD * len(parts)
        try:
            self._read[conn] += size  # the hot path: one dict update per message
        except KeyError:
            self._learn(conn, parts, size)

    def _learn(self, conn: bytes, parts: list, size: int) -> None:
        try:
            fd = parts[1].get(zmq.SRCFD) if len(parts) > 1 else None
        except zmq.ZMQError:
            return
        entry = self._router.get(fd)
        if entry is None or entry[1] is not None:
            return  # the monitor has not told us yet, or the descriptor is another's: learn it next time
        entry[1] = conn
        self._read[conn] = size

    # --- periodic checks -----------------------------------------------------------------
    def next_check(self) -> float:
        return self._next_check

    def check(self, now: float) -> None:
        if now < self._next_check:
            return
        self._next_check = now + self.limits.check_every
        if self._trims:
            self._trims -= 1
            LIBC.trim()
        rss = self.rss()
        if rss > self._watermark:
            self._scan(now)
            self._watermark = rss + self.limits.rss_step
        else:
            self._watermark = min(self._watermark, rss + self.limits.rss_step)
        if self._suspects:
            self._judge(now)
        if now >= self._next_sweep:
            self._next_sweep = now + min(1.0, self.unregistered_timeout / 4)
            self._sweep_unregistered(now)

    def _excess(self, fd: int, now: float) -> tuple[int, int]:
        """(bytes delivered by the kernel, not received by us, beyond what this connection may hold;
        bytes we received). A subscriber sends us nothing but subscriptions and PONGs, and a connection
        without a session nothing but a small REGISTER: they may hold little."""
        entry = self._router.get(fd)
        if entry is None:  # a PUB connection: we never read from those
            allowance = self.limits.stranger_unread + int(PONG_ALLOWANCE * (now - self._pub.get(fd, now)))
            return _bytes_received(fd) - allowance, 0
        conn = entry[1]
        read = self._read.get(conn, 0) if conn is not None else 0
        may = self.limits.max_unread if conn is not None and self._registered(conn) else self.limits.stranger_unread
        return _bytes_received(fd) - read - may, read

    def _scan(self, now: float) -> None:
        """Memory grew: every connection holding more unread than it may becomes a suspect."""
        excess = {fd: self._excess(fd, now)[0] for fd in (*self._router, *self._pub)}
        for fd in pick_culprits(excess):
            self._suspects.setdefault(fd, [self._excess(fd, now)[1], 0])

    def _judge(self, now: float) -> None:
        """A suspect that delivers nothing for ``STRIKES`` checks in a row is stuck inside a message that
        never ends (libzmq hands nothing of a connection over until its current message is whole):
        cut it. One that delivers is only behind (a backlog of whole messages): let it be."""
        for fd, (read_then, strikes) in list(self._suspects.items()):
            if fd not in self._router and fd not in self._pub:
                del self._suspects[fd]
                continue
            excess, read = self._excess(fd, now)
            if excess <= 0 or read != read_then:
                del self._suspects[fd]
            elif strikes + 1 < STRIKES:
                self._suspects[fd][1] = strikes + 1
            else:
                del self._suspects[fd]
                log.warning("connection fd=%d cut: %d bytes more than it may are held inside ZeroMQ unread (an "
                            "unfinished multipart message?)%s", fd, excess, "" if fd in self._pub else
                            f" conn={(self._router[fd][1] or b'').hex() or '?'}")
                self._cut(fd)

    def _sweep_unregistered(self, now: float) -> None:
        timeout = self.unregistered_timeout
        for fd, entry in list(self._router.items()):
            if entry[1] is not None and self._registered(entry[1]):
                entry[0] = now  # registered now: the timeout counts from when it last was
            elif now - entry[0] > timeout:
                log.info("connection fd=%d conn=%s cut: no session for %.0fs", fd,
                         (entry[1] or b"").hex() or "?", timeout)
                self._cut(fd)
                self.disconnected(fd, False)

    def _cut(self, fd: int) -> None:
        try:
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)  # libzmq sees the end of the stream and drops the connection
        except OSError as exc:
            log.info("cutting fd=%d: %s", fd, exc)
        self._trims = 10

    def close(self) -> None:
        os.close(self._statm)


def _bytes_received(fd: int) -> int:
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            info = dup.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_BYTES_RECEIVED + 8)
    except OSError:
        return 0
    return struct.unpack_from("Q", info, TCPI_BYTES_RECEIVED)[0] if len(info) >= TCPI_BYTES_RECEIVED + 8 else 0
