"""Renders one conversation into a Tk ``Text`` widget, Slack style.

Messages from the same sender within a few minutes share one header (avatar,
name, time); our own messages carry their delivery state after the text, in a
tagged range so an ack or a failure rewrites only that range. A file is a
``FileCard`` embedded in the text, redrawn in place as its transfer moves.
"""

from __future__ import annotations

import datetime as dt
import tkinter as tk
from collections.abc import Callable

from client.gui_filecard import Action, FileCard, forward_wheel
from client.gui_model import ChatLine, Conversation, Delivery, FileLine, Line
from client.gui_theme import Fonts, Palette, avatar_colour

GROUP_GAP_MS = 5 * 60 * 1000
AVATAR = 30  # px
INDENT = AVATAR + 10  # the avatar's canvas includes the gap, so bodies line up under the name

DELIVERY_TEXT = {
    Delivery.SENDING: "sending…",
    Delivery.SENT: "sent ✓",
    Delivery.FAILED: "failed",
}


def _local(ts_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts_ms / 1000)


def day_label(day: dt.date, today: dt.date) -> str:
    if day == today:
        return "Today"
    if day == today - dt.timedelta(days=1):
        return "Yesterday"
    return day.strftime("%A %d %B %Y" if day.year != today.year else "%A %d %B")


def delivery_text(line: ChatLine) -> str:
    text = DELIVERY_TEXT.get(line.delivery, "")
    return f"{text}: {line.failure}" if line.delivery is Delivery.FAILED and line.failure else text


