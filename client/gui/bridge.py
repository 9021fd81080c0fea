"""Self-pipe bridge from the client's agent thread to the Tk thread.

Why not call ``window.write_event_value`` straight from the agent's callback?
With a threaded Tcl, tkinter runs any Tk call made from another thread by
queueing it to the Tk thread and *waiting* until that thread services its event
loop. The agent would then stall its heartbeats whenever the window is busy,
and deadlock whenever the Tk thread itself waits on the agent (``send_async``
waits for the message id, ``close`` joins the agent). So the agent only puts
the event in a queue and pokes a socket; Tk watches that socket with a file
handler and, on its own thread, hands each event to ``write_event_value``.
"""

from __future__ import annotations

import logging
import queue
import tkinter
from collections.abc import Callable
from typing import Any

from p2pchat.common.wakeup import Waker

log = logging.getLogger(__name__)


class TkEventBridge:
    def __init__(self, tk: Any, deliver: Callable[[Any], None]) -> None:
        """``tk`` is the Tcl interpreter (``widget.tk``); ``deliver`` runs on the Tk thread."""
        self._tk = tk
        self._deliver = deliver
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waker = Waker()
        self._open = True
        if not hasattr(tk, "createfilehandler"):  # Tk on Windows watches no sockets
            self._waker.close()
            raise OSError("the desktop GUI needs Tk file handlers (Linux, BSD or macOS)")
        tk.createfilehandler(self._waker.fileno(), tkinter.READABLE, self._on_readable)

    def post(self, item: Any) -> None:
        """Any thread; never blocks."""
        self._queue.put(item)
        self._waker.wake()

    def _on_readable(self, _fd: int, _mask: int) -> None:
        self._waker.drain()  # drain first: a post racing with us leaves a fresh wake-up
        while self._open:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                self._deliver(item)
            except Exception:  # an exception here would be swallowed by Tk: keep it visible
                log.exception("dropped a client event the window could not take: %r", item)

    def close(self) -> None:
        """Tk thread. Later posts are dropped silently (the client is closed by then)."""
        if not self._open:
            return
        self._open = False
        self._tk.deletefilehandler(self._waker.fileno())
        self._waker.close()
