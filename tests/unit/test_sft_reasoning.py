"""Reasoning data, template keywords and dirty records in SFT (issue: Qwen3-family SFT, items 2 and 3).

- ``reasoning_content`` (OpenAI format) and inline ``<think>...</think>`` (ShareGPT) reach the template, and
  the reasoning is supervised exactly where the template renders it; a template that never renders it is an
  error naming file:line, never a silent drop.
- ``chat_template_kwargs`` reach every render in training and the chat tool alike.
- ``invalid_records: skip`` skips and counts bad records within ``max_invalid_share``; trailing user turns
  are removed before fitting.

Hermetic with the tiny tokenizer's Qwen3-style template; the official templates in ``../shared`` when present.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation, render, supervised_char_spans
from llmtrain.data.conversations import read_conversation_files, read_conversations, template_messages
from llmtrain.data.fitting import fit_conversation
from llmtrain.data.sft import prepare_sft_data
from llmtrain.errors import ConfigError, DataError, InvalidRecord
from llmtrain.loss import IGNORE_INDEX
from llmtrain.paths import TINY_MODEL_DIR, TINY_THINK_TEMPLATE
from llmtrain.tools.chat import encode_chat, recorded_template_kwargs

EOT = "<|im_end|>"
SHARED = Path(__file__).resolve().parents[3] / "shared"
SHARED_QWEN3 = SHARED / "qwen3-tokenizer"
SHARED_QWEN25 = SHARED / "qwen2.5-tokenizer"

REASONING = ["Two and two make four.", "Three and three make six."]
ANSWERS = ["4.", "6."]
OPENAI_RECORD = {
    "messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": ANSWERS[0], "reasoning_content": REASONING[0]},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": ANSWERS[1], "reasoning_content": REASONING[1]},
    ]
}
SHAREGPT_RECORD = {
    "conversations": [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": f"<think>\n{REASONING[0]}\n</think>\n\n{ANSWERS[0]}"},
        {"from": "human", "value": "And 3+3?"},
        {"from": "gpt", "value": f"<think>\n{REASONING[1]}\n</think>\n\n{ANSWERS[1]}"},
    ]
}


def tiny_tokenizer(template: Path | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    if template is not None:
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


def qwen3_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if not (SHARED_QWEN3 / "templates" / name).is_file():
        pytest.skip(f"../shared qwen3-tokenizer/templates/{name} absent")
    tokenizer = AutoTokenizer.from_pretrained(SHARED_QWEN3)
    tokenizer.chat_template = (SHARED_QWEN3 / "templates" / name).read_text(encoding="utf-8")
    return tokenizer


def think_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return tiny_tokenizer(TINY_THINK_TEMPLATE) if name == "tiny-think" else qwen3_tokenizer(name)


def write_records(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def supervised_texts(rows: list[dict[str, list[int]]], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The decoded runs of supervised tokens, row by row."""
    texts: list[str] = []
    for row in rows:
        run: list[int] = []
        for token, label in [*zip(row["input_ids"], row["labels"], strict=True), (None, IGNORE_INDEX)]:
            if label != IGNORE_INDEX:
                assert token is not None
                run.append(token)
            elif run:
                texts.append(str(tokenizer.decode(run)))
                run = []
    return texts


def data_args(**overrides: Any) -> SFTDataArguments:
    return SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=4096, **overrides)


# Where each template puts an answer's reasoning in the supervised text (Qwen3.5 think opens the block in the
# generation prompt, so the supervised text starts inside it).
SUPERVISED = {
    "tiny-think": "<think>\n{reasoning}\n</think>\n\n{answer}" + EOT,
    "qwen3.jinja": "<think>\n{reasoning}\n</think>\n\n{answer}" + EOT,
    "qwen3_5_think.jinja": "{reasoning}\n</think>\n\n{answer}" + EOT,
}


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_reasoning_content_is_supervised_exactly_where_the_template_renders_it(name: str, tmp_path: Path) -> None:
    tokenizer = think_tokenizer(name)
    [conversation] = read_conversations(write_records(tmp_path / "r.jsonl", [OPENAI_RECORD]))
    fitted = fit_conversation(conversation["messages"], tokenizer, data_args(), str(conversation["source"]))
    expected = [SUPERVISED[name].format(reasoning=r, answer=a) for r, a in zip(REASONING, ANSWERS, strict=True)]
    assert supervised_texts(fitted["rows"], tokenizer) == expected
    assert len(fitted["rows"]) == 2  # the first answer's reasoning is history in the second row: a row of its own


