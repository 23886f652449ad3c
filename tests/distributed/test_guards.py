"""Guard rails and security defaults through pretrain.sh with 2 CPU ranks.

* a NaN loss on one rank: ``nonfinite_policy: stop`` ends every rank with exit 3 naming the
  step, earlier checkpoints untouched; ``skip`` drops the batch, logs it and finishes;
* a killed run resumed by the launcher continues the same SwanLab run (same id);
* an API key (environment) and a hub token (YAML) appear in no log, saved config, manifest,
  checkpoint or recorded command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.errors import DIVERGED_EXIT_CODE
from llmtrain.run.checkpoints import checkpoint_problem

from ..conftest import REPO_ROOT, free_port, launch, read_summary, wait
from .test_tracking_resume import assert_one_finished_experiment

pytestmark = pytest.mark.slow

API_KEY = "sk-llmtrain-test-4f7c1e2d9a"
HUB_TOKEN = "hf_llmtrainTestToken8b3e5d"


def command(output_dir: Path, *extra: str) -> list[str]:
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--disable_tqdm", "true", "--report_to", "none",
        "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2", "--max_steps", "6", *extra,
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


def test_resume_continues_the_swanlab_run_and_no_secret_is_ever_written(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"hub_token: {HUB_TOKEN}  # must never be written anywhere\n")
    cli = command(output_dir, "--report_to", "swanlab", "--swanlab_mode", "local")
    cli.insert(2, str(config))
    run = launch(cli, tmp_path, "run.log", NPROC="2", MASTER_PORT=str(free_port()),
                 LLMTRAIN_FAULT="kill_after_step=3", SWANLAB_API_KEY=API_KEY)  # fmt: skip
    log = wait(run, tmp_path, "run.log")
    assert "restart 1/2 resumes from step 2" in log

    run_id = json.loads((output_dir / "run_manifest.json").read_text())["run_id"]
    assert json.loads((output_dir / "checkpoint-2" / "run_manifest.json").read_text())["run_id"] == run_id
    swanlab_runs = sorted(p.name for p in (output_dir / "swanlog").glob("run-*"))
    assert len(swanlab_runs) == 1, swanlab_runs  # one experiment: the resumed attempt replaced the killed one
    assert all(name.endswith(f"-{run_id}") for name in swanlab_runs), (swanlab_runs, run_id)
    # SwanLab receives the throughput keys the ThroughputCallback adds to every training log
    run_files = list((output_dir / "swanlog").glob(f"run-*/run-{run_id}.swanlab"))
    assert run_files and all(b"supervised_tokens_per_second" in f.read_bytes() for f in run_files)

    assert_one_finished_experiment(output_dir, log, "local")  # one experiment, finished, every step

    for path in [tmp_path / "run.log", *output_dir.rglob("*")]:
        if path.is_file() and path != config:
            content = path.read_bytes()
            assert API_KEY.encode() not in content and HUB_TOKEN.encode() not in content, f"secret in {path}"
