"""Read supervised fine-tuning conversations from JSON-lines / JSON files into one message format.

Three record formats are understood; each file's format is detected from its first record and
every later record of that file must be in the same format::

    sharegpt  {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    openai    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    alpaca    {"instruction": "Hi", "input": "", "output": "Hello"}   (input optional)

    each with an optional top-level "system": "..." (the system prompt)

Every record becomes a list of ``{"role": "system" | "user" | "assistant", "content": str}``,
the shape ``tokenizer.apply_chat_template`` takes, so training sees the same roles as inference
(Belle/ShareGPT's ``human`` and ``gpt`` become ``user`` and ``assistant``). A top-level ``system``
string (LLaMA-Factory's ``system`` column) becomes the system turn; blank or null means none, and
a record that also has a system message is invalid (``two_system_prompts``). An OpenAI-format
assistant message may carry ``reasoning_content`` (a string), kept for templates that render it
(Qwen3); inline ``<think>...</think>`` in any content stays in the content, where Qwen3's template
looks for it. Every other key of a record or a turn (``tools``, ``id``, ``conversations[].weight``,
...) is not trained on and never dropped in silence: :class:`IgnoredFields` counts the records
holding each one, with the first place it was seen, for one WARNING and the dataset's stats.

Files are ``.jsonl`` / ``.json``, plain or ``.gz`` / ``.zst``, names matched case-insensitively
(:data:`CONVERSATION_FILES`). Reading goes through :mod:`llmtrain.data.records`, one
``json.loads`` per line, so every bad record is reported as ``file:line: problem`` (``file: record
N: problem`` inside a ``.json`` array) in a :class:`~llmtrain.errors.InvalidRecord` (a
``DataError`` with a ``reason`` code); readers given an :class:`InvalidRecords` accumulator (or
the older ``skipped`` list) collect those instead of stopping (``invalid_records: skip``). A
``.json`` file that does not start with ``[`` is read as JSON lines, as ``datasets`` does. A
conversation without an assistant turn is an error: it has nothing to learn from, and a file full
of them is usually the wrong role mapping.

:func:`iter_conversations` streams ``(messages, source)`` one record at a time (memory bounded by
the longest line); :func:`read_conversations` / :func:`read_conversation_files` return them all.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

from llmtrain.data.records import UTF8_BOM, FileTypes, iter_json_records, read_errors_named
from llmtrain.errors import ConfigError, DataError, InvalidRecord

logger = logging.getLogger(__name__)

Message = dict[str, str]
REASONING_KEY = "reasoning_content"  # OpenAI-style reasoning of an assistant message (vLLM, DeepSeek, Qwen3 templates)

FORMATS = ("sharegpt", "openai", "alpaca")
ROLES = ("system", "user", "assistant")
CONVERSATION_FILES = FileTypes("conversation", (".jsonl", ".json"), compressible=(".jsonl", ".json"))
# The key whose presence identifies each format, checked in this order.
FORMAT_KEYS = {"sharegpt": "conversations", "openai": "messages", "alpaca": "instruction"}
FORMAT_SHAPES = (
    'sharegpt {"conversations": [{"from", "value"}, ...], "system" (optional)}',
    'openai {"messages": [{"role", "content"}, ...], "system" (optional)}',
    'alpaca {"instruction", "input" (optional), "output", "system" (optional)}',
)
# What training reads of a record and of a turn, per format; every other key is reported (IgnoredFields).
RECORD_KEYS = {
    "sharegpt": frozenset({"conversations", "system"}),
    "openai": frozenset({"messages", "system"}),
    "alpaca": frozenset({"instruction", "input", "output", "system"}),
}
TURN_KEYS = {"sharegpt": frozenset({"from", "value"}), "openai": frozenset({"role", "content", REASONING_KEY})}
INVALID_LOCATIONS_SHOWN = 5  # first bad records named in the log and the manifest
IGNORED_NAMES_KEPT = 64  # distinct ignored field names counted one by one; more are pooled (bounded memory)
OTHER_IGNORED = "(other fields)"
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

    Roles become ``system`` / ``user`` / ``assistant``; a system message may only come first. A
    top-level ``system`` string (any format) is the system message; blank or null means none; a
    record holding both it and a system turn is refused (``two_system_prompts``). With
    ``default_system_prompt``, a conversation still without a system message gets one prepended.
    Contents are kept exactly as written. Raises :class:`DataError` naming ``where`` when the record
    is in another format than ``fmt``, or a turn is not an object, has an unknown role, or has
    no content (missing, null, not a string, or blank), or ``system`` is not a string, or the
    conversation has no assistant turn or opens with one. Turn numbers in messages count the
    record's own turns.

    >>> normalise_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ...                  "sharegpt", "a.jsonl:1")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    >>> alpaca = {"instruction": "Sum:", "input": "2 3", "output": "5"}
    >>> [m["role"] for m in normalise_record(alpaca, "alpaca", "a.jsonl:1", default_system_prompt="Be brief.")]
    ['system', 'user', 'assistant']
    >>> normalise_record(alpaca, "alpaca", "a.jsonl:1")[0]
    {'role': 'user', 'content': 'Sum:\\n\\n2 3'}
    >>> normalise_record({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
    ...                   {"role": "assistant", "content": "Hello"}]}, "openai", "a.jsonl:2")[0]
    {'role': 'system', 'content': 'Be brief.'}
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
    if fmt == "alpaca":
        messages, system = _alpaca_messages(record, where), None  # alpaca's own system is already its first turn
    else:
        messages, system = _turn_messages(record, fmt, where), _record_system(record, where)
    if system is not None:
        turn = next((number for number, m in enumerate(messages, start=1) if m["role"] == "system"), None)
        if turn is not None:
            raise InvalidRecord(
                where,
                "two_system_prompts",
                f"the record has a top-level 'system' and a system message in turn {turn}; give the system prompt once",
            )
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
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if default_system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system_prompt})
    return messages


def unused_keys(record: Mapping[str, object], fmt: str) -> list[str]:
    """The keys of ``record`` (a valid record of format ``fmt``) that training does not read, each named once.

    Record keys by name; keys of its turns as ``conversations[].KEY`` / ``messages[].KEY``; in the
    order first met.

    >>> unused_keys({"id": 7, "conversations": [{"from": "human", "value": "Hi", "weight": 0},
    ...              {"from": "gpt", "value": "Yo", "weight": 1, "loss": True}], "system": ""}, "sharegpt")
    ['id', 'conversations[].weight', 'conversations[].loss']
    >>> unused_keys({"messages": [{"role": "assistant", "content": "", "tool_calls": []}], "tools": "[]"}, "openai")
    ['tools', 'messages[].tool_calls']
    >>> unused_keys({"instruction": "Hi", "output": "Yo", "history": []}, "alpaca")
    ['history']
    """
    names = [key for key in record if key not in RECORD_KEYS[fmt]]
    if fmt in TURN_KEYS:
        list_key = FORMAT_KEYS[fmt]
        turns = record.get(list_key)
        seen: set[str] = set()
        for turn in turns if isinstance(turns, list) else ():
            for key in turn if isinstance(turn, dict) else ():
                if key not in TURN_KEYS[fmt] and key not in seen:
                    seen.add(key)
                    names.append(f"{list_key}[].{key}")
    return names


class IgnoredFields:
    """Fields of the records read that training does not use: per name, the records holding it and where first seen.

    Memory is bounded: a count and one location per name, for at most :data:`IGNORED_NAMES_KEPT`
    names (records holding only names beyond those are counted under :data:`OTHER_IGNORED`).

    >>> ignored = IgnoredFields()
    >>> ignored.add(["tools", "conversations[].weight"], "a.jsonl:1"); ignored.add(["tools"], "a.jsonl:2")
    >>> ignored.stats()
    {'tools': {'records': 2, 'first': 'a.jsonl:1'}, 'conversations[].weight': {'records': 1, 'first': 'a.jsonl:1'}}
    >>> ignored.describe().endswith(": tools: 2 (a.jsonl:1), conversations[].weight: 1 (a.jsonl:1)")
    True
    """

    def __init__(self) -> None:
        self.records: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, names: Iterable[str], where: str) -> None:
        """Count one record (at ``where``) holding ``names`` (as :func:`unused_keys` lists them)."""
        pooled = False
        for name in names:
            if name not in self.first and len(self.first) >= IGNORED_NAMES_KEPT:
                pooled = True
                continue
            self.first.setdefault(name, where)
            self.records[name] += 1
        if pooled:
            self.first.setdefault(OTHER_IGNORED, where)
            self.records[OTHER_IGNORED] += 1

    def __bool__(self) -> bool:
        return bool(self.records)

    def stats(self) -> dict[str, dict[str, Any]]:
        """``{name: {"records": count, "first": "file:line"}}``, most frequent first: the stats' ``ignored_fields``."""
        return {name: {"records": count, "first": self.first[name]} for name, count in self.records.most_common()}

    def describe(self) -> str:
        """One line naming every ignored field with its count and first location."""
        fields = ", ".join(f"{name}: {entry['records']} ({entry['first']})" for name, entry in self.stats().items())
        return f"ignored fields, not trained on (records holding each, where first seen): {fields}"

    def warn(self) -> None:
        """Log :meth:`describe` as one WARNING, when any field was ignored."""
        if self:
            logger.warning("%s", self.describe())


