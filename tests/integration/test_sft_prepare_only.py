"""SFT data through the real entry point: what ``--prepare_only`` writes (bad SFT records: the catalogue)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmtrain.data.sft import load_sft_rows
from llmtrain.paths import TINY_THINK_TEMPLATE

from ..conftest import qa_conversations, save_random_tiny_model, served_entry, write_jsonl


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_tiny_model(tmp_path_factory.mktemp("base") / "model")


def prepare_only(
    model: Path, data: Path, target: Path, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return served_entry(
        ["--model_name_or_path", str(model), "--train_files", str(data), "--prepare_only", "true",
         "--tokenized_path", str(target), "--packing", "false", "--validation_split_percentage", "0",
         "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), *extra],
        tmp_path,
        entry="finetune.py",
    )  # fmt: skip


def test_prepare_only_writes_one_row_per_conversation_with_labels(base_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", qa_conversations(30))
    target = tmp_path / "encoded"
    result = prepare_only(base_model, data, target, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[[It is 0.<|im_end|>]]" in result.stdout or "[[" in result.stdout  # the preview marks spans
    encoded, _ = load_sft_rows(target)
    assert len(encoded) == 30 and {"input_ids", "labels"} <= set(encoded.row(0))
    assert any(label != -100 for label in encoded.row(0)["labels"]) and encoded.row(0)["labels"][0] == -100
    assert not (tmp_path / "out").exists()
    assert "fine-tuning" not in result.stdout, "prepare_only must not load the model"


def test_a_template_that_rewrites_history_trains_earlier_answers_in_rows_of_their_own(
    base_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "think-model"
    shutil.copytree(base_model, model)
    shutil.copy(TINY_THINK_TEMPLATE, model / "chat_template.jinja")  # Qwen3-style: not prefix-stable
    two_answers = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                      {"role": "user", "content": "and?"}, {"role": "assistant", "content": f"b{i}"}]}
        for i in range(12)
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "data.jsonl", two_answers)
    target = tmp_path / "encoded"
    # Rows, not prefix trees (share_prefixes auto would share each conversation's history: test_sft_prefix_tree).
    result = prepare_only(model, data, target, tmp_path, "--share_prefixes", "false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "12 conversation(s) rendered earlier assistant turns differently as history" in result.stdout
    encoded, _ = load_sft_rows(target)
    assert len(encoded) == 24  # each conversation: its first answer's own row, then the whole conversation
    stats = json.loads((target / "llmtrain_meta.json").read_text())["stats"]
    assert stats["kept"] == 12 and stats["expanded_conversations"] == 12 and stats["extra_rows"] == 12
    tokenizer = AutoTokenizer.from_pretrained(model)
    all_ids = [encoded.row(index)["input_ids"] for index in range(len(encoded))]
    own_rows = [ids for ids in all_ids if "and?" not in tokenizer.decode(ids)]  # end at the first answer
    assert len(own_rows) == 12 and stats["extra_tokens"] == sum(len(ids) for ids in own_rows)