class ConversationView:
    def __init__(self, widget: tk.Text, pal: Palette, fonts: Fonts, me: str, on_action: Action) -> None:
        self.widget = widget
        self.pal = pal
        self.fonts = fonts
        self.me = me
        self._on_action = on_action
        self._last: Line | None = None
        self._cards: dict[bytes, FileCard] = {}  # the files of the conversation on screen
        w = widget
        w.configure(background=pal.chat_bg, foreground=pal.text, font=fonts.base, wrap="word", padx=18, pady=10,
                    borderwidth=0, highlightthickness=0, insertwidth=0, cursor="arrow",
                    selectbackground=pal.select_bg, selectforeground=pal.select_text, inactiveselectbackground=pal.border)
        w.tag_configure("header", spacing1=12, spacing3=2)
        w.tag_configure("name", font=fonts.bold, foreground=pal.text)
        w.tag_configure("own-name", font=fonts.bold, foreground=pal.own_name)
        w.tag_configure("time", font=fonts.small, foreground=pal.muted)
        w.tag_configure("body", lmargin1=INDENT, lmargin2=INDENT, rmargin=12, spacing1=1, spacing3=3)
        w.tag_configure("meta", font=fonts.small, foreground=pal.muted)
        w.tag_configure("meta-failed", font=fonts.small, foreground=pal.error)
        w.tag_configure("day", font=fonts.small_bold, foreground=pal.muted, justify="center", spacing1=14, spacing3=2)
        w.tag_configure("hint", font=fonts.base, foreground=pal.muted, justify="center", spacing1=4)
        w.tag_configure("hint-first", spacing1=150)

    # --- whole views ----------------------------------------------------------
    def show(self, conv: Conversation | None, hint: str = "") -> None:
        self._edit(lambda: self._render(conv, hint))

    def _render(self, conv: Conversation | None, hint: str) -> None:
        self.widget.delete("1.0", "end")  # also destroys the embedded avatars and file cards
        self._last = None
        self._cards.clear()
        if conv is None or not conv.lines:
            first, _, rest = hint.partition("\n")
            self.widget.insert("end", first, ("hint", "hint-first"))
            if rest:
                self.widget.insert("end", "\n" + rest, ("hint",))
            return
        for line in conv.lines:
            self._insert(line)

    # --- incremental updates --------------------------------------------------
    def append(self, line: Line) -> None:
        if self._last is None:  # replace the empty-conversation hint
            self._edit(lambda: self.widget.delete("1.0", "end"))
        self._edit(lambda: self._insert(line))

    def update_delivery(self, line: ChatLine) -> None:
        tag = self._meta_tag(line)
        ranges = self.widget.tag_ranges(tag)
        if not ranges:
            return
        start, end = ranges[0], ranges[-1]
        style = "meta-failed" if line.delivery is Delivery.FAILED else "meta"

        def rewrite() -> None:
            self.widget.delete(start, end)
            self.widget.insert(start, delivery_text(line), (style, tag))

        self._edit(rewrite, scroll=False)

    def update_file(self, line: FileLine) -> None:
        card = self._cards.get(line.xfer)
        if card is not None:
            card.render(line)

    def card(self, xfer: bytes) -> FileCard | None:
        return self._cards.get(xfer)

    def cards(self) -> list[FileCard]:
        return list(self._cards.values())

    def delivery_shown(self, line: ChatLine) -> str:
        """The delivery text as displayed (what a user reads, for tests)."""
        ranges = self.widget.tag_ranges(self._meta_tag(line))
        return self.widget.get(ranges[0], ranges[-1]) if ranges else ""

    # --- helpers ----------------------------------------------------------------
    def _insert(self, line: Line) -> None:
        w, last = self.widget, self._last
        when = _local(line.ts_ms)
        if last is None or _local(last.ts_ms).date() != when.date():
            if last is not None:
                w.insert("end", "\n")
            w.insert("end", day_label(when.date(), dt.date.today()), ("day",))
            last = None
        same_group = (last is not None and last.outgoing == line.outgoing
                      and 0 <= line.ts_ms - last.ts_ms < GROUP_GAP_MS)
        if not same_group:
            w.insert("end", "\n")
            start = w.index("end-1c")
            who = self.me if line.outgoing else line.peer
            avatar = self._avatar(who)
            forward_wheel(avatar, w)
            w.window_create("end", window=avatar, align="center")
            w.insert("end", "You" if line.outgoing else line.peer, ("own-name" if line.outgoing else "name",))
            w.insert("end", "   " + when.strftime("%H:%M"), ("time",))
            w.tag_add("header", start, "end-1c")  # Tk takes line spacing from the line's first index: the avatar
        w.insert("end", "\n")
        if isinstance(line, FileLine):
            card = FileCard(w, line, self.pal, self.fonts, self._on_action)
            forward_wheel(card, w)
            w.window_create("end", window=card, pady=4)
            w.tag_add("body", "end-2c")  # the card is the line's first index: it takes the body's indent
            self._cards[line.xfer] = card
        else:
            w.insert("end", line.text, ("body",))
        if isinstance(line, ChatLine) and line.outgoing:
            style = "meta-failed" if line.delivery is Delivery.FAILED else "meta"
            w.insert("end", "   ", ("body",))
            w.insert("end", delivery_text(line), (style, "body", self._meta_tag(line)))
        self._last = line

    def _avatar(self, name: str) -> tk.Canvas:
        canvas = tk.Canvas(self.widget, width=INDENT, height=AVATAR, background=self.pal.chat_bg,
                           highlightthickness=0, borderwidth=0)
        canvas.create_oval(1, 1, AVATAR - 1, AVATAR - 1, fill=avatar_colour(self.pal, name), outline="")
        canvas.create_text(AVATAR // 2, AVATAR // 2, text=name[:1].upper(), fill="#FFFFFF", font=self.fonts.avatar)
        return canvas

    @staticmethod
    def _meta_tag(line: ChatLine) -> str:
        return "m-" + line.msg_id.hex()

    def _edit(self, change: Callable[[], None], scroll: bool = True) -> None:
        """The widget is read-only for the user; open it just for our own change."""
        self.widget.configure(state="normal")
        try:
            change()
        finally:
            self.widget.configure(state="disabled")
        if scroll:
            self.widget.see("end")
            # An embedded card has its height only once laid out: scroll again when Tk is idle.
            self.widget.after_idle(self._see_end)

    def _see_end(self) -> None:
        if self.widget.winfo_exists():
            self.widget.see("end")
