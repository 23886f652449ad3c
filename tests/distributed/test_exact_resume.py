"""Exact resume under fault injection: 2 CPU ranks, ZeRO-2, fp32, gradient accumulation 2, 2 loader workers.

Each interrupted run is relaunched by the launcher's own restart (or by rerunning the same
command) and must end bit-identical to an uninterrupted run: per-step losses, every weight
tensor, and the data-order ledger of every rank, with each rank's data loader state restored
from the checkpoint (torchdata's StatefulDataLoader, ``dataloader_num_workers 2``). Resumed on one
rank with doubled accumulation (the same global batch), a run trains on the same samples, step for
step, as the uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from llmtrain.errors import PREEMPTED_EXIT_CODE
from llmtrain.run.completeness import checkpoint_problem
from llmtrain.run.faults import FIRED_FILE
from llmtrain.run.ledger import read_ledger
from llmtrain.tools.verify_resume import compare_runs

from ..conftest import (
    REPO_ROOT,
    free_port,
    launch,
    reasoning_conversations,
    save_random_tiny_qwen3_model,
    subprocess_env,
    wait,
    wait_for_checkpoint,
    write_jsonl,
)
from .conftest import REFERENCE_STEPS, pretrain_reference_command
from .test_preemption import worker_pids

pytestmark = pytest.mark.slow

STEPS = REFERENCE_STEPS


def command(output_dir: Path) -> list[str]:
    return pretrain_reference_command(output_dir)


def run(output_dir: Path, log_name: str, *extra: str, **env: str) -> str:
    env = {"NPROC": "2", "MASTER_PORT": str(free_port()), **env}
    process = launch([*command(output_dir), *extra], output_dir.parent, log_name, **env)
    return wait(process, output_dir.parent, log_name, timeout=600)


@pytest.fixture(scope="module")
def reference(pretrain_reference: Path) -> Path:
    """The uninterrupted run every run here must equal (shared with test_interruptions.py)."""
    return pretrain_reference


def assert_identical(reference: Path, resumed: Path) -> None:
    assert compare_runs(reference, resumed) == []
    ledger = read_ledger(resumed)
    assert sorted(ledger) == [0, 1]
    for steps in ledger.values():
        assert sorted(steps) == list(range(1, STEPS + 1))
        assert all(len(batches) == 2 for batches in steps.values())  # both micro-batches of every step
    batches = [b for steps in ledger.values() for step_batches in steps.values() for b in step_batches]
    assert len(set(batches)) == len(batches), "a batch was trained on twice"


@pytest.mark.parametrize(
    ("fault", "resumed_step"),
    [("kill_in_accumulation=5", 3), ("kill_during_save=6", 3)],
    ids=["inside-gradient-accumulation", "during-checkpoint-save"],
)
def test_a_run_killed_mid_step_or_mid_save_finishes_bit_identical(
    reference: Path, fault: str, resumed_step: int
) -> None:
    output_dir = reference.parent / fault.split("=")[0]
    output = run(output_dir, f"{output_dir.name}.log", LLMTRAIN_FAULT=fault)
    assert "killing this rank now (SIGKILL)" in output and (output_dir / FIRED_FILE).exists()
    assert f"restart 1/2 resumes from step {resumed_step}" in output
    if fault.startswith("kill_during_save"):
        # checkpoint-6 was left without its marker; resume skipped it and the rerun wrote a complete one
        assert "checkpoint-6" in output and f"resuming from {output_dir}/checkpoint-3" in output
    # The loader continues where the checkpoint left it, nothing skipped or replayed (rank 0 logs it; rank 1 logs
    # warnings only, and its ledger below shows the same).
    assert f"restored the data loader state of rank 0 from {output_dir}/checkpoint-3/dataloader/rank-0.pt" in output
    assert_identical(reference, output_dir)


def test_a_run_killed_during_its_final_save_only_finishes_the_save(reference: Path) -> None:
    # Checkpoints every 5 steps put a complete checkpoint at the last step (10), as the issue found it:
    # the restart resumes there and must not train step 11; saving less often changes no weight.
    output_dir = reference.parent / "final-save"
    output = run(output_dir, "final-save.log", "--save_steps", "5", LLMTRAIN_FAULT=f"kill_during_final_save={STEPS}")
    assert "killing this rank now (SIGKILL)" in output and (output_dir / FIRED_FILE).exists()
    assert f"restart 1/2 resumes from step {STEPS}" in output
    assert f"step {STEPS} already reaches max_steps={STEPS}: nothing left to train" in output
    assert_identical(reference, output_dir)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["train_loss"] is None
    assert not (output_dir / ".final-partial").exists()


def test_sigterm_then_rerunning_the_same_command_is_bit_identical(reference: Path) -> None:
    output_dir = reference.parent / "sigterm"
    env = {"NPROC": "2", "MASTER_PORT": str(free_port())}
    first = launch(command(output_dir), reference.parent, "sigterm-1.log", **env)
    wait_for_checkpoint(first, output_dir / "checkpoint-3", reference.parent / "sigterm-1.log")
    for pid in worker_pids(first.pid):
        os.kill(pid, signal.SIGTERM)
    assert first.wait(timeout=180) == PREEMPTED_EXIT_CODE
    run(output_dir, "sigterm-2.log")
    assert_identical(reference, output_dir)


def test_verify_resume_on_a_lora_sft_config_packed_as_prefix_trees(tmp_path: Path) -> None:
    """A think template drops earlier turns' reasoning, so each answer is its own row; packed, those rows share
    their history as prefix trees. Killed and resumed, the LoRA run still ends bit-identical."""
    base = save_random_tiny_qwen3_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "chat.jsonl", reasoning_conversations(48))
    command = [
        sys.executable, "-m", "llmtrain.tools.verify_resume", "sft", str(REPO_ROOT / "configs" / "sft_tiny_lora.yaml"),
        "--steps", "5", "--kill_after", "3", "--save_every", "2", "--workdir", str(tmp_path / "verify"),
        "--model_name_or_path", str(base), "--train_files", str(data), "--validation_split_percentage", "0",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
    ]  # fmt: skip
    import subprocess

    env = subprocess_env(tmp_path, NPROC="2", MASTER_PORT=str(free_port()))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "verify_resume: identical" in result.stdout + result.stderr
    resumed_log = (tmp_path / "verify" / "resumed.log").read_text()
    assert "restart 1/1 resumes from step 2" in resumed_log
    summary = json.loads((tmp_path / "verify" / "resumed" / "train_summary.json").read_text())
    assert summary["global_step"] == 5 and summary["resumed_from"] is not None
    manifest = json.loads((tmp_path / "verify" / "resumed" / "run_manifest.json").read_text())
    assert manifest["data"]["sequence_layout"]["name"] == "packed_trees", manifest["data"]["sequence_layout"]
    assert manifest["data"]["stats"]["trees"] > 0, manifest["data"]["stats"]


def test_a_two_rank_run_resumed_on_one_rank_trains_the_same_samples_step_for_step(
    reference: Path, tmp_path: Path
) -> None:
    """verify_resume's elastic mode: killed on 2 ranks after step 4, resumed from checkpoint-3 on 1 rank with
    doubled accumulation (the same global batch), through a universal checkpoint; compared with this module's
    uninterrupted 2-rank run (``--reference``)."""
    import subprocess

    workdir = tmp_path / "verify"
    command = [
        sys.executable, "-m", "llmtrain.tools.verify_resume", "pretrain", "--steps", str(STEPS), "--kill_after", "4",
        "--save_every", "3", "--workdir", str(workdir), "--resume_nproc", "1", "--reference", str(reference),
        "--gradient_accumulation_steps", "2", "--dataloader_num_workers", "2", "--save_total_limit", "10",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    env = subprocess_env(tmp_path, NPROC="2", MASTER_PORT=str(free_port()))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"verify_resume: the same samples at every one of {STEPS} steps on 1 rank(s) (accumulation 4)" in output
    resumed = workdir / "resumed"
    log = (workdir / "resumed.log").read_text()
    assert "written by 2 rank(s), this run has 1: converting it to a universal checkpoint" in log
    assert "data order resumes at step 3 of epoch 0" in log
    checkpoint = resumed / "checkpoint-3"
    assert (checkpoint / "latest_universal").read_text() == "global_step3_universal"
    assert checkpoint_problem(checkpoint, verify_checksums=True) is None, "the original shards must stay intact"
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 1
    assert summary["resumed_from"] == str(checkpoint)
