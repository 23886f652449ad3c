"""A killed run that the launcher resumes is one SwanLab experiment, and no secret is written anywhere.

2 CPU ranks through pretrain.sh in local mode (offline mode resumes through the same code; local
mode adds the dashboard database, checked here too; a plain offline run: ``test_swanlab_offline.py``);
``LLMTRAIN_FAULT=kill_after_step=3`` SIGKILLs every rank once (after checkpoint-2), the launcher's
own restart resumes and finishes. Read back from the swanlog directory: one run directory, named
with the run id of the output's ``run_manifest.json``, whose ``.swanlab`` file ends with a
"finished" record and holds the loss of every step, those of the killed attempt (replayed from the
checkpoint) and those of the resumed one; one dashboard entry under the experiment's own name,
status finished. An API key and a hub token (both in the environment, the only place a credential
is accepted) appear in no log, saved config, manifest, checkpoint or recorded command line.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT, free_port, launch, train_log, wait

pytestmark = pytest.mark.slow

MAX_STEPS = 6
API_KEY = "sk-llmtrain-test-4f7c1e2d9a"
HUB_TOKEN = "hf_llmtrainTestToken8b3e5d"


def command(output_dir: Path, mode: str) -> list[str]:
    return [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(output_dir.parent / "cache"), "--disable_tqdm", "true",
        "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "2", "--max_steps", str(MAX_STEPS),
        "--per_device_train_batch_size", "2",  # blocks of 1024 tokens (the dataclass default)
        "--report_to", "swanlab", "--swanlab_mode", mode,
    ]  # fmt: skip


def read_swanlab_run(path: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    """A ``.swanlab`` run file, through swanlab's own reader: scalars by key and step, and the finish states."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    scalars: dict[str, dict[int, float]] = {}
    finishes: list[str] = []
    reader = DataStoreReader()
    reader.open(path)
    try:
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("scalar"):
                scalars.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
            elif record.HasField("finish"):
                finishes.append(RunState.Name(record.finish.state))
    finally:
        reader.close()
    return scalars, finishes


def test_resume_continues_the_swanlab_run_and_no_secret_is_ever_written(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    config = tmp_path / "run.yaml"  # the dataclass defaults, not the tiny config's
    config.write_text("# no credential here: a hub_token key is refused; HF_TOKEN comes from the environment\n")
    cli = command(output_dir, "local")
    cli.insert(2, str(config))
    run = launch(cli, tmp_path, "run.log", NPROC="2", MASTER_PORT=str(free_port()),
                 LLMTRAIN_FAULT="kill_after_step=3", SWANLAB_API_KEY=API_KEY, HF_TOKEN=HUB_TOKEN)  # fmt: skip
    log = wait(run, tmp_path, "run.log")
    run_id = json.loads((output_dir / "run_manifest.json").read_text())["run_id"]
    assert json.loads((output_dir / "checkpoint-2" / "run_manifest.json").read_text())["run_id"] == run_id
    # SwanLab receives the throughput keys the ThroughputCallback adds to every training log
    run_files = list((output_dir / "swanlog").glob(f"run-*/run-{run_id}.swanlab"))
    assert run_files and all(b"supervised_tokens_per_second" in f.read_bytes() for f in run_files)
    assert_one_finished_experiment(output_dir, log, "local")  # one experiment, finished, every step

    for path in [tmp_path / "run.log", *output_dir.rglob("*")]:
        if path.is_file():
            content = path.read_bytes()
            assert API_KEY.encode() not in content and HUB_TOKEN.encode() not in content, f"secret in {path}"


def assert_one_finished_experiment(output_dir: Path, log: str, mode: str) -> None:
    """The swanlog directory after a run killed at step 3 (checkpoint-2) and resumed to ``MAX_STEPS``."""
    assert "restart 1/2 resumes from step 2" in log
    assert "2 logged steps replayed from the checkpoint, 1 interrupted attempt(s) replaced" in log

    run_id = json.loads((output_dir / "run_manifest.json").read_text())["run_id"]
    swanlog = output_dir / "swanlog"
    run_dirs = sorted(path for path in swanlog.iterdir() if path.is_dir())
    assert len(run_dirs) == 1, [path.name for path in run_dirs]  # no second experiment, no dangling attempt
    run_dir = run_dirs[0]
    assert run_dir.name.startswith("run-") and run_dir.name.endswith(f"-{run_id}"), (run_dir.name, run_id)

    scalars, finishes = read_swanlab_run(run_dir / f"run-{run_id}.swanlab")
    assert finishes == ["RUN_STATE_FINISHED"]  # not left running
    trainer_losses = {entry["step"]: entry["loss"] for entry in train_log(output_dir) if "loss" in entry}
    assert sorted(trainer_losses) == list(range(1, MAX_STEPS + 1))
    assert sorted(scalars["train/loss"]) == sorted(trainer_losses)  # steps of both attempts
    for step in (1, MAX_STEPS):  # the first (killed attempt, replayed) and the last (resumed attempt)
        assert scalars["train/loss"][step] == pytest.approx(trainer_losses[step], rel=1e-6), step
    assert 1 in scalars["train/tokens_per_second"]  # the callbacks' keys are replayed too

    if mode == "local":  # what `swanlab watch` lists: swanboard's database beside the run directory
        with sqlite3.connect(swanlog / "runs.swanlab") as database:
            entries = database.execute("SELECT run_id, name, status FROM experiment").fetchall()
            (folder,) = database.execute("SELECT folder FROM tag WHERE name = 'train/loss'").fetchone()
        assert entries == [(run_dir.name, "out", 1)]  # one entry, its own name (no "out-2"), 1 = finished
        lines = [line for path in (run_dir / "logs" / folder).glob("*.log") for line in path.read_text().splitlines()]
        assert sorted(json.loads(line)["index"] for line in lines) == sorted(trainer_losses)  # the charts' data
