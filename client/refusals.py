"""Why the broker refused a user ID, in words a user can act on: one text for the CLI, the GUI and the library."""

from __future__ import annotations

from p2pchat.common.errors import ErrorCode, RemoteError


def explain_refusal(user: str, error: RemoteError) -> RemoteError:
    """``error`` with a plain message when it refuses ``user``'s ID (the broker's words are technical)."""
    if error.code is ErrorCode.ID_TAKEN:
        text = (f"{user} is registered with another key; use your recovery phrase (p2pchat recover --user {user}) "
                "or ask the broker's operator")
    elif error.code is ErrorCode.ID_ONLINE:
        text = f"{user} is already signed in on another connection (another device, or another program using this ID)"
    else:
        return error
    return RemoteError(text, error.code, error.ref)
