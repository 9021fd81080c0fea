"""Linking a second device (docs/PROTOCOL.md §10.2.1), end to end: real broker processes (one, or two sharing a
real Redis), and the command line on two installations as a user runs it (`p2pchat link`, `devices`, `unlink`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pchat.client.broker_trust import KeyService
from p2pchat.client.storage.account import account_key
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import ExitCode
from p2pchat.common.linking import JoiningDevice, LinkCode
from p2pchat.common.recovery import RecoveryKey
from tests.client.test_recovery import cli, two_brokers  # noqa: F401 - a fixture
from tests.conftest import ROOT, BrokerProcess


def server(broker: BrokerProcess) -> str:
    return f"127.0.0.1:{broker.port}"


def first_device(home: Path, broker: BrokerProcess, user: str = "bob") -> str:
    """``user`` registered from ``home`` (its first device: it has the phrase); returns the phrase."""
    sent = cli(home, "send", "--user", user, "--server", server(broker), "--to", user, "hello me")
    assert sent.returncode == ExitCode.OK, sent.stderr
    return cli(home, "recovery-phrase", "--user", user).stdout.strip()


class Offer:
    """``p2pchat link --user bob`` waiting on the existing device, with the code it printed."""

    def __init__(self, home: Path, broker: BrokerProcess, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "p2pchat.client.cli", "link", "--user", "bob",
                                      "--server", server(broker), *extra], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, P2PCHAT_HOME=str(home)))
        self.code = self.proc.stdout.readline().strip()
        assert self.code, self.proc.stderr.read()

    def result(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def offers() -> Iterator[list[Offer]]:
    made: list[Offer] = []
    yield made
    for offer in made:
        if offer.proc.poll() is None:
            offer.kill()


def devices(home: Path, broker: BrokerProcess) -> list[dict]:
    listed = cli(home, "devices", "--user", "bob", "--server", server(broker), "--json")
    assert listed.returncode == ExitCode.OK, listed.stderr
    return json.loads(listed.stdout)


def link_by_code(existing: Path, new: Path, broker: BrokerProcess, offers: list[Offer],
                 at: BrokerProcess | None = None) -> subprocess.CompletedProcess:
    offers.append(Offer(existing, broker))
    joined = cli(new, "link", "--user", "bob", "--server", server(at or broker), "--code", offers[-1].code,
                 "--name", "laptop")
    status, err = offers[-1].result()
    assert (status, joined.returncode) == (ExitCode.OK, ExitCode.OK), err + joined.stderr
    return joined


def test_a_device_linked_by_code_is_listed_and_can_send_but_gets_no_phrase(broker, offers, tmp_path):
    desk, laptop = tmp_path / "desk", tmp_path / "laptop"
    phrase = first_device(desk, broker)
    link_by_code(desk, laptop, broker, offers)
    listed = devices(laptop, broker)
    mine = Identity.load_or_create(laptop / "users" / "bob" / "identity.key").public
    # the first device named itself when it registered (the host's name), the new one as asked
    assert [(d["id"], d["name"], d["this"]) for d in listed] == [(1, socket.gethostname()[:32], False),
                                                                   (2, "laptop", True)]
    assert listed[1]["key"] == mine.hex()
    assert [d["this"] for d in devices(desk, broker)] == [True, False]
    # The laptop pinned the account key through the code's channel; it has no phrase, and shows none.
    assert account_key(laptop / "users" / "bob", "bob") == RecoveryKey.from_phrase(phrase, "bob").public
    sent = cli(laptop, "send", "--user", "bob", "--server", server(broker), "--to", "bob", "from the laptop")
    assert sent.returncode == ExitCode.OK and "recovery phrase" not in sent.stderr, sent.stderr
    assert not (laptop / "users" / "bob" / "recovery.phrase").exists()
    shown = cli(laptop, "recovery-phrase", "--user", "bob")
    assert shown.returncode != ExitCode.OK and "linked to bob by code" in shown.stderr


def test_a_wrong_code_fails_on_both_devices_and_spends_the_slot(broker, offers, tmp_path):
    desk, laptop = tmp_path / "desk", tmp_path / "laptop"
    first_device(desk, broker)
    offers.append(Offer(desk, broker))
    slot, digits = offers[0].code.split("-", 1)
    wrong = f"{slot}-{'000-000' if digits != '000-000' else '000-001'}"
    joined = cli(laptop, "link", "--user", "bob", "--server", server(broker), "--code", wrong)
    status, err = offers[0].result()
    assert status == ExitCode.REFUSED and "someone entered a wrong code; run link again" in err
    assert joined.returncode == ExitCode.REFUSED and "wrong code" in joined.stderr
    again = cli(laptop, "link", "--user", "bob", "--server", server(broker), "--code", offers[0].code)
    assert again.returncode == ExitCode.REFUSED and "was closed" in again.stderr  # the right code, too late
    assert not (laptop / "users" / "bob" / "identity.key").exists()  # a failed try leaves nothing
    assert len(devices(desk, broker)) == 1


def test_a_slot_takes_one_join_so_a_second_device_with_the_code_is_refused(broker, offers, tmp_path):
    desk, laptop = tmp_path / "desk", tmp_path / "laptop"
    first_device(desk, broker)
    offers.append(Offer(desk, broker, "--timeout", "30"))
    code = LinkCode.parse(offers[0].code)
    intruder = JoiningDevice("bob", LinkCode(code.slot, "999999" if code.secret != "999999" else "000000"))
    KeyService(broker.address, broker.port + 2, 5.0).pake_put(code.slot, "B", 0, intruder.first)  # joins first
    joined = cli(laptop, "link", "--user", "bob", "--server", server(broker), "--code", offers[0].code)
    assert joined.returncode == ExitCode.REFUSED and f"someone else joined link slot {code.slot} first" in \
        joined.stderr, joined.stderr
    assert len(devices(desk, broker)) == 1


def test_an_unlinked_device_can_no_longer_register(broker, offers, tmp_path):
    desk, laptop = tmp_path / "desk", tmp_path / "laptop"
    first_device(desk, broker)
    link_by_code(desk, laptop, broker, offers)
    removed = cli(desk, "unlink", "--user", "bob", "--server", server(broker), "laptop")
    assert removed.returncode == ExitCode.OK and "unlinked device 2 (laptop" in removed.stdout, removed.stderr
    assert [d["id"] for d in devices(desk, broker)] == [1]
    refused = cli(laptop, "send", "--user", "bob", "--server", server(broker), "--to", "bob", "still here?")
    assert refused.returncode == ExitCode.REFUSED and "id_taken" in refused.stderr, refused.stderr
    # The laptop has no phrase: it cannot unlink the desk (nor link anything).
    denied = cli(laptop, "unlink", "--user", "bob", "--server", server(broker), "1")
    assert denied.returncode == ExitCode.REFUSED and "no recovery phrase of bob" in denied.stderr


def test_linking_with_the_recovery_phrase_keeps_the_phrase_like_the_first_device(broker, tmp_path):
    desk, phone = tmp_path / "desk", tmp_path / "phone"
    phrase = first_device(desk, broker)
    linked = cli(phone, "link", "--user", "bob", "--server", server(broker), "--recovery", "--name", "phone",
                 stdin=phrase + "\n")
    assert linked.returncode == ExitCode.OK, linked.stderr
    assert [(d["name"], d["this"]) for d in devices(phone, broker)] == [(socket.gethostname()[:32], False),
                                                                          ("phone", True)]
    assert cli(phone, "recovery-phrase", "--user", "bob").stdout.strip() == phrase
    # With the phrase, this device may unlink another (here the first one), reading it from stdin or its own.
    removed = cli(phone, "unlink", "--user", "bob", "--server", server(broker), "1")
    assert removed.returncode == ExitCode.OK, removed.stderr
    wrong = cli(tmp_path / "thief", "link", "--user", "bob", "--server", server(broker), "--recovery",
                stdin="let me in\n")
    assert wrong.returncode == ExitCode.REFUSED and "a recovery phrase is 12 words" in wrong.stderr


def test_the_two_devices_may_reach_different_brokers_of_a_cluster(two_brokers, offers, tmp_path):
    one, two, _ = two_brokers
    desk, laptop = tmp_path / "desk", tmp_path / "laptop"
    first_device(desk, one)
    link_by_code(desk, laptop, one, offers, at=two)  # the slot lives in Redis
    assert [d["name"] for d in devices(laptop, two)] == [socket.gethostname()[:32], "laptop"]
    sent = cli(laptop, "send", "--user", "bob", "--server", server(one), "--to", "bob", "via the other broker")
    assert sent.returncode == ExitCode.OK, sent.stderr
