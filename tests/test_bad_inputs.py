"""Bad input through the real entry point: one clear error, exit code 2, nothing written.

Each case runs ``python pretrain.py`` in a subprocess, as a user would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmtrain.errors import USER_ERROR_EXIT_CODE

from .conftest import prose_records, run_entry, write_jsonl


def write_bad_jsonl(directory: Path) -> Path:
    path = directory / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    return path


def write_empty(directory: Path) -> Path:
    path = directory / "corpus.jsonl"
    path.write_text("")
    return path


def write_no_text_field(directory: Path) -> Path:
    return write_jsonl(directory / "corpus.jsonl", [{"text": "a"}, {"content": "b"}])


CASES = {
    "malformed-jsonl-line": (write_bad_jsonl, [], r"corpus\.jsonl:3: invalid JSON"),
    "empty-data-file": (write_empty, [], r"corpus\.jsonl: the file is empty"),
    "missing-text-field": (write_no_text_field, [], r"corpus\.jsonl:2: missing field 'text'"),
    "block-size-above-positions": (
        lambda d: write_jsonl(d / "corpus.jsonl", prose_records(5)),
        ["--block_size", "4096"],
        r"block_size=4096 exceeds the model's max_position_embeddings=1024",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_or_field_fails_cleanly(case: str, tmp_path: Path) -> None:
    make_data, extra, message = CASES[case]
    corpus = make_data(tmp_path)
    output_dir = tmp_path / "out"
    result = run_entry(
        ["--train_files", str(corpus), "--output_dir", str(output_dir), "--report_to", "none",
         "--dataset_cache_dir", str(tmp_path / "cache"), "--use_cpu", "true", *extra],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stdout + result.stderr
    error_lines = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1, result.stdout
    assert re.search(message, error_lines[0]), error_lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    written = {p.name for p in output_dir.rglob("*")} if output_dir.exists() else set()
    assert not written & {"model.safetensors", "trainer_state.json"}
    assert not any(name.startswith("checkpoint-") for name in written)


def test_missing_config_file_fails_cleanly(tmp_path: Path) -> None:
    result = run_entry([str(tmp_path / "no-such-config.yaml")], tmp_path)
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert "config file" in result.stdout and "no-such-config.yaml does not exist" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
