"""Keep glibc from handing bulk-transfer buffers back to the kernel after every chunk.

File chunks are 512 KiB. By default glibc serves blocks that size with mmap, or
trims the top of the heap as soon as they are freed, so every chunk costs fresh
pages: page faults and zeroed memory in the sender, in the broker's I/O thread
and in the receiver (bench/bench_files.py: the sender's system time fell from
0.8 to 0.15 s per GiB once tuned). A fixed mmap threshold above the largest
frame and a larger trim threshold keep those pages in the process for the next
chunk; the memory kept is bounded by what a window of chunks needs at its peak.
"""

from __future__ import annotations

import ctypes
import logging
import sys

from p2pchat.common.protocol import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * MAX_FRAME_BYTES  # every frame we make or receive stays on the heap
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_for_bulk_transfer() -> bool:
    """Set glibc's malloc thresholds for this process; False where there is no glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the bulk-transfer thresholds; keeping the allocator's defaults")
    return ok
