"""Linking by code, the two sides in memory (docs/PROTOCOL.md §10.2.1): the code, the PAKE and its channel."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pchat.common.errors import ErrorCode
from p2pchat.common.linking import ExistingDevice, JoiningDevice, LinkCode, LinkRefused, Welcome, WrongCode

KEY, ACCOUNT, BROKER = b"k" * 32, b"a" * 32, b"b" * 32


def test_a_code_is_the_slot_and_six_digits_and_reads_back():
    code = LinkCode.new(7, random_bytes=lambda n: (493027).to_bytes(n, "big"))
    assert str(code) == "7-493-027" and LinkCode.parse(" 7-493-027\n") == code


@pytest.mark.parametrize("text", ["7-493-02", "0-493-027", "7493027", "x-493-027", "7-493-027-1", "123456-000-000"])
def test_text_that_is_no_code_is_refused_before_anything_is_sent(text):
    with pytest.raises(WrongCode) as err:
        LinkCode.parse(text)
    assert err.value.code is ErrorCode.LINK_FAILED and "is not a link code" in err.value.message


def test_with_the_same_code_the_new_device_learns_the_account_and_the_existing_one_its_key_and_name():
    code = LinkCode.new(3)
    existing, joining = ExistingDevice("bob", code), JoiningDevice("bob", code)
    sealed = joining.join(existing.first, KEY, "bob's laptop")
    device = existing.open_new_device(joining.first, sealed)
    assert (device.key, device.name) == (KEY, "bob's laptop")
    assert joining.open_verdict(existing.welcome(ACCOUNT, BROKER)) == Welcome(ACCOUNT, BROKER)


@pytest.mark.parametrize("other", [(LinkCode(3, "000001"), "bob"), (LinkCode(4, "000000"), "bob"),
                                   (LinkCode(3, "000000"), "carol")], ids=["secret", "slot", "user"])
def test_another_code_slot_or_user_fails_on_both_sides(other):
    existing = ExistingDevice("bob", LinkCode(3, "000000"))
    joining = JoiningDevice(other[1], other[0])
    sealed = joining.join(existing.first, KEY, "laptop")
    with pytest.raises(WrongCode):
        existing.open_new_device(joining.first, sealed)
    with pytest.raises(WrongCode):  # and had E answered anyway, N could not open it
        joining.open_verdict(existing.refuse("no"))


def test_the_existing_device_can_say_why_it_did_not_link():
    code = LinkCode.new(1)
    existing, joining = ExistingDevice("bob", code), JoiningDevice("bob", code)
    existing.open_new_device(joining.first, joining.join(existing.first, KEY, ""))
    with pytest.raises(LinkRefused, match="bob has as many devices"):
        joining.open_verdict(existing.refuse("bob has as many devices as the broker allows"))


def test_a_long_or_unprintable_name_is_cut_and_cleaned():
    code = LinkCode.new(1)
    existing, joining = ExistingDevice("bob", code), JoiningDevice("bob", code)
    sealed = joining.join(existing.first, KEY, "a\nb" + "x" * 40)
    assert existing.open_new_device(joining.first, sealed).name == "ab" + "x" * 30


@given(st.binary(max_size=64), st.binary(max_size=300))
def test_hostile_bytes_from_the_slot_are_a_wrong_code_never_a_crash(first, sealed):
    existing = ExistingDevice("bob", LinkCode(1, "123456"))
    with pytest.raises(WrongCode):
        existing.open_new_device(first, sealed)
