"""Peer keys in the window: the header's verified mark, the Verify panel, the changed-key banner and notice.

A mixin of ``ChatWindow`` (window.py holds its state). A changed key is
explained in words and holds what goes to and comes from that peer only until
the user has seen it: Continue accepts the new key and lets it all go at once;
Verify… shows the safety number to compare, now or later, and marks the key
verified: one number for the peer's account where both account keys are known, with the peer's devices under it
(verifying it marks the account verified, so their devices count as verified as they come and go), else the
per-device number, said so. With the setting to accept new keys automatically, the library has
already accepted it: a notice says so instead.
"""

from __future__ import annotations

from p2pchat.client.gui.layout import (
    K_COMPOSER_NOTE,
    K_DEVICE_SAFETY,
    K_DEVICE_SAFETY_ROW,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_BANNER_TITLE,
    K_KEY_INFO,
    K_KEY_NOTICE,
    K_KEY_NOTICE_TEXT,
    K_KEY_NOTICE_TITLE,
    K_KEY_PANEL,
    K_KEY_PANEL_NOTE,
    K_KEY_PANEL_TITLE,
    K_MARK_VERIFIED,
    K_OWN_FP,
    K_OWN_FP_LABEL,
    K_PEER_DEVICES,
    K_PEER_DEVICES_ROW,
    K_PEER_FP,
    K_PEER_FP_LABEL,
    K_PEER_KEY,
    K_SAFETY,
    K_VERIFIED_STATE,
)
from p2pchat.client.gui.accounts import peer_device_lines, safety_note
from p2pchat.client.gui.model import KeyChange
from p2pchat.common.crypto import fingerprint, safety_number
from p2pchat.common.errors import P2PChatError


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def why_keys_change(peer: str, how: str | None = None) -> str:
    if how == "recovered":
        return (f"The broker says {peer} moved their account to a new key with their recovery phrase — if {peer} "
                f"did not, someone else has that phrase.")
    if how == "moved":
        return (f"The broker says its operator moved {peer}'s ID to a new key (for example after {peer} lost "
                f"their device) — or the broker is not to be trusted.")
    return (f"{peer} may have reinstalled p2p-chat, set up a new device or recovered their account — "
            f"or someone may be impersonating {peer}.")


def explain_key_change(peer: str, to_send: int, held: int, was_verified: bool, comparing: bool,
                       how: str | None = None) -> str:
    """The banner's paragraph: why a key changes, what waits for the user, what Continue and Verify… do
    (``comparing``: the Verify panel is open below, so a line is enough)."""
    if comparing:
        return f"Compare the safety number below with {peer}, or Continue without verifying."
    parts = [_count(to_send, "message") + " to send"] if to_send else []
    parts += [_count(held, "received message") + " to show"] if held else []
    waiting = f" Waiting: {', '.join(parts)}." if parts else ""
    caution = (f"You had verified {peer}'s previous key: compare the new safety number with {peer} before you "
               f"continue." if was_verified else
               f"Continue accepts the new key and lets what waits go at once; verify it with {peer} now or later.")
    return f"{why_keys_change(peer, how)}{waiting} {caution}"


