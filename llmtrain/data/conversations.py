"""Read supervised fine-tuning conversations from ``.jsonl`` / ``.json`` files into one message format.

Three record formats are understood; each file's format is detected from its first record and
every later record of that file must be in the same format::

    sharegpt  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    openai    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    alpaca    {"instruction": "Hi", "input": "", "output": "Hello", "system": "..."}   (input, system optional)

Every record becomes a list of ``{"role": "system" | "user" | "assistant", "content": str}``,
the shape ``tokenizer.apply_chat_template`` takes, so training sees the same roles as inference
(Belle/ShareGPT's ``human`` and ``gpt`` become ``user`` and ``assistant``). An OpenAI-format
assistant message may carry ``reasoning_content`` (a string), kept for templates that render it
(Qwen3); inline ``<think>...</think>`` in any content stays in the content, where Qwen3's template
looks for it.

Reading goes through :mod:`llmtrain.data.records`, one ``json.loads`` per line, so every bad record
is reported as ``file:line: problem`` (``file: record N: problem`` inside a ``.json`` array) in a
:class:`~llmtrain.errors.InvalidRecord` (a ``DataError`` with a ``reason`` code); readers given a
``skipped`` list collect those instead of stopping (``invalid_records: skip``). A ``.json`` file
that does not start with ``[`` is read as JSON lines, as ``datasets`` does. A conversation
without an assistant turn is an error: it has nothing to learn from, and a file full of them is
usually the wrong role mapping.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import datasets

from llmtrain.data.records import JSON_SUFFIXES, UTF8_BOM, iter_json_records, read_errors_named
from llmtrain.errors import ConfigError, DataError, InvalidRecord

logger = logging.getLogger(__name__)

Message = dict[str, str]
REASONING_KEY = "reasoning_content"  # OpenAI-style reasoning of an assistant message (vLLM, DeepSeek, Qwen3 templates)

FORMATS = ("sharegpt", "openai", "alpaca")
ROLES = ("system", "user", "assistant")
SUFFIXES = (*JSON_SUFFIXES, ".jsonl.gz", ".jsonl.zst")
# The key whose presence identifies each format, checked in this order.
FORMAT_KEYS = {"sharegpt": "conversations", "openai": "messages", "alpaca": "instruction"}
FORMAT_SHAPES = (
    'sharegpt {"conversations": [{"from", "value"}, ...]}',
    'openai {"messages": [{"role", "content"}, ...]}',
    'alpaca {"instruction", "input" (optional), "output", "system" (optional)}',
)
# Belle / ShareGPT speaker names -> chat-template roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

CONVERSATION_FEATURES = datasets.Features(
    {
        "messages": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.Value("string"),
                REASONING_KEY: datasets.Value("string"),
            }
        ),
        "source": datasets.Value("string"),
    }
)


def detect_format(record: object, where: str) -> str:
    """Return the format of ``record``, one of :data:`FORMATS`.

    The format is chosen by key: ``conversations`` -> sharegpt, ``messages`` -> openai,
    ``instruction`` -> alpaca. Raises :class:`DataError` naming ``where`` when ``record`` is not
    an object, or when it has none of these keys or more than one.

    >>> detect_format({"conversations": [{"from": "human", "value": "Hi"}]}, "a.jsonl:1")
    'sharegpt'
    >>> detect_format({"instruction": "Add 2 and 3.", "output": "5"}, "a.jsonl:1")
    'alpaca'
    """
    if not isinstance(record, dict):
        raise InvalidRecord(where, "not_an_object", f"expected a JSON object, got {_json_type(record)}")
    found = [fmt for fmt, key in FORMAT_KEYS.items() if key in record]
    if len(found) == 1:
        return found[0]
    keys = ", ".join(repr(key) for key in record) or "none"
    if not found:
        raise InvalidRecord(
            where,
            "unknown_format",
            f"record is in no known conversation format (keys found: {keys}); "
            f"expected one of: {'; '.join(FORMAT_SHAPES)}",
        )
    raise InvalidRecord(
        where, "mixed_formats", f"record mixes the keys of formats {', '.join(found)} (keys found: {keys})"
    )


def normalise_record(record: object, fmt: str, where: str, default_system_prompt: str | None = None) -> list[Message]:
    """Turn one record of format ``fmt`` into ``[{"role", "content"}, ...]``.

    Roles become ``system`` / ``user`` / ``assistant``; a system message may only come first.
    With ``default_system_prompt``, a conversation without a system message gets one prepended.
    Contents are kept exactly as written. Raises :class:`DataError` naming ``where`` when the record
    is in another format than ``fmt``, or a turn is not an object, has an unknown role, or has
    no content (missing, null, not a string, or blank), or the conversation has no assistant turn or
    opens with one.

    >>> normalise_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ...                  "sharegpt", "a.jsonl:1")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    >>> alpaca = {"instruction": "Sum:", "input": "2 3", "output": "5"}
    >>> [m["role"] for m in normalise_record(alpaca, "alpaca", "a.jsonl:1", default_system_prompt="Be brief.")]
    ['system', 'user', 'assistant']
    >>> normalise_record(alpaca, "alpaca", "a.jsonl:1")[0]
    {'role': 'user', 'content': 'Sum:\\n\\n2 3'}
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown conversation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    found = detect_format(record, where)
    if found != fmt:
        raise InvalidRecord(
            where,
            "format_mismatch",
            f"record is in {found} format, but this file is {fmt} (a file holds one format, set by its first record)",
        )
    assert isinstance(record, dict)  # detect_format checked it
    messages = _alpaca_messages(record, where) if fmt == "alpaca" else _turn_messages(record, fmt, where)
    if not any(message["role"] == "assistant" for message in messages):
        raise InvalidRecord(
            where, "no_assistant_turn", "no assistant turn (nothing to learn from); every conversation needs one"
        )
    for number, message in enumerate(messages[1:], start=2):
        if message["role"] == "system":
            raise InvalidRecord(
                where,
                "misplaced_system",
                f"system message in turn {number}; a system message may only be the first turn",
            )
    first_turn = 1 if messages[0]["role"] == "system" else 0
    if messages[first_turn]["role"] == "assistant":
        raise InvalidRecord(
            where,
            "opens_with_assistant",
            f"the conversation opens with an assistant turn (turn {first_turn + 1}); chat templates "
            "need a user turn before the first answer",
        )
    if default_system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system_prompt})
    return messages


