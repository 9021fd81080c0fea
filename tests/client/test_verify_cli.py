"""Verifying keys from the command line (issue 15, point 4): ``p2pchat keys`` says who is verified and which key
changes wait, in words and as JSON; ``p2pchat verify`` shows the safety number, then marks the key verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from p2pchat.client.storage.trust import CHANGED_KEYS, PINNED_KEYS, VERIFIED_KEYS, KeyStore, VerifiedKeys
from p2pchat.common.crypto import Identity, fingerprint, safety_number
from p2pchat.common.paths import ensure_private_dir, user_dir
from tests.conftest import ROOT


@dataclass
class Keys:
    state: Path  # alice's state directory
    me: bytes
    bob: bytes
    carol: bytes
    carol_new: bytes


@pytest.fixture
def alice(home) -> Keys:
    """alice's key files: bob's key pinned, carol's pinned key and the new one she presents since, waiting."""
    state = ensure_private_dir(user_dir("alice"))
    keys = Keys(state, Identity.load_or_create(state / "identity.key").public,
                *(Identity.generate().public for _ in range(3)))
    KeyStore(state / PINNED_KEYS).put("bob", keys.bob)
    KeyStore(state / PINNED_KEYS).put("carol", keys.carol)
    KeyStore(state / CHANGED_KEYS).put("carol", keys.carol_new)
    return keys


def p2pchat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pchat.client.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def keys_json() -> dict[str, dict]:
    done = p2pchat("keys", "--user", "alice", "--json")
    assert done.returncode == 0, done.stderr
    return {peer["user"]: peer for peer in json.loads(done.stdout)["peers"]}


def test_keys_says_who_is_verified_and_which_key_change_waits(alice):
    VerifiedKeys(alice.state / VERIFIED_KEYS).mark("bob", alice.bob)
    peers = keys_json()
    assert peers["bob"]["verified"] and peers["bob"]["changed_to"] is None
    assert not peers["carol"]["verified"]
    assert peers["carol"]["changed_to"] == fingerprint(alice.carol_new)
    assert peers["carol"]["changed_safety_number"] == safety_number(alice.me, alice.carol_new)

    text = p2pchat("keys", "--user", "alice").stdout
    bob_line = next(line for line in text.splitlines() if line.startswith("bob:"))
    assert "verified" in bob_line and "not verified" not in bob_line
    assert f"carol's key CHANGED to {fingerprint(alice.carol_new)}" in text
    assert "reinstalled, set up a new device or recovered the account" in text
    assert "p2pchat verify --peer carol" in text


def test_verify_shows_the_safety_number_then_marks_the_key_verified_once_confirmed(alice):
    number = safety_number(alice.me, alice.bob)
    declined = p2pchat("verify", "--user", "alice", "--peer", "bob", stdin="n\n")
    assert declined.returncode == 1 and f"Safety number with bob: {number}" in declined.stdout
    assert "not marked verified" in declined.stderr and not keys_json()["bob"]["verified"]

    done = p2pchat("verify", "--user", "alice", "--peer", "bob", stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert f"Safety number with bob: {number}" in done.stdout and "bob's key is verified" in done.stdout
    assert keys_json()["bob"]["verified"]


def test_verifying_a_changed_key_accepts_it_and_a_later_change_is_unverified_again(alice):
    done = p2pchat("verify", "--user", "alice", "--peer", "carol", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "user": "alice", "peer": "carol", "fingerprint": fingerprint(alice.carol_new),
        "safety_number": safety_number(alice.me, alice.carol_new), "verified": True, "accepted": True,
        # no account keys known (alice has no phrase here, carol's account was never seen), no --server
        "account_safety_number": None, "account_fingerprint": None, "devices": None}
    carol = keys_json()["carol"]
    assert carol["verified"] and carol["changed_to"] is None and carol["fingerprint"] == fingerprint(alice.carol_new)

    KeyStore(alice.state / CHANGED_KEYS).put("carol", Identity.generate().public)  # she changes keys again
    assert p2pchat("trust", "--user", "alice", "--peer", "carol").returncode == 0
    assert not keys_json()["carol"]["verified"]  # the key verified is not the one pinned now


def test_verify_refuses_a_peer_without_a_known_key(alice):
    done = p2pchat("verify", "--user", "alice", "--peer", "dave", "--yes")
    assert done.returncode == 1 and "no key known for 'dave'" in done.stderr
