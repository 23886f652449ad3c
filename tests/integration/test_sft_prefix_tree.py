"""A multi-turn reasoning set trained end to end through finetune.py with prefix trees on and off: the same labels.

The tiny Qwen3 uses a template that rewrites history (earlier answers lose their think block), so
each two-answer conversation is two rows; with ``share_prefixes`` they train as one tree. One
optimizer step over every sample: the first logged loss (the mean over every supervised token)
must be the same, and the tree run must train fewer tokens for the same supervised ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import (
    reasoning_conversations,
    save_random_tiny_qwen3_model,
    served_entry,
    train_log,
    write_jsonl,
)

pytestmark = pytest.mark.slow

CONVERSATIONS = 16  # half of them with two answers (reasoning_conversations): 24 per-turn rows


def one_step(base: Path, data: Path, tmp_path: Path, share_prefixes: str, samples: int) -> Path:
    output_dir = tmp_path / f"share-{share_prefixes}"
    result = served_entry(
        ["--model_name_or_path", str(base), "--train_files", str(data), "--output_dir", str(output_dir),
         "--finetuning_type", "full", "--packing", "false", "--share_prefixes", share_prefixes,
         "--per_device_train_batch_size", str(samples), "--max_steps", "1", "--logging_steps", "1",
         "--validation_split_percentage", "0", "--eval_strategy", "no", "--save_strategy", "no",
         "--report_to", "none", "--max_seq_length", "256", "--dataset_cache_dir", str(tmp_path / "cache"),
         "--disable_tqdm", "true"],
        tmp_path, entry="finetune.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output_dir


def test_the_same_conversations_train_the_same_loss_with_and_without_prefix_trees(tmp_path: Path) -> None:
    base = save_random_tiny_qwen3_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "reasoning.jsonl", reasoning_conversations(CONVERSATIONS))
    rows = one_step(base, data, tmp_path, "false", CONVERSATIONS * 3 // 2)
    trees = one_step(base, data, tmp_path, "true", CONVERSATIONS)
    data_of = {run: json.loads((run / "run_manifest.json").read_text())["data"] for run in (rows, trees)}
    assert data_of[rows]["sequence_layout"]["name"] == "padded"
    assert data_of[trees]["sequence_layout"]["name"] == "tree_rows"
    row_stats, tree_stats = data_of[rows]["stats"], data_of[trees]["stats"]
    assert tree_stats["trees"] == CONVERSATIONS // 2 and tree_stats["tree_rows"] == CONVERSATIONS
    assert tree_stats["supervised_tokens"] == row_stats["supervised_tokens"]
    assert tree_stats["tokens"] < row_stats["tokens"] == tree_stats["tokens_without_sharing"]
    assert tree_stats["history_removed_share"] > 0.1
    row_loss, tree_loss = (train_log(run)[0]["loss"] for run in (rows, trees))
    assert abs(tree_loss - row_loss) / row_loss < 1e-5, (tree_loss, row_loss)
