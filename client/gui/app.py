"""``p2pchat gui``: open the chat window.

Pre-fills the connect panel from ``--server``/``--user`` over the remembered
settings, and connects at once when both are given. Problems that stop the
window from opening (no display, no Tk, no PySimpleGUI) become one-line
``OSError``s for the CLI to print, never tracebacks: they are about this
machine, not the chat protocol, so no ``ErrorCode`` fits them.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from p2pchat.common.endpoints import ServerAddress
from p2pchat.common.errors import P2PChatError

if TYPE_CHECKING:
    from p2pchat.client.gui.window import ChatWindow, GuiOptions


def run_gui(args: argparse.Namespace) -> int:
    open_window(args).run()
    return 0


def open_window(args: argparse.Namespace, options: GuiOptions | None = None) -> ChatWindow:
    """Build the window from the command line and saved settings; connect if told whom and where."""
    try:
        import tkinter

        from p2pchat.client.gui.settings import SettingsStore, settings_path
        from p2pchat.client.gui.window import ChatWindow, GuiOptions
    except ImportError as exc:
        raise OSError(f"the desktop GUI needs tkinter and PySimpleGUI ({exc})") from None

    store = SettingsStore(settings_path())
    settings = store.load()
    notice = ""
    if args.server:
        try:
            server = ServerAddress.parse(args.server)
            settings = dataclasses.replace(settings, host=server.host, port=server.port)
        except P2PChatError as exc:  # shown in the connect panel, where it can be corrected
            notice = f"--server: {exc.message}"
    if args.user:
        settings = dataclasses.replace(settings, user=args.user)
    try:
        window = ChatWindow(settings, store=store, options=options or GuiOptions.from_env(), notice=notice)
    except tkinter.TclError as exc:
        raise OSError(f"cannot open a window: {exc}") from None
    if args.server and args.user and not notice:
        window.submit_connect()  # a bad --user is reported inline, like a typed one
    return window
