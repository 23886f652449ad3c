"""Prefix trees of per-turn rows: every token's loss and every gradient equal the rows trained alone.

Under a template that rewrites history (Qwen3, Qwen3.5 think, the tiny think template) a
multi-turn conversation is one row per earlier answer plus the whole conversation; the tree computes
their shared prefixes once (:mod:`llmtrain.data.prefix_tree`). Checked on tiny Qwen2 and Qwen3
models, sdpa and eager, with reasoning as ``reasoning_content`` and inline, and in a packed row
of several trees and chains.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config

from llmtrain.data.chat_masks import encode_conversation
from llmtrain.data.collate import PaddingCollator, TreeRowsCollator, check_collated_batch
from llmtrain.data.fitting import concatenate_rows
from llmtrain.data.prefix_tree import share_prefixes, tree_samples
from llmtrain.loss import IGNORE_INDEX
from llmtrain.paths import TINY_MODEL_DIR, TINY_THINK_TEMPLATE

from ..conftest import REPO_ROOT

SHARED_QWEN3 = REPO_ROOT.parent / "shared" / "qwen3-tokenizer"
EOT = "<|im_end|>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def conversation(inline: bool) -> list[dict[str, str]]:
    """Three answers with reasoning: as ``reasoning_content``, or inline ``<think>`` in the content."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "Answer briefly."}]
    turns = [("What is 17 * 3?", "51.", "17 * 3 = 30 + 21 = 51."), ("And 17 * 4?", "68.", "51 + 17 = 68."),
             ("Is 68 even?", "Yes.", "68 = 2 * 34.")]  # fmt: skip
    for number, (question, answer, reasoning) in enumerate(turns):
        messages.append({"role": "user", "content": question})
        if inline:
            messages.append({"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
        else:
            messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
        if number == 1:
            messages[-1]["content"] += " Check: 4 * 17 is 68."
    return messages


def tokenizer_for(template: str) -> PreTrainedTokenizerBase:
    if template == "tiny-think":
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
        tokenizer.chat_template = TINY_THINK_TEMPLATE.read_text(encoding="utf-8")
        return tokenizer
    if not SHARED_QWEN3.is_dir():
        pytest.skip("../shared/qwen3-tokenizer absent")
    tokenizer = AutoTokenizer.from_pretrained(SHARED_QWEN3)
    if template != "qwen3.jinja":
        tokenizer.chat_template = (SHARED_QWEN3 / "templates" / template).read_text()
    return tokenizer


def tiny_model(architecture: str, vocab_size: int, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if architecture == "qwen2":
        config = AutoConfig.from_pretrained(TINY_MODEL_DIR, vocab_size=vocab_size)
    else:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        config = Qwen3Config(
            vocab_size=vocab_size, **shape, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.config.use_cache = False
    return model.train()


def token_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Each supervised target's loss (sorted), the summed loss, and every gradient of that sum."""
    model.zero_grad()
    inputs = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs).logits.float()
    shifted = batch.get("shift_labels")
    if shifted is None:
        shifted = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    losses = losses[shifted.flatten() != IGNORE_INDEX]
    losses.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses.detach().sort().values, losses.sum().detach(), grads


@pytest.mark.parametrize(
    ("template", "architecture", "attn"),
    [("tiny-think", "qwen3", "sdpa"), ("tiny-think", "qwen2", "eager"), ("qwen3.jinja", "qwen3", "sdpa"),
     ("qwen3_5_think.jinja", "qwen3", "eager")],
)  # fmt: skip
@pytest.mark.parametrize("inline", [False, True], ids=["reasoning_content", "inline-think"])
def test_a_tree_trains_every_token_of_its_rows_exactly_once_with_the_same_loss_and_gradients(
    template: str, architecture: str, attn: str, inline: bool
) -> None:
    tokenizer = tokenizer_for(template)
    rows = encode_conversation(conversation(inline), tokenizer, EOT)
    assert len(rows) == 3, "each earlier answer in a row of its own"
    tree = share_prefixes(rows)
    assert tree is not None and len(tree["input_ids"]) < sum(len(row["input_ids"]) for row in rows)
    model = tiny_model(architecture, len(tokenizer) + (-len(tokenizer)) % 64, attn)
    batch = TreeRowsCollator(pad_token_id=0, additive=attn == "eager")([tree])
    check_collated_batch(batch)
    expected, expected_sum, expected_grads = token_losses(model, PaddingCollator(0)(rows))
    got, got_sum, grads = token_losses(model, batch)
    assert len(got) == len(expected) == sum(label != IGNORE_INDEX for row in rows for label in row["labels"][1:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sum, expected_sum, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_packed_row_of_trees_and_chains_equals_its_rows_alone() -> None:
    tokenizer = tokenizer_for("tiny-think")
    single = encode_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                 tokenizer, EOT)  # fmt: skip
    samples = [*tree_samples(encode_conversation(conversation(False), tokenizer, EOT), 10_000), *single]
    assert "position_ids" in samples[0] and "position_ids" not in samples[1]
    packed = concatenate_rows(samples)
    rows = [*encode_conversation(conversation(False), tokenizer, EOT), *single]
    model = tiny_model("qwen3", 4096, "sdpa")
    # the packed row, padded beside a short second row: padding never reaches a real token
    expected, _, expected_grads = token_losses(model, PaddingCollator(0)([*rows, single[0]]))
    got, _, grads = token_losses(model, TreeRowsCollator(pad_token_id=0)([packed, single[0]]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_tree_over_the_budget_is_split_into_trees_that_fit(tmp_path: Path) -> None:
    tokenizer = tokenizer_for("tiny-think")
    rows = encode_conversation(conversation(False), tokenizer, EOT)
    whole = share_prefixes(rows)
    assert whole is not None
    samples = tree_samples(rows, max_tokens=len(whole["input_ids"]) - 1)
    assert 1 < len(samples) < len(rows) + 1 and all(len(s["input_ids"]) < len(whole["input_ids"]) for s in samples)
    supervised = sum(label != IGNORE_INDEX for sample in samples for label in sample["labels"])
    assert supervised == sum(label != IGNORE_INDEX for row in rows for label in row["labels"])


def test_rows_that_would_supervise_a_token_twice_stay_rows() -> None:
    twice = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 2, 4], "labels": [-100, 2, 4]}]
    assert share_prefixes(twice) is None  # token 2 after 1 would count once in the tree, twice as rows
    assert tree_samples(twice, 100) == twice
