"""PresenceTracker, the client half of the Clone pattern: snapshot + updates that must be last+1."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.client.core.presence import PresenceTracker
from p2pchat.common.protocol import PeerSync, PeerUpdate, Snapshot

E1, E2 = b"epoch-01", b"epoch-02"


class History:
    """What the broker published: updates 1..n in one epoch, and the peer set after each."""

    def __init__(self, changes: list[tuple[str, bool]], epoch: bytes = E1) -> None:
        self.epoch = epoch
        self.states: list[frozenset[str]] = [frozenset()]
        self.updates: list[PeerUpdate] = []
        for seq, (user, online) in enumerate(changes, start=1):
            current = set(self.states[-1])
            current.add(user) if online else current.discard(user)
            self.states.append(frozenset(current))
            self.updates.append(PeerUpdate(epoch, seq, user, online))

    @property
    def last(self) -> int:
        return len(self.updates)

    def update(self, seq: int) -> PeerUpdate:
        return self.updates[seq - 1]

    def snapshot(self, seq: int | None = None) -> Snapshot:
        seq = self.last if seq is None else seq
        return Snapshot(self.epoch, seq, tuple(sorted(self.states[seq])))

    def sync(self, seq: int | None = None) -> PeerSync:
        return PeerSync(self.epoch, self.last if seq is None else seq)


def synced_tracker(history: History, seq: int = 0) -> PresenceTracker:
    tracker = PresenceTracker()
    assert tracker.on_snapshot(history.snapshot(seq))
    return tracker


HISTORY = History([("alice", True), ("bob", True), ("carol", True), ("bob", False), ("dave", True)])


# --- examples -------------------------------------------------------------------------
def test_snapshot_gives_the_peer_list_and_sequence():
    tracker = synced_tracker(HISTORY, 3)
    assert (tracker.peers, tracker.seq, tracker.epoch, tracker.synced) == ({"alice", "bob", "carol"}, 3, E1, True)


def test_next_update_in_sequence_is_applied():
    tracker = synced_tracker(HISTORY, 3)
    assert tracker.on_update(HISTORY.update(4))
    assert tracker.peers == {"alice", "carol"} and tracker.seq == 4


def test_gap_means_on_update_returns_false():
    tracker = synced_tracker(HISTORY, 2)
    assert not tracker.on_update(HISTORY.update(4))  # 3 was lost
    assert not tracker.synced
    assert tracker.peers == {"alice", "bob"}  # nothing applied out of order


def test_old_and_duplicate_updates_are_ignored():
    tracker = synced_tracker(HISTORY, 3)
    assert tracker.on_update(HISTORY.update(2))
    assert tracker.on_update(HISTORY.update(3))
    assert tracker.synced and tracker.seq == 3 and tracker.peers == {"alice", "bob", "carol"}


def test_updates_before_the_snapshot_are_buffered_and_applied_after_it():
    tracker = PresenceTracker()
    assert not tracker.on_update(HISTORY.update(3))
    assert not tracker.on_update(HISTORY.update(4))
    assert tracker.on_snapshot(HISTORY.snapshot(2))
    assert (tracker.seq, tracker.peers) == (4, set(HISTORY.states[4]))


def test_snapshot_leaving_a_gap_before_buffered_updates_reports_it():
    tracker = PresenceTracker()
    tracker.on_update(HISTORY.update(5))
    assert not tracker.on_snapshot(HISTORY.snapshot(3))  # 4 is still missing


def test_sync_beacon_ahead_of_us_means_we_missed_updates():
    tracker = synced_tracker(HISTORY, 4)
    assert tracker.on_sync(HISTORY.sync(4))
    assert not tracker.on_sync(HISTORY.sync(5))
    assert not tracker.synced


def test_sync_before_any_snapshot_is_not_in_sync():
    assert not PresenceTracker().on_sync(HISTORY.sync(0))


def test_epoch_change_in_an_update_forces_a_resync():
    tracker = synced_tracker(HISTORY, 5)
    restarted = History([("alice", True)], epoch=E2)
    assert not tracker.on_update(restarted.update(1))  # seq 1 <= 5, but a new epoch: not "old"
    assert not tracker.synced
    assert tracker.on_snapshot(restarted.snapshot(0))
    assert (tracker.epoch, tracker.seq, tracker.peers) == (E2, 1, {"alice"})  # the buffered update applied


def test_epoch_change_in_a_sync_beacon_forces_a_resync():
    tracker = synced_tracker(HISTORY, 5)
    assert not tracker.on_sync(PeerSync(E2, 0))
    assert not tracker.synced


def test_reset_keeps_the_last_list_but_drops_the_sync():
    tracker = synced_tracker(HISTORY, 5)
    tracker.reset()
    assert not tracker.synced and tracker.peers == set(HISTORY.states[5])
    assert not tracker.on_update(HISTORY.update(5))  # buffered until the next snapshot


# --- properties -------------------------------------------------------------------------
users = st.sampled_from(["alice", "bob", "carol", "dave", "erin"])
histories = st.lists(st.tuples(users, st.booleans()), max_size=30).map(History)


@st.composite
def deliveries(draw, history: History):
    """What one subscriber sees: updates lost, repeated and reordered; snapshots and beacons of any age."""
    seqs = st.integers(1, history.last) if history.last else st.nothing()
    any_seq = st.integers(0, history.last)
    event = st.one_of(
        st.tuples(st.just("update"), seqs),
        st.tuples(st.just("snapshot"), any_seq),
        st.tuples(st.just("sync"), any_seq),
    )
    return draw(st.lists(event, max_size=60))


def deliver(tracker: PresenceTracker, history: History, kind: str, seq: int) -> bool:
    if kind == "update":
        return tracker.on_update(history.update(seq))
    if kind == "snapshot":
        return tracker.on_snapshot(history.snapshot(seq))
    return tracker.on_sync(history.sync(seq))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), history=histories)
def test_tracker_in_sync_always_shows_the_truth_for_its_seq(data, history):
    tracker = PresenceTracker()
    for kind, seq in data.draw(deliveries(history)):
        in_sync = deliver(tracker, history, kind, seq)
        assert in_sync == tracker.synced
        if in_sync:
            assert tracker.epoch == history.epoch
            assert tracker.peers == set(history.states[tracker.seq])
    assert tracker.on_snapshot(history.snapshot())
    assert tracker.on_sync(history.sync())
    assert tracker.peers == set(history.states[-1]) and tracker.seq == history.last


@settings(max_examples=300, deadline=None)
@given(data=st.data(), history=histories)
def test_a_subscriber_that_resnapshots_on_every_gap_tracks_the_truth(data, history):
    """Late join with stray updates buffered, then the live stream; every False costs one snapshot."""
    tracker = PresenceTracker()
    for kind, seq in data.draw(deliveries(history)):
        if kind == "update":  # arrived before we asked for a snapshot: buffered, never applied
            assert not tracker.on_update(history.update(seq))
    assert tracker.peers == set()
    start = data.draw(st.integers(0, history.last))
    in_sync = tracker.on_snapshot(history.snapshot(start))
    for seq in range(start + 1, history.last + 1):
        in_sync = tracker.on_update(history.update(seq))
        if not in_sync:  # what the session does: ask for a snapshot, which reflects the broker now
            in_sync = tracker.on_snapshot(history.snapshot(seq))
        if in_sync:
            assert tracker.peers == set(history.states[tracker.seq])
    if not in_sync:
        in_sync = tracker.on_snapshot(history.snapshot())
    assert in_sync and tracker.on_sync(history.sync())
    assert tracker.peers == set(history.states[-1]) and tracker.seq == history.last


@settings(max_examples=200, deadline=None)
@given(history=histories.filter(lambda h: h.last >= 2), data=st.data())
def test_any_skipped_update_is_detected(history, data):
    start = data.draw(st.integers(0, history.last - 2))
    skip_to = data.draw(st.integers(start + 2, history.last))
    tracker = synced_tracker(history, start)
    assert not tracker.on_update(history.update(skip_to))
    assert tracker.peers == set(history.states[start])
