"""More malformed SFT records through the real entry point (the main catalogue: test_bad_input_catalogue.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmtrain.errors import USER_ERROR_EXIT_CODE

from ..conftest import qa_conversations, run_entry, save_random_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_tiny_model(tmp_path_factory.mktemp("base") / "model")


def jsonl(*records: object) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


CASES = {
    "conversations-not-a-list": (
        jsonl({"conversations": "hello"}), [], r"data\.jsonl:1: 'conversations' must be a list"
    ),
    "turn-without-content": (
        jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}), [],
        r"data\.jsonl:1: turn 2 \(assistant\) has no content",
    ),
    "no-known-format": (jsonl({"prompt": "a", "completion": "b"}), [], r"data\.jsonl:1: record is in no known"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sft_input_fails_cleanly(case: str, base_model: Path, tmp_path: Path) -> None:
    content, extra, message = CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    output_dir = tmp_path / "out"
    result = run_entry(
        ["--model_name_or_path", str(base_model), "--train_files", str(data), "--output_dir", str(output_dir),
         "--report_to", "none", "--use_cpu", "true", "--dataset_cache_dir", str(tmp_path / "cache"),
         "--validation_split_percentage", "0", "--eval_strategy", "no", *extra],
        tmp_path,
        entry="finetune.py",
    )  # fmt: skip
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stdout[-3000:]
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    written = {p.name for p in output_dir.rglob("*")} if output_dir.exists() else set()
    assert not written & {"adapter_model.safetensors", "model.safetensors", "trainer_state.json"}
    assert not any(name.startswith("checkpoint-") for name in written)
    assert not list((tmp_path / "cache").glob(".*partial*")), "no half-built dataset may be left in the cache"


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
