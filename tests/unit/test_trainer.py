"""``build_trainer`` in one process: our rotation replaces the Trainer's without touching the user's settings."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtrain.config.arguments import TrainArguments
from llmtrain.data.pretrain import collate_blocks
from llmtrain.errors import ConfigError
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.run.checkpoints import COMPLETE_MARKER
from llmtrain.run.trainer import build_trainer

BLOCK_SIZE = 16


def test_checkpoints_rotate_by_our_rule_and_record_the_users_save_total_limit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR))
    model.config.use_cache = False
    blocks = torch.randint(0, model.config.vocab_size, (8, BLOCK_SIZE)).tolist()
    args = TrainArguments(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        max_steps=3,
        save_steps=1,
        save_total_limit=1,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        eval_strategy="no",
        disable_tqdm=True,
    )
    manifest = {"config": {"block_size": BLOCK_SIZE}, "run_id": "unit-test-run"}
    trainer = build_trainer(
        model, AutoTokenizer.from_pretrained(TINY_MODEL_DIR), args, datasets.Dataset.from_dict({"input_ids": blocks}),
        None, collate_blocks, manifest, sequence_length=BLOCK_SIZE,
    )  # fmt: skip
    assert args.save_total_limit == 1  # building the Trainer leaves the user's setting alone
    trainer.train()
    assert args.save_total_limit == 1
    checkpoints = sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"]  # rotated by CompleteCheckpointCallback, after the marker
    assert (tmp_path / "run" / "checkpoint-3" / COMPLETE_MARKER).is_file()
    saved = torch.load(tmp_path / "run" / "checkpoint-3" / "training_args.bin", weights_only=False)
    assert saved.save_total_limit == 1


def test_evaluating_without_validation_data_is_one_clear_error_and_eval_strategy_no_means_no_eval(
    tmp_path: Path,
) -> None:
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR))
    blocks = datasets.Dataset.from_dict({"input_ids": [[1] * BLOCK_SIZE]})
    tokenizer, manifest = AutoTokenizer.from_pretrained(TINY_MODEL_DIR), {"config": {}, "run_id": "unit-test-run"}
    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to="none", eval_strategy="steps")
    with pytest.raises(ConfigError, match=re.escape("eval_strategy='steps' but there is no validation data")):
        build_trainer(model, tokenizer, args, blocks, None, collate_blocks, manifest)
    # The tiny configs set eval_on_start (the quick start's "before"); --eval_strategy no switches it off too.
    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to="none", eval_strategy="no",
                          eval_on_start=True)  # fmt: skip
    assert args.eval_on_start is False
    build_trainer(model, tokenizer, args, blocks, None, collate_blocks, manifest)
