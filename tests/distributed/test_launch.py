"""Real launches through pretrain.sh: 2 CPU ranks under DeepSpeed ZeRO-2, two simulated nodes, SIGKILL + resume.

These start real processes (DeepSpeed launcher / torchrun, gloo backend) and take tens of
seconds each; they are the proof that the launcher, the DeepSpeed path and resume work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..conftest import (
    REPO_ROOT,
    built_once,
    free_port,
    kill_every_rank,
    launch,
    read_summary,
    train_log,
    wait,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.slow


def pretrain_command(output_dir: Path, cache_dir: Path, *extra: str, every: int = 10) -> list[str]:
    """``bash pretrain.sh`` on the tiny default, evaluating and saving ``every`` steps."""
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"),
        "--output_dir", str(output_dir), "--dataset_cache_dir", str(cache_dir),
        "--disable_tqdm", "true", "--logging_steps", "2", "--eval_steps", str(every), "--save_steps", str(every),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank run that the tests below read, built once (:func:`tests.conftest.built_once`)."""

    def build(tmp_path: Path) -> Path:
        output_dir = tmp_path / "out"
        command = pretrain_command(
            output_dir, tmp_path / "cache", "--max_steps", "30", "--warmup_steps", "10", "--report_to", "swanlab",
            "--per_device_train_batch_size", "4",
        )  # fmt: skip
        wait(launch(command, tmp_path, "run.log", NPROC="2", MASTER_PORT=str(free_port())), tmp_path, "run.log")
        return output_dir

    return built_once(tmp_path_factory, "two-rank-run", build)


def test_two_ranks_ran_the_deepspeed_zero2_engine(two_rank_run: Path) -> None:
    summary = read_summary(two_rank_run)
    assert summary["deepspeed"] is True
    assert summary["engine"] == "DeepSpeedEngine"
    assert summary["zero_stage"] == 2
    assert summary["world_size"] == 2
    assert summary["global_step"] == 30


def test_loss_is_finite_and_falls(two_rank_run: Path) -> None:
    losses = [entry["loss"] for entry in train_log(two_rank_run) if "loss" in entry]
    assert len(losses) == 15 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    evals = [entry for entry in train_log(two_rank_run) if "eval_loss" in entry]
    assert evals and all(e["eval_perplexity"] == pytest.approx(math.exp(e["eval_loss"]), rel=1e-6) for e in evals)


def test_lr_warms_up_then_decays_under_the_deepspeed_config(two_rank_run: Path) -> None:
    lrs = [entry["learning_rate"] for entry in train_log(two_rank_run) if "loss" in entry]
    peak = lrs.index(max(lrs))
    assert 3 <= peak <= 5  # logged every 2 steps; warmup is 10 steps
    assert lrs[:peak] == sorted(lrs[:peak])
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True)
    assert lrs[-1] < 0.1 * max(lrs)  # cosine has decayed almost to zero at max_steps


def test_checkpoints_final_safetensors_and_run_records_exist(two_rank_run: Path) -> None:
    assert sorted(p.name for p in two_rank_run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    assert (two_rank_run / "checkpoint-30" / "global_step30").is_dir()
    assert (two_rank_run / "checkpoint-30" / "llmtrain_complete.json").is_file()
    assert not (two_rank_run / ".final-partial").exists()
    for directory, step in ((two_rank_run / "checkpoint-30", 30), (two_rank_run, 30)):
        manifest = json.loads((directory / "run_manifest.json").read_text())
        assert manifest["global_step"] == step and manifest["config"]["max_steps"] == 30
        assert manifest["packages"]["torch"] and manifest["packages"]["deepspeed"]
        assert manifest["data"]["sources"]["train"][0]["path"].endswith("pretrain_corpus.jsonl")
        assert manifest["data"]["stats"]["train_blocks"] > 0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "run_config.yaml", "loss_curve.png"):
        assert (two_rank_run / name).is_file(), name
    assert not list(two_rank_run.glob("*.bin")) or [p.name for p in two_rank_run.glob("*.bin")] == ["training_args.bin"]
    launch_logs = list((two_rank_run / "logs").glob("launch-*.log"))
    assert launch_logs and "-m deepspeed.launcher.launch --world_info=" in launch_logs[0].read_text()
    assert list((two_rank_run / "logs").glob("launch-*.sh"))
    assert any((two_rank_run / "swanlog").rglob("*")), "SwanLab wrote no local run files"


def test_final_model_loads_and_generates(two_rank_run: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(two_rank_run)
    model = AutoModelForCausalLM.from_pretrained(two_rank_run)
    assert model.config.use_cache is True
    inputs = tokenizer("Return the", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_two_simulated_nodes_train_with_world_size_two(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = pretrain_command(output_dir, tmp_path / "cache", "--max_steps", "6", "--report_to", "none")
    port = str(free_port())
    nodes = [
        launch(command, tmp_path, f"node{rank}.log", NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, NPROC="1")
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [wait(node, tmp_path, f"node{rank}.log") for rank, node in enumerate(nodes)]
    summary = read_summary(output_dir)
    assert summary["world_size"] == 2 and summary["engine"] == "DeepSpeedEngine" and summary["zero_stage"] == 2
    assert summary["global_step"] == 6
    assert all("torch.distributed.run --nnodes 2" in output for output in outputs)


def test_sigkill_after_a_checkpoint_then_the_same_command_resumes(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    extra = ["--max_steps", "16", "--report_to", "none", "--per_device_train_batch_size", "4", "--eval_strategy", "no"]
    command = pretrain_command(output_dir, tmp_path / "cache", *extra, every=4)
    env = {"NPROC": "2", "MASTER_PORT": str(free_port())}
    first = launch(command, tmp_path, "first.log", **env)
    wait_for_checkpoint(first, output_dir / "checkpoint-4", tmp_path / "first.log")
    kill_every_rank(first)
    assert not (output_dir / "train_summary.json").exists(), "the run finished before it could be killed"
    saved_steps = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))

    env["MASTER_PORT"] = str(free_port())
    output = wait(launch(command, tmp_path, "second.log", **env), tmp_path, "second.log")
    summary = read_summary(output_dir)
    assert summary["global_step"] == 16
    resumed_step = int(Path(summary["resumed_from"]).name.split("-")[1])
    assert resumed_step in saved_steps and resumed_step >= 4
    assert f"resuming from {output_dir}/checkpoint-{resumed_step}" in output
    steps_logged = [entry["step"] for entry in train_log(output_dir) if "loss" in entry]
    assert steps_logged == list(range(2, 17, 2))  # one continuous history, no step repeated or missing