class KeyVerification:
    def accept_key(self) -> None:
        """Continue: the user has seen the change; trust the new key and let what waited go."""
        peer, client = self.model.active, self.client
        if peer is None or client is None or peer not in self.model.key_changed:
            return
        change = self.model.key_changed[peer]
        try:
            client.accept_peer_key(peer)
        except P2PChatError as exc:
            self._log(f"Cannot accept {peer}'s key: {exc.message}")
            return
        self._key_accepted(peer, f"You accepted {peer}'s new key {change.new}")

    def toggle_verified(self) -> None:
        """The Verify panel's button: mark the key compared as verified (accepting a new one), or clear the mark."""
        peer, client = self.model.active, self.client
        if peer is None or client is None:
            return
        if peer in self.model.key_changed:  # what the panel shows is the new key: accept it, then mark it
            self.accept_key()
            if peer in self.model.key_changed:
                return
            verified = True
        else:
            verified = not client.is_verified(peer)
        if client.set_verified(peer, verified):
            self._log(f"You marked {peer}'s key as verified" if verified else
                      f"You cleared the verification of {peer}'s key")
        self._render_security()

    def dismiss_key_notice(self) -> None:
        if self.model.active is not None:
            self.model.dismiss_key_notice(self.model.active)
            self._render_security()

    def _key_accepted(self, peer: str, why: str) -> None:
        for line in self.model.peer_key_accepted(peer):
            if self._showing(peer):
                self._view().update_delivery(line)
        self._log(why)
        self._render_roster()
        self._render_header()

    def _key_changed(self, peer: str, old: bytes, new: bytes, accepted: bool = False, how: str | None = None
                     ) -> None:
        """``peer`` presents a new key: everything that waits for it raises the same banner (or the notice, when
        the library accepted it by itself). Reported again for each message held: the counts move."""
        known = self.model.key_changed.get(peer) or self.model.key_notices.get(peer)
        if how is None and known is not None and known.new_key == new:
            how = known.how  # the broker said it once (key_changed); later reports of the same key do not
        change = KeyChange(fingerprint(old) if old else "none", fingerprint(new), new, how)
        if accepted:
            if self.model.peer_key_auto_accepted(peer, change):
                self._log(f"{peer}'s key changed to {change.new}; accepted automatically, as your settings ask")
        else:
            if self.model.peer_key_changed(peer, change):
                self._log(f"{peer}'s key changed to {change.new}; messages to and from them wait until you "
                          f"press Continue")
            for line in self.model.hold_unsent(peer):
                if self._showing(peer):
                    self._view().update_delivery(line)
        self._render_roster()
        if peer == self.model.active:
            self._render_header()

    def _check_pending_key(self, peer: str) -> None:
        """A change still pending (from this run or an earlier one) shows its banner before the user sends."""
        change = self.client.pending_key_change(peer) if self.client is not None else None
        if change is not None:
            self._key_changed(peer, *change)

    def _check_key_decided(self, peer: str) -> None:
        """A change accepted in another process (``p2pchat trust`` or ``verify``): the library noticed within a
        heartbeat and let what waited go; the window follows when it hears from that peer."""
        if peer in self.model.key_changed and self.client is not None \
                and self.client.pending_key_change(peer) is None:
            self._key_accepted(peer, f"{peer}'s new key was accepted outside this window")

    def _render_security(self) -> None:
        """The peer's key in the header, the Verify panel, and the banner or notice of a changed key (none while
        searching)."""
        active = self.model.active
        peer = active if self.model.search is None and type(active) is str else None  # a room's keys are its members'
        client, pal = self.client, self.palette
        keys_known = peer is not None and client is not None
        change = self.model.key_changed.get(peer) if peer is not None else None
        notice = self.model.key_notices.get(peer) if peer is not None and change is None else None
        peer_fp = client.fingerprint_of(peer) if keys_known else None
        verified = keys_known and peer_fp is not None and client.is_verified(peer)
        if change is not None:
            header, colour = "key changed", pal.warn
        elif peer_fp:
            header, colour = (f"✓ verified · key {peer_fp}", pal.ok) if verified else \
                (f"not verified · key {peer_fp}", pal.muted)
        else:
            header, colour = ("key not known yet" if keys_known else ""), pal.muted
        self.window[K_PEER_KEY].update(header, text_color=colour)
        self._set_visible(K_KEY_INFO, keys_known)

        self._set_visible(K_KEY_BANNER, change is not None)
        if change is not None:
            assert client is not None and peer is not None
            self.window[K_KEY_BANNER_TITLE].update(f"{peer}'s key has changed")
            self.window[K_KEY_BANNER_TEXT].update(explain_key_change(
                peer, self.model.waiting_to_send(peer), self._held_from(peer), client.was_verified(peer),
                comparing=self._key_panel_open, how=change.how))
        self._set_visible(K_KEY_NOTICE, notice is not None)
        if notice is not None:
            self.window[K_KEY_NOTICE_TITLE].update(f"{peer}'s key changed and was accepted automatically")
            self.window[K_KEY_NOTICE_TEXT].update(
                f"{why_keys_change(peer, notice.how)} Your settings accept new keys at once, so nothing waited: compare the "
                f"safety number with {peer} (Verify…) to be sure.")
        self.window[K_COMPOSER_NOTE].update(
            f"What you send {peer} waits until you press Continue above." if change else "")
        self._set_visible(K_COMPOSER_NOTE, change is not None)
        self._render_key_panel(peer if self._key_panel_open and keys_known else None, change, peer_fp, verified)

    def _held_from(self, peer: str) -> int:
        try:
            return self.client.held_from(peer) if self.client is not None else 0
        except P2PChatError:  # the agent has just stopped: its Stopped event takes the window back to connect
            return 0

    def _render_key_panel(self, peer: str | None, change: KeyChange | None, peer_fp: str | None,
                          verified: bool) -> None:
        """The safety number and both keys to compare, and the verified mark (``peer`` None: hidden)."""
        self._set_visible(K_KEY_PANEL, peer is not None)
        self.window[K_KEY_INFO].update("Hide keys" if peer is not None else "Verify")
        if peer is None:
            return
        client = self.client
        assert client is not None
        account_number = client.account_safety_number(peer) if change is None else None
        if change is not None and change.new_key:  # what to check before accepting is the new key
            number: str | None = safety_number(client.identity.public, change.new_key)
            shown_fp, label = change.new, "Their new key"
        elif account_number is not None:  # one number for the account, whatever devices either side uses
            account = client.account_of(peer)
            assert account is not None
            number, shown_fp, label = account_number, fingerprint(account), "Their account"
        else:
            number, shown_fp, label = client.safety_number(peer), peer_fp, "Their key"
        devices = peer_device_lines(client.devices_of(peer)) if account_number is not None else ""
        # Beside the account's number, the one of this pair of devices: what the other side compares while one
        # of them has a key change to decide (the panel then shows that number alone).
        device_number = client.safety_number(peer) if account_number is not None else None
        self._set_visible(K_DEVICE_SAFETY_ROW, device_number is not None)
        self.window[K_DEVICE_SAFETY].update(device_number or "")
        self.window[K_KEY_PANEL_TITLE].update(f"VERIFY {peer.upper()} · " + (
            "ONE NUMBER FOR THEIR ACCOUNT" if account_number else "PER DEVICE"))
        self.window[K_SAFETY].update(number or "known once you have exchanged a message")
        self.window[K_PEER_FP_LABEL].update(label)
        self.window[K_PEER_FP].update(shown_fp or "not known yet")
        self._set_visible(K_PEER_DEVICES_ROW, bool(devices))
        self.window[K_PEER_DEVICES].update(devices)
        own = client.account_of(client.user) if account_number else None
        self.window[K_OWN_FP_LABEL].update("Your account" if own else "Your key")
        self.window[K_OWN_FP].update(fingerprint(own) if own else client.fingerprint_of(client.user) or "")
        self.window[K_KEY_PANEL_NOTE].update(safety_note(peer, per_account=account_number is not None))
        if change is not None:
            state, colour, button = "new key, not verified", self.palette.warn, "Mark as verified and continue"
        elif verified:
            state, colour, button = "✓ verified", self.palette.ok, "Clear verification"
        else:
            state, colour, button = "not verified", self.palette.muted, "Mark as verified"
        self.window[K_VERIFIED_STATE].update(state, text_color=colour)
        self.window[K_MARK_VERIFIED].update(button, disabled=number is None)
