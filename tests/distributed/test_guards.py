"""Guard rails and security defaults through pretrain.sh with 2 CPU ranks.

* a NaN loss on one rank: ``nonfinite_policy: stop`` ends every rank with exit 3 naming the
  step, earlier checkpoints untouched; ``skip`` drops the batch, logs it and finishes.

(A killed run that continues its SwanLab run without writing a secret anywhere: ``test_tracking_resume.py``.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.errors import DIVERGED_EXIT_CODE
from llmtrain.run.completeness import checkpoint_problem

from ..conftest import REPO_ROOT, free_port, launch, read_summary, wait

pytestmark = pytest.mark.slow


def command(output_dir: Path, *extra: str) -> list[str]:
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--disable_tqdm", "true", "--report_to", "none",
        "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2", "--max_steps", "6",
        "--per_device_train_batch_size", "4", *extra,
    ]  # fmt: skip


def test_nan_loss_with_policy_stop_ends_every_rank_with_exit_3_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    run = launch(command(output_dir, "--nonfinite_policy", "stop"), tmp_path, "run.log", NPROC="2",
                 MASTER_PORT=str(free_port()), LLMTRAIN_FAULT="nan_loss=3")  # fmt: skip
    assert run.wait(timeout=300) == DIVERGED_EXIT_CODE, (tmp_path / "run.log").read_text()[-4000:]
    log = (tmp_path / "run.log").read_text()
    errors = [line for line in log.splitlines() if "non-finite values at step 3 (" in line]
    assert any("loss nan on micro-batch 0" in line for line in errors), errors  # rank 0, which saw it
    assert "OVERFLOW! Skipping step" in log  # DeepSpeed did not apply the update
    assert log.count("non-finite values at step 3 (") == 2  # both ranks stop at the same step
    assert "not retrying" in log
    assert checkpoint_problem(output_dir / "checkpoint-2", verify_checksums=True) is None
    assert not (output_dir / "checkpoint-4").exists() and not (output_dir / "model.safetensors").exists()


def test_nan_loss_with_policy_skip_drops_that_batch_and_finishes(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    run = launch(command(output_dir, "--nonfinite_policy", "skip"), tmp_path, "run.log", NPROC="2",
                 MASTER_PORT=str(free_port()), LLMTRAIN_FAULT="nan_loss=3")  # fmt: skip
    log = wait(run, tmp_path, "run.log")
    assert "step 3: loss nan on micro-batch 0" in log and "this optimizer update is skipped" in log
    summary = read_summary(output_dir)
    assert summary["global_step"] == 6
    assert [event["step"] for event in summary["skipped_nonfinite"]] == [3]
    weights = load_file(output_dir / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert math.isfinite(summary["train_loss"])
