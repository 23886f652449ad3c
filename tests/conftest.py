"""Shared fixtures: the committed tiny tokenizer, data-file writers and a launcher runner.

Everything is hermetic: no hub access (HF_HUB_OFFLINE), SwanLab only in local mode, every
output under pytest's tmp dirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmtrain.tiny_default import TINY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def write_jsonl(path: Path, records: Iterable[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def prose_records(count: int, words: int = 60) -> list[dict[str, str]]:
    """Distinct, deterministic English-ish documents."""
    vocabulary = ["the", "model", "reads", "a", "block", "of", "text", "and", "learns", "which", "token", "next"]
    return [
        {"text": " ".join(vocabulary[(i * 7 + j) % len(vocabulary)] for j in range(words)) + f" ({i})."}
        for i in range(count)
    ]


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a launched run: offline, local SwanLab, the test's Python."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SWANLAB_", "PYTEST_"))}
    env.update(
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        SWANLAB_MODE="local",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update(extra)
    return env


def run_entry(args: list[str], tmp_path: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python pretrain.py ARGS`` (one process, no launcher) and capture its output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "pretrain.py"), *args],
        cwd=tmp_path,
        env=subprocess_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
