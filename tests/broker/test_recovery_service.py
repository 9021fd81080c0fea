"""The key service's recovery (RECOVERY, RECOVER) without sockets, on a real SQLite registry: the bounds that
raw lines from one address cannot show (docs/PROTOCOL.md §10.1, §10.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pchat.broker.backends.audit import Change
from p2pchat.broker.backends.sqlite_keys import SqliteKeyRegistry
from p2pchat.broker.shell.keyservice import KeyServiceConnection, KeyServiceCore, KeyServiceLimits
from p2pchat.common.recovery import RecoveryKey, new_phrase

BROKER_KEY = b"\x01" * 32
OLD, NEW = b"o" * 32, b"n" * 32


@pytest.fixture
def keys(tmp_path: Path):
    registry = SqliteKeyRegistry(tmp_path / "keys.sqlite")
    yield registry
    registry.close()


def ask(service: KeyServiceCore, line: str, source: str = "192.0.2.1", now: float = 0.0) -> bytes:
    reply, _ = KeyServiceConnection(source, now).receive(line.encode() + b"\n", service, now)
    return reply


def recover_line(recovery: RecoveryKey, user: str, generation: int, key: bytes) -> str:
    return f"RECOVER {user} {key.hex()} {recovery.prove(BROKER_KEY, user, generation, key).hex()}"


def test_a_recovery_is_audited_with_the_address_it_came_from(keys):
    recovery = RecoveryKey.from_phrase(new_phrase(), "bob")
    keys.bind("bob", OLD, recovery.public)
    service = KeyServiceCore(BROKER_KEY, keys)
    assert ask(service, "RECOVERY bob") == b"RECOVERY 0\n"
    assert ask(service, recover_line(recovery, "bob", 0, NEW), source="198.51.100.7") == b"OK\n"
    [record] = keys.audit("bob")
    assert (record.change, record.old_key, record.new_key, record.origin) == (
        Change.RECOVERED, OLD, NEW, "key service 198.51.100.7")


def test_attempts_on_one_id_are_bounded_across_source_addresses(keys):
    recovery = RecoveryKey.from_phrase(new_phrase(), "bob")
    keys.bind("bob", OLD, recovery.public)
    service = KeyServiceCore(BROKER_KEY, keys, KeyServiceLimits(recover_id_burst=3))
    wrong = RecoveryKey.from_phrase(new_phrase(), "bob")
    answers = [ask(service, recover_line(wrong, "bob", 0, NEW), source=f"192.0.2.{n}") for n in range(4)]
    assert [a.split(b" ")[1] for a in answers] == [b"recovery_refused"] * 3 + [b"rate_limited"]
    assert ask(service, recover_line(recovery, "bob", 0, NEW), source="203.0.113.9").startswith(b"ERR rate_limited ")
    later = 1 / service.limits.recover_id_rate  # the bucket refills: the owner gets in
    assert ask(service, recover_line(recovery, "bob", 0, NEW), source="203.0.113.9", now=later) == b"OK\n"


def test_recovery_requests_from_one_address_are_bounded_whatever_the_id(keys):
    service = KeyServiceCore(BROKER_KEY, keys, KeyServiceLimits(recover_burst=2))
    answers = [ask(service, f"RECOVERY user{n}") for n in range(3)]
    assert [a.split(b" ")[1] for a in answers] == [b"recovery_refused"] * 2 + [b"rate_limited"]
    assert ask(service, "RECOVERY user9", source="192.0.2.2").startswith(b"ERR recovery_refused ")
