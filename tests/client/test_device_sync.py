"""A client's session core against a lying or buggy broker, about devices (docs/PROTOCOL.md §5.6): frames in by
hand, what the session sends and reports out. No sockets: the broker here is whatever the test says."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Emit, Transmit
from p2pchat.client.core.session import ClientSession
from p2pchat.client.core.transfer import TransferConfig, TransferManager
from p2pchat.client.e2e import DeviceListRefused, EndToEnd, MemoryKeys, PeerKeyChanged
from p2pchat.client.storage.transfers import LocalFiles
from p2pchat.common.errors import ErrorCode
from p2pchat.common.protocol import CAPS_DEVICES, ChatMessage, Devices, DevicesRequest, Error, FileOffer, Registered, decode, pack
from p2pchat.common.recovery import LINK_LABEL, RecoveryKey, new_phrase
from tests.cores import id_source, identity

EPOCH = b"epoch-01"
BROKER_KEY = b"k" * 32


def sent(actions) -> list:
    return [decode(a.frames).message for a in actions if type(a) is Transmit]


def emitted(actions, kind) -> list:
    return [a.event for a in actions if type(a) is Emit and type(a.event) is kind]


def one_device(user: str, ver: int = 1) -> Devices:
    return Devices(user, ver, ((1, identity(user).public, "", 1),))


@pytest.fixture
def alice(tmp_path: Path):
    """alice's session, registered at a broker that granted CAPS_DEVICES, with a file transfer manager."""
    e2e = EndToEnd("alice", identity("alice"), MemoryKeys(), MemoryKeys())
    ids = id_source("alice")
    transfers = TransferManager("alice", TransferConfig(received_dir=tmp_path), e2e, wall_ms=lambda: 0,
                                wall_time=lambda: 0.0, new_id=ids, files=LocalFiles())
    session = ClientSession("alice", wall_ms=lambda: 0, e2e=e2e, token=b"alice", new_id=ids, devices=True,
                            transfers=transfers)
    session.start(0.0)
    session.on_frames(pack(Registered("alice", EPOCH, 1000, CAPS_DEVICES, 1, 1), 0), 0.0)
    return session


def test_a_broker_that_always_answers_devices_changed_gets_a_message_a_few_times_then_it_fails(alice):
    actions = alice.send_text("bob", b"hello", 0.1)
    for user in ("alice", "bob"):
        actions = alice.on_frames(pack(one_device(user), 0), 0.1)
    [message] = [decode(a.frames) for a in actions if type(a) is Transmit]
    msg_id = message.msg_id
    tries = 1
    for turn in range(20):
        actions = alice.on_frames(pack(Error(ErrorCode.DEVICES_CHANGED, "changed", msg_id), 0), 0.2)
        failed = emitted(actions, ev.SendFailed)
        if failed:
            break
        asked = {m.user for m in sent(actions) if type(m) is DevicesRequest}
        for user in asked:
            actions = alice.on_frames(pack(one_device(user), 0), 0.2)
        tries += sum(type(m) is ChatMessage for m in sent(actions))
    assert [(f.msg_id, f.error.code) for f in failed] == [(msg_id, ErrorCode.DEVICES_CHANGED)]
    assert tries <= 4 and not alice.outbox


def test_an_offer_refused_with_devices_changed_is_offered_again_for_the_new_list(alice, tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 100)
    xfer, actions = alice.send_file("bob", path, 0.1)
    for user in ("alice", "bob"):
        actions = alice.on_frames(pack(one_device(user), 0), 0.1)
    [offer] = [a for a in actions if type(a) is Transmit and type(decode(a.frames).message) is FileOffer]
    offer_id = decode(offer.frames).msg_id
    actions = alice.on_frames(pack(Error(ErrorCode.DEVICES_CHANGED, "bob's devices changed", offer_id), 0), 0.2)
    assert emitted(actions, ev.FileFailed) == []
    assert [m.user for m in sent(actions) if type(m) is DevicesRequest] == ["bob"]
    laptop = identity("bob-laptop").public
    proof = ACCOUNT.prove(BROKER_KEY, "bob", 1, laptop, LINK_LABEL)  # (not checked: this broker has no key)
    actions = alice.on_frames(pack(Devices("bob", 2, ((1, identity("bob").public, "", 1), (2, laptop, "", 1)),
                                           ACCOUNT.public, ((2, 1, proof),)), 0), 0.3)
    [again] = [m for m in sent(actions) if type(m) is FileOffer]
    assert again.xfer == xfer and [dev for dev, _ in again.copies] == [1, 2]


