"""Files in the window: sending what was chosen or dropped (to a person, online or not, or to a room), cancel,
the library's transfer events, the status bar's share.

A mixin of ``ChatWindow`` (window.py holds its state). The client library's
agent does the transfer itself (network and disk); this side only turns its
events into ``FileLine`` updates and redraws the file's card. A file to someone
offline is uploaded to the broker, which keeps it for them (uploaded, then
delivered); a room's is uploaded once and each member fetches it. A folder is
passed to the library as it is: one transfer, one card.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from p2pchat.client import events as ev
from p2pchat.client.gui.file_model import FileLine, Transfer
from p2pchat.client.gui.layout import K_CONVERSATION, K_STATUS_TRANSFERS
from p2pchat.client.gui.model import Key, should_notify
from p2pchat.client.gui.rendering import now_ms
from p2pchat.client.gui.units import human_size, short_path
from p2pchat.common.errors import ErrorCode, P2PChatError

FILE_EVENTS = (ev.FileIncoming, ev.FileProgress, ev.FileReceived, ev.FileUploaded, ev.FileSent, ev.FileFailed)


class FileTransfers:
    def attach_files(self) -> None:
        """Ask the desktop for files (the dialog is modal; several at once) and send them to the open conversation."""
        key = self.model.active
        if key is None or not self._can_attach():
            return
        chosen = self.desktop.choose_files(self.window.TKroot, f"Send files to {self._to_whom(key)}")
        # The dialog ran Tk's loop: the conversation or the connection may have changed meanwhile.
        if chosen and self.model.active == key and self._can_attach():
            self.send_paths(key, [Path(c) for c in chosen])

    def attach_folder(self) -> None:
        key = self.model.active
        if key is None or not self._can_attach():
            return
        chosen = self.desktop.choose_folder(self.window.TKroot, f"Send a folder to {self._to_whom(key)}", "")
        if chosen and self.model.active == key and self._can_attach():
            self.send_paths(key, [Path(chosen)])

    def drop_paths(self, paths: list[Path]) -> None:
        """Files and folders dropped on the window: to the open conversation, if it takes files now."""
        key = self.model.active
        if key is None or not self._can_attach():
            self._log("Open a conversation to send files to before dropping them.")
            return
        self.send_paths(key, paths)

    def _drag_hover(self, over: bool) -> None:
        """Something that may be dropped is over the window (or no longer): the timeline's border shows it."""
        self.drag_over = over
        accent = self.palette.accent
        self.window[K_CONVERSATION].Widget.configure(highlightthickness=2 if over else 0,
                                                     highlightbackground=accent, highlightcolor=accent)

    def send_paths(self, key: Key, paths: list[Path]) -> None:
        for path in paths:
            self.send_file(key, path)

    def send_file(self, key: Key, path: Path) -> None:
        """One file or folder to ``key``: a person (live, or left at the broker when offline) or a room."""
        assert self.client is not None
        now, room = now_ms(), key if type(key) is bytes else None
        peer = self.model.user if room is not None else key  # in a room, the line's author
        folder = path.is_dir()
        try:
            size = 0 if folder else path.stat().st_size
        except OSError:
            size = 0  # the library says why it cannot send it
        try:
            if room is not None:
                xfer, _done = self.client.send_room_file(self.model.rooms.name(room), path)
            else:
                xfer, _done = self.client.send_file(key, path)  # the outcome arrives as events
        except (P2PChatError, FutureTimeout) as exc:
            reason = exc.message if isinstance(exc, P2PChatError) else "the client did not answer"
            line = self.model.file_refused(peer, path.name, now, reason, room, folder)
            self._log(f"Cannot send {path.name}: {reason}")
        else:
            existing = self.model.file(xfer)
            if existing is not None and not existing.finished:  # the same file, still on its way
                return
            held = room is None and key not in self.model.online  # the library leaves it at the broker for them
            line = self.model.file_sending(xfer, peer, path.name, size, now, room, held, folder)
            what = f"{path.name} ({human_size(size)})" if not folder else f"the folder {path.name}"
            self._log(f"Uploading {what} to {self._to_whom(key)}" if room is not None
                      else f"Uploading {what} for {key}, who is offline: the broker keeps it for them" if held
                      else f"Offering {what} to {key}")
        if self._showing(line.key):
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

    def _to_whom(self, key: Key) -> str:
        return f"#{self.model.rooms.name(key)}" if type(key) is bytes else str(key)

    def _on_file_event(self, event: Any) -> None:
        """Files in both directions: each event moves one ``FileLine``; new ones join the timeline."""
        model, now, kind = self.model, now_ms(), type(event)
        room = getattr(event, "room", None)  # FileUploaded has none: it is one person's
        known = model.file(event.xfer) is not None
        line: FileLine | None
        if kind is ev.FileIncoming:
            line, _ = model.file_incoming(event.xfer, event.sender, event.name, event.size, now, room)
            if not known:
                where = f" in {self._to_whom(room)}" if room is not None else ""
                self._log(f"Receiving {event.name} ({human_size(event.size)}) from {event.sender}{where}")
                if should_notify(self._notifications_on(), self._focused(), model.active, line.key):
                    text = f"sent {'a file' if room is not None else 'you a file'}: {event.name} " \
                           f"({human_size(event.size)})"
                    self._notify(line.key, text, title=f"{self._to_whom(room)} · {event.sender}" if room else None)
        elif kind is ev.FileProgress:
            progress = model.file_progress(event.xfer, event.peer, event.name, event.direction == "out",
                                           event.done, event.size, event.rate, event.eta, now, room)
            line = progress[0] if progress else None
        elif kind is ev.FileReceived:
            files = getattr(event, "files", None)  # a folder's (the folders branch adds them), else absent
            folder = files is not None or event.path.is_dir()
            size = getattr(event, "bytes", None) or event.size
            line = model.file_received(event.xfer, event.sender, event.name, event.path, size, now, room, folder,
                                       files)
            self._log(f"Saved {event.name} from {event.sender} to {short_path(event.path)}")
            if not folder:
                self._thumbnails.request(event.xfer, event.path)
        elif kind is ev.FileUploaded:
            line = model.file_uploaded(event.xfer)
            if line is not None:
                self._log(f"Uploaded {event.name}: the broker keeps it until {event.recipient} fetches it")
        elif kind is ev.FileSent:
            line = model.file_sent(event.xfer)
            if line is not None:
                self._log(f"{self._to_whom(room)} was told about {event.name}" if room is not None
                          else f"{event.recipient} received {event.name}")
        else:  # FileFailed; an offer refused at once, or a transfer resumed from an earlier run, is news here
            if event.error.code is ErrorCode.PEER_KEY_CHANGED:
                self._check_pending_key(event.peer)
            if not known and event.direction == "in":
                model.file_incoming(event.xfer, event.peer, event.name, 0, now, room)
            elif not known:
                model.file_sending(event.xfer, event.peer, event.name, 0, now, room)
            line = model.file_failed(event.xfer, event.error)
            if line is not None:
                if line.outgoing:
                    way = f"Sending {event.name} to {self._to_whom(line.key)}"
                else:
                    way = f"Receiving {event.name} from {event.peer}" + (
                        f" in {self._to_whom(room)}" if room is not None else "")
                self._log(f"{way}: {line.failure}")
        if line is None:
            return
        if self._showing(line.key):
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
