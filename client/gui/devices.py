"""Our own devices in the window: the Devices panel lists them, links another by code, unlinks one.

A mixin of ``ChatWindow`` (window.py holds its state). The work is the command line's (``p2pchat devices``,
``link --user ID``, ``unlink``: client/linking.py, over the broker's key service, no session needed), each run on
a thread of its own so the window stays live: a link waits minutes for the new device. A job's outcome comes back
through the window's bridge as a ``DeviceJob`` tagged with the client generation it was started for, so a job that
ends after a disconnect changes nothing. The jobs' threads are daemons the window does not join: a link offer
only ends at its deadline, and what it reports then is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pchat.client.gui.accounts import chosen_device, own_device_lines, unlink_choices
from p2pchat.client.gui.layout import (
    K_DEVICES_LIST,
    K_DEVICES_NOTE,
    K_DEVICES_PANEL,
    K_LINK_CODE,
    K_LINK_DEVICE,
    K_UNLINK_DEVICE,
    K_UNLINK_WHICH,
)
from p2pchat.common.crypto import fingerprint
from p2pchat.common.errors import P2PChatError

log = logging.getLogger(__name__)

ASKING = "Asking the broker for your devices…"
LINK_TIMEOUT = 300.0  # seconds a code waits for the new device (as `p2pchat link`)
REQUEST_TIMEOUT = 10.0  # seconds for the key service


@dataclass(frozen=True, slots=True)
class DeviceJob:
    """What a device job reports: ``listed`` (a DeviceList), ``code`` ((code, seconds it lives)), ``linked`` (the
    new device), ``unlinked`` (the device removed) or ``failed`` (``error`` says why)."""

    kind: str
    value: Any = None
    error: str = ""


class DeviceManagement:
    _devices_open = False
    _devices_listed: Any = None  # the last DeviceList, None until listed
    _devices_note = ""
    _link_code = ""
    _device_busy = False  # a link or an unlink is under way: one at a time

    def toggle_devices(self, open_: bool | None = None) -> None:
        self._devices_open = not self._devices_open if open_ is None else open_
        if self._devices_open and self.client is not None:
            if self._devices_listed is None:
                self._devices_note = ASKING
            self._list_devices()
        self._render_devices()

    def forget_devices(self) -> None:
        """Another client (disconnected, or another user): what the panel showed was theirs."""
        self._devices_listed, self._device_busy, self._link_code, self._devices_note = None, False, "", ""

    def _list_devices(self) -> None:
        self._start_device_job("listed", lambda linking: linking.service.devices(linking.user))

    def link_device(self) -> None:
        """Show a code for the new device (``p2pchat link --user ID --code CODE`` there) and link what answers."""
        from p2pchat.client.linking import offer_link

        if self.client is None or self._device_busy:
            return
        generation, post = self._generation, self.bridge.post

        def show_code(code: str, ttl: float) -> None:
            post((generation, DeviceJob("code", (code, min(ttl, LINK_TIMEOUT)))))

        self._device_busy = True
        self._devices_note = "Opening a link slot at the broker…"
        self._start_device_job("linked", lambda linking: offer_link(linking, LINK_TIMEOUT, show_code))
        self._render_devices()

    def unlink_device(self) -> None:
        from p2pchat.client.linking import unlink

        which = chosen_device(self.window[K_UNLINK_WHICH].get())
        if self.client is None or self._device_busy or not which:
            return
        self._device_busy = True
        self._devices_note = f"Unlinking device {which}…"
        self._start_device_job("unlinked", lambda linking: unlink(linking, which, None))
        self._render_devices()

    def _start_device_job(self, kind: str, work: Callable[[Any], Any]) -> None:
        from p2pchat.client.linking import Linking

        assert self.client is not None
        user, config, generation, post = self.client.user, self.client.config, self._generation, self.bridge.post

        def run() -> None:
            try:
                job = DeviceJob(kind, work(Linking.start(user, config, REQUEST_TIMEOUT)))
            except P2PChatError as exc:
                job = DeviceJob("failed", error=exc.message)
            except OSError as exc:
                job = DeviceJob("failed", error=str(exc))
            post((generation, job))

        threading.Thread(target=run, name=f"p2pchat-gui-devices-{kind}", daemon=True).start()

    def _on_device_job(self, job: DeviceJob) -> None:
        if job.kind == "listed":
            self._devices_listed = job.value
            if self._devices_note == ASKING:
                self._devices_note = ""
        elif job.kind == "code":
            code, ttl = job.value
            self._link_code = code
            self._devices_note = (f"On the new device run: p2pchat link --user {self.model.user} --code {code}   "
                                  f"(within {ttl:g} s; the code works once). This window waits for it.")
        elif job.kind == "failed":
            self._device_busy, self._link_code = False, ""
            self._devices_note = f"Could not do that: {job.error}"
            self._log(f"Devices: {job.error}")
        else:
            device = job.value
            self._device_busy, self._link_code = False, ""
            what = "Linked" if job.kind == "linked" else "Unlinked"
            self._devices_note = f"{what} {device.name or 'a device'} ({fingerprint(device.key)})."
            self._log(f"{what} {device.name or 'a device'} ({fingerprint(device.key)}) as a device of "
                      f"{self.model.user}" if job.kind == "linked" else
                      f"Unlinked device {device.id} ({device.name or 'unnamed'}): it can no longer connect")
            self._list_devices()  # the list again, as the broker has it now
        self._render_devices()

    def _render_devices(self) -> None:
        open_ = self._devices_open and self.client is not None
        self._set_visible(K_DEVICES_PANEL, open_)
        if not open_:
            return
        listed = self._devices_listed
        mine = self.client.identity.public
        self.window[K_DEVICES_LIST].update(own_device_lines(listed.devices, mine) if listed is not None else "")
        choices = unlink_choices(listed.devices, mine) if listed is not None else []
        chosen = self.window[K_UNLINK_WHICH].get()  # kept while it is still a device to unlink
        self.window[K_UNLINK_WHICH].update(value=chosen if chosen in choices else choices[0] if choices else "",
                                           values=choices)
        for key, text in ((K_LINK_CODE, self._link_code), (K_DEVICES_NOTE, self._devices_note)):
            self.window[key].update(text)
            self._set_visible(key, bool(text))
        self.window[K_LINK_DEVICE].update(disabled=self._device_busy)
        self.window[K_UNLINK_DEVICE].update(disabled=self._device_busy or not choices)
