"""A message's delivery state as the window shows it: the states, the moves between them, and their words.

The library reports states by events (an ack, a receipt, ``SendState``) and
history by name; they may come late or twice, and history read while the
library works may be older than the events already shown. ``MOVES`` is the one
rule for all of them: a report that is not a move from the state shown changes
nothing. No Tk here.
"""

from __future__ import annotations

import enum


class Delivery(enum.Enum):
    """Ours: SENDING, SENT, DELIVERED, READ, with the detours of a key change, or FAILED. Theirs: RECEIVED, READ."""

    SENDING = "sending"  # in the outbox: not acknowledged by the broker yet
    HELD = "held"  # waits for the user to accept the recipient's new key
    SENT = "sent"  # the broker has it (stored, or relayed at once)
    UNDECRYPTABLE = "undecryptable"  # the recipient could not open it (sealed to a key they no longer have)
    RESEALED = "resealed"  # sealed again to the recipient's current key, going out again
    DELIVERED = "delivered"  # the recipient's client has it
    READ = "read"  # the recipient opened the conversation (ours), or we did (theirs)
    FAILED = "failed"
    RECEIVED = "received"  # theirs, not seen by the user yet


# Where each report may move a state. READ and FAILED are final; a message is refused at most once before it
# fails (history re-seals it once), so UNDECRYPTABLE is no move for a line already resealed (``can_move``).
# HELD goes back to SENDING when the user accepts the key (``ChatModel.peer_key_accepted``), never on a report.
MOVES: dict[Delivery, frozenset[Delivery]] = {
    Delivery.SENDING: frozenset({Delivery.HELD, Delivery.SENT, Delivery.UNDECRYPTABLE, Delivery.DELIVERED,
                                 Delivery.READ, Delivery.FAILED}),
    Delivery.HELD: frozenset({Delivery.SENT, Delivery.DELIVERED, Delivery.READ, Delivery.FAILED}),
    Delivery.SENT: frozenset({Delivery.UNDECRYPTABLE, Delivery.DELIVERED, Delivery.READ, Delivery.FAILED}),
    Delivery.UNDECRYPTABLE: frozenset({Delivery.RESEALED, Delivery.FAILED}),
    Delivery.RESEALED: frozenset({Delivery.SENT, Delivery.DELIVERED, Delivery.READ, Delivery.FAILED}),
    Delivery.DELIVERED: frozenset({Delivery.READ}),
    Delivery.READ: frozenset(),
    Delivery.FAILED: frozenset(),
    Delivery.RECEIVED: frozenset({Delivery.READ}),
}
# Not yet with the broker: what a send failure (``SendFailed``) can still fail.
UNSENT = frozenset({Delivery.SENDING, Delivery.HELD, Delivery.RESEALED})

# History's states (client.storage.history), the library's receipts and ``SendState``s, as the window shows them.
FROM_HISTORY = {
    "queued": Delivery.SENDING, "sent": Delivery.SENT, "stored": Delivery.SENT, "delivered": Delivery.DELIVERED,
    "read": Delivery.READ, "failed": Delivery.FAILED, "received": Delivery.RECEIVED,
    "undecryptable": Delivery.UNDECRYPTABLE, "resealed": Delivery.RESEALED,
}
RECEIPTS = {"delivered": Delivery.DELIVERED, "read": Delivery.READ}
SEND_STATES = {"held": Delivery.HELD, "undecryptable": Delivery.UNDECRYPTABLE, "resealed": Delivery.RESEALED,
               "failed": Delivery.FAILED}

STYLES = {Delivery.READ: "meta-read", Delivery.FAILED: "meta-failed", Delivery.HELD: "meta-warn",
          Delivery.UNDECRYPTABLE: "meta-warn"}  # the others: "meta"


def can_move(current: Delivery, new: Delivery, resealed: bool) -> bool:
    return new in MOVES[current] and not (resealed and new is Delivery.UNDECRYPTABLE)


def delivery_text(delivery: Delivery, peer: str, failure: str = "") -> str:
    """Our message's state in the words a chat user expects ("" for theirs)."""
    if delivery is Delivery.FAILED:
        return f"failed — {failure}" if failure else "failed"
    return {
        Delivery.SENDING: "sending…",
        Delivery.HELD: f"waiting — accept {peer}'s new key to send",
        Delivery.SENT: "sent ✓",
        Delivery.UNDECRYPTABLE: f"{peer} couldn't open this — it will be re-sent when you accept {peer}'s new key",
        Delivery.RESEALED: f"re-sent to {peer}'s new key…",
        Delivery.DELIVERED: "delivered ✓✓",
        Delivery.READ: "read ✓✓",
    }.get(delivery, "")


def delivery_style(delivery: Delivery) -> str:
    return STYLES.get(delivery, "meta")
