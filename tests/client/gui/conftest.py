"""Fixtures for the desktop GUI's tests: a display (Xvfb when there is none) and real windows on a real broker.

Every window lives on the test's thread, as Tk requires; tests step each
window's read loop (``ChatWindow.step``) until what a user would see on screen
matches, with a deadline instead of sleeps (``pump``). Notifications are off
unless a test turns them on, so no popup can steal a step. What a user does to
a window (click, type, pick a person, attach a file) is in driving.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from p2pchat.client.gui.settings import GuiSettings, SettingsStore
from p2pchat.client import events as ev
from p2pchat.client.chat_client import ChatClient, ClientConfig
from tests.conftest import HEARTBEAT, BrokerProcess, wait_for

if TYPE_CHECKING:
    from p2pchat.client.gui.window import ChatWindow

STEP_MS = 20  # how long one idle window may hold the loop before the next gets its turn
# One small chunk per round trip through the broker: a big (sparse) file stays in flight for seconds,
# long enough to watch its progress and press Cancel, without writing much to disk.
SLOW_FILES = (("chunk_size", 16 * 1024), ("window", 1))


@pytest.fixture(scope="package")
def display() -> Iterator[str]:
    """The existing DISPLAY, or a private Xvfb on a free display number for the GUI's tests."""
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("no DISPLAY and Xvfb is not installed (apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    # -displayfd: Xvfb picks a free display number and writes it once it accepts connections.
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    try:
        while not number.endswith(b"\n"):
            chunk = os.read(read_fd, 16)  # EOF if Xvfb died before it was ready
            if not chunk:
                pytest.fail(f"Xvfb exited with {xvfb.wait(5)} before it was ready")
            number += chunk
    finally:
        os.close(read_fd)
    os.environ["DISPLAY"] = f":{number.decode().strip()}"
    try:
        yield os.environ["DISPLAY"]
    finally:
        # Tk dies with the X server if its root is still connected: destroy it first.
        import PySimpleGUI as sg  # only here: test_model.py runs without Tk

        root = sg.Window.hidden_master_root
        if root is not None:
            root.destroy()
            sg.Window.hidden_master_root = None
        del os.environ["DISPLAY"]
        xvfb.terminate()
        xvfb.wait(10)


def pump(windows: list[ChatWindow], until: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Step every open window's event loop until ``until()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        for window in windows:
            if not window.finished:
                window.step(STEP_MS)


def received_dir(tmp_path: Path, user: str) -> Path:
    return tmp_path / "homes" / user / "client_received"


@pytest.fixture
def reinstalled_bob(tmp_path: Path, home: Path) -> Path:
    """alice and bob chatted on another broker, so each pinned the other's key; then bob reinstalled. Returns
    his new state directory (a fresh key): alice's windows on the test's broker still have his old key."""
    first = BrokerProcess.launch(tmp_path / "first-broker")
    config = ClientConfig(server=first.address, heartbeat_ivl=HEARTBEAT)
    clients = [ChatClient(user, config) for user in ("alice", "bob")]
    try:
        for client in clients:
            client.connect(timeout=10)
        clients[0].send("bob", "See you at the review tomorrow.")
        wait_for(clients[1], lambda e: isinstance(e, ev.MessageReceived))
        wait_for(clients[0], lambda e: isinstance(e, ev.Receipt))  # alice's history says delivered
    finally:
        for client in clients:
            client.close()
        first.stop()
    return tmp_path / "bob-reinstalled"


@pytest.fixture
def make_window(display: str, broker: BrokerProcess, home: Path,
                tmp_path: Path) -> Iterator[Callable[..., ChatWindow]]:
    # Imported here, not at the top: they need Tk, and test_model.py runs without it.
    from p2pchat.client.gui.window import ChatWindow, GuiOptions
    from tests.client.gui.driving import FakeDesktop

    windows: list[ChatWindow] = []

    def make(user: str = "", connect: bool = True, notifications: bool = False, send_timeout: float = 10.0,
             desktop: FakeDesktop | None = None, slow_files: bool = False, state_dir: Path | None = None,
             received: Path | None = None, **settings_: object) -> ChatWindow:
        """``state_dir``: the user's files somewhere else (a reinstall, another device), ``received`` where its
        files go; ``settings_``: more GuiSettings."""
        settings = GuiSettings(host="127.0.0.1", port=broker.port, user=user, **settings_)
        overrides = (*(SLOW_FILES if slow_files else ()), *((("state_dir", state_dir),) if state_dir else ()))
        options = GuiOptions(notifications=notifications, heartbeat_ivl=HEARTBEAT, toast_ms=60_000,
                             send_timeout=send_timeout, received_dir=received or received_dir(tmp_path, user or "nobody"),
                             client_overrides=overrides)
        window = ChatWindow(settings, store=SettingsStore(home / "gui.json"), options=options,
                            desktop=(desktop or FakeDesktop()).desktop())
        windows.append(window)
        if connect:
            window.submit_connect()
            pump([window], lambda: window.status_text().startswith("Connected"), f"{user} to connect")
        return window

    yield make
    for window in windows:
        window.close()
