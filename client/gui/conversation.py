"""Renders one conversation, or the results of a search, into a Tk ``Text`` widget, Slack style.

Messages from the same sender within a few minutes share one header (avatar,
name, time); our own messages carry their delivery state after the text, in a
tagged range so an ack, a receipt or a failure rewrites only that range. A file
is a ``FileCard`` embedded in the text, redrawn in place as its transfer moves.
In a room, what happened there (a member joined, the room was renamed) is a
muted line of its own between the messages.
A search result is a tagged block that posts ``SEARCH_OPEN`` when clicked.
"""

from __future__ import annotations

import datetime as dt
import tkinter as tk
from collections.abc import Callable

from p2pchat.client.gui.delivery import delivery_style, delivery_text
from p2pchat.client.gui.filecard import Action, FileCard, forward_wheel
from p2pchat.client.gui.layout import SEARCH_OPEN
from p2pchat.client.gui.found import Search, match_spans
from p2pchat.client.gui.file_model import FileLine
from p2pchat.client.gui.model import ChatLine, Conversation, Line
from p2pchat.client.gui.room_model import NoticeLine
from p2pchat.client.gui.theme import Fonts, Palette, avatar_colour

GROUP_GAP_MS = 5 * 60 * 1000
AVATAR = 30  # px
INDENT = AVATAR + 10  # the avatar's canvas includes the gap, so bodies line up under the name


def _local(ts_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts_ms / 1000)


def day_label(day: dt.date, today: dt.date) -> str:
    if day == today:
        return "Today"
    if day == today - dt.timedelta(days=1):
        return "Yesterday"
    return day.strftime("%A %d %B %Y" if day.year != today.year else "%A %d %B")


def when_label(ts_ms: int, today: dt.date) -> str:
    """A message's day and time, for a search result seen out of its conversation."""
    when = _local(ts_ms)
    return f"{day_label(when.date(), today)}, {when.strftime('%H:%M')}"


def _meta(line: ChatLine) -> str:
    return delivery_text(line.delivery, line.peer, line.failure)