def read_conversations(
    path: Path, default_system_prompt: str | None = None, skipped: list[InvalidRecord] | None = None
) -> list[dict[str, object]]:
    """Read one ``.jsonl`` / ``.json`` conversation file, detecting its format from the first record.

    Returns one ``{"messages": list[Message], "source": where}`` per record, in file order, where
    ``where`` is ``path:line`` (``path: record N`` for a ``.json`` array). Blank lines are skipped.
    Raises :class:`DataError` naming the file (and line or record) when it cannot be read, is
    empty, holds invalid UTF-8 or JSON, or any record is invalid (see :func:`normalise_record`).
    With a ``skipped`` list, each invalid record (and unreadable JSON line) is appended to it
    instead and reading goes on; the file's format is then set by its first valid record.
    """
    _check_system_prompt(default_system_prompt)
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"{path}: unsupported conversation file type; use {', '.join(SUFFIXES)}")
    conversations: list[dict[str, object]] = []
    skipped_here = 0
    fmt = ""
    with read_errors_named(path):
        for where, record in iter_json_records(path, yield_invalid=skipped is not None):
            try:
                if isinstance(record, InvalidRecord):
                    raise record
                record_format = fmt or detect_format(record, where)
                messages = normalise_record(record, record_format, where, default_system_prompt)
            except InvalidRecord as invalid:
                if skipped is None:
                    raise
                skipped.append(invalid)
                skipped_here += 1
                continue
            fmt = record_format
            conversations.append({"messages": messages, "source": where})
        if not conversations and not skipped_here and not path.read_bytes().removeprefix(UTF8_BOM).strip():
            raise DataError(f"{path}: the file is empty")
    if not conversations and not skipped_here:
        raise DataError(f"{path}: the file holds no records")
    logger.info(
        "read %d %s conversations from %s%s",
        len(conversations),
        fmt or "(no valid)",
        path,
        f" ({skipped_here} invalid records skipped)" if skipped_here else "",
    )
    return conversations


def read_conversation_files(
    paths: Iterable[Path], default_system_prompt: str | None = None, skipped: list[InvalidRecord] | None = None
) -> datasets.Dataset:
    """Read several conversation files (see :func:`read_conversations`) into one dataset, in the given order.

    Each file has its own format. Columns: ``messages`` (a list of ``{"role", "content",
    "reasoning_content"}``, the last None where absent) and ``source`` (``path:line`` of the
    record). Raises :class:`DataError` when ``paths`` is empty or any file is bad (with a
    ``skipped`` list: when no valid record is left).
    """
    rows: list[dict[str, object]] = []
    for path in paths:
        rows += read_conversations(path, default_system_prompt, skipped)
    if not rows:
        raise DataError("no conversation files given" if not skipped else "no valid conversation in the files given")
    return datasets.Dataset.from_list(rows, features=CONVERSATION_FEATURES)


