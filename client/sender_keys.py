"""Sender keys of rooms, sans I/O (docs/ROOMS-DESIGN.md §4.1-§4.5): this device's generation per room, and the
generations other devices sent us.

Randomness comes in through ``random_bytes`` and every change goes out through a ``SenderKeyStore`` before the
call that made it returns, so a test (or a replay) runs the whole scheme with fixed bytes and no disk. Not
thread-safe: one owner (the client's agent) calls it.

Ordering rules that make it safe:
* ``seal`` moves the iteration on in memory and in the store before it returns a body: a crash can skip an
  iteration, never seal two bodies under one.
* ``open`` checks the signature before it walks the chain, and stores the new position before it takes it: a
  forged body moves nothing, and a failed save leaves the message to be opened again.
* ``accept`` never replaces a generation it holds: a payload re-sent (or replayed) at another iteration could
  otherwise rewind the chain and let old bodies open twice, or skip keys still needed by queued messages.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pchat.common.crypto import KEY_BYTES, IntegrityError
from p2pchat.common.errors import ErrorCode, P2PChatError
from p2pchat.common.room_crypto import (
    SenderKeyPayload, chain_step, decrypt_room, pack_sender_key, parse_room_body, seal_room, unpack_sender_key,
    verify_room,
)

log = logging.getLogger(__name__)

MAX_SKIPPED = 2_000  # message keys kept per received generation for messages that arrive late
MAX_JUMP = 25_000  # iterations a message may skip ahead of the one expected (bounds the chain walk)
MAX_GENERATIONS = 5  # generations kept per sending device: messages queued before a rotation still open
ROTATE_AFTER = 2**24  # messages sealed under one generation before it must rotate (§4.3)

Device = tuple[str, int]  # (user, dev)


class NoSenderKey(P2PChatError):
    """No generation ``gen`` of ``sender``'s device ``dev`` for room ``rid`` (yet): hold the message until the
    ``room_key`` arrives, or report it undecryptable (§4.5). Not an IntegrityError: nothing was wrong with it."""

    default_code = ErrorCode.INTEGRITY

    def __init__(self, rid: bytes, sender: str, dev: int, gen: int) -> None:
        super().__init__(f"no key for generation {gen} of {sender}'s device {dev} in room {rid.hex()}")
        self.rid, self.sender, self.dev, self.gen = rid, sender, dev, gen


class SenderKeyStore(Protocol):
    """Where the states persist: opaque records by key. ``put`` and ``delete`` are durable when they return
    (or raise StorageError)."""

    def load_all(self) -> dict[str, bytes]: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class MemorySenderKeys:
    """A ``SenderKeyStore`` in a dict: tests, the load tool, and clients run without history."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    def load_all(self) -> dict[str, bytes]:
        return dict(self.records)

    def put(self, key: str, value: bytes) -> None:
        self.records[key] = value

    def delete(self, key: str) -> None:
        self.records.pop(key, None)


@dataclass(frozen=True, slots=True)
class OwnGeneration:
    """This device's current generation in a room, at the iteration its next message will use."""

    gen: int
    iteration: int
    chain: bytes
    sign_pub: bytes


@dataclass(frozen=True, slots=True)
class _Own:
    gen: int
    iteration: int
    chain: bytes
    signing: Ed25519PrivateKey

    def public(self) -> OwnGeneration:
        return OwnGeneration(self.gen, self.iteration, self.chain, _raw_public(self.signing))


@dataclass(frozen=True, slots=True)
class _Received:
    """A generation of another device: the chain at the next expected iteration, and the keys it skipped."""

    next: int
    chain: bytes
    sign_pub: bytes
    skipped: dict[int, bytes]  # iteration -> message key, oldest first


