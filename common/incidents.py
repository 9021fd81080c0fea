"""Repeated incidents (bad frames, refusals, drops) counted per key and logged aggregated.

A flood must not become a flood of log lines or of replies. A key's first incident in a period is
"news": ``record`` returns True so the caller may log it, reply or report it; the rest of the period
is only counted, and ``flush`` writes one line per key with the count. At most ``max_keys`` keys are
tracked; past that the rest share one count.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable


class IncidentLog:
    def __init__(self, what: str, logger: logging.Logger, interval: float = 10.0, max_keys: int = 10_000) -> None:
        self.what, self.interval, self.max_keys = what, interval, max_keys
        self._log = logger
        self._seen: dict[Hashable, list] = {}  # key -> [period start, count since, label, last detail]
        self._untracked = 0
        self._next_flush = 0.0

    def record(self, key: Hashable, label: str, detail: str, now: float, quiet: bool = False) -> bool:
        """Count one incident; True when it is ``key``'s first in its period (then it is logged,
        unless ``quiet``: the caller reports it its own way)."""
        entry = self._seen.get(key)
        if entry is not None:
            entry[1] += 1
            entry[3] = detail
            return False
        if len(self._seen) >= self.max_keys:
            self._untracked += 1
            return False
        self._seen[key] = [now, 0, label, detail]
        if not quiet:
            self._log.warning("%s %s: %s (more are counted, logged every %.0fs)", label, self.what, detail,
                              self.interval)
        return True

    def forget(self, key: Hashable) -> None:
        """``key`` is gone (a closed connection): its count is written now, not at the next period."""
        entry = self._seen.pop(key, None)
        if entry is not None and entry[1]:
            self._write(entry, entry[0])

    def flush(self, now: float) -> None:
        """Write each period that has ended; cheap to call on every tick."""
        if now < self._next_flush:
            return
        self._next_flush = now + min(1.0, self.interval)
        ended = [key for key, entry in self._seen.items() if now - entry[0] >= self.interval]
        for key in ended:
            entry = self._seen.pop(key)
            if entry[1]:
                self._write(entry, now)
        if self._untracked:
            self._log.warning("%d more %s past the %d keys tracked", self._untracked, self.what, self.max_keys)
            self._untracked = 0

    def _write(self, entry: list, now: float) -> None:
        self._log.warning("%s %d more %s in %.0fs, the last: %s", entry[2], entry[1], self.what,
                          max(now - entry[0], 0.0), entry[3])
