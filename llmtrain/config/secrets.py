"""Which settings are credentials, and how they are kept out of logs, saved configs and pickles."""

from __future__ import annotations

from collections.abc import Sequence

# Keys whose value must never reach a log, a saved config or an experiment tracker.
SECRET_KEY_MARKERS = ("token", "api_key", "secret", "password")
TOKENIZER_KEYS = frozenset({"tokenizer_name_or_path"})


def is_secret_key(key: str) -> bool:
    """True for keys such as ``hub_token`` whose values are credentials."""
    lowered = key.lower()
    return key not in TOKENIZER_KEYS and any(marker in lowered for marker in SECRET_KEY_MARKERS)


def redact_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag replaced, for logging.

    >>> redact_secrets(["--hub_token", "hf_x", "--seed", "1", "--hub_token=hf_y"])
    ['--hub_token', '***', '--seed', '1', '--hub_token=***']
    """
    redacted: list[str] = []
    hide_next = False
    for item in argv:
        flag, has_value, _ = item.partition("=")
        if hide_next:
            redacted.append("***")
            hide_next = False
        elif flag.startswith("--") and is_secret_key(flag[2:]):
            redacted.append(f"{flag}=***" if has_value else item)
            hide_next = not has_value
        else:
            redacted.append(item)
    return redacted