class ConversationView:
    def __init__(self, widget: tk.Text, pal: Palette, fonts: Fonts, me: str, on_action: Action,
                 thumbnail: Callable[[FileLine], tk.PhotoImage | None] = lambda _line: None) -> None:
        """``thumbnail``: a received image's, for its card (the window owns the images)."""
        self.widget = widget
        self._thumbnail = thumbnail
        self.pal = pal
        self.fonts = fonts
        self.me = me
        self._on_action = on_action
        self._last: Line | None = None
        self._cards: dict[bytes, FileCard] = {}  # the files of the conversation on screen
        self._at_end = True  # the last line is in view: a narrower or shorter widget, or longer lines, keep it there
        self._top = "1.0"  # the index of the line at the top of the view
        w = widget
        scrollbar = w.cget("yscrollcommand")
        w.configure(yscrollcommand=lambda first, last: self._scrolled(scrollbar, first, last))
        # A panel or the members column appearing resizes the widget before it lays its lines out again.
        w.bind("<Configure>", lambda _e: self._at_end and w.see("end"), add="+")
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
        w.tag_configure("meta-read", font=fonts.small_bold, foreground=pal.own_name)
        w.tag_configure("meta-warn", font=fonts.small, foreground=pal.warn)
        w.tag_configure("found", background=pal.found_bg)
        w.tag_configure("result", lmargin1=INDENT, lmargin2=INDENT, rmargin=12, spacing1=1, spacing3=4)
        w.tag_configure("match", font=fonts.bold, background=pal.found_bg)
        w.tag_configure("day", font=fonts.small_bold, foreground=pal.muted, justify="center", spacing1=14, spacing3=2)
        w.tag_configure("hint", font=fonts.base, foreground=pal.muted, justify="center", spacing1=4)
        w.tag_configure("hint-first", spacing1=150)
        w.tag_configure("notice", font=fonts.small, foreground=pal.muted, lmargin1=INDENT, lmargin2=INDENT,
                        spacing1=10, spacing3=2)

    # --- whole views ----------------------------------------------------------
    def show(self, conv: Conversation | None, hint: str = "", reveal: bytes | None = None) -> None:
        """Draw ``conv`` scrolled to the end, or to message ``reveal``, highlighted."""
        self._edit(lambda: self._render(conv, hint))
        ranges = self.widget.tag_ranges(self._line_tag(reveal)) if reveal is not None else ()
        if ranges:
            self.widget.tag_add("found", ranges[0], ranges[-1])
            self.widget.mark_set("found", ranges[0])
            self._scroll_to("found")

    def show_results(self, search: Search, room_name: Callable[[bytes], str]) -> None:
        """Each result as a block (who, when, the text with the query's words marked) that opens its message;
        ``room_name`` names the room of a room's message."""
        def render() -> None:
            self._clear()
            if not search.results:
                self._hint(f"No messages match “{search.query}”.\nSearch looks for words that start as you typed.")
                return
            w, today = self.widget, dt.date.today()
            for entry in search.results:
                tag = "r-" + entry.msg_id.hex()
                if w.index("end-1c") != "1.0":
                    w.insert("end", "\n")
                start = w.index("end-1c")
                avatar = self._avatar(self.me if entry.outgoing else entry.peer)
                forward_wheel(avatar, w)
                avatar.bind("<Button-1>", lambda _e, msg_id=entry.msg_id: self._on_action(SEARCH_OPEN, msg_id))
                w.window_create("end", window=avatar, align="center")
                where = f" in #{room_name(entry.room)}" if entry.room is not None else ""
                w.insert("end", (f"You{where}" if where else f"You to {entry.peer}") if entry.outgoing
                         else entry.peer + where, ("own-name" if entry.outgoing else "name", tag))
                w.insert("end", "   " + when_label(entry.ts, today), ("time", tag))
                w.tag_add("header", start, "end-1c")
                w.insert("end", "\n")
                body = w.index("end-1c")
                w.insert("end", entry.text, ("result", tag))
                for a, b in match_spans(entry.text, search.query):
                    w.tag_add("match", f"{body}+{a}c", f"{body}+{b}c")
                w.tag_bind(tag, "<Button-1>", lambda _e, msg_id=entry.msg_id: self._on_action(SEARCH_OPEN, msg_id))
                w.tag_bind(tag, "<Enter>", lambda _e: w.configure(cursor="hand2"))
                w.tag_bind(tag, "<Leave>", lambda _e: w.configure(cursor="arrow"))

        self._edit(render, scroll=False)
        self.widget.yview_moveto(0)  # newest first: the top is what matters

    def result_index(self, msg_id: bytes) -> str | None:
        """Where the result for ``msg_id`` starts on screen, to click it (tests)."""
        ranges = self.widget.tag_ranges("r-" + msg_id.hex())
        return str(ranges[0]) if ranges else None

    def _clear(self) -> None:
        self.widget.delete("1.0", "end")  # also destroys the embedded avatars and file cards
        self.widget.configure(cursor="arrow")
        self._last = None
        self._cards.clear()

    def _hint(self, hint: str) -> None:
        first, _, rest = hint.partition("\n")
        self.widget.insert("end", first, ("hint", "hint-first"))
        if rest:
            self.widget.insert("end", "\n" + rest, ("hint",))

    def _render(self, conv: Conversation | None, hint: str) -> None:
        self._clear()
        if conv is None or not conv.lines:
            self._hint(hint)
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

        def rewrite() -> None:
            self.widget.delete(start, end)
            self.widget.insert(start, _meta(line), (delivery_style(line.delivery), "body", tag))

        self._edit(rewrite, scroll=False)

    def update_file(self, line: FileLine) -> None:
        card = self._cards.get(line.xfer)
        if card is not None:
            card.render(line)

    def show_thumbnail(self, xfer: bytes, image: tk.PhotoImage) -> None:
        card = self._cards.get(xfer)
        if card is not None:
            card.show_thumbnail(image)

    def card(self, xfer: bytes) -> FileCard | None:
        return self._cards.get(xfer)

    def cards(self) -> list[FileCard]:
        return list(self._cards.values())

    def delivery_shown(self, line: ChatLine) -> tuple[str, str]:
        """The delivery text as displayed and its style (what a user sees, for tests)."""
        ranges = self.widget.tag_ranges(self._meta_tag(line))
        if not ranges:
            return "", ""
        styles = [t for t in self.widget.tag_names(ranges[0]) if t.startswith("meta")]
        return self.widget.get(ranges[0], ranges[-1]), styles[0] if styles else ""

    # --- helpers ----------------------------------------------------------------
    def _insert(self, line: Line) -> None:
        w, last = self.widget, self._last
        when = _local(line.ts_ms)
        if last is None or _local(last.ts_ms).date() != when.date():
            if last is not None:
                w.insert("end", "\n")
            w.insert("end", day_label(when.date(), dt.date.today()), ("day",))
            last = None
        if isinstance(line, NoticeLine):
            w.insert("end", "\n")
            w.insert("end", line.text, ("notice",))
            self._last = line
            return
        # In a room, "theirs" are several people's: a header for each author.
        same_group = (isinstance(last, (ChatLine, FileLine)) and last.outgoing == line.outgoing
                      and (line.outgoing or last.peer == line.peer) and 0 <= line.ts_ms - last.ts_ms < GROUP_GAP_MS)
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
            card = FileCard(w, line, self.pal, self.fonts, self._on_action, self._thumbnail(line))
            forward_wheel(card, w)
            w.window_create("end", window=card, pady=4)
            w.tag_add("body", "end-2c")  # the card is the line's first index: it takes the body's indent
            self._cards[line.xfer] = card
        else:
            w.insert("end", line.text, ("body", self._line_tag(line.msg_id)))
        if isinstance(line, ChatLine) and line.outgoing:
            w.insert("end", "   ", ("body",))
            w.insert("end", _meta(line), (delivery_style(line.delivery), "body", self._meta_tag(line)))
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

    @staticmethod
    def _line_tag(msg_id: bytes) -> str:
        return "l-" + msg_id.hex()

    def _edit(self, change: Callable[[], None], scroll: bool = True) -> None:
        """The widget is read-only for the user; open it just for our own change."""
        self.widget.configure(state="normal")
        try:
            change()
        finally:
            self.widget.configure(state="disabled")
        if scroll:
            self._scroll_to("end")

    def _scrolled(self, scrollbar: str, first: str, last: str) -> None:
        """Tk says what part is in view. A top line that moved was a scroll (the user's, or ours to the end); one that
        stayed means the lines below grew (a card laid out, a thumbnail): the end stays in view if it was."""
        top = self.widget.index("@0,0")
        if top != self._top or float(last) >= 1.0:
            self._top, self._at_end = top, float(last) >= 1.0
        elif self._at_end:
            self.widget.after_idle(lambda: self.widget.winfo_exists() and self.widget.see("end"))
        if scrollbar:
            self.widget.tk.call(scrollbar, first, last)

    def _scroll_to(self, index: str) -> None:
        self.widget.see(index)
        # An embedded card has its height only once laid out: scroll again when Tk is idle.
        self.widget.after_idle(lambda: self.widget.winfo_exists() and self.widget.see(index))
