"""``python -m llmtrain.tools.doctor`` as the launchers run it: exit code 2 and greppable report lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import REPO_ROOT, subprocess_env


def common(tmp_path: Path) -> list[str]:
    return ["--output_dir", str(tmp_path / "out"), "--dataset_cache_dir", str(tmp_path / "cache")]


def test_cli_exits_2_with_greppable_error_lines(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "llmtrain.tools.doctor", "pretrain", "--fast", "--train_files", str(missing),
         *common(tmp_path)],
        cwd=REPO_ROOT, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert f"doctor: ERROR   data: train_files: data file {missing} does not exist\n" in result.stdout
    assert "doctor: ok      tokenizer:" in result.stdout  # the other checks still ran
    assert "Traceback" not in result.stdout + result.stderr
