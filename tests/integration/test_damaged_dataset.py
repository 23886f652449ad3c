"""A prepared dataset damaged after it was built, run through the real entry point as a user would.

``pretrain.py --prepare_only true --tokenized_path X``, then the token stream ``train/tokens.bin`` is cut to
its first half (a copy interrupted mid-transfer, a full disk). With the raw files it was built from, the
next run warns, naming the file, and rebuilds it; without them it stops with one ERROR line
naming ``tokenized_path`` and the file, exit 2, and writes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import prose_records, served_entry, write_jsonl

TOKENS = "train/tokens.bin"


def common_args(tokenized: Path) -> list[str]:
    return ["--tokenized_path", str(tokenized), "--block_size", "32", "--report_to", "none", "--use_cpu", "true"]


def prepare_then_truncate(tmp_path: Path) -> tuple[Path, Path, list[list[int]], str]:
    """Corpus, dataset prepared from it with its token stream cut in half, its original ids, the expected fault."""
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", prose_records(80))
    tokenized = tmp_path / "tokenized"
    result = served_entry(["--train_files", str(corpus), *common_args(tokenized), "--prepare_only", "true"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tokens = tokenized / TOKENS
    data = tokens.read_bytes()
    original = np.frombuffer(data, dtype="<u2").tolist()
    tokens.write_bytes(data[: len(data) // 2])
    return corpus, tokenized, original, f"{TOKENS}: {len(data) // 2} bytes, expected {len(data)}"


def test_truncated_dataset_is_rebuilt_from_its_train_files(tmp_path: Path) -> None:
    corpus, tokenized, original, fault = prepare_then_truncate(tmp_path)

    result = served_entry(["--train_files", str(corpus), *common_args(tokenized), "--prepare_only", "true"], tmp_path)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "llmtrain.data.cache" in warnings[0] and fault in warnings[0], result.stdout[-3000:]
    assert np.fromfile(tokenized / TOKENS, dtype="<u2").tolist() == original
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tokenized")] == [], "the damaged copy was left"


@pytest.mark.parametrize("raw_files", ["unset", "deleted"])
def test_truncated_dataset_without_its_raw_files_fails_cleanly(raw_files: str, tmp_path: Path) -> None:
    """``unset``: train_files cannot be unset; it falls back to the embedded demo corpus, not what X was built from.
    ``deleted``: the train_files X was built from are given but gone."""
    corpus, tokenized, _, fault = prepare_then_truncate(tmp_path)
    train_files = []
    if raw_files == "deleted":
        corpus.unlink()
        train_files = ["--train_files", str(corpus)]
    output_dir = tmp_path / "out"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    result = served_entry([*train_files, *common_args(tokenized), "--output_dir", str(output_dir), "--max_steps", "2"],
                       tmp_path)  # fmt: skip

    output = result.stdout + result.stderr
    assert result.returncode == USER_ERROR_EXIT_CODE, output[-3000:]
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stdout[-3000:]
    assert re.search(r" ERROR llmtrain\.cli: tokenized_path: ", errors[0]) and fault in errors[0], errors[0]
    assert "Traceback" not in output
    assert not output_dir.exists(), "the output dir was written to"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "a file was written"
