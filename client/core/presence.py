"""The client half of the Clone pattern: a snapshot plus sequence-numbered updates.

Updates that arrive before the snapshot are buffered; each later update must be
exactly last+1 in the same epoch, and a PEER_SYNC beacon ahead of us means we
missed something. Either way the tracker asks for a fresh snapshot.
"""

from __future__ import annotations

from p2pchat.common.protocol import PeerSync, PeerUpdate, Snapshot

MAX_BUFFERED = 10_000


class PresenceTracker:
    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.epoch: bytes | None = None
        self.seq = 0
        self.synced = False
        self._buffer: list[PeerUpdate] = []

    def reset(self) -> None:
        """Forget the sync (e.g. the broker went away); keep showing the last list."""
        self.synced = False
        self._buffer.clear()

    def on_snapshot(self, snap: Snapshot) -> bool:
        """Apply a snapshot and the buffered updates after it. False: still a gap."""
        self.peers = set(snap.peers)
        self.epoch, self.seq, self.synced = snap.epoch, snap.seq, True
        buffered, self._buffer = sorted(self._buffer, key=lambda u: u.seq), []
        for update in buffered:
            if update.epoch == self.epoch and update.seq > self.seq and not self.on_update(update):
                return False
        return True

    def on_update(self, update: PeerUpdate) -> bool:
        """Apply one update. False: the caller must request a snapshot."""
        if not self.synced:
            if len(self._buffer) >= MAX_BUFFERED:
                self._buffer.clear()
            self._buffer.append(update)
            return False
        if update.epoch == self.epoch and update.seq <= self.seq:
            return True  # already in our snapshot
        if update.epoch != self.epoch or update.seq != self.seq + 1:
            self.synced = False
            self._buffer.append(update)
            return False
        self.seq = update.seq
        if update.online:
            self.peers.add(update.user)
        else:
            self.peers.discard(update.user)
        return True

    def on_sync(self, sync: PeerSync) -> bool:
        """A beacon: False when it shows we missed updates or the broker changed."""
        if self.synced and (sync.epoch != self.epoch or sync.seq > self.seq):
            self.synced = False
        return self.synced
