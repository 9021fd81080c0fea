"""Searching history from the sidebar: results newest first, a click opens the message in its conversation."""

from __future__ import annotations

import pytest

pytest.importorskip("PySimpleGUI", reason="the desktop GUI needs PySimpleGUI")

from p2pchat.client.gui.layout import (  # noqa: E402
    K_PEER_NAME,
    K_PEER_PRESENCE,
    K_SEARCH,
    K_SEARCH_CLOSE,
    K_SEND,
)
from tests.client.gui.conftest import pump  # noqa: E402
from tests.client.gui.driving import (  # noqa: E402
    act,
    click_text,
    line_of,
    search_for,
    select_peer,
    shows,
    type_and_press,
)


def test_search_finds_a_message_and_opens_its_conversation(make_window):
    alice, bob, carol = make_window("alice"), make_window("bob"), make_window("carol")
    everyone = [alice, bob, carol]
    pump(everyone, lambda: shows(alice, "bob", "●") and shows(alice, "carol", "●") and shows(bob, "alice", "●")
         and shows(carol, "alice", "●"), "everyone online")
    select_peer(bob, "alice", everyone)
    type_and_press(bob, "the numbers for Thursday are in")
    select_peer(carol, "alice", everyone)
    type_and_press(carol, "lunch on thursday?")
    type_and_press(carol, "or friday")
    pump(everyone, lambda: "●  bob  1" in alice.roster_text() and "●  carol  2" in alice.roster_text(),
         "both messages at alice")
    select_peer(alice, "carol", everyone)

    search_for(alice, "thurs")
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "Search", "the results")
    text = alice.conversation_text()
    assert "the numbers for Thursday are in" in text and "lunch on thursday?" in text and "or friday" not in text
    assert text.index("lunch on thursday?") < text.index("the numbers for Thursday")  # newest first
    assert alice.window[K_PEER_PRESENCE].get() == "2 messages matching “thurs”" and alice.shown(K_SEARCH_CLOSE)
    assert alice.window[K_SEND].Widget.cget("state") == "disabled"

    found = line_of(alice, "bob", "the numbers for Thursday are in")
    index = alice._view().result_index(found.msg_id)
    assert index is not None
    click_text(alice, index)
    pump(everyone, lambda: alice.model.active == "bob" and alice.window[K_PEER_NAME].get() == "bob",
         "bob's conversation to open")
    assert "the numbers for Thursday are in" in alice.conversation_text() and not alice.shown(K_SEARCH_CLOSE)
    assert alice.window[K_SEARCH].get() == "" and alice.roster_text() == ["●  bob", "●  carol"]

    search_for(alice, "friday")  # Esc in the search box goes back to the conversation
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "Search", "the results")
    act(alice, lambda: alice.window[K_SEARCH].Widget.event_generate("<Escape>"))
    pump([alice], lambda: alice.window[K_PEER_NAME].get() == "bob", "the conversation again")
    assert "the numbers for Thursday are in" in alice.conversation_text()
