"""Recovery phrases and proofs (common/recovery.py; docs/PROTOCOL.md §10.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pchat.common.recovery import (
    PhraseError,
    RecoveryKey,
    new_phrase,
    normalise_phrase,
    recovery_statement,
    verify_recovery,
)

# BIP39's first test vector: 128 zero bits.
ZERO_PHRASE = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"
BROKER, NEW = b"b" * 32, b"n" * 32


def test_a_new_phrase_is_twelve_words_that_check_out():
    phrase = new_phrase()
    assert len(phrase.split(" ")) == 12 and normalise_phrase(phrase) == phrase
    assert new_phrase() != phrase


def test_a_phrase_is_read_whatever_its_case_and_spacing():
    assert normalise_phrase("  " + ZERO_PHRASE.upper().replace(" ", " \n\t ") + "\n") == ZERO_PHRASE


@pytest.mark.parametrize("text, why", [
    ("abandon " * 11, "12 words"),
    (ZERO_PHRASE + " about", "12 words"),
    (ZERO_PHRASE.replace("about", "abound"), "not a word"),
    (ZERO_PHRASE.replace("about", "abandon"), "one is wrong or out of place"),  # the checksum word
])
def test_text_that_is_no_phrase_is_refused_before_anything_is_sent(text, why):
    with pytest.raises(PhraseError, match=why):
        normalise_phrase(text)


def test_the_recovery_key_depends_on_the_phrase_and_the_user_id_only():
    key = RecoveryKey.from_phrase(ZERO_PHRASE, "bob")
    assert RecoveryKey.from_phrase(ZERO_PHRASE.upper(), "bob").public == key.public
    assert RecoveryKey.from_phrase(ZERO_PHRASE, "alice").public != key.public
    assert RecoveryKey.from_phrase(new_phrase(), "bob").public != key.public


def test_the_statement_is_laid_out_as_the_spec_says():
    statement = recovery_statement(BROKER, "bob", 258, NEW)
    assert statement == b"p2pchat recover v1\x00" + BROKER + b"bob\x00" + bytes([0, 0, 0, 0, 0, 0, 1, 2]) + NEW


def test_a_proof_holds_for_its_broker_id_generation_and_key_only():
    key = RecoveryKey.from_phrase(ZERO_PHRASE, "bob")
    proof = key.prove(BROKER, "bob", 3, NEW)
    assert verify_recovery(key.public, proof, BROKER, "bob", 3, NEW)
    for broker, user, generation, new in ((b"c" * 32, "bob", 3, NEW), (BROKER, "bobby", 3, NEW),
                                          (BROKER, "bob", 2, NEW), (BROKER, "bob", 3, b"m" * 32)):
        assert not verify_recovery(key.public, proof, broker, user, generation, new)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64))
def test_hostile_keys_and_signatures_are_refused_without_raising(recovery, signature):
    assert not verify_recovery(recovery, signature, BROKER, "bob", 0, NEW)