class InvalidRecords:
    """What ``invalid_records: skip`` left out: a count per reason, the total and the first few, in bounded memory.

    Memory holds the counts and the first locations only, whatever the number of bad records.

    >>> invalid = InvalidRecords()
    >>> invalid.add(InvalidRecord("a.jsonl:3", "no_content", "turn 2 (gpt) has no content"))
    >>> stats = invalid.stats(records=200)
    >>> stats["skipped"], stats["records"], stats["by_reason"], stats["first"]
    (1, 200, {'no_content': 1}, ['a.jsonl:3: turn 2 (gpt) has no content'])
    """

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.first: list[str] = []  # the first INVALID_LOCATIONS_SHOWN, as "file:line: problem"

    def add(self, invalid: InvalidRecord) -> None:
        """Count one skipped record."""
        self.by_reason[invalid.reason] += 1
        if len(self.first) < INVALID_LOCATIONS_SHOWN:
            self.first.append(str(invalid))

    def __len__(self) -> int:
        return sum(self.by_reason.values())

    def stats(self, records: int) -> dict[str, Any]:
        """Counts by reason and the first locations; ``records`` counts every record read, valid or not."""
        skipped = len(self)
        return {
            "skipped": skipped,
            "records": records,
            "share": skipped / records if records else 0.0,
            "by_reason": dict(self.by_reason.most_common()),
            "first": list(self.first),
        }

    def describe(self, records: int) -> str:
        """:func:`describe_invalid_records` of :meth:`stats`: the log line."""
        return describe_invalid_records(self.stats(records))

    def check_share(self, records: int, max_share: float) -> None:
        """:func:`check_invalid_share` of :meth:`stats`: a DataError when more than ``max_share`` are invalid."""
        check_invalid_share(self.stats(records), max_share)


