"""``--prepare_only``: tokenize on one machine, train elsewhere from the saved dataset alone."""

from __future__ import annotations

import json
from pathlib import Path

from ..conftest import prose_records, served_entry, write_jsonl


def test_prepare_only_then_train_from_tokenized_path_without_raw_files(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "raw" / "corpus.jsonl", prose_records(80))
    tokenized = tmp_path / "tokenized"
    output_dir = tmp_path / "out"
    common = ["--tokenized_path", str(tokenized), "--block_size", "32", "--output_dir", str(output_dir),
              "--report_to", "none", "--use_cpu", "true"]  # fmt: skip

    prepared = served_entry(["--train_files", str(corpus), "--prepare_only", "true", *common], tmp_path)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert (tokenized / "llmtrain_meta.json").is_file()
    assert not output_dir.exists(), "prepare_only must not touch output_dir"
    assert "model:" not in prepared.stdout, "prepare_only must not build the model"

    corpus.unlink()
    trained = served_entry(
        ["--train_files", str(corpus), "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", *common],
        tmp_path,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "reusing the tokenized dataset" in trained.stdout
    assert json.loads((output_dir / "train_summary.json").read_text())["global_step"] == 3
