"""The key service's linking lines (LINK, UNLINK, DEVICES, PAKE_*) without sockets, on a real SQLite registry
(docs/PROTOCOL.md §10.1, §10.2.1)."""

from __future__ import annotations

import pytest

from p2pchat.broker.backends.audit import Change
from p2pchat.broker.shell.keyservice import KeyServiceCore, KeyServiceLimits
from p2pchat.common.recovery import LINK_LABEL, UNLINK_LABEL, RecoveryKey, new_phrase
from tests.broker.test_recovery_service import BROKER_KEY, NEW, OLD, ask, keys  # noqa: F401 - keys: a fixture


@pytest.fixture
def account(keys) -> RecoveryKey:
    """bob's account key; bob is bound with it, his first device's key OLD."""
    recovery = RecoveryKey.from_phrase(new_phrase(), "bob")
    keys.bind("bob", OLD, recovery.public)
    return recovery


def signed(account: RecoveryKey, verb: str, key: bytes, generation: int, extra: str = "") -> str:
    label = LINK_LABEL if verb == "LINK" else UNLINK_LABEL
    return f"{verb} bob {key.hex()} {account.prove(BROKER_KEY, 'bob', generation, key, label).hex()}{extra}"


def test_link_adds_the_device_with_its_name_and_unlink_removes_it(keys, account):
    service = KeyServiceCore(BROKER_KEY, keys)
    assert ask(service, signed(account, "LINK", NEW, 0, " " + "laptop é".encode().hex()),
               source="198.51.100.7") == b"OK\n"
    [device1, device2] = keys.devices("bob").devices
    assert (device2.id, device2.key, device2.name, device2.gen) == (2, NEW, "laptop é", 0)
    assert ask(service, "DEVICES bob") == (
        f"DEVICES 2 1:{OLD.hex()}:0:{device1.added_ms}: 2:{NEW.hex()}:0:{device2.added_ms}:"
        f"{'laptop é'.encode().hex()}\n").encode()
    assert ask(service, signed(account, "UNLINK", NEW, 1)) == b"OK\n"
    assert [d.key for d in keys.devices("bob").devices] == [OLD] and not keys.admits(NEW, 0.0)
    assert [(r.change, r.origin) for r in keys.audit("bob")] == [
        (Change.LINKED, "key service 198.51.100.7"), (Change.UNLINKED, "key service 192.0.2.1")]


def test_a_link_proof_is_good_for_one_label_one_key_and_one_generation(keys, account):
    service = KeyServiceCore(BROKER_KEY, keys, KeyServiceLimits(recover_id_burst=10))
    as_unlink = signed(account, "UNLINK", NEW, 0).replace("UNLINK", "LINK")
    assert ask(service, as_unlink).startswith(b"ERR recovery_refused that is not the recovery phrase of 'bob'")
    stale = signed(account, "LINK", NEW, 0)
    assert ask(service, stale) == b"OK\n"
    third = signed(account, "LINK", b"t" * 32, 0)  # made before the first link raised the generation
    assert ask(service, third).startswith(b"ERR recovery_refused ")
    assert ask(service, signed(account, "UNLINK", OLD, 1)) == b"OK\n"  # any device, the first one too
    assert ask(service, signed(account, "UNLINK", NEW, 2)).startswith(
        b"ERR link_failed that is the last device of 'bob'")
    assert ask(service, signed(account, "UNLINK", OLD, 2)).startswith(b"ERR devices_changed ")


def test_link_unlink_and_recover_share_one_bound_of_attempts_per_id(keys, account):
    service = KeyServiceCore(BROKER_KEY, keys, KeyServiceLimits(recover_id_burst=2))
    wrong = RecoveryKey.from_phrase(new_phrase(), "bob")
    assert ask(service, signed(wrong, "LINK", NEW, 0), source="192.0.2.1").startswith(b"ERR recovery_refused ")
    assert ask(service, signed(wrong, "UNLINK", OLD, 0), source="192.0.2.2").startswith(b"ERR recovery_refused ")
    assert ask(service, signed(account, "LINK", NEW, 0), source="192.0.2.3").startswith(b"ERR rate_limited ")


def test_devices_of_an_unbound_id_is_refused(keys):
    assert ask(KeyServiceCore(BROKER_KEY, keys), "DEVICES carol").startswith(b"ERR unknown_recipient ")


def test_the_pake_lines_open_post_read_and_close_a_slot(keys):
    service = KeyServiceCore(BROKER_KEY, keys)
    assert ask(service, "PAKE_OPEN") == b"PAKE 1 300\n"
    assert ask(service, "PAKE_GET 1 B 0") == b"WAIT\n"
    assert ask(service, "PAKE_PUT 1 B 0 " + "ab" * 33) == b"OK\n"
    assert ask(service, "PAKE_GET 1 B 0") == f"PAKE_DATA {'ab' * 33}\n".encode()
    assert ask(service, "PAKE_PUT 1 B 0 " + "cd" * 33).startswith(b"ERR link_failed someone else joined link slot 1")
    assert ask(service, "PAKE_CLOSE 1") == b"OK\n"
    assert ask(service, "PAKE_GET 1 B 0").startswith(b"ERR link_failed link slot 1 was closed")
    assert ask(service, "PAKE_GET 2 A 0").startswith(b"ERR link_failed no link slot 2 is open")


@pytest.mark.parametrize("line", ["PAKE_OPEN 1", "PAKE_PUT 1 C 0 ab", "PAKE_PUT 1 A 4 ab", "PAKE_PUT 01 A 0 ab",
                                  "PAKE_PUT 1 A 0 " + "ab" * 257, "PAKE_PUT 1 A 0 abc", "PAKE_PUT 1 A 0 ",
                                  "PAKE_GET 0 A 0", "PAKE_GET 10001 A 0", "PAKE_CLOSE", "DEVICES",
                                  "LINK bob " + "ab" * 32 + " " + "cd" * 64 + " " + "ff",
                                  "LINK bob " + "ab" * 32 + " " + "cd" * 64 + " " + "61" * 33])
def test_malformed_linking_lines_get_bad_frame(keys, line):
    assert ask(KeyServiceCore(BROKER_KEY, keys), line).startswith(b"ERR bad_frame ")


def test_slots_are_opened_within_the_per_address_bound_and_polled_within_another(keys):
    service = KeyServiceCore(BROKER_KEY, keys, KeyServiceLimits(recover_burst=2, pake_burst=3))
    assert [ask(service, "PAKE_OPEN")[:8] for _ in range(3)] == [b"PAKE 1 3", b"PAKE 2 3", b"ERR rate"]
    assert [ask(service, "PAKE_GET 1 A 0")[:8] for _ in range(4)] == [b"WAIT\n"] * 3 + [b"ERR rate"]
    assert ask(service, "PAKE_GET 1 A 0", source="192.0.2.9") == b"WAIT\n"