def describe_invalid_records(stats: Mapping[str, Any]) -> str:
    """What :meth:`InvalidRecords.stats` counted, for the log: counts first, then the first locations."""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in stats["by_reason"].items())
    first = "".join(f"\n  {location}" for location in stats["first"])
    return (
        f"invalid_records: skip left out {stats['skipped']} of {stats['records']} records "
        f"({100 * stats['share']:.2f}%; {reasons}); the first:{first}"
    )


def check_invalid_share(stats: Mapping[str, Any], max_share: float) -> None:
    """Refuse to build when more than ``max_share`` of the records are invalid (a wrong file, not a few bad lines)."""
    if stats["skipped"] and stats["share"] > max_share:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in stats["by_reason"].items())
        first = "".join(f"\n  {location}" for location in stats["first"])
        raise DataError(
            f"train_files: {stats['skipped']} of {stats['records']} records are invalid "
            f"({100 * stats['share']:.2f}%), more than max_invalid_share={max_share:g} ({reasons}); fix them, or "
            f"raise max_invalid_share if leaving them out is intended; the first:{first}"
        )


def iter_conversations(
    paths: Iterable[Path],
    default_system_prompt: str | None,
    invalid: InvalidRecords | None,
    ignored: IgnoredFields,
) -> Iterator[tuple[list[Message], str]]:
    """Stream ``(messages, source)`` for every valid record of ``paths``, one at a time, in file order.

    ``source`` is ``path:line`` (``path: record N`` in a ``.json`` array). Each file's format is
    detected from its first (valid) record, with the errors of :func:`read_conversations`. With
    ``invalid``, invalid records are counted there and skipped; without, the first one raises.
    Fields that training does not use are counted in ``ignored``; logging them (``ignored.warn()``)
    once after everything is read is the caller's. No paths yield nothing; a file left with no
    valid record is the caller's to judge (``invalid.stats``). Memory: one line at a time (a
    ``.json`` array is parsed whole).
    """
    _check_system_prompt(default_system_prompt)
    on_invalid = invalid.add if invalid is not None else None
    for path in paths:
        yield from _file_conversations(path, default_system_prompt, on_invalid, ignored)


