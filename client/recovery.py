"""Moving a user ID to this installation's key with its recovery phrase (``p2pchat recover``).

The library half of the command: check the phrase, make (or take) this installation's identity, trust the
broker's key as a connection would (pinned, remembered, or on first use), prove the phrase to the key
service, and keep the phrase so the next registrations carry its recovery key (docs/PROTOCOL.md §10.2).
"""

from __future__ import annotations

import logging

from p2pchat.client.broker_trust import trusted_key_service
from p2pchat.client.chat_client import ClientConfig
from p2pchat.client.storage.phrase import save_phrase
from p2pchat.common.crypto import Identity
from p2pchat.common.paths import ensure_private_dir, user_dir
from p2pchat.common.protocol import check_user_id
from p2pchat.common.recovery import RecoveryKey, normalise_phrase

log = logging.getLogger(__name__)


def recover_user(user: str, phrase: str, config: ClientConfig, timeout: float = 5.0) -> bytes:
    """Move ``user`` to this installation's key (made if there is none yet); returns that public key.

    Raises PhraseError for text that is no recovery phrase (nothing is sent), RemoteError when the broker
    refuses (``recovery_refused``, ``rate_limited``), BrokenError when it cannot be reached.
    """
    phrase = normalise_phrase(phrase)
    service, broker_key = trusted_key_service(config.server, config.key_port, config.server_key, config.insecure,
                                              timeout)
    state_dir = ensure_private_dir(config.state_dir or user_dir(check_user_id(user)))
    identity = Identity.load_or_create(state_dir / "identity.key")
    service.prove("RECOVER", user, identity.public, RecoveryKey.from_phrase(phrase, user), broker_key)
    log.warning("user=%s moved to this installation's key with its recovery phrase", user)
    save_phrase(state_dir, phrase)  # from now on this installation registers the ID's recovery key
    return identity.public
