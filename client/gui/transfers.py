"""Files in the window: attach and offer one, cancel, show the folder, follow transfer events, the status bar's share.

A mixin of ``ChatWindow`` (window.py holds its state). The client library's
agent does the transfer itself (network and disk); this side only turns its
events into ``FileLine`` updates and redraws the file's card.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from p2pchat.client import events as ev
from p2pchat.client.gui.layout import K_STATUS_TRANSFERS
from p2pchat.client.gui.model import FileLine, Transfer, should_notify
from p2pchat.client.gui.units import human_size, short_path
from p2pchat.client.gui.rendering import now_ms
from p2pchat.common.errors import ErrorCode, P2PChatError


class FileTransfers:
    def attach_file(self) -> None:
        """Ask the desktop for a file (the dialog is modal) and offer it to the open conversation."""
        peer = self.model.active
        if peer is None or not self._can_send():
            return
        chosen = self.desktop.choose_file(self.window.TKroot, peer)
        # The dialog ran Tk's loop: the conversation or the connection may have changed meanwhile.
        if chosen and self.model.active == peer and self._can_send():
            self.send_file(peer, Path(chosen))

    def send_file(self, peer: str, path: Path) -> None:
        assert self.client is not None
        now = now_ms()
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # the library says why it cannot send it
        try:
            xfer, _done = self.client.send_file(peer, path)  # the outcome arrives as FileSent or FileFailed
        except (P2PChatError, FutureTimeout) as exc:
            reason = exc.message if isinstance(exc, P2PChatError) else "the client did not answer"
            line = self.model.file_refused(peer, path.name, now, reason)
            self._log(f"Cannot send {path.name}: {reason}")
        else:
            existing = self.model.file(xfer)
            if existing is not None and not existing.finished:  # the same file, still on its way
                return
            line = self.model.file_sending(xfer, peer, path.name, size, now)
            self._log(f"Offering {path.name} ({human_size(size)}) to {peer}")
        if self._showing(peer):
            self._view().append(line)
        self._render_roster()
        self._render_transfers()

    def cancel_transfer(self, xfer: bytes) -> None:
        line = self.model.file(xfer)
        if line is None or line.finished or self.client is None:
            return
        line.cancel_asked = True  # the FileFailed(CANCELLED) that follows is ours
        try:
            self.client.cancel_transfer(xfer)
        except P2PChatError as exc:
            self._log(f"Cannot cancel {line.name}: {exc.message}")

    def open_folder(self, xfer: bytes) -> None:
        line = self.model.file(xfer)
        if line is None or line.path is None:
            return
        folder = line.path.parent
        try:
            self.desktop.open_folder(folder)
        except OSError as exc:
            self._log(f"Cannot open {short_path(folder)}: {exc.strerror or exc}")

    def _on_file_event(self, event: Any) -> None:
        """Files in both directions: each event moves one ``FileLine``; new ones join the timeline."""
        model, now, kind = self.model, now_ms(), type(event)
        known = model.file(event.xfer) is not None
        line: FileLine | None
        if kind is ev.FileIncoming:
            line, _ = model.file_incoming(event.xfer, event.sender, event.name, event.size, now)
            if not known:
                self._log(f"Receiving {event.name} ({human_size(event.size)}) from {event.sender}")
                if should_notify(self._notifications_on(), self._focused(), model.active, event.sender):
                    self._notify(event.sender, f"sent you a file: {event.name} ({human_size(event.size)})")
        elif kind is ev.FileProgress:
            progress = model.file_progress(event.xfer, event.peer, event.name, event.direction == "out",
                                           event.done, event.size, event.rate, event.eta, now)
            line = progress[0] if progress else None
        elif kind is ev.FileReceived:
            line = model.file_received(event.xfer, event.sender, event.name, event.path, event.size, now)
            self._log(f"Saved {event.name} from {event.sender} to {short_path(event.path)}")
        elif kind is ev.FileSent:
            line = model.file_sent(event.xfer)
            if line is not None:
                self._log(f"{event.recipient} received {event.name}")
        else:  # FileFailed; an offer refused at once, or a transfer resumed from an earlier run, is news here
            if event.error.code is ErrorCode.PEER_KEY_CHANGED:
                self._check_pending_key(event.peer)
            if not known and event.direction == "in":
                model.file_incoming(event.xfer, event.peer, event.name, 0, now)
            elif not known:
                model.file_sending(event.xfer, event.peer, event.name, 0, now)
            line = model.file_failed(event.xfer, event.error)
            if line is not None:
                way = f"Sending {event.name} to" if line.outgoing else f"Receiving {event.name} from"
                self._log(f"{way} {event.peer}: {line.failure}")
        if line is None:
            return
        if self._showing(line.peer):
            if known:
                self._view().update_file(line)
            else:
                self._view().append(line)
        if not known:
            self._render_roster()
        self._render_transfers()

    def _render_transfers(self) -> None:
        """The status bar's transfer segment: what is moving in any conversation, and how fast."""
        moving = [t for t in self.model.active_transfers() if t.state is not Transfer.PAUSED]
        if not moving:
            text = ""
        elif len(moving) == 1:
            t = moving[0]
            arrow = "↑" if t.outgoing else "↓"
            text = f"{arrow} {t.name} {round(t.fraction * 100)}%"
            if t.rate > 0:
                text += f" · {human_size(t.rate)}/s"
        else:
            ups = sum(1 for t in moving if t.outgoing)
            rate = sum(t.rate for t in moving)
            text = f"↑ {ups}  ↓ {len(moving) - ups} transfers · {human_size(rate)}/s"
        self.window[K_STATUS_TRANSFERS].update(text)
