"""What a search of every conversation found, as plain data and words: the results, their summary line, where the
query's words match. No Tk here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2pchat.client.storage.history import HistoryEntry


@dataclass(frozen=True, slots=True)
class Search:
    """Messages matching ``query`` in every conversation: the newest ``results``, newest first, of ``total``."""

    query: str
    results: tuple[HistoryEntry, ...]
    total: int
    capped: bool = False  # there may be more than ``total``


def search_summary(search: Search) -> str:
    total = f"{search.total}+" if search.capped else str(search.total)
    if search.total == 0:
        return f"nothing matches “{search.query}”"
    if len(search.results) < search.total:
        return f"newest {len(search.results)} of {total} messages matching “{search.query}”"
    return f"{total} message{'s' if search.total != 1 else ''} matching “{search.query}”"


def match_spans(text: str, query: str) -> list[tuple[int, int]]:
    """Where the query's words start words of ``text`` (the history search matches word prefixes)."""
    words = [re.escape(w) for w in query.split() if w]
    if not words:
        return []
    pattern = re.compile(r"\b(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")", re.IGNORECASE)
    return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]
