"""Output-dir rules: resume from the newest complete checkpoint, refuse another run's model, start over safely."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from llmtrain.config.arguments import TrainArguments
from llmtrain.errors import ConfigError
from llmtrain.run.checkpoints import find_resume_checkpoint
from llmtrain.run.completeness import write_completion_marker
from llmtrain.run.output_dir import (
    RUN_CONFIG_FILE,
    RUN_ID_FILE,
    SUMMARY_FILE,
    RunStart,
    inspect_output_dir,
    open_output_dir,
)

RUN = {"learning_rate": 1e-3, "block_size": 64, "logging_steps": 10}


def prepare_output_dir(args: TrainArguments, run_config: dict) -> RunStart:
    """What an entry point does around its data and model building: inspect, then open."""
    start = inspect_output_dir(args, run_config)
    if not start.already_finished:
        open_output_dir(args, run_config, start).release()  # the entry point releases it when the run ends
    return start


def train_args(output_dir: Path, **overrides: object) -> TrainArguments:
    return TrainArguments(output_dir=str(output_dir), use_cpu=True, **overrides)  # type: ignore[arg-type]


def make_checkpoint(output_dir: Path, step: int, complete: bool = True, deepspeed: bool = False) -> Path:
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    if deepspeed:
        (checkpoint / "latest").write_text(f"global_step{step}")
        (checkpoint / f"global_step{step}").mkdir()
        (checkpoint / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    else:
        (checkpoint / "optimizer.pt").write_bytes(b"x")
    (checkpoint / "trainer_state.json").write_text("{}")
    if complete:
        write_completion_marker(checkpoint, {"global_step": step})
    return checkpoint


def finish_run(output_dir: Path, run_config: dict[str, object]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config))
    (output_dir / "model.safetensors").write_bytes(b"weights")
    (output_dir / SUMMARY_FILE).write_text(json.dumps({"global_step": 5}))


def test_empty_or_logs_only_output_dir_starts_fresh_and_records_the_config(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "launch.log").write_text("hello")
    start = prepare_output_dir(train_args(tmp_path), RUN)
    assert start.resume_from is None and not start.already_finished
    assert yaml.safe_load((tmp_path / RUN_CONFIG_FILE).read_text()) == RUN


def test_resume_takes_the_newest_complete_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, deepspeed=True)
    make_checkpoint(tmp_path, 30, complete=False)
    make_checkpoint(tmp_path, 100, deepspeed=True)
    (tmp_path / "checkpoint-100" / "global_step100" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    start = prepare_output_dir(train_args(tmp_path), RUN)
    assert start.resume_from == tmp_path / "checkpoint-20"
    assert "skipping" in caplog.text and "checkpoint-100" in caplog.text and "checkpoint-30" in caplog.text
    assert "resuming from" in caplog.text


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10, complete=False)
    assert find_resume_checkpoint(tmp_path) is None


def test_finished_model_of_another_run_is_refused_and_left_untouched(tmp_path: Path) -> None:
    finish_run(tmp_path, {**RUN, "learning_rate": 5e-4})
    with pytest.raises(ConfigError, match=r"finished model of another run \(settings differ: learning_rate\)"):
        prepare_output_dir(train_args(tmp_path), RUN)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    assert yaml.safe_load((tmp_path / RUN_CONFIG_FILE).read_text())["learning_rate"] == 5e-4


def test_foreign_model_without_our_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"no run_config\.yaml"):
        prepare_output_dir(train_args(tmp_path), RUN)


def test_rerunning_a_finished_run_does_nothing(tmp_path: Path) -> None:
    finish_run(tmp_path, RUN)
    changed_logging_only = {**RUN, "logging_steps": 1}
    start = prepare_output_dir(train_args(tmp_path), changed_logging_only)
    assert start.already_finished


def test_a_setting_only_one_version_records_is_no_difference(tmp_path: Path) -> None:
    # A run finished by a version of this project that did not record end_of_turn_token (then taken
    # for a secret) is still this run; a setting both record and that differs still is not.
    finish_run(tmp_path, RUN)
    assert prepare_output_dir(train_args(tmp_path), {**RUN, "end_of_turn_token": "<|im_end|>"}).already_finished
    with pytest.raises(ConfigError, match="settings differ: learning_rate"):
        prepare_output_dir(train_args(tmp_path), {**RUN, "learning_rate": 0.5, "end_of_turn_token": "<|im_end|>"})


def test_start_over_moves_everything_aside_and_deletes_nothing(tmp_path: Path) -> None:
    finish_run(tmp_path, {**RUN, "learning_rate": 5e-4})
    make_checkpoint(tmp_path, 10)
    (tmp_path / "logs").mkdir()
    start = prepare_output_dir(train_args(tmp_path, start_over=True), RUN)
    assert start.resume_from is None and not start.already_finished
    archived = list((tmp_path / "previous").iterdir())
    assert len(archived) == 1
    assert (archived[0] / "model.safetensors").read_bytes() == b"weights"
    assert (archived[0] / "checkpoint-10" / "trainer_state.json").is_file()
    assert (tmp_path / "logs").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "previous", RUN_CONFIG_FILE, RUN_ID_FILE]


def test_a_run_restarted_before_its_first_checkpoint_keeps_its_run_id(tmp_path: Path) -> None:
    first = prepare_output_dir(train_args(tmp_path), RUN)
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first.run_id
    again = prepare_output_dir(train_args(tmp_path), RUN)  # killed before checkpoint-N: same settings, same run
    assert again.run_id == first.run_id
    other = prepare_output_dir(train_args(tmp_path), {**RUN, "learning_rate": 5e-4})  # another run in the dir
    assert other.run_id != first.run_id
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == other.run_id
