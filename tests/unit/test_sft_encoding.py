"""SFT encoding: labels match the definition against the tokenizer's own chat template.

Definition under test (issue 3, point 3): the tokens are exactly ``apply_chat_template``'s; a
token is supervised iff its characters overlap an assistant message's content or the
``<|im_end|>`` closing it; everything else is -100.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation
from llmtrain.data.collate import FlatPackedCollator, PackedRowsCollator, PaddingCollator, check_collated_batch
from llmtrain.data.conversations import detect_format, normalise_record
from llmtrain.data.fitting import fit_conversation, pack_batch
from llmtrain.errors import DataError
from llmtrain.loss import IGNORE_INDEX
from llmtrain.metrics import PADDED_POSITIONS, TokenCounter
from llmtrain.paths import TINY_MODEL_DIR

REAL_QWEN_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "qwen2.5-tokenizer"
EOT = "<|im_end|>"

CONVERSATIONS = {
    "multi-turn": [
        {"role": "user", "content": "What is a block?"},
        {"role": "assistant", "content": "A block is a fixed-size run of tokens."},
        {"role": "user", "content": "And EOS?"},
        {"role": "assistant", "content": "It ends every document."},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ],
    "cjk": [
        {"role": "user", "content": "你好，请介绍一下自己。"},
        {"role": "assistant", "content": "我是一个语言模型，喜欢中文和 English。"},
    ],
    "newline-leading": [
        {"role": "user", "content": "Show code"},
        {"role": "assistant", "content": "\ndef f():\n    return 1\n"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "\n\nSecond answer"},
    ],
}


def as_format(messages: list[dict[str, str]], fmt: str) -> dict:
    """The same conversation written in one of the three file formats."""
    if fmt == "openai":
        return {"messages": messages}
    if fmt == "sharegpt":
        speaker = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]}
    system = [m["content"] for m in messages if m["role"] == "system"]
    user, assistant = [m["content"] for m in messages if m["role"] != "system"][-2:]
    return {"instruction": user, "input": "", "output": assistant, **({"system": system[0]} if system else {})}


def tokenizers() -> list:
    found = [pytest.param(TINY_MODEL_DIR, id="tiny")]
    found.append(
        pytest.param(
            REAL_QWEN_TOKENIZER,
            id="qwen2.5",
            marks=pytest.mark.skipif(not REAL_QWEN_TOKENIZER.is_dir(), reason="../shared/qwen2.5-tokenizer absent"),
        )
    )
    return found


@pytest.fixture(scope="module", params=tokenizers())
def tokenizer(request: pytest.FixtureRequest):
    return AutoTokenizer.from_pretrained(request.param)


def supervised_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels, strict=True):
        current = label != IGNORE_INDEX
        if current and not previous:
            runs.append([])
        if current:
            assert label == token
            runs[-1].append(token)
        previous = current
    return runs


@pytest.mark.parametrize("fmt", ["openai", "sharegpt", "alpaca"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_follow_the_definition(tokenizer, name: str, fmt: str) -> None:
    record = as_format(CONVERSATIONS[name], fmt)
    messages = normalise_record(record, detect_format(record, "test"), "test")
    [encoded] = encode_conversation(messages, tokenizer, EOT)
    ids, labels = encoded["input_ids"], encoded["labels"]

    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == list(expected_ids), "training tokens differ from the tokens inference sees"

    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = [tokenizer.decode(run) for run in supervised_runs(ids, labels)]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers, strict=True):
        assert run.endswith(answer + EOT), (run, answer)
        # only a header newline merged into the answer's leading newline may precede it
        assert run[: len(run) - len(answer + EOT)] in ("", "\n"), run
        if not answer.startswith("\n"):
            assert run == answer + EOT

    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    for position, token in enumerate(ids[:-1]):
        if token == eot_id:
            assert labels[position + 1] == IGNORE_INDEX, "the newline after <|im_end|> must not be supervised"
    unsupervised = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in unsupervised


def test_newline_leading_answer_merges_with_the_header_newline_and_is_supervised(tokenizer) -> None:
    messages = CONVERSATIONS["newline-leading"][:2]
    [encoded] = encode_conversation(messages, tokenizer, EOT)
    first_supervised = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.decode([encoded["input_ids"][first_supervised]]).startswith("\n")


def test_last_turn_only_supervises_one_answer(tokenizer) -> None:
    messages = CONVERSATIONS["multi-turn"]
    [encoded] = encode_conversation(messages, tokenizer, EOT, last_turn_only=True)
    runs = supervised_runs(encoded["input_ids"], encoded["labels"])
    assert [tokenizer.decode(run) for run in runs] == ["It ends every document." + EOT]


def sft_args(**overrides: object) -> SFTDataArguments:
    values: dict[str, object] = {"train_files": ["unused.jsonl"], "max_seq_length": 64}
    values.update(overrides)
    return SFTDataArguments(**values)  # type: ignore[arg-type]


def long_conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        messages += [
            {"role": "user", "content": f"question {turn} " + "word " * 10},
            {"role": "assistant", "content": f"answer {turn} " + "word " * 10},
        ]
    return messages


def test_drop_oldest_turns_keeps_the_system_prompt_and_whole_answers(tiny_tokenizer) -> None:
    fitted = fit_conversation(long_conversation(6), tiny_tokenizer, sft_args(), "f.jsonl:1")
    assert fitted["drop_reason"] == "" and fitted["dropped_turns"] > 0
    [row] = fitted["rows"]
    assert len(row["input_ids"]) <= 64
    text = tiny_tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.")
    assert "answer 5 " in text and "question 0 " not in text
    kept_answers = [tiny_tokenizer.decode(r) for r in supervised_runs(row["input_ids"], row["labels"])]
    assert all(a.startswith("answer ") and a.endswith("word " + EOT) for a in kept_answers)


def test_drop_and_error_strategies(tiny_tokenizer) -> None:
    dropped = fit_conversation(long_conversation(6), tiny_tokenizer, sft_args(truncation_strategy="drop"), "f:1")
    assert dropped["drop_reason"] == "too_long" and dropped["rows"] == []
    with pytest.raises(DataError, match=r"f\.jsonl:7: \d+ tokens exceed max_seq_length=64"):
        fit_conversation(long_conversation(6), tiny_tokenizer, sft_args(truncation_strategy="error"), "f.jsonl:7")
    one_huge_turn = long_conversation(1)
    one_huge_turn[-1]["content"] *= 20
    assert fit_conversation(one_huge_turn, tiny_tokenizer, sft_args(), "f:1")["drop_reason"] == "too_long"


def test_conversation_without_an_assistant_turn_is_dropped_not_trained(tiny_tokenizer) -> None:
    fitted = fit_conversation([{"role": "user", "content": "hello?"}], tiny_tokenizer, sft_args(), "f:1")
    assert fitted["drop_reason"] == "no_supervised_tokens"


def test_packing_restarts_position_ids_and_collators_keep_padding_unlabelled(tiny_tokenizer) -> None:
    encoded = [encode_conversation(CONVERSATIONS[name], tiny_tokenizer, EOT)[0] for name in ("system", "cjk")]
    lengths = [len(e["input_ids"]) for e in encoded]
    packed = pack_batch({k: [e[k] for e in encoded] for k in ("input_ids", "labels")}, max_length=sum(lengths))
    assert len(packed["input_ids"]) == 1
    assert packed["position_ids"][0] == list(range(lengths[0])) + list(range(lengths[1]))
    flat = FlatPackedCollator()([{k: v[0] for k, v in packed.items()}])
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    check_collated_batch(flat)

    padded = PaddingCollator(pad_token_id=tiny_tokenizer.pad_token_id)(encoded)
    assert padded["input_ids"].shape == (2, max(lengths))
    assert (padded["labels"][padded["attention_mask"] == 0] == IGNORE_INDEX).all()
    check_collated_batch(padded)
    padded["labels"][padded["attention_mask"] == 0] = 5
    with pytest.raises(DataError, match="padding position carries a label"):
        check_collated_batch(padded)


def test_packed_loss_equals_per_sample_loss(tiny_tokenizer) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR), attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()  # the trap in STACK_NOTES bites in train mode; dropout is 0 in this config
    samples = [encode_conversation(CONVERSATIONS[name], tiny_tokenizer, EOT)[0] for name in sorted(CONVERSATIONS)]
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor([sample["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[0, 1:]
            total_loss += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            total_tokens += int((targets != IGNORE_INDEX).sum())
        packed = pack_batch({k: [s[k] for s in samples] for k in ("input_ids", "labels")}, max_length=10_000)
        batch = FlatPackedCollator()([{k: v[0] for k, v in packed.items()}])
        packed_loss = model(**batch).loss
    assert float(packed_loss) == pytest.approx(float(total_loss) / total_tokens, abs=1e-5)
    # and the check can fail: without position ids the samples see each other
    with torch.no_grad():
        contaminated = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert abs(float(contaminated) - float(packed_loss)) > 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "flattened"])
def test_packed_loss_equals_per_sample_loss_on_every_attention_path(
    tiny_tokenizer, attention: str, layout: str
) -> None:
    """Two packed rows of different lengths, kept as rows (padded) or flattened into one sequence."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    model.config.use_cache = False
    model.train()
    samples = [encode_conversation(CONVERSATIONS[name], tiny_tokenizer, EOT)[0] for name in sorted(CONVERSATIONS)]
    lengths = [len(sample["input_ids"]) for sample in samples]
    packed = pack_batch({k: [s[k] for s in samples] for k in ("input_ids", "labels")}, max_length=sum(lengths) // 2)
    rows = [{k: v[i] for k, v in packed.items()} for i in range(len(packed["input_ids"]))]
    assert len(rows) >= 2 and len({len(row["input_ids"]) for row in rows}) > 1  # padding on the rows path
    with torch.no_grad():
        total_loss, total_tokens = 0.0, 0
        for sample in samples:
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(sample["labels"][1:])
            total_loss += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            total_tokens += int((targets != IGNORE_INDEX).sum())
        batch = (
            PackedRowsCollator(tiny_tokenizer.pad_token_id)(rows) if layout == "rows" else FlatPackedCollator()(rows)
        )
        check_collated_batch(batch)
        counter = TokenCounter()
        counter.observe(batch)
        batch.pop(PADDED_POSITIONS, None)
        packed_loss = model(**batch).loss
    assert float(packed_loss) == pytest.approx(float(total_loss) / total_tokens, abs=1e-5)
    counts = counter.take()
    assert counts["real_tokens"] == sum(lengths) and counts["positions"] == batch["input_ids"].numel()
    assert counts["supervised_tokens"] == total_tokens


def test_a_template_whose_generation_prompt_is_not_a_prefix_is_refused(tiny_tokenizer) -> None:
    import copy

    from llmtrain.errors import ConfigError

    broken = copy.deepcopy(tiny_tokenizer)
    broken.chat_template = tiny_tokenizer.chat_template.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant:\\n'"
    )
    assert broken.chat_template != tiny_tokenizer.chat_template
    with pytest.raises(ConfigError, match="generation prompt is not a prefix of it"):
        encode_conversation(CONVERSATIONS["system"], broken, EOT)
    with pytest.raises(ConfigError, match="closes assistant turns without"):
        encode_conversation(CONVERSATIONS["system"], tiny_tokenizer, "<|not_a_marker|>")


