"""Moving a user ID to this installation's key with its recovery phrase (``p2pchat recover``).

The library half of the command: check the phrase, make (or take) this installation's identity, trust the
broker's key as a connection would (pinned, remembered, or on first use), prove the phrase to the key
service, and keep the phrase so the next registrations carry its recovery key (docs/PROTOCOL.md §10.2).
"""

from __future__ import annotations

import time

from p2pchat.client.broker_trust import recover, resolve_broker_key
from p2pchat.client.chat_client import ClientConfig
from p2pchat.client.storage.phrase import save_phrase
from p2pchat.client.storage.trust import KeyStore
from p2pchat.common.crypto import Identity
from p2pchat.common.errors import BrokenError, P2PChatError
from p2pchat.common.paths import ensure_private_dir, home_dir, user_dir
from p2pchat.common.protocol import check_user_id
from p2pchat.common.recovery import RecoveryKey, normalise_phrase


def recover_user(user: str, phrase: str, config: ClientConfig, timeout: float = 5.0) -> bytes:
    """Move ``user`` to this installation's key (made if there is none yet); returns that public key.

    Raises PhraseError for text that is no recovery phrase (nothing is sent), RemoteError when the broker
    refuses (``recovery_refused``, ``rate_limited``), BrokenError when it cannot be reached.
    """
    phrase = normalise_phrase(phrase)
    if config.insecure:
        raise P2PChatError("recovery needs the broker's key service, which a broker run with --insecure has not")
    state_dir = ensure_private_dir(config.state_dir or user_dir(check_user_id(user)))
    identity = Identity.load_or_create(state_dir / "identity.key")
    server = config.server
    key_port = config.key_port or server.port + 2
    deadline = time.monotonic() + timeout
    trusted = resolve_broker_key(server, key_port, KeyStore(ensure_private_dir(home_dir()) / "known_brokers.json"),
                                 config.server_key, stopped=lambda: time.monotonic() > deadline)
    if trusted is None:
        raise BrokenError(f"broker {server} unreachable after {timeout:g}s")
    recover(server, key_port, user, identity.public, RecoveryKey.from_phrase(phrase, user), trusted.key,
            max(0.5, deadline - time.monotonic()))
    save_phrase(state_dir, phrase)  # from now on this installation registers the ID's recovery key
    return identity.public
