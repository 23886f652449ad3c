"""SFT data through the real entry point: what ``--prepare_only`` writes (bad SFT records: the catalogue)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import qa_conversations, run_entry, save_random_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_tiny_model(tmp_path_factory.mktemp("base") / "model")


def test_prepare_only_writes_one_row_per_conversation_with_labels(base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", qa_conversations(30))
    target = tmp_path / "encoded"
    result = run_entry(
        ["--model_name_or_path", str(base_model), "--train_files", str(data), "--prepare_only", "true",
         "--tokenized_path", str(target), "--packing", "false", "--validation_split_percentage", "0",
         "--use_cpu", "true", "--output_dir", str(tmp_path / "out")],
        tmp_path,
        entry="finetune.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[[It is 0.<|im_end|>]]" in result.stdout or "[[" in result.stdout  # the preview marks spans
    import datasets

    encoded = datasets.load_from_disk(str(target))["train"]
    assert len(encoded) == 30 and {"input_ids", "labels"} <= set(encoded.column_names)
    assert not (tmp_path / "out").exists()
    assert "fine-tuning" not in result.stdout, "prepare_only must not load the model"
