"""``build_trainer`` in one process: our rotation and loader state at each save; the train loader built quietly."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmtrain.config.arguments import TrainArguments
from llmtrain.config.parser import resolved_config
from llmtrain.data.order import GlobalOrderBatchSampler
from llmtrain.data.pretrain import collate_blocks
from llmtrain.errors import ConfigError
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.run.completeness import COMPLETE_MARKER
from llmtrain.run.trainer import LOADER_STATE_DIR, SET_VITAL_WARNING, IndexedSamples, TrainLoader, build_trainer

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
    # The project holds the user's limit; the Trainer's stays None, so its own rotation never runs.
    assert (args.checkpoint_limit, args.save_total_limit) == (1, None)
    assert resolved_config(args)["save_total_limit"] == 1  # and a run config records what the user set
    trainer.train()
    assert (args.checkpoint_limit, args.save_total_limit) == (1, None)  # nothing switched around the saves
    checkpoints = sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"]  # rotated by CompleteCheckpointCallback, after the marker
    checkpoint = tmp_path / "run" / "checkpoint-3"
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    saved = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert saved.checkpoint_limit == 1
    # Each rank's loader state, written by the on_save callback before the marker, which lists it.
    assert f"{LOADER_STATE_DIR}/rank-0.pt" in marker["files"]
    state = torch.load(checkpoint / LOADER_STATE_DIR / "rank-0.pt", weights_only=True)
    assert state["global_step"] == 3 and state["geometry"]["world_size"] == 1 and "loader" in state


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


def test_building_the_train_loader_silences_torchdatas_set_vital_warning_and_nothing_else() -> None:
    dataset = IndexedSamples([{"input_ids": [i]} for i in range(8)])
    sampler = GlobalOrderBatchSampler(8, micro_batch=2, accumulation=1, rank=0, world_size=1, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # More workers than this machine has CPUs: torch's own warning about that must still come through.
        TrainLoader(dataset, batch_sampler=sampler, num_workers=4096)
        torch.set_vital("Dataloader", "enabled", "True")  # type: ignore[attr-defined]  # outside the loader: kept
    messages = [(warning.category, str(warning.message)) for warning in caught]
    assert any("worker processes in total" in message for _, message in messages), messages
    assert messages.count((UserWarning, SET_VITAL_WARNING)) == 1, messages  # the direct call's, not the loader's