def template_messages(messages: Iterable[Mapping[str, str | None]]) -> list[Message]:
    """Messages as a chat template takes them: keys that are None (absent in the record) left out.

    The dataset gives every message every column; a template testing ``message.reasoning_content is
    defined`` must not see one the record never had.

    >>> template_messages([{"role": "user", "content": "Hi", "reasoning_content": None}])
    [{'role': 'user', 'content': 'Hi'}]
    """
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def _check_system_prompt(default_system_prompt: str | None) -> None:
    if default_system_prompt is not None and not default_system_prompt.strip():
        raise ConfigError("default_system_prompt is blank; leave it unset for no default system prompt")


def _turn_messages(record: dict[str, object], fmt: str, where: str) -> list[Message]:
    """Messages of a sharegpt (``from``/``value``) or openai (``role``/``content``) record."""
    list_key = FORMAT_KEYS[fmt]
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    role_map = SHAREGPT_ROLES if fmt == "sharegpt" else {role: role for role in ROLES}
    turns = record[list_key]
    if not isinstance(turns, list):
        raise InvalidRecord(where, "bad_turns", f"'{list_key}' must be a list of turns, got {_json_type(turns)}")
    if not turns:
        raise InvalidRecord(where, "bad_turns", f"'{list_key}' is an empty list")
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise InvalidRecord(where, "bad_turns", f"turn {number} must be a JSON object, got {_json_type(turn)}")
        if role_key not in turn:
            keys = ", ".join(repr(key) for key in turn) or "none"
            raise InvalidRecord(where, "bad_turns", f"turn {number} has no '{role_key}' (keys found: {keys})")
        speaker = turn[role_key]
        if not isinstance(speaker, str) or speaker not in role_map:
            shown = repr(speaker) if isinstance(speaker, str) else json.dumps(speaker)
            expected = ", ".join(role_map)
            raise InvalidRecord(
                where, "unknown_role", f"unknown role {shown} in turn {number} (expected one of {expected})"
            )
        content = _content(turn, content_key, where, f"turn {number} ({speaker})")
        message = {"role": role_map[speaker], "content": content}
        reasoning = _reasoning(turn, message["role"], where, number) if fmt == "openai" else None
        if reasoning is not None:
            message[REASONING_KEY] = reasoning
        messages.append(message)
    return messages


def _reasoning(turn: dict[str, object], role: str, where: str, number: int) -> str | None:
    """An assistant message's ``reasoning_content`` when it has one (null or blank: none)."""
    reasoning = turn.get(REASONING_KEY)
    if reasoning is None:
        return None
    if not isinstance(reasoning, str):
        raise InvalidRecord(
            where, "bad_field", f"turn {number}: '{REASONING_KEY}' is {_json_type(reasoning)}, not a string"
        )
    if role != "assistant" and reasoning.strip():
        raise InvalidRecord(
            where, "bad_field", f"turn {number} ({role}) has '{REASONING_KEY}'; only assistant messages carry reasoning"
        )
    return reasoning if reasoning.strip() else None


def _alpaca_messages(record: dict[str, object], where: str) -> list[Message]:
    """[system] user (instruction, then a blank line and input when there is one), assistant (output)."""
    instruction = _content(record, "instruction", where, "alpaca record")
    output = _content(record, "output", where, "alpaca record")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise InvalidRecord(where, "bad_field", f"'input' must be a string, got {_json_type(extra)}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRecord(where, "bad_field", f"'system' must be a string, got {_json_type(system)}")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages: list[Message] = []
    # An empty "system" is how many alpaca exports spell "none", unlike an empty chat turn.
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _content(holder: dict[str, object], key: str, where: str, what: str) -> str:
    """``holder[key]`` when it is a non-blank string; otherwise a DataError saying what is wrong."""
    value = holder.get(key)
    if isinstance(value, str) and value.strip():
        return value
    if key not in holder:
        problem = f"'{key}' is missing"
    elif value is None:
        problem = f"'{key}' is null"
    elif not isinstance(value, str):
        problem = f"'{key}' is {_json_type(value)}, not a string"
    else:
        problem = f"'{key}' is blank"
    raise InvalidRecord(where, "no_content", f"{what} has no content: {problem}")


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages written in the file's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
