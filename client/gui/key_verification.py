"""Peer keys in the window: the header's fingerprint, the Verify panel, the changed-key banner, accepting a new key.

A mixin of ``ChatWindow`` (window.py holds its state). A changed key pauses
sending to that peer until the user compares safety numbers and accepts it.
"""

from __future__ import annotations

from p2pchat.client.gui.layout import (
    K_COMPOSER_NOTE,
    K_KEY_BANNER,
    K_KEY_BANNER_TEXT,
    K_KEY_BANNER_TITLE,
    K_KEY_INFO,
    K_KEY_PANEL,
    K_KEY_PANEL_NOTE,
    K_KEY_PANEL_TITLE,
    K_OWN_FP,
    K_PEER_FP,
    K_PEER_FP_LABEL,
    K_PEER_KEY,
    K_SAFETY,
)
from p2pchat.client.gui.model import KeyChange
from p2pchat.common.crypto import fingerprint, safety_number
from p2pchat.common.errors import P2PChatError


class KeyVerification:
    def accept_key(self) -> None:
        """The user compared the new key with the peer: trust it and let sending resume."""
        peer, client = self.model.active, self.client
        if peer is None or client is None or peer not in self.model.key_changed:
            return
        change = self.model.key_changed[peer]
        try:
            client.accept_peer_key(peer)
        except P2PChatError as exc:
            self._log(f"Cannot accept {peer}'s key: {exc.message}")
            return
        self.model.peer_key_accepted(peer)
        self._log(f"You accepted {peer}'s new key {change.new}")
        self._render_roster()
        self._render_header()

    def _key_changed(self, peer: str, old: bytes, new: bytes) -> None:
        """Sends, offers and messages refused because a peer's key changed all raise the same banner."""
        change = KeyChange(fingerprint(old) if old else "none", fingerprint(new), new)
        if not self.model.peer_key_changed(peer, change):
            return
        self._log(f"{peer}'s key changed to {change.new}; sending to them is paused until you accept it")
        self._render_roster()
        if peer == self.model.active:
            self._render_header()

    def _check_pending_key(self, peer: str) -> None:
        """A change still pending (from this run or an earlier one) shows its banner before the user sends."""
        change = self.client.pending_key_change(peer) if self.client is not None else None
        if change is not None:
            self._key_changed(peer, *change)

    def _render_security(self) -> None:
        """The peer's key in the header, the Verify panel, and the banner of a changed key (none while searching)."""
        peer = self.model.active if self.model.search is None else None
        client, user, pal = self.client, self.model.user, self.palette
        keys_known = peer is not None and client is not None
        change = self.model.key_changed.get(peer) if peer is not None else None
        peer_fp = client.fingerprint_of(peer) if keys_known else None
        if change is not None:
            header, colour = "key changed", pal.warn
        else:
            header = f"key {peer_fp}" if peer_fp else "key not known yet" if keys_known else ""
            colour = pal.muted
        self.window[K_PEER_KEY].update(header, text_color=colour)
        self._set_visible(K_KEY_INFO, keys_known)

        self._set_visible(K_KEY_BANNER, change is not None)
        if change is not None:
            self.window[K_KEY_BANNER_TITLE].update(f"{peer}'s key has changed")
            self.window[K_KEY_BANNER_TEXT].update(
                f"It was {change.old} and is now {change.new}. That happens when {peer} reinstalls p2p-chat, "
                f"but it can also mean someone is impersonating them. Sending to {peer} is paused until you "
                f"compare the new safety number with them (in person or on a call) and accept the new key.")
        self.window[K_COMPOSER_NOTE].update(
            f"Sending to {peer} is paused until you accept their new key." if change else "")
        self._set_visible(K_COMPOSER_NOTE, change is not None)

        show_panel = self._key_panel_open and keys_known
        self._set_visible(K_KEY_PANEL, show_panel)
        self.window[K_KEY_INFO].update("Hide keys" if show_panel else "Verify")
        if not show_panel:
            return
        assert client is not None and peer is not None
        if change is not None and change.new_key:  # what to check before accepting is the new key
            number: str | None = safety_number(client.identity.public, change.new_key)
            shown_fp, label = change.new, "Their new key"
        else:
            number, shown_fp, label = client.safety_number(peer), peer_fp, "Their key"
        self.window[K_KEY_PANEL_TITLE].update(f"VERIFY {peer.upper()}")
        self.window[K_SAFETY].update(number or "known once you have exchanged a message")
        self.window[K_PEER_FP_LABEL].update(label)
        self.window[K_PEER_FP].update(shown_fp or "not known yet")
        self.window[K_OWN_FP].update(client.fingerprint_of(user) or "")
        self.window[K_KEY_PANEL_NOTE].update(
            f"Compare the safety number with {peer} in person or on a call. If you both see the same digits, "
            f"what you send can only be read by {peer}. It changes when either of you gets a new key.")