def read_conversations(
    path: Path,
    default_system_prompt: str | None = None,
    skipped: list[InvalidRecord] | None = None,
    ignored: IgnoredFields | None = None,
) -> list[dict[str, object]]:
    """Read one conversation file (see :data:`CONVERSATION_FILES`), detecting its format from the first record.

    Returns one ``{"messages": list[Message], "source": where}`` per record, in file order, where
    ``where`` is ``path:line`` (``path: record N`` for a ``.json`` array). Blank lines are skipped.
    Raises :class:`DataError` naming the file (and line or record) when it cannot be read, is
    empty, holds invalid UTF-8 or JSON, or any record is invalid (see :func:`normalise_record`).
    With a ``skipped`` list, each invalid record (and unreadable JSON line) is appended to it
    instead and reading goes on; the file's format is then set by its first valid record. Unused
    fields go to ``ignored``; without one, they are logged in one WARNING here.
    """
    _check_system_prompt(default_system_prompt)
    fields = IgnoredFields() if ignored is None else ignored
    on_invalid = skipped.append if skipped is not None else None
    conversations: list[dict[str, object]] = [
        {"messages": messages, "source": where}
        for messages, where in _file_conversations(path, default_system_prompt, on_invalid, fields)
    ]
    if ignored is None:
        fields.warn()
    return conversations


def read_conversation_files(
    paths: Iterable[Path],
    default_system_prompt: str | None = None,
    skipped: list[InvalidRecord] | None = None,
    ignored: IgnoredFields | None = None,
) -> datasets.Dataset:
    """Read several conversation files (see :func:`read_conversations`) into one dataset, in the given order.

    Each file has its own format. Columns: ``messages`` (a list of ``{"role", "content",
    "reasoning_content"}``, the last None where absent) and ``source`` (``path:line`` of the
    record). Raises :class:`DataError` when ``paths`` is empty or any file is bad (with a
    ``skipped`` list: when no valid record is left). Unused fields go to ``ignored``; without one,
    they are logged in one WARNING once every file is read.
    """
    fields = IgnoredFields() if ignored is None else ignored
    rows: list[dict[str, object]] = []
    for path in paths:
        rows += read_conversations(path, default_system_prompt, skipped, fields)
    if not rows:
        raise DataError("no conversation files given" if not skipped else "no valid conversation in the files given")
    if ignored is None:
        fields.warn()
    return datasets.Dataset.from_list(rows, features=CONVERSATION_FEATURES)


def _file_conversations(
    path: Path,
    default_system_prompt: str | None,
    on_invalid: Callable[[InvalidRecord], None] | None,
    ignored: IgnoredFields,
) -> Iterator[tuple[list[Message], str]]:
    """``(messages, where)`` of one file's valid records; invalid ones go to ``on_invalid``, or raise without it."""
    if not CONVERSATION_FILES.format_of(path):
        raise DataError(f"{path}: unsupported conversation file type; use {CONVERSATION_FILES.names()}")
    kept = skipped = 0
    fmt = ""
    with read_errors_named(path):
        for where, record in iter_json_records(path, yield_invalid=on_invalid is not None):
            try:
                if isinstance(record, InvalidRecord):
                    raise record
                record_format = fmt or detect_format(record, where)
                messages = normalise_record(record, record_format, where, default_system_prompt)
            except InvalidRecord as invalid:
                if on_invalid is None:
                    raise
                on_invalid(invalid)
                skipped += 1
                continue
            assert isinstance(record, dict)  # normalise_record checked it
            fmt = record_format
            ignored.add(unused_keys(record, fmt), where)
            kept += 1
            yield messages, where
        if not kept and not skipped and not path.read_bytes().removeprefix(UTF8_BOM).strip():
            raise DataError(f"{path}: the file is empty")
    if not kept and not skipped:
        raise DataError(f"{path}: the file holds no records")
    logger.info(
        "read %d %s conversations from %s%s",
        kept,
        fmt or "(no valid)",
        path,
        f" ({skipped} invalid records skipped)" if skipped else "",
    )


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
    system = _record_system(record, where)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages: list[Message] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _record_system(record: dict[str, object], where: str) -> str | None:
    """A record's top-level ``system`` prompt, or None where it is absent, null or blank."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRecord(where, "bad_field", f"'system' must be a string, got {_json_type(system)}")
    # An empty "system" is how many exports (alpaca, LLaMA-Factory's column) spell "none", unlike an empty chat turn.
    return system if system and system.strip() else None


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
