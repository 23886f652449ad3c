"""The embedded tiny default: tokenizer, chat template, model configs, demo corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR
from llmtrain.tiny_default import CHATML_TEMPLATE, SPECIAL_TOKENS, tiny_model_config, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_tokenizer_carries_qwen_special_tokens_and_chatml(tiny_tokenizer) -> None:
    for token in SPECIAL_TOKENS:
        ids = tiny_tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tiny_tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tiny_tokenizer.eos_token == "<|endoftext|>"
    assert tiny_tokenizer.bos_token is None
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert (
        rendered
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


def test_byte_level_bpe_round_trips_any_text(tiny_tokenizer) -> None:
    text = "Return the list of items.\n\n\tcafé 中文 🙂"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_a_throwaway_tokenizer_trains_in_process_with_the_same_shape() -> None:
    tokenizer = train_tokenizer(["hello world, hello tokens"] * 50, vocab_size=300)
    assert len(tokenizer) <= 300
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))[-1] == len(tokenizer) - 1
    config = tiny_model_config(tokenizer)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id


def test_demo_corpus_is_real_prose_in_jsonl() -> None:
    lines = DEMO_CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) > 1000
    assert all(isinstance(r["text"], str) and len(r["text"]) >= 200 for r in records)
    assert sum(len(r["text"]) for r in records) > 1_000_000


def test_tiny_model_config_matches_its_tokenizer(tiny_tokenizer) -> None:
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    assert config.model_type == "qwen2"
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.eos_token_id == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize(("name", "billions"), [("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544)])
def test_real_model_configs_have_qwen25_parameter_counts(name: str, billions: float) -> None:
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / f"{name}.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.002)