def test_the_qwen3_5_no_think_template_trains_reasoning_only_with_thinking_turned_on(tmp_path: Path) -> None:
    tokenizer = qwen3_tokenizer("qwen3_5_nothink.jinja")
    [conversation] = read_conversations(write_records(tmp_path / "r.jsonl", [OPENAI_RECORD]))
    messages, source = conversation["messages"], str(conversation["source"])
    with pytest.raises(ConfigError, match=r"r\.jsonl:1: .*is thinking turned off in chat_template_kwargs"):
        fit_conversation(messages, tokenizer, data_args(), source)  # its default generation prompt closes the block
    thinking = fit_conversation(messages, tokenizer, data_args(chat_template_kwargs={"enable_thinking": True}), source)
    template = SUPERVISED["qwen3_5_think.jinja"]
    expected = [template.format(reasoning=r, answer=a) for r, a in zip(REASONING, ANSWERS, strict=True)]
    assert supervised_texts(thinking["rows"], tokenizer) == expected


@pytest.mark.parametrize("name", ["tiny-think", "qwen3.jinja"])
def test_inline_think_in_sharegpt_trains_the_same_tokens_as_reasoning_content(name: str, tmp_path: Path) -> None:
    tokenizer = think_tokenizer(name)
    dataset = read_conversation_files(
        [
            write_records(tmp_path / "openai.jsonl", [OPENAI_RECORD]),
            write_records(tmp_path / "sg.jsonl", [SHAREGPT_RECORD]),
        ]
    )
    openai, sharegpt = (fit_conversation(row["messages"], tokenizer, data_args(), row["source"]) for row in dataset)
    assert openai["rows"] == sharegpt["rows"]


@pytest.mark.parametrize("name", ["tiny-chatml", "qwen3_instruct_2507.jinja"])
def test_reasoning_the_template_never_renders_is_an_error_naming_the_record(name: str, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer() if name == "tiny-chatml" else qwen3_tokenizer(name)
    data = write_records(tmp_path / "r.jsonl", [{"messages": OPENAI_RECORD["messages"][:2]}, OPENAI_RECORD])
    [first, _] = read_conversations(data)
    with pytest.raises(DataError, match=rf"^{data}:1: assistant turn 1 has reasoning_content, but the chat template"):
        fit_conversation(first["messages"], tokenizer, data_args(), str(first["source"]))


def test_reasoning_on_a_user_turn_or_not_a_string_is_an_invalid_record(tmp_path: Path) -> None:
    on_user = {"messages": [{"role": "user", "content": "a", "reasoning_content": "r"},
                            {"role": "assistant", "content": "b"}]}  # fmt: skip
    not_text = {"messages": [{"role": "user", "content": "a"},
                             {"role": "assistant", "content": "b", "reasoning_content": 5}]}  # fmt: skip
    for record, problem in ((on_user, "only assistant messages carry reasoning"), (not_text, "not a string")):
        with pytest.raises(InvalidRecord, match=problem) as raised:
            read_conversations(write_records(tmp_path / "bad.jsonl", [record]))
        assert raised.value.reason == "bad_field"


def test_template_kwargs_reach_training_and_the_chat_tool_alike(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(TINY_THINK_TEMPLATE)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    thinking_off = data_args(chat_template_kwargs='{"enable_thinking": false}')
    assert thinking_off.template_kwargs == {"enable_thinking": False}
    # The empty think block moves into the prompt: only the answer is the target.
    [(text, [span])] = supervised_char_spans(plain, tokenizer, EOT, template_kwargs=thinking_off.template_kwargs)
    assert text[span[0] : span[1]] == "Hello." + EOT
    assert text[: span[0]].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    [(_, [default_span])] = supervised_char_spans(plain, tokenizer, EOT)
    assert default_span[1] - default_span[0] > span[1] - span[0]  # default: the model writes the think block
    # The chat tool renders the prompt exactly as training's context for that answer.
    prompt = render(tokenizer, plain[:1], generation_prompt=True, template_kwargs=thinking_off.template_kwargs)
    chat_ids = encode_chat(tokenizer, plain[:1], True, thinking_off.template_kwargs)["input_ids"][0].tolist()
    assert chat_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(chat_ids).endswith("</think>\n\n")
    # Reasoning data under thinking turned off contradicts the prompt: an error with the hint, not a guess.
    with pytest.raises(ConfigError, match=r"r\.jsonl:1: .*is thinking turned off in chat_template_kwargs"):
        fit_conversation(OPENAI_RECORD["messages"], tokenizer, thinking_off, "r.jsonl:1")
    # The chat tool finds the keywords the run recorded.
    (tmp_path / "run_manifest.json").write_text(
        json.dumps({"config": {"chat_template_kwargs": {"enable_thinking": False}}})
    )
    assert recorded_template_kwargs(tmp_path) == {"enable_thinking": False}
    assert recorded_template_kwargs(tmp_path / "elsewhere") == {}


def test_chat_template_kwargs_must_be_template_keywords() -> None:
    with pytest.raises(ConfigError, match="chat_template_kwargs: not a JSON object"):
        data_args(chat_template_kwargs="enable_thinking=false")
    with pytest.raises(ConfigError, match="'add_generation_prompt' is a parameter of apply_chat_template"):
        data_args(chat_template_kwargs={"add_generation_prompt": True})


@pytest.mark.parametrize("tokenizer_dir", [TINY_MODEL_DIR, SHARED_QWEN25], ids=["tiny-chatml", "qwen2.5"])
def test_messages_read_back_from_the_dataset_encode_as_before(tokenizer_dir: Path, tmp_path: Path) -> None:
    if not tokenizer_dir.is_dir():
        pytest.skip("../shared qwen2.5-tokenizer absent")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]}  # fmt: skip
    [row] = read_conversation_files([write_records(tmp_path / "c.jsonl", [record])])
    assert any("reasoning_content" in message for message in row["messages"])  # the dataset's column, None
    fitted = fit_conversation(row["messages"], tokenizer, data_args(), row["source"])
    assert fitted["rows"] == encode_conversation(template_messages(row["messages"]), tokenizer, EOT)
    [encoded] = fitted["rows"]
    assert encoded["input_ids"] == list(tokenizer.apply_chat_template(template_messages(row["messages"]))["input_ids"])


