"""Reading SFT conversation files: three formats normalised to chat messages, one clear error per bad input."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from llmtrain.data.conversations import (
    FORMATS,
    IGNORED_NAMES_KEPT,
    OTHER_IGNORED,
    IgnoredFields,
    InvalidRecords,
    detect_format,
    iter_conversations,
    normalise_record,
    read_conversation_files,
    read_conversations,
    template_messages,
)
from llmtrain.demo_conversations import LOCATION_ANSWER, MAX_ANSWER_CHARS, SYSTEM_PROMPT, build_demo_conversations
from llmtrain.errors import ConfigError, DataError, InvalidRecord
from llmtrain.paths import DEMO_CONVERSATIONS_PATH

from ..conftest import write_jsonl

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Bye"},
        {"from": "assistant", "value": "Goodbye"},
    ]
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "2+2?", "name": "ann"},
        {"role": "assistant", "content": "4", "weight": 1},
    ]
}


def messages(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_sharegpt_speakers_become_chat_template_roles() -> None:
    assert detect_format(SHAREGPT, "x") == "sharegpt"
    assert normalise_record(SHAREGPT, "sharegpt", "x") == messages(
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Goodbye")
    )


def test_openai_messages_keep_role_and_content_only() -> None:
    assert detect_format(OPENAI, "x") == "openai"
    assert normalise_record(OPENAI, "openai", "x") == messages(("user", "2+2?"), ("assistant", "4"))


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "Name a colour.", "input": "", "output": "Red."}, [("user", "Name a colour.")]),
        ({"instruction": "Name a colour.", "output": "Red."}, [("user", "Name a colour.")]),
        ({"instruction": "Translate:", "input": "chat", "output": "Red."}, [("user", "Translate:\n\nchat")]),
        (
            {"instruction": "Name a colour.", "input": "", "output": "Red.", "system": "Be brief."},
            [("system", "Be brief."), ("user", "Name a colour.")],
        ),
        ({"instruction": "Name a colour.", "output": "Red.", "system": ""}, [("user", "Name a colour.")]),
    ],
)
def test_alpaca_becomes_user_then_assistant(record: dict[str, str], expected: list[tuple[str, str]]) -> None:
    assert detect_format(record, "x") == "alpaca"
    assert normalise_record(record, "alpaca", "x") == messages(*expected, ("assistant", "Red."))


def test_default_system_prompt_is_added_only_where_there_is_none(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}],
    )
    with_own, without = (row["messages"] for row in read_conversations(path, default_system_prompt="Default."))
    assert with_own == normalise_record(SHAREGPT, "sharegpt", "x")
    assert without == messages(("system", "Default."), ("user", "Hi"), ("assistant", "Hello"))
    assert read_conversations(path)[1]["messages"] == messages(("user", "Hi"), ("assistant", "Hello"))


def test_blank_default_system_prompt_is_a_config_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [OPENAI])
    with pytest.raises(ConfigError, match="default_system_prompt"):
        read_conversations(path, default_system_prompt="  ")


def test_each_file_has_its_own_format_and_files_keep_their_order(tmp_path: Path) -> None:
    openai = write_jsonl(tmp_path / "b.jsonl", [OPENAI])
    sharegpt = write_lines(tmp_path / "a.jsonl", "", json.dumps(SHAREGPT), "   ", json.dumps(SHAREGPT))
    alpaca = tmp_path / "c.json"
    alpaca.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}], indent=2), encoding="utf-8")
    dataset = read_conversation_files([openai, sharegpt, alpaca])
    assert dataset.column_names == ["messages", "source"]
    assert dataset["source"] == [f"{openai}:1", f"{sharegpt}:2", f"{sharegpt}:4", f"{alpaca}: record 1"]
    assert template_messages(dataset[0]["messages"]) == messages(("user", "2+2?"), ("assistant", "4"))
    assert template_messages(dataset[1]["messages"])[1] == {"role": "user", "content": "Hi"}
    assert template_messages(dataset[3]["messages"]) == messages(("user", "Hi"), ("assistant", "Hello"))


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "belle.json", json.dumps(SHAREGPT), json.dumps(SHAREGPT))
    assert [row["source"] for row in read_conversations(path)] == [f"{path}:1", f"{path}:2"]


def test_cjk_and_line_separators_round_trip_exactly(tmp_path: Path) -> None:
    question, answer = "你好，请介绍一下你自己。", "我是一个语言模型\u2028（第二行）🙂\n最后一行"
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    path = tmp_path / "zh.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = messages(("user", question), ("assistant", answer))
    assert read_conversations(path)[0]["messages"] == expected
    assert template_messages(read_conversation_files([path])[0]["messages"]) == expected


def test_a_conversation_without_an_assistant_turn_is_an_error_naming_its_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "a.jsonl", [good, {"messages": [{"role": "user", "content": "anyone?"}]}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: no assistant turn"):
        read_conversations(path)


def test_a_conversation_opening_with_an_answer_is_an_error_naming_its_line(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    opens_with_answer = {"messages": [{"role": "system", "content": "Be brief."}, *reversed(good["messages"])]}
    path = write_jsonl(tmp_path / "a.jsonl", [good, opens_with_answer])
    with pytest.raises(DataError, match=r"a\.jsonl:2: the conversation opens with an assistant turn \(turn 2\)"):
        read_conversations(path)


def test_a_lone_surrogate_escape_is_an_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        turns({"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"})
        + "\n"
        + '{"conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "a"}]}\n'
    )
    with pytest.raises(DataError, match=r"a\.jsonl:2: a lone UTF-16 surrogate escape"):
        read_conversations(path)


def turns(*items: object) -> str:
    return json.dumps({"conversations": list(items)})


HI = {"from": "human", "value": "Hi"}
HELLO = {"from": "gpt", "value": "Hello"}

# (second line of a .jsonl whose first line is a good ShareGPT record, expected message after "file:2: ")
BAD_LINES = [
    ('{"conversations": [', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object, got an array"),
    ('"just text"', "expected a JSON object, got a string"),
    (
        '{"prompt": "Hi", "answer": "Hello"}',
        "record is in no known conversation format (keys found: 'prompt', 'answer')",
    ),
    (json.dumps(OPENAI), "record is in openai format, but this file is sharegpt"),
    ('{"conversations": {"from": "human"}}', "'conversations' must be a list of turns, got an object"),
    ('{"conversations": []}', "'conversations' is an empty list"),
    (turns(HI, "Hello"), "turn 2 must be a JSON object, got a string"),
    (turns(HI, {"from": "bot", "value": "Hello"}), "unknown role 'bot' in turn 2 (expected one of human, user, gpt"),
    (turns({"value": "Hi"}), "turn 1 has no 'from' (keys found: 'value')"),
    (turns(HI, {"from": "gpt"}), "turn 2 (gpt) has no content: 'value' is missing"),
    (turns(HI, {"from": "gpt", "value": None}), "turn 2 (gpt) has no content: 'value' is null"),
    (turns(HI, {"from": "gpt", "value": 42}), "turn 2 (gpt) has no content: 'value' is a number, not a string"),
    (turns(HI, {"from": "gpt", "value": ""}), "turn 2 (gpt) has no content: 'value' is blank"),
    (turns(HI, {"from": "gpt", "value": " \n\t"}), "turn 2 (gpt) has no content: 'value' is blank"),
    (turns(HI, {"from": "system", "value": "Late."}, HELLO), "system message in turn 2"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_sharegpt_record_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", turns(HI, HELLO), line, turns(HI, HELLO))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
        read_conversations(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "Hi"}, "'messages' must be a list of turns, got a string"),
        ({"messages": [{"role": "bot", "content": "Hi"}]}, "unknown role 'bot' in turn 1"),
        ({"messages": [{"role": "human", "content": "Hi"}]}, "unknown role 'human' in turn 1"),
        ({"messages": [{"role": ["user"], "content": "Hi"}]}, 'unknown role ["user"] in turn 1'),
        (
            {"messages": [{"role": "user", "content": ["Hi"]}]},
            "turn 1 (user) has no content: 'content' is an array, not a string",
        ),
        ({"instruction": "Hi"}, "alpaca record has no content: 'output' is missing"),
        ({"instruction": "", "output": "Hello"}, "alpaca record has no content: 'instruction' is blank"),
        ({"instruction": "Hi", "input": 3, "output": "Hello"}, "'input' must be a string, got a number"),
        ({"instruction": "Hi", "output": "Hello", "system": ["x"]}, "'system' must be a string, got an array"),
        ({"messages": [], "instruction": "Hi"}, "record mixes the keys of formats openai, alpaca"),
    ],
)
def test_bad_openai_and_alpaca_records_name_file_and_line(tmp_path: Path, record: object, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", "", json.dumps(record))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {message}")):
        read_conversations(path)


def test_a_file_in_no_known_format_lists_the_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "plain pretraining text"}])
    with pytest.raises(DataError) as raised:
        read_conversations(path)
    assert str(raised.value).startswith(f"{path}:1: record is in no known conversation format (keys found: 'text')")
    for fmt, key in zip(FORMATS, ("conversations", "messages", "instruction"), strict=True):
        assert f"{fmt} {{" in str(raised.value) and key in str(raised.value)


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([turns(HI, HELLO).encode(), turns(HI, HELLO).encode(), b'{"x": "\xff"}']) + b"\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid UTF-8")):
        read_conversations(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", ": the file is empty"),
        ("blank.jsonl", "\n  \n", ": the file is empty"),
        ("empty.json", "[]", ": the file holds no records"),
        ("notes.txt", "Hi", ": unsupported conversation file type; use .jsonl, .json, .jsonl.gz, .jsonl.zst"),
        ("broken.json", '[\n  {"conversations": []},\n  {oops}\n]', ":3: invalid JSON"),
        ("bad.json", json.dumps([json.loads(turns(HI, HELLO)), 7]), ": record 2: expected a JSON object, got a number"),
        (
            "mixed.json",
            json.dumps([OPENAI, SHAREGPT]),
            ": record 2: record is in sharegpt format, but this file is openai",
        ),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}{message}")):
        read_conversations(path)


def test_a_missing_file_or_no_files_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gone.jsonl'}: cannot be read")):
        read_conversations(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match="no conversation files given"):
        read_conversation_files([])


def test_normalise_record_checks_the_expected_format() -> None:
    with pytest.raises(DataError, match=re.escape("f.jsonl:9: record is in openai format, but this file is alpaca")):
        normalise_record(OPENAI, "alpaca", "f.jsonl:9")
    with pytest.raises(ValueError, match="unknown conversation format 'belle'"):
        normalise_record(OPENAI, "belle", "f.jsonl:9")


def test_committed_demo_set_loads_and_has_the_promised_shape() -> None:
    assert DEMO_CONVERSATIONS_PATH.stat().st_size < 1_500_000
    rows = read_conversations(DEMO_CONVERSATIONS_PATH)
    conversations = [row["messages"] for row in rows]
    assert len(conversations) > 1000
    assert all(isinstance(c, list) and any(m["role"] == "assistant" for m in c) for c in conversations)
    roles = {m["role"] for c in conversations for m in c}
    assert roles == {"system", "user", "assistant"}
    user_turns = [sum(m["role"] == "user" for m in c) for c in conversations]
    assert 0.1 < sum(n > 1 for n in user_turns) / len(conversations) < 0.9
    with_system = [c for c in conversations if c[0]["role"] == "system"]
    assert 0.1 < len(with_system) / len(conversations) < 0.9
    assert all(c[0]["content"] == SYSTEM_PROMPT for c in with_system)
    answers = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert max(len(answer) for answer in answers) <= MAX_ANSWER_CHARS
    assert any(answer.endswith(" module.") and " is defined in the `" in answer for answer in answers)


def fake_stdlib(root: Path) -> Path:
    files = {
        "pkg/__init__.py": '"""Tools for parsing small languages into trees of nodes."""\n',
        "pkg/parse.py": (
            '"""Parse token streams into syntax trees for the tiny languages."""\n'
            "class Parser:\n"
            '    """Build a syntax tree from a stream of tokens, one rule at a time."""\n'
            "    def parse(self, text):\n"
            '        """Return the syntax tree of the whole text, or raise an error."""\n'
            "def tokenize(text):\n"
            '    """Split the text into tokens of the parsing language."""\n'
            "def walk(tree):\n"
            '    """Yield every node of the tree in depth-first order, parents first.\n\n    More detail."""\n'
            "    def visit(node):\n"
            '        """Visit one node of the tree and all of its children below it."""\n'
        ),
        "other.py": '"""Other helpers used for many little things."""\n'
        'def tokenize(text):\n    """Cut the text into words separated by any whitespace."""\n',
        "_private.py": 'def secret():\n    """A private helper that no demo question should be about."""\n',
    }
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source, encoding="utf-8")
    return root


def test_demo_builder_asks_about_public_definitions_deterministically(tmp_path: Path) -> None:
    stdlib_dir = fake_stdlib(tmp_path / "stdlib")
    first, second = tmp_path / "a" / "sft.jsonl", tmp_path / "b" / "sft.jsonl"
    count = build_demo_conversations(first, stdlib_dir=stdlib_dir)
    build_demo_conversations(second, stdlib_dir=stdlib_dir)
    assert first.read_bytes() == second.read_bytes()
    conversations = [row["messages"] for row in read_conversations(first)]
    assert len(conversations) == count > 0
    pairs = {
        (c[i]["content"], c[i + 1]["content"])
        for c in conversations
        for i in range(len(c) - 1)
        if c[i]["role"] == "user" and c[i + 1]["role"] == "assistant"
    }
    answers = {answer for _, answer in pairs}
    assert answers == {
        "Tools for parsing small languages into trees of nodes.",
        "Parse token streams into syntax trees for the tiny languages.",
        "Build a syntax tree from a stream of tokens, one rule at a time.",
        "Return the syntax tree of the whole text, or raise an error.",
        "Split the text into tokens of the parsing language.",
        "Yield every node of the tree in depth-first order, parents first.",
        "Other helpers used for many little things.",
        "Cut the text into words separated by any whitespace.",
        LOCATION_ANSWER.format(name="Parser", module="pkg.parse"),
        LOCATION_ANSWER.format(name="walk", module="pkg.parse"),
    }
    questions = {question: answer for question, answer in pairs}
    assert questions["Which module defines `walk`?"] == "`walk` is defined in the `pkg.parse` module."
    assert any("`pkg.parse.Parser.parse`" in question for question in questions)
    assert build_demo_conversations(first, limit=2, stdlib_dir=stdlib_dir) == 2


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_compressed_conversation_files_read_as_their_plain_copy(compression: str, tmp_path: Path) -> None:
    import gzip

    import zstandard

    plain = write_jsonl(tmp_path / "chat.jsonl", [SHAREGPT, SHAREGPT])
    compress = gzip.compress if compression == "gz" else zstandard.ZstdCompressor().compress
    packed = tmp_path / f"chat.jsonl.{compression}"
    packed.write_bytes(compress(plain.read_bytes()))
    assert [row["messages"] for row in read_conversations(packed)] == [
        row["messages"] for row in read_conversations(plain)
    ]
    assert read_conversations(packed)[1]["source"] == f"{packed}:2"
    packed.write_bytes(compress(plain.read_bytes())[:20])
    with pytest.raises(DataError, match=rf"chat\.jsonl\.{compression}: cannot be (read|decompressed)"):
        read_conversations(packed)


# --- a top-level system prompt, and every other field used or named ---

CHAT = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
OPENAI_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"system": "Be kind.", "conversations": CHAT}, "sharegpt"),
        ({"messages": OPENAI_CHAT, "system": "Be kind."}, "openai"),
    ],
)
def test_a_top_level_system_prompt_becomes_the_system_turn(record: dict[str, object], fmt: str) -> None:
    expected = messages(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello"))
    assert normalise_record(record, fmt, "x") == expected
    assert normalise_record(record, fmt, "x", default_system_prompt="Default.") == expected  # the record's wins
    for blank in ("", "  \n", None):
        assert normalise_record({**record, "system": blank}, fmt, "x", default_system_prompt="Default.")[0] == {
            "role": "system",
            "content": "Default.",
        }
        assert normalise_record({**record, "system": blank}, fmt, "x")[0] == {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("record", "reason", "message"),
    [
        (
            {"system": "Be kind.", "conversations": [{"from": "system", "value": "Be brief."}, *CHAT]},
            "two_system_prompts",
            "the record has a top-level 'system' and a system message in turn 1; give the system prompt once",
        ),
        (
            {"system": "Be kind.", "messages": [*OPENAI_CHAT, {"role": "system", "content": "Late."}]},
            "two_system_prompts",
            "the record has a top-level 'system' and a system message in turn 3",
        ),
        ({"system": ["Be kind."], "conversations": CHAT}, "bad_field", "'system' must be a string, got an array"),
        ({"system": 1, "messages": OPENAI_CHAT}, "bad_field", "'system' must be a string, got a number"),
        (
            {"system": "Be kind.", "conversations": list(reversed(CHAT))},
            "opens_with_assistant",
            "the conversation opens with an assistant turn (turn 1)",  # the record's turn, not the system's
        ),
    ],
)
def test_a_top_level_system_prompt_that_cannot_be_used_is_an_invalid_record(
    tmp_path: Path, record: dict[str, object], reason: str, message: str
) -> None:
    good = json.dumps({"messages": OPENAI_CHAT}) if "messages" in record else turns(HI, HELLO)
    path = write_lines(tmp_path / "data.jsonl", good, json.dumps(record))
    with pytest.raises(InvalidRecord, match=re.escape(f"{path}:2: {message}")) as raised:
        read_conversations(path)
    assert raised.value.reason == reason
    skipped: list[InvalidRecord] = []
    assert len(read_conversations(path, skipped=skipped)) == 1 and [s.reason for s in skipped] == [reason]


def test_fields_not_trained_on_are_named_in_one_warning_with_counts_and_first_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tool_call = {"role": "assistant", "content": "4", "tool_calls": [], "weight": 0}
    first = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"id": 1, "messages": OPENAI_CHAT},
            {"id": 2, "tools": "[]", "messages": [{"role": "user", "content": "2+2?"}, tool_call]},
        ],
    )
    second = write_jsonl(
        tmp_path / "b.jsonl", [{"id": "x", "conversations": [{"from": "human", "value": "Hi", "loss": 1}, HELLO]}]
    )
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.conversations"):
        dataset = read_conversation_files([first, second])
    assert len(dataset) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "ignored fields, not trained on (records holding each, where first seen): "
        f"id: 3 ({first}:1), tools: 1 ({first}:2), messages[].tool_calls: 1 ({first}:2), "
        f"messages[].weight: 1 ({first}:2), conversations[].loss: 1 ({second}:1)"
    ]
    ignored = IgnoredFields()
    read_conversation_files([first, second], ignored=ignored)  # the caller's accumulator: the caller warns
    assert ignored.stats()["id"] == {"records": 3, "first": f"{first}:1"}
    assert ignored.stats()["messages[].tool_calls"] == {"records": 1, "first": f"{first}:2"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.conversations"):
        read_conversations(write_jsonl(tmp_path / "c.jsonl", [SHAREGPT, {"system": "", **SHAREGPT}]))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], "every field was used"


def test_ignored_fields_stay_bounded_however_many_names_there_are() -> None:
    ignored = IgnoredFields()
    for index in range(1000):
        ignored.add([f"key{index}", "id"], f"a.jsonl:{index + 1}")
    stats = ignored.stats()
    assert len(stats) == IGNORED_NAMES_KEPT + 1
    assert stats["id"] == {"records": 1000, "first": "a.jsonl:1"}
    assert stats[OTHER_IGNORED] == {"records": 1000 - IGNORED_NAMES_KEPT + 1, "first": f"a.jsonl:{IGNORED_NAMES_KEPT}"}


def test_invalid_records_accumulator_gives_the_stats_and_messages_of_the_list(tmp_path: Path) -> None:
    reasons = ["no_content", "unknown_role", "no_content", "invalid_json", "no_content", "unknown_role", "bad_turns"]
    invalid = InvalidRecords()
    for line, reason in enumerate(reasons, start=1):
        invalid.add(InvalidRecord(f"a.jsonl:{line}", reason, f"problem {line}"))
    stats = invalid.stats(records=100)
    assert stats == {
        "skipped": 7,
        "records": 100,
        "share": 0.07,
        "by_reason": {"no_content": 3, "unknown_role": 2, "invalid_json": 1, "bad_turns": 1},
        "first": [f"a.jsonl:{line}: problem {line}" for line in range(1, 6)],
    }
    assert list(stats["by_reason"]) == ["no_content", "unknown_role", "invalid_json", "bad_turns"]
    assert len(invalid) == 7
    first = "".join(f"\n  a.jsonl:{line}: problem {line}" for line in range(1, 6))
    reasons_text = "no_content: 3, unknown_role: 2, invalid_json: 1, bad_turns: 1"
    assert invalid.describe(100) == (
        f"invalid_records: skip left out 7 of 100 records (7.00%; {reasons_text}); the first:{first}"
    )
    invalid.check_share(100, 0.1)
    with pytest.raises(DataError) as refused:
        invalid.check_share(100, 0.05)
    assert str(refused.value) == (
        f"train_files: 7 of 100 records are invalid (7.00%), more than max_invalid_share=0.05 ({reasons_text}); "
        f"fix them, or raise max_invalid_share if leaving them out is intended; the first:{first}"
    )


def test_iter_conversations_streams_every_file_in_order_with_the_readers_errors(tmp_path: Path) -> None:
    openai = write_jsonl(tmp_path / "b.jsonl", [OPENAI, {"messages": OPENAI_CHAT, "id": 3}])
    sharegpt = write_lines(tmp_path / "a.jsonl", json.dumps({"system": "Be kind.", "conversations": CHAT}), "{broken")
    ignored = IgnoredFields()
    stream = iter_conversations([openai, sharegpt], "Default.", None, ignored)
    assert next(stream) == (messages(("system", "Default."), ("user", "2+2?"), ("assistant", "4")), f"{openai}:1")
    assert next(stream)[1] == f"{openai}:2"
    assert next(stream) == (messages(("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello")), f"{sharegpt}:1")
    with pytest.raises(DataError, match=re.escape(f"{sharegpt}:2: invalid JSON")):
        next(stream)  # read lazily: the bad line is met only when reached
    assert ignored.stats() == {
        "messages[].name": {"records": 1, "first": f"{openai}:1"},
        "messages[].weight": {"records": 1, "first": f"{openai}:1"},
        "id": {"records": 1, "first": f"{openai}:2"},
    }
    invalid = InvalidRecords()
    kept = list(iter_conversations([openai, sharegpt], None, invalid, IgnoredFields()))
    assert [source for _, source in kept] == [f"{openai}:1", f"{openai}:2", f"{sharegpt}:1"]
    assert invalid.stats(4)["by_reason"] == {"invalid_json": 1}
    assert list(iter_conversations([], None, None, IgnoredFields())) == []
    with pytest.raises(DataError, match=r"notes\.txt: unsupported conversation file type"):
        list(iter_conversations([write_lines(tmp_path / "notes.txt", "Hi")], None, None, IgnoredFields()))
    with pytest.raises(ConfigError, match="default_system_prompt"):
        next(iter_conversations([openai], " ", None, IgnoredFields()))


@pytest.mark.parametrize("name", ["c.Jsonl", "part3.JSONL", "e.jsonl.GZ", "d.json.gz", "f.JSON.ZST", "g.json.gz"])
def test_conversation_files_are_read_by_any_suffix_case_and_compression(name: str, tmp_path: Path) -> None:
    import gzip

    import zstandard

    array = name.startswith("g")  # a .json.gz holding an array; the others JSON lines
    text = json.dumps([SHAREGPT, SHAREGPT]) if array else json.dumps(SHAREGPT) + "\n" + json.dumps(SHAREGPT) + "\n"
    data = text.encode()
    if name.lower().endswith(".gz"):
        data = gzip.compress(data)
    elif name.lower().endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / name
    path.write_bytes(data)
    rows = read_conversations(path)
    assert [row["messages"] for row in rows] == [normalise_record(SHAREGPT, "sharegpt", "x")] * 2
    assert rows[1]["source"] == (f"{path}: record 2" if array else f"{path}:2")
