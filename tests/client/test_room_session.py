"""The session core's rooms without a broker (client/core/rooms.py): what it does with frames a broker could send
that the end-to-end tests (test_rooms.py) cannot provoke on purpose."""

from __future__ import annotations

from p2pchat.client.core.session import ClientSession
from p2pchat.client.e2e import EndToEnd, MemoryKeys
from p2pchat.client.sender_keys import MemorySenderKeys, SenderKeys
from p2pchat.common.crypto import Identity
from p2pchat.common.protocol import new_msg_id, pack
from p2pchat.common.protocol_rooms import RoomMessage


def test_a_room_message_whose_sender_key_never_comes_is_given_up_not_kept_forever():
    """Sans I/O: bob's session gets a room message sealed with a key it was never sent."""
    alice_keys = SenderKeys("alice", 1, MemorySenderKeys())
    rid, msg_id = b"r" * 16, new_msg_id()
    body = alice_keys.seal(rid, msg_id, 5, b"you never had my key")
    bob = ClientSession("bob", wall_ms=lambda: 5, e2e=EndToEnd("bob", Identity.generate(), MemoryKeys(), MemoryKeys()),
                        token=b"t", new_id=new_msg_id, rooms=True, sender_key_store=MemorySenderKeys())
    bob.sender_keys = SenderKeys("bob", 1, MemorySenderKeys())
    assert bob.on_frames(pack(RoomMessage("alice", rid, 1, body, 1), 5, msg_id), 1.0) == []  # held, not consumed
    assert bob._consumes == []
    assert [a for a in bob._no_key_expired(20.0)] == [] and bob._consumes == []
    reported = bob._no_key_expired(40.0)
    assert bob._consumes == [msg_id]  # consumed: it will not come back at every reconnect
    assert [type(a.event).__name__ for a in reported] == ["ErrorReported"]