class SenderKeys:
    """Seal this device's room messages and open everybody else's (see the module docstring)."""

    def __init__(self, user: str, device: int, store: SenderKeyStore,
                 random_bytes: Callable[[int], bytes] = os.urandom, rotate_after: int = ROTATE_AFTER) -> None:
        self.user = user
        self.device = device
        self.seals = 0  # sealing operations: one per room message, whatever the room's size (the bench checks it)
        self._store = store
        self._random = random_bytes
        self._rotate_after = rotate_after
        self._own: dict[bytes, _Own] = {}
        self._sent: dict[bytes, set[Device]] = {}  # who has this device's current generation, per room
        self._received: dict[tuple[bytes, str, int], dict[int, _Received]] = {}  # (rid, user, dev) -> gen -> state
        self._load(store.load_all())

    # --- this device's generation ---------------------------------------------------------------------
    def seal(self, rid: bytes, msg_id: bytes, ts: int, plaintext: bytes) -> bytes:
        """The ``0x02`` body of one room message; makes generation 1 on the room's first message."""
        own = self._current(rid)
        message_key, chain = chain_step(own.chain)
        body = seal_room(self.user, rid, msg_id, ts, self.device, own.gen, own.iteration, message_key, own.signing,
                         plaintext)
        # In memory first, then the store: if the save fails, no body leaves and the iteration is skipped.
        self._save_own(rid, replace(own, iteration=own.iteration + 1, chain=chain))
        self.seals += 1
        return body

    def current(self, rid: bytes) -> OwnGeneration:
        return self._current(rid).public()

    def distribution(self, rid: bytes) -> bytes:
        """The ``room_key`` payload of the current generation at its current iteration (nothing sealed before)."""
        own = self.current(rid)
        return pack_sender_key(rid, self.device, own.gen, own.iteration, own.chain, own.sign_pub)

    def rotate(self, rid: bytes) -> OwnGeneration:
        """A new generation (fresh chain and signing key, iteration 0) that nobody has been sent yet."""
        old = self._own.get(rid)
        return self._new_generation(rid, old.gen + 1 if old else 1).public()

    def unsent(self, rid: bytes, devices: Iterable[Device]) -> set[Device]:
        """Which of ``devices`` have not been sent the current generation."""
        return set(devices) - self._sent.get(rid, set())

    def mark_sent(self, rid: bytes, devices: Iterable[Device]) -> None:
        self._current(rid)
        sent = self._sent.setdefault(rid, set())
        new = set(devices) - sent
        if new:
            sent |= new
            self._store.put(_key("sent", rid), msgpack.packb(
                {"rid": rid, "gen": self._own[rid].gen, "to": sorted(sent)}, use_bin_type=True))

    def must_rotate(self, rid: bytes, devices: Iterable[Device]) -> bool:
        """True if a device that holds the current generation is not among ``devices`` (the current devices of
        the joined members, our own other devices included), or the generation has sealed ``ROTATE_AFTER``
        messages."""
        own = self._own.get(rid)
        if own is None:
            return False
        return bool(self._sent.get(rid, set()) - set(devices)) or own.iteration >= self._rotate_after

    def forget_room(self, rid: bytes) -> None:
        """Drop every generation received in ``rid``, and replace ours by a fresh one sent to nobody. Its number
        is kept (one small record): after a rejoin, receivers that still hold our old generations would refuse
        a reused number and could open nothing."""
        for (room, sender, dev), gens in list(self._received.items()):
            if room == rid:
                for gen in gens:
                    self._store.delete(_key("recv", rid, sender, dev, gen))
                del self._received[room, sender, dev]
        if rid in self._own:
            self.rotate(rid)

    def _current(self, rid: bytes) -> _Own:
        own = self._own.get(rid)
        return own if own is not None else self._new_generation(rid, 1)

    def _new_generation(self, rid: bytes, gen: int) -> _Own:
        own = _Own(gen, 0, self._random(KEY_BYTES), Ed25519PrivateKey.from_private_bytes(self._random(KEY_BYTES)))
        self._sent[rid] = set()  # first: should the save fail, the generation in memory is still sent to nobody
        self._save_own(rid, own)
        self._store.delete(_key("sent", rid))  # left behind by a crash here, it names an older gen: ignored
        return own

    def _save_own(self, rid: bytes, own: _Own) -> None:
        self._own[rid] = own
        # The private signing key as raw bytes: the store lives in the user's private (0700) directory, beside
        # the identity key it is no more secret than.
        self._store.put(_key("own", rid), msgpack.packb(
            {"rid": rid, "gen": own.gen, "iter": own.iteration, "chain": own.chain,
             "sign": own.signing.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                               serialization.NoEncryption())}, use_bin_type=True))

    # --- other devices' generations ---------------------------------------------------------------------
    def accept(self, sender: str, payload: bytes) -> SenderKeyPayload:
        """Keep the generation a ``room_key`` from ``sender`` carries (IntegrityError if malformed). One already
        held is left as it is (module docstring); of a device's generations, the newest ``MAX_GENERATIONS`` are
        kept (a late one older than those is dropped at once)."""
        p = unpack_sender_key(payload)
        gens = self._received.setdefault((p.rid, sender, p.dev), {})
        if p.gen in gens:
            return p
        self._save_received(p.rid, sender, p.dev, p.gen, _Received(p.iteration, p.chain, p.sign_pub, {}))
        while len(gens) > MAX_GENERATIONS:
            oldest = min(gens)
            self._store.delete(_key("recv", p.rid, sender, p.dev, oldest))
            del gens[oldest]
        return p

    def open(self, rid: bytes, sender: str, msg_id: bytes, ts: int, body: bytes) -> bytes:
        """The plaintext of ``sender``'s room message. NoSenderKey if its generation has not arrived;
        IntegrityError if it is malformed, forged, a replay, or too far ahead."""
        dev, gen, i = parse_room_body(body)
        state = self._received.get((rid, sender, dev), {}).get(gen)
        if state is None:
            raise NoSenderKey(rid, sender, dev, gen)
        if i < state.next and i not in state.skipped:
            raise IntegrityError(f"room message {i} of {sender}'s generation {gen} refused: already opened "
                                 "(a replay) or too old to have its key")
        if i - state.next > MAX_JUMP:
            raise IntegrityError(f"room message {i} of {sender}'s generation {gen} refused: {i - state.next} "
                                 f"iterations ahead (at most {MAX_JUMP})")
        verify_room(sender, rid, msg_id, ts, body, state.sign_pub)
        if i < state.next:
            message_key = state.skipped[i]
            moved = replace(state, skipped={k: v for k, v in state.skipped.items() if k != i})
        else:
            message_key, moved = _walk(state, i)
        plaintext = decrypt_room(sender, rid, msg_id, ts, body, message_key)
        self._save_received(rid, sender, dev, gen, moved)  # before it is taken: a failed save changes nothing
        return plaintext

    def _save_received(self, rid: bytes, sender: str, dev: int, gen: int, state: _Received) -> None:
        self._store.put(_key("recv", rid, sender, dev, gen), msgpack.packb(
            {"rid": rid, "from": sender, "dev": dev, "gen": gen, "iter": state.next, "chain": state.chain,
             "sign": state.sign_pub, "skipped": list(state.skipped.items())}, use_bin_type=True))
        self._received.setdefault((rid, sender, dev), {})[gen] = state

    # --- persistence -------------------------------------------------------------------------------------
    def _load(self, records: dict[str, bytes]) -> None:
        """Rebuild the states from the store's records; an unreadable one is skipped (and counted in one log
        line): losing a received generation costs the messages sealed under it, not the client."""
        sent: dict[bytes, tuple[int, set[Device]]] = {}
        bad = 0
        for key, value in records.items():
            try:
                r = msgpack.unpackb(value, raw=False)
                kind = key.split(":", 1)[0]
                if kind == "own":
                    self._own[r["rid"]] = _Own(r["gen"], r["iter"], r["chain"],
                                               Ed25519PrivateKey.from_private_bytes(r["sign"]))
                elif kind == "sent":
                    sent[r["rid"]] = (r["gen"], {(user, dev) for user, dev in r["to"]})
                elif kind == "recv":
                    self._received.setdefault((r["rid"], r["from"], r["dev"]), {})[r["gen"]] = _Received(
                        r["iter"], r["chain"], r["sign"], dict(r["skipped"]))
                else:
                    raise ValueError(kind)
            except Exception:  # msgpack's zoo, a missing field, a bad key: the record is unreadable
                bad += 1
        for rid, (gen, devices) in sent.items():
            if rid in self._own and self._own[rid].gen == gen:  # a sent-set of an older generation is void
                self._sent[rid] = devices
        if bad:
            log.warning("sender keys of %s (device %d): %d unreadable records skipped", self.user, self.device, bad)


def _walk(state: _Received, i: int) -> tuple[bytes, _Received]:
    """Iteration ``i``'s message key (``i`` at or after ``state.next``) and the state just past it, keeping the
    keys of the iterations in between (the newest ``MAX_SKIPPED`` of all skipped)."""
    chain = state.chain
    skipped = dict(state.skipped)
    for j in range(state.next, i):
        message_key, chain = chain_step(chain)
        if j >= i - MAX_SKIPPED:
            skipped[j] = message_key
    for old in list(itertools.islice(skipped, max(0, len(skipped) - MAX_SKIPPED))):
        del skipped[old]
    message_key, chain = chain_step(chain)
    return message_key, _Received(i + 1, chain, state.sign_pub, skipped)


def _key(kind: str, rid: bytes, *rest: object) -> str:
    return ":".join((kind, rid.hex(), *map(str, rest)))


def _raw_public(signing: Ed25519PrivateKey) -> bytes:
    return signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