def test_mask_check_refuses_unsupervised_data_and_a_never_supervised_end_of_turn(tiny_tokenizer) -> None:
    from llmtrain.data.sft import SplitCounts, check_masks

    def counted(*rows: dict[str, list[int]]) -> SplitCounts:
        counts = SplitCounts()
        for row in rows:
            counts.add_row(row["labels"], eot_id)
        return counts

    eot_id = tiny_tokenizer.convert_tokens_to_ids(EOT)
    [good] = encode_conversation(CONVERSATIONS["system"], tiny_tokenizer, EOT)
    stats = check_masks(counted(good), eot_id)
    assert 0 < stats["supervised_share"] < 1 and stats["tokens"] == len(good["labels"])
    nothing = {"input_ids": good["input_ids"], "labels": [IGNORE_INDEX] * len(good["labels"])}
    with pytest.raises(DataError, match="no token is supervised"):
        check_masks(counted(nothing), eot_id)
    no_eot = {"input_ids": good["input_ids"], "labels": [t if t != eot_id else IGNORE_INDEX for t in good["labels"]]}
    with pytest.raises(DataError, match="end-of-turn token is never supervised"):
        check_masks(counted(no_eot), eot_id)


def test_the_sft_code_version_hashes_every_module_that_shapes_a_row() -> None:
    """Editing any function on the path from a record to a stored row must rebuild prepared rows."""
    from llmtrain.data import sft
    from llmtrain.data.fitting import smallest_fitting
    from llmtrain.data.prefix_tree import tree_samples
    from llmtrain.data.sft_rows import pack_order, pack_split

    row_shaping = [smallest_fitting, tree_samples, pack_order, pack_split, sft.fit_conversation, sft.iter_conversations]
    hashed_modules = {module.__name__ for module in sft.ROW_SHAPING_MODULES}
    for function in row_shaping:
        assert function.__module__ in hashed_modules, function
