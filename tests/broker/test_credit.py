"""The broker's credit ledger (broker/core/credit.py): windows, in-flight bytes and their bounds."""

from __future__ import annotations

from p2pchat.broker.core.credit import CreditLedger, CreditLimits

X, Y = b"x" * 16, b"y" * 16
LIMITS = CreditLimits(max_window=4, inflight_per_recipient=10, inflight_total=15, transfers_per_recipient=2,
                      transfers_total=3, idle_seconds=60.0)


def test_a_chunk_needs_a_credit_covering_its_index():
    ledger = CreditLedger(LIMITS)
    assert not ledger.admit("alice", "bob", X, 0, 1, 0.0)
    ledger.on_credit("alice", "bob", X, 2, 5, 0.0)
    assert [ledger.admit("alice", "bob", X, i, 1, 0.0) for i in range(6)] == [False, False, True, True, True, False]


def test_a_huge_credit_is_clamped_to_the_broker_window():
    ledger = CreditLedger(LIMITS)
    ledger.on_credit("alice", "bob", X, 0, 2**62, 0.0)
    assert [ledger.admit("alice", "bob", X, i, 1, 0.0) for i in range(5)] == [True] * 4 + [False]


def test_inflight_bytes_are_capped_per_recipient_and_released_by_the_next_credit():
    ledger = CreditLedger(LIMITS)
    ledger.on_credit("alice", "bob", X, 0, 4, 0.0)
    assert [ledger.admit("alice", "bob", X, i, 4, 0.0) for i in range(3)] == [True, True, False]  # 10 bytes
    assert ledger.inflight_to("bob") == 8
    ledger.on_credit("alice", "bob", X, 1, 5, 0.0)  # bob holds chunk 0
    assert ledger.inflight_to("bob") == 4 and ledger.admit("alice", "bob", X, 2, 4, 0.0)


def test_a_resent_chunk_counts_again_until_credited():
    ledger = CreditLedger(LIMITS)
    ledger.on_credit("alice", "bob", X, 0, 4, 0.0)
    assert [ledger.admit("alice", "bob", X, 0, 3, 0.0) for _ in range(4)] == [True, True, True, False]
    ledger.on_credit("alice", "bob", X, 1, 4, 0.0)
    assert ledger.inflight_total == 0


def test_the_total_cap_holds_across_recipients():
    ledger = CreditLedger(LIMITS)
    ledger.on_credit("alice", "bob", X, 0, 4, 0.0)
    ledger.on_credit("alice", "carol", X, 0, 4, 0.0)
    assert ledger.admit("alice", "bob", X, 0, 10, 0.0) and not ledger.admit("alice", "carol", X, 0, 6, 0.0)
    ledger.unadmit("alice", "bob", X, 0, 10)  # the shell could not hand it over
    assert ledger.admit("alice", "carol", X, 0, 6, 0.0)


def test_done_cancel_disconnect_and_idleness_release_what_they_hold():
    ledger = CreditLedger(LIMITS)
    ledger.on_credit("alice", "bob", X, 0, 4, 0.0)
    ledger.on_credit("carol", "bob", Y, 0, 4, 0.0)
    ledger.admit("alice", "bob", X, 0, 3, 0.0)
    ledger.admit("carol", "bob", Y, 0, 3, 0.0)
    ledger.forget("alice", "bob", X)
    assert ledger.inflight_to("bob") == 3 and not ledger.admit("alice", "bob", X, 1, 1, 0.0)
    ledger.recipient_gone("bob")  # its queue went with its connection; the window stays for a reconnect
    assert ledger.inflight_total == 0 and ledger.admit("carol", "bob", Y, 1, 1, 0.0)
    assert ledger.expire(30.0) == 0 and ledger.expire(61.0) == 1 and ledger.transfer_count == 0


def test_the_number_of_transfers_is_bounded_per_recipient_and_in_all():
    ledger = CreditLedger(LIMITS)
    for i in range(3):
        ledger.on_credit("alice", "bob", bytes([i]) * 16, 0, 4, 0.0)
    assert ledger.transfer_count == 2 and not ledger.admit("alice", "bob", b"\x02" * 16, 0, 1, 0.0)
    ledger.on_credit("alice", "carol", X, 0, 4, 0.0)
    ledger.on_credit("alice", "dave", X, 0, 4, 0.0)
    assert ledger.transfer_count == 3
