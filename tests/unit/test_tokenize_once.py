"""The tokenize-once cache: reuse, invalidation, tokenized_path and prepare-only hand-off."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtrain.config.arguments import PretrainDataArguments
from llmtrain.data.pretrain import prepare_pretrain_data
from llmtrain.errors import ConfigError, DataError
from llmtrain.tiny_default import train_tokenizer

from ..conftest import prose_records, write_jsonl


def data_args(tmp_path: Path, **overrides: object) -> PretrainDataArguments:
    values: dict[str, object] = {
        "train_files": [str(tmp_path / "corpus.jsonl")],
        "block_size": 16,
        "validation_split_percentage": 10.0,
        "dataset_cache_dir": str(tmp_path / "cache"),
    }
    values.update(overrides)
    return PretrainDataArguments(**values)  # type: ignore[arg-type]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", prose_records(60))


def test_second_run_reuses_the_cache_without_tokenizing(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    second = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    assert first.built and not second.built
    assert second.path == first.path
    assert second.train["input_ids"] == first.train["input_ids"]
    assert first.eval is not None and len(first.eval) > 0
    assert all(len(block) == 16 for block in first.train["input_ids"])


def test_changed_block_size_tokenizer_or_data_invalidates(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    base = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    other_block = prepare_pretrain_data(data_args(tmp_path, block_size=32), tiny_tokenizer)
    assert other_block.built and other_block.path != base.path
    other_tokenizer = train_tokenizer((r["text"] for r in prose_records(30)), vocab_size=300)
    retokenized = prepare_pretrain_data(data_args(tmp_path), other_tokenizer)
    assert retokenized.built and retokenized.path != base.path
    write_jsonl(corpus, prose_records(61))
    changed_data = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    assert changed_data.built and changed_data.path != base.path


def test_prepared_tokenized_path_trains_without_the_raw_files(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    target = tmp_path / "prepared"
    built = prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target), prepare_only=True), tiny_tokenizer)
    assert built.built and (target / "llmtrain_meta.json").is_file()
    corpus.unlink()
    reused = prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    assert not reused.built
    assert reused.train["input_ids"] == built.train["input_ids"]


def test_tokenized_path_built_for_another_block_size_is_refused(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    target = tmp_path / "prepared"
    prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"tokenized_path: .*block_size=16 but this run needs 32"):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target), block_size=32), tiny_tokenizer)


def test_no_partial_dataset_is_left_when_building_fails(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    target = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"corpus\.jsonl:2"):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    assert not target.exists()
    assert not any(p.name.startswith(".prepared") for p in tmp_path.iterdir())