# --- our own device list ---------------------------------------------------------------------------
ACCOUNT = RecoveryKey.from_phrase(new_phrase(), "bob")
LAPTOP = identity("bob-laptop")


def own_list(primary: bytes, laptop: bytes = LAPTOP.public, ver: int = 2) -> Devices:
    proof = ACCOUNT.prove(BROKER_KEY, "bob", 1, laptop, LINK_LABEL)
    return Devices("bob", ver, ((1, primary, "", 1), (2, laptop, "", 1)), ACCOUNT.public, ((2, 1, proof),))


@pytest.fixture
def laptop() -> EndToEnd:
    """bob's second device, linked by code: it has the account key, not the first device's key."""
    accounts = MemoryKeys()
    accounts.put("bob", ACCOUNT.public)
    e2e = EndToEnd("bob", LAPTOP, MemoryKeys(), MemoryKeys(), accounts=accounts, broker_key=BROKER_KEY)
    e2e.device_aware = True
    return e2e


def test_our_own_first_device_is_pinned_on_first_sight_and_another_key_for_it_is_refused(laptop):
    laptop.set_devices(own_list(identity("bob").public))
    with pytest.raises(DeviceListRefused):  # the broker swaps in a key of its own: our echoes would go to it
        laptop.set_devices(own_list(identity("mallory").public, ver=3))
    assert laptop.devices_of("bob").devices[0] == (1, identity("bob").public)


def test_our_own_device_list_without_this_device_is_refused(laptop):
    other = identity("bob-tablet").public
    with pytest.raises(DeviceListRefused):
        laptop.set_devices(own_list(identity("bob").public, laptop=other))
    assert laptop.devices_of("bob") is None


def test_a_peer_list_with_a_device_their_account_did_not_link_is_reported_and_nothing_is_sealed_to_it(alice):
    alice.e2e.broker_key = BROKER_KEY
    alice.send_text("bob", b"for bob's devices", 0.1)
    alice.on_frames(pack(one_device("alice"), 0), 0.1)
    account = RecoveryKey.from_phrase(new_phrase(), "bob").public
    forged = Devices("bob", 2, ((1, identity("bob").public, "", 1), (2, identity("mallory").public, "spy", 1)),
                     account, ((2, 1, b"s" * 64),))  # a proof that is no signature of bob's account key
    actions = alice.on_frames(pack(forged, 0), 0.2)
    assert [e.error.code for e in emitted(actions, ev.ErrorReported)] == [ErrorCode.INTEGRITY]
    assert [e.error.code for e in emitted(actions, ev.SendFailed)] == [ErrorCode.INTEGRITY]
    assert not [m for m in sent(actions) if type(m) is ChatMessage]


def test_accepting_a_peers_new_key_pins_their_next_account_key_afresh():
    e2e = EndToEnd("alice", identity("alice"), MemoryKeys(), MemoryKeys())
    old, new = (RecoveryKey.from_phrase(new_phrase(), "bob").public for _ in range(2))
    e2e.set_devices(Devices("bob", 1, ((1, identity("bob").public, "", 1),), old))
    with pytest.raises(PeerKeyChanged):  # bob reinstalled without his phrase: a new key, and a new account key
        e2e.set_devices(Devices("bob", 1, ((1, identity("bob2").public, "", 1),), new))
    assert e2e.accept("bob")
    e2e.set_devices(Devices("bob", 1, ((1, identity("bob2").public, "", 1),), new))
    assert e2e._accounts.get("bob") == new