def test_trailing_user_turns_are_removed_before_fitting_and_counted() -> None:
    tokenizer = tiny_tokenizer()
    answered = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    question = {"role": "user", "content": "And then? " * 40}
    fitted = fit_conversation([*answered, question], tokenizer, data_args(), "c.jsonl:1")
    assert fitted["trailing_user_turns"] == 1
    assert fitted["rows"] == encode_conversation(answered, tokenizer, EOT)
    # Under drop_oldest_turns, a long unanswered question no longer costs the conversation its answered pair.
    fits_pair = len(fitted["rows"][0]["input_ids"])
    tight = SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=fits_pair)
    kept = fit_conversation([*answered, question], tokenizer, tight, "c.jsonl:1")
    assert kept["drop_reason"] == "" and kept["rows"] == fitted["rows"]


DIRTY = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "   "}]},  # a blank turn
    {"conversations": [{"from": "human", "value": "anyone there?"}]},  # user only
]


def good_records(count: int) -> list[dict[str, Any]]:
    return [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(count)]  # fmt: skip


def test_skip_leaves_bad_records_out_with_their_location_and_reason(tmp_path: Path) -> None:
    lines = [json.dumps(record) for record in good_records(3)]
    lines[1:1] = [json.dumps(DIRTY[0]), '{"conversations": oops}', json.dumps(DIRTY[1])]
    data = tmp_path / "dirty.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InvalidRecord, match=rf"^{data}:2: turn 2 \(gpt\) has no content"):
        read_conversations(data)  # invalid_records: error, the default
    skipped: list[InvalidRecord] = []
    kept = read_conversations(data, skipped=skipped)
    assert [row["source"] for row in kept] == [f"{data}:1", f"{data}:5", f"{data}:6"]
    assert [(invalid.where, invalid.reason) for invalid in skipped] == [
        (f"{data}:2", "no_content"), (f"{data}:3", "invalid_json"), (f"{data}:4", "no_assistant_turn")
    ]  # fmt: skip


def test_skip_counts_into_the_prepared_data_and_refuses_beyond_max_invalid_share(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = tiny_tokenizer()
    data = write_records(tmp_path / "chat.jsonl", [*good_records(98), *DIRTY])
    common = {"train_files": [str(data)], "validation_split_percentage": 0.0, "packing": False,
              "dataset_cache_dir": str(tmp_path / "cache")}  # fmt: skip
    with pytest.raises(DataError, match=r"chat\.jsonl:99: turn 2 \(gpt\) has no content"):
        prepare_sft_data(SFTDataArguments(**common), tokenizer)
    with pytest.raises(DataError) as raised:
        prepare_sft_data(SFTDataArguments(**common, invalid_records="skip", max_invalid_share=0.01), tokenizer)
    message = str(raised.value)
    assert message.startswith("train_files: 2 of 100 records are invalid (2.00%), more than max_invalid_share=0.01")
    assert f"{data}:99: turn 2 (gpt) has no content" in message and f"{data}:100: no assistant turn" in message
    assert not list((tmp_path / "cache").glob("*/*")), "nothing is written when the share is exceeded"
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.sft"):
        prepared = prepare_sft_data(
            SFTDataArguments(**common, invalid_records="skip", max_invalid_share=0.05), tokenizer
        )
    assert len(prepared.train) == 98
    assert "invalid_records: skip left out 2 of 100 records (2.00%; no_content: 1, no_assistant_turn: 1)" in caplog.text
    assert f"{data}:100: no assistant turn" in caplog.text  # the first locations, in the log too
    invalid = prepared.metadata["stats"]["invalid_records"]
    assert invalid["skipped"] == 2 and invalid["records"] == 100
    assert invalid["by_reason"] == {"no_content": 1, "no_assistant_turn": 1}
    assert invalid["first"][0] == f"{data}:99: turn 2 (gpt) has no content: 'value' is blank"
