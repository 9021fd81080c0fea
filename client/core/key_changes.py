"""What the session does around a peer's key change (docs/PROTOCOL.md §10.3, §10.4), apart from its main loop.

A peer's new key (from ``key_info``, ``key_changed``, a sealed body, or an ``undecryptable`` receipt naming
it) holds messages both ways until the user accepts it: ours wait in the outbox, theirs in ``HeldMessages``.
Accepting (here, or by ``p2pchat trust`` in another process, seen at the next tick) lets both through at once,
and our messages the peer could not open are sealed again to the new key (same id and time).

``KeyChanges`` is a mixin of ``ClientSession``: it uses the session's ``e2e``, ``history``, ``outbox``,
``transfers``, ``trust_key_changes``, ``_blocked``, ``_held``, ``_flush`` and ``_on_chat``.
"""

from __future__ import annotations

import logging

from p2pchat.client import events as ev
from p2pchat.client.core.actions import Action, Emit
from p2pchat.client.e2e import PeerKeyChanged

log = logging.getLogger(__name__)


class KeyChanges:
    def accept_peer_key(self, user: str, now: float) -> list[Action]:
        """The user verified ``user``'s new key: use it from now on, and let through what waited for it."""
        return self._key_accepted(user, now) if self.e2e.accept(user) else []

    def held_from(self, user: str) -> int:
        """``user``'s messages that wait for the user to accept their new key."""
        return self._held.count(user) if self._held is not None else 0

    def _key_changed(self, exc: PeerKeyChanged, now: float, how: str | None = None) -> list[Action]:
        """``exc.user`` presents a new key. Messages to and from them wait for the user's decision, or, with
        ``trust_key_changes``, go on at once; the change is reported either way."""
        log.warning("user=%s peer=%s key changed: %s", self.user, exc.user, exc.message)
        actions: list[Action] = [Emit(ev.PeerKeyChanged(exc.user, exc.old, exc.new, exc,
                                                        accepted=self.trust_key_changes, how=how))]
        if self.trust_key_changes and self.e2e.accept(exc.user):
            return actions + self._key_accepted(exc.user, now)
        if exc.user not in self._blocked:  # what waited for their key (or device list) waits for the user now
            actions += [Emit(ev.SendState(msg_id, exc.user, "held")) for msg_id in self.outbox.unsealed_to(exc.user)]
        self._blocked = self._blocked | {exc.user}
        return actions

    def _key_accepted(self, user: str, now: float) -> list[Action]:
        """``user``'s new key is pinned: our refused messages sealed to it again, the waiting ones sealed, theirs
        opened, without waiting for a reconnect."""
        self._blocked = self._blocked - {user}
        if self.closed:  # pinned for the next run, which seals and shows what waited; nothing goes from here
            return []
        actions = self._reseal(user) + self._flush(now)
        if self.e2e.device_aware:  # their list again now, with their account key (a reinstall brings a new one)
            actions += self._ask_keys({user}, now)
        if self.transfers is not None:  # offers that waited for it go again, sealed to it
            actions += self.transfers.on_key(user, now)
        for msg_id, msg, ts in self._held.take(user) if self._held is not None else ():
            actions += self._on_chat(msg_id, msg, ts, now)
        return actions

    def _reseal(self, peer: str) -> list[Action]:
        """Our messages ``peer`` could not open go back to the outbox, same id and time (``_flush`` seals them to
        the key pinned now); the recipient shows each id once however often it comes."""
        if self.history is None:
            return []
        entries = self.history.reseal(peer)
        for entry in entries:
            self.outbox.add(entry.msg_id, peer, entry.text.encode("utf-8"), entry.ts, 0.0)
        self.outbox.put_first([entry.msg_id for entry in entries])  # older than what waited meanwhile
        return [Emit(ev.SendState(entry.msg_id, peer, "resealed")) for entry in entries]

    def _on_undecryptable(self, peer: str, ref: bytes, key: bytes | None, now: float) -> list[Action]:
        """``peer`` could not open our message ``ref`` and names the key to seal to (docs/PROTOCOL.md §10.4)."""
        if self.history is None:  # nothing kept to seal again: say so, it is lost
            return [Emit(ev.SendState(ref, peer, "undecryptable"))]
        state = self.history.undecryptable(ref, peer)
        if state is None:  # not ours in flight to them: unknown, already waiting, or contradicted by a receipt
            return []
        actions: list[Action] = [Emit(ev.SendState(ref, peer, state))]
        if state != "undecryptable" or key is None or not self.e2e.enabled:
            return actions
        try:
            self.e2e.learn(peer, key)
        except PeerKeyChanged as exc:
            return actions + self._key_changed(exc, now)
        if self.e2e.pending_key(peer) is not None:  # a change the user has not decided on yet
            return actions
        return actions + self._reseal(peer) + self._flush(now)  # the key we have is theirs: we sealed to an older one

    def _waiting_from_earlier_run(self, now: float) -> list[Action]:
        """At the first registration: our refused messages of an earlier run go if their recipient's key was
        accepted meanwhile (or is the one pinned); else its change is reported again."""
        actions: list[Action] = []
        if self.history is None:
            return actions
        for peer in self.history.waiting_peers():
            pending = self.e2e.pending_key(peer)
            if pending is None:
                actions += self._reseal(peer)
            elif peer not in self._blocked:
                actions += self._key_changed(PeerKeyChanged(peer, self.e2e.pinned_key(peer) or b"", pending), now)
        return actions

    def _accepted_elsewhere(self, now: float) -> list[Action]:
        """Changes the user accepted in another process (``p2pchat trust``: the key file changed)."""
        actions: list[Action] = []
        for user in [u for u in self._blocked if self.e2e.pending_key(u) is None]:
            actions += self._key_accepted(user, now)
        return actions
