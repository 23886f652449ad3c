"""``chat_template_kwargs``: keywords a run passes to the chat template, read from YAML, the CLI or a run manifest.

Kept apart from the argument dataclasses so the inference tools (``chat``, ``compare``) can read a
run's keywords without importing the training stack.
"""

from __future__ import annotations

import json
from typing import Any

from llmtrain.errors import ConfigError

# apply_chat_template's own parameters: a template keyword with one of these names would never reach the template.
RESERVED_TEMPLATE_KEYWORDS = frozenset(
    {
        "conversation",
        "messages",
        "add_generation_prompt",
        "tokenize",
        "return_dict",
        "return_tensors",
        "chat_template",
        "continue_final_message",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
        "tools",
        "documents",
        "return_assistant_tokens_mask",
        "sanitize_control_tokens",
    }
)


def parse_template_kwargs(
    value: dict[str, Any] | str | None, field_name: str = "chat_template_kwargs"
) -> dict[str, Any] | None:
    """``chat_template_kwargs`` from JSON text (CLI) or a mapping (YAML, code); None stays None.

    >>> parse_template_kwargs('{"enable_thinking": false}')
    {'enable_thinking': False}
    >>> parse_template_kwargs('{"tokenize": true}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: chat_template_kwargs: 'tokenize' is a parameter of apply_chat_template itself, ...
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{field_name}: not a JSON object ({error.msg}): {value!r}") from error
    if not isinstance(value, dict):
        raise ConfigError(f"{field_name}: expected a mapping of template keywords, got {value!r}")
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{field_name}: {key!r} is not a template variable name")
        if key in RESERVED_TEMPLATE_KEYWORDS:
            raise ConfigError(
                f"{field_name}: {key!r} is a parameter of apply_chat_template itself, not a template keyword"
            )
    return value
