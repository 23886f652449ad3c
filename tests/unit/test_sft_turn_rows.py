"""Every assistant turn trained in the context inference gives it, under templates that are not prefix-stable.

The definition (issue: Qwen3-family SFT): for assistant turn *i*, context = ``render(messages[:i],
add_generation_prompt=True)``; supervised = from there through the end-of-turn marker of
``render(messages[:i+1])``; tokens = that rendering tokenized up to the marker. Each turn is
supervised exactly once, in one row. Checked hermetically with the tiny tokenizer's Qwen3-style
template, and with the official Qwen3 / Qwen3-2507 / Qwen3.5 templates when ``../shared`` has them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation, render, supervised_char_spans
from llmtrain.data.fitting import fit_conversation
from llmtrain.errors import ConfigError
from llmtrain.loss import IGNORE_INDEX
from llmtrain.paths import TINY_MODEL_DIR, TINY_THINK_TEMPLATE

EOT = "<|im_end|>"
SHARED_QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "qwen3-tokenizer"
# Rows each template makes of CONVERSATION (3 answers): Qwen3-2507 (no think blocks) is prefix-stable.
ROWS = {"tiny-think": 3, "qwen3.jinja": 3, "qwen3_instruct_2507.jinja": 1, "qwen3_5_think.jinja": 3,
        "qwen3_5_nothink.jinja": 3}  # fmt: skip
REAL_TEMPLATES = tuple(name for name in ROWS if name.endswith(".jinja"))

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def tiny_think_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.chat_template = TINY_THINK_TEMPLATE.read_text(encoding="utf-8")
    return tokenizer


def template_cases() -> list[Any]:
    cases: list[Any] = [pytest.param("tiny-think", id="tiny-think")]
    for name in REAL_TEMPLATES:
        present = (SHARED_QWEN3 / "templates" / name).is_file()
        cases.append(
            pytest.param(name, id=name, marks=pytest.mark.skipif(not present, reason=f"../shared {name} absent"))
        )
    return cases


@pytest.fixture(scope="module", params=template_cases())
def template(request: pytest.FixtureRequest) -> tuple[str, PreTrainedTokenizerBase]:
    if request.param == "tiny-think":
        return request.param, tiny_think_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(SHARED_QWEN3)
    tokenizer.chat_template = (SHARED_QWEN3 / "templates" / request.param).read_text(encoding="utf-8")
    return request.param, tokenizer


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        current = label != IGNORE_INDEX
        if current:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = current
    return runs


def test_each_assistant_turn_is_one_row_span_as_the_definition_says(
    template: tuple[str, PreTrainedTokenizerBase],
) -> None:
    name, think_tokenizer = template
    rows = supervised_char_spans(CONVERSATION, think_tokenizer, EOT)
    spans = [(text, span) for text, row_spans in rows for span in row_spans]
    assistant_turns = [i for i, message in enumerate(CONVERSATION) if message["role"] == "assistant"]
    assert len(spans) == len(assistant_turns), "every assistant turn supervised exactly once"
    for index, (text, (start, end)) in zip(assistant_turns, spans, strict=True):
        context = render(think_tokenizer, CONVERSATION[:index], generation_prompt=True)
        through_turn = render(think_tokenizer, CONVERSATION[: index + 1])
        marker_end = through_turn.rfind(EOT, len(context)) + len(EOT)
        assert text.startswith(through_turn[:marker_end]), f"turn {index} is not in the context inference gives it"
        assert (start, end) == (len(context), marker_end)
        assert text[start:end].endswith(CONVERSATION[index]["content"] + EOT)
    # Where the template renders history differently, earlier turns get rows of their own; the last row is
    # always the whole conversation.
    assert len(rows) == ROWS[name] and rows[-1][0] == render(think_tokenizer, CONVERSATION)


def test_rows_are_tokenized_as_rendered_and_supervise_exactly_the_turns(
    template: tuple[str, PreTrainedTokenizerBase],
) -> None:
    _, think_tokenizer = template
    rows = encode_conversation(CONVERSATION, think_tokenizer, EOT)
    texts = supervised_char_spans(CONVERSATION, think_tokenizer, EOT)
    assert len(rows) == len(texts)
    answers = []
    for row, (text, _) in zip(rows, texts, strict=True):
        assert row["input_ids"] == think_tokenizer(text, add_special_tokens=False)["input_ids"]  # token for token
        answers += [think_tokenizer.decode(run) for run in supervised_runs(row["input_ids"], row["labels"])]
    contents = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(answers) == len(contents)
    assert all(answer.endswith(content + EOT) for answer, content in zip(answers, contents, strict=True))


def test_a_prefix_stable_template_keeps_one_row_per_conversation() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    [row] = encode_conversation(CONVERSATION, tokenizer, EOT)
    assert row["input_ids"] == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    assert len(supervised_runs(row["input_ids"], row["labels"])) == 3


def test_last_turn_only_trains_one_row_under_a_think_template() -> None:
    [(text, [span])] = supervised_char_spans(CONVERSATION, tiny_think_tokenizer(), EOT, last_turn_only=True)
    assert text[span[0] : span[1]] == "<think>\n\n</think>\n\nBlue." + EOT


def test_the_length_policy_applies_to_every_row() -> None:
    data_args = SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=4096)
    fitted = fit_conversation(CONVERSATION, tiny_think_tokenizer(), data_args, "f.jsonl:1")
    assert fitted["drop_reason"] == "" and len(fitted["rows"]) == 3
    longest = max(len(row["input_ids"]) for row in fitted["rows"])
    tight = SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=longest - 1)
    trimmed = fit_conversation(CONVERSATION, tiny_think_tokenizer(), tight, "f.jsonl:1")
    assert trimmed["dropped_turns"] >= 1 and all(len(row["input_ids"]) < longest for row in trimmed["rows"])


def test_a_template_that_breaks_its_own_generation_prompt_names_the_record_and_the_difference() -> None:
    broken = copy.deepcopy(tiny_think_tokenizer())
    assert broken.chat_template is not None
    broken.chat_template = broken.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' }}\n{%- if loop.index0",
        "{{- '<|im_start|>assistant:\\n' }}\n{%- if loop.index0",
    )
    with pytest.raises(ConfigError) as raised:
        encode_conversation(CONVERSATION, broken, EOT, source="chat.jsonl:7")
    message = str(raised.value)
    assert message.startswith("tokenizer_name_or_path: chat.jsonl:7: the chat template renders assistant turn 2")
    assert "at character" in message and "assistant\\n' vs " in message and "assistant:\\n" in message
