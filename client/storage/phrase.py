"""The user's recovery phrase on this installation: ``recovery.phrase`` (mode 0600) beside ``identity.key``.

Made with the identity on the first run, and shown to the user then; ``p2pchat recovery-phrase`` prints it
again. A recovery on a new machine (``p2pchat recover``) writes the phrase the user typed, so that this
installation registers the ID's recovery key from then on (docs/PROTOCOL.md §10.2), and so does linking with
the phrase (``p2pchat link --recovery``). A device linked by code gets no phrase: it keeps only the account's
public key (``account.pub``, client/storage/account.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pchat.common.recovery import PhraseError, new_phrase, normalise_phrase

PHRASE_FILE = "recovery.phrase"
ACCOUNT_FILE = "account.pub"  # a device linked by code: the account key it pinned, and no phrase


def load_or_create_phrase(state_dir: Path) -> tuple[str | None, bool]:
    """The stored phrase, or a new one (stored); True when it is new, so the caller shows it once. None on a
    device linked by code: the ID's phrase stays on the devices that have it."""
    path = state_dir / PHRASE_FILE
    try:
        return normalise_phrase(path.read_text()), False
    except FileNotFoundError:
        if (state_dir / ACCOUNT_FILE).exists():
            return None, False
        phrase = new_phrase()
        save_phrase(state_dir, phrase)
        return phrase, True
    except PhraseError as exc:  # never replaced silently: the broker may hold the recovery key of this one
        raise PhraseError(f"{path} does not hold a recovery phrase ({exc.message}): restore it, or delete it "
                          "to get a new one") from None


def save_phrase(state_dir: Path, phrase: str) -> None:
    """Write ``phrase`` (one line) with mode 0600, atomically."""
    path = state_dir / PHRASE_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(normalise_phrase(phrase) + "\n")
    os.replace(tmp, path)
