"""Credentials come from the environment only, and are written nowhere.

A credential given as a flag (``--hub_token X``, ``--hub-token=X``) or a run-config key
(``hub_token: X``) is refused by the launcher before anything is written, naming the variable to
set instead. A credential in the environment (``HF_TOKEN``, ``SWANLAB_API_KEY``) reaches no file
of a real launch: not the launcher's recorded command or log, not the console, not the run's
records or checkpoints, not SwanLab's files and metadata.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..conftest import REPO_ROOT, free_port, subprocess_env

HUB_TOKEN = "hf_llmtrainSecretValue7c1d"
API_KEY = "sk-llmtrain-secret-value-2e9a"


@pytest.mark.parametrize(
    ("given", "refused"),
    [
        (["--hub_token", HUB_TOKEN], "--hub_token is not supported"),
        ([f"--hub-token={HUB_TOKEN}"], "--hub-token is not supported"),
        (["RUN_YAML"], "run.yaml:2: 'hub_token' is not supported"),
    ],
    ids=["flag", "hyphens-equals-sign", "yaml-key"],
)
def test_a_secret_flag_or_key_is_refused_before_the_launch_writes_anything(
    given: list[str], refused: str, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: 3\nhub_token: {HUB_TOKEN}\n")
    args = [str(config) if word == "RUN_YAML" else word for word in given]
    command = ["bash", str(REPO_ROOT / "pretrain.sh"), *args, "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and result.stderr.startswith("launch: ") and refused in result.stderr
    assert "set the HF_TOKEN environment variable instead" in result.stderr and HUB_TOKEN not in result.stderr
    assert not (tmp_path / "out").exists()


def test_secrets_in_the_environment_are_in_no_file_log_or_swanlab_metadata_of_a_launch(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = [
        "bash", str(REPO_ROOT / "pretrain.sh"), "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(tmp_path / "cache"), "--disable_tqdm", "true", "--logging_steps", "1",
        "--eval_strategy", "no", "--save_steps", "2", "--max_steps", "2",
        "--report_to", "swanlab", "--swanlab_mode", "local",
    ]  # fmt: skip
    env = subprocess_env(
        tmp_path, NPROC="1", MASTER_PORT=str(free_port()), SKIP_DOCTOR="0", HF_TOKEN=HUB_TOKEN, SWANLAB_API_KEY=API_KEY
    )
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600, check=False)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console.decode(errors="replace")[-4000:]

    # What would have held a secret is there: the recorded command, the launch log, SwanLab's metadata.
    assert "pretrain.py" in next((output_dir / "logs").glob("launch-*.sh")).read_text()
    assert next((output_dir / "logs").glob("launch-*.log")).stat().st_size > 0
    metadata = json.loads(next((output_dir / "swanlog").rglob("swanlab-metadata.json")).read_text())
    assert "pretrain.py" in metadata["runtime"]["command"]
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "run_config.yaml").is_file()
    for secret in (HUB_TOKEN, API_KEY):
        assert secret.encode() not in console
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"secret in {path}"
