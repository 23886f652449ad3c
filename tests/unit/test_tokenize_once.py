"""The tokenize-once cache: reuse, invalidation, tokenized_path, prepare-only hand-off, damaged datasets,
refusals that write nothing, and what the prepared stats record."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmtrain.config.arguments import PretrainDataArguments, SFTDataArguments, TrainArguments
from llmtrain.data import cache
from llmtrain.data.cache import META_FILE
from llmtrain.data.pretrain import prepare_pretrain_data
from llmtrain.data.sft import prepare_sft_data
from llmtrain.errors import ConfigError, DataError
from llmtrain.run.manifest import run_manifest, write_manifest
from llmtrain.run.output_dir import RunStart
from llmtrain.run.train import resume_data_check
from llmtrain.tiny_default import train_tokenizer

from ..conftest import prose_records, write_jsonl

TOKENS = "train/tokens.bin"


def ids(blocks: object) -> list[list[int]]:
    """Every block of a prepared split, as lists (read before a test damages the mapped file)."""
    return [blocks[i]["input_ids"].tolist() for i in range(len(blocks))]  # type: ignore[index, arg-type]


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
    assert ids(second.train) == ids(first.train)
    assert first.eval is not None and len(first.eval) > 0
    assert all(len(block) == 16 for block in ids(first.train))


def test_changed_tokenizer_or_data_invalidates_and_another_block_size_reuses_the_store(
    tmp_path: Path, corpus: Path, tiny_tokenizer
) -> None:
    base = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    other_block = prepare_pretrain_data(data_args(tmp_path, block_size=32), tiny_tokenizer)
    assert not other_block.built and other_block.path == base.path  # blocks are windows of the same stream
    stream = [token for block in ids(base.train) for token in block]
    assert [token for block in ids(other_block.train) for token in block] == stream[: len(other_block.train) * 32]
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
    assert ids(reused.train) == ids(built.train)
    assert len(
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target), block_size=32), tiny_tokenizer).train
    )


def test_tokenized_path_built_with_another_tokenizer_is_refused(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    target = tmp_path / "prepared"
    prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    other_tokenizer = train_tokenizer((r["text"] for r in prose_records(30)), vocab_size=300)
    with pytest.raises(ConfigError, match=r"tokenized_path: .* was prepared with tokenizer="):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), other_tokenizer)


def test_no_partial_dataset_is_left_when_building_fails(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    target = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"corpus\.jsonl:2"):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    assert not target.exists()
    assert not any(p.name.startswith(".prepared") for p in tmp_path.iterdir())


# --- a damaged prepared dataset is never trusted ---


def truncate(file: Path) -> tuple[int, int]:
    """Keep the first half of ``file``'s bytes; return (new size, old size).

    Datasets loaded from ``file`` are memory-mapped: read what a test compares before this
    (reading a truncated mapping is a bus error).
    """
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_metadata_lists_every_file_with_size_and_hash(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    prepared = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    on_disk = {p.relative_to(prepared.path).as_posix(): p for p in prepared.path.rglob("*") if p.is_file()}
    files = json.loads((prepared.path / META_FILE).read_text())["files"]
    assert set(files) == set(on_disk) - {META_FILE}
    assert {TOKENS, "train/documents.npy", "train/store.json", "validation/tokens.bin"} <= set(files)
    for name, entry in files.items():
        assert entry["size"] == on_disk[name].stat().st_size
        assert entry["sha256"] == hashlib.sha256(on_disk[name].read_bytes()).hexdigest()  # small: all hashed


def test_large_dataset_records_sizes_only_for_its_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtrain.data.sft_rows import EncodedRows, SftRowsWriter

    writer = SftRowsWriter(tmp_path / "ds" / "train", vocab_size=100)  # an SFT row store
    writer.add(EncodedRows.of([[1, 2, 3]] * 800, [[-100, 2, 3]] * 800))
    writer.close()
    monkeypatch.setattr(cache, "HASH_DATASET_BYTES", 100)  # everything above it counts as a multi-GB dataset
    monkeypatch.setattr(cache, "HASH_SMALL_FILE_BYTES", 1000)
    files = cache.file_manifest(tmp_path / "ds")
    assert "sha256" not in files["train/ids.bin"] and "sha256" in files["train/store.json"]


def test_truncated_tokens_in_the_cache_is_rebuilt_with_a_warning(
    tmp_path: Path, corpus: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    before = ids(first.train)
    size, expected = truncate(first.path / TOKENS)
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.cache"):
        again = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    assert again.built and again.path == first.path
    assert ids(again.train) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{TOKENS}: {size} bytes, expected {expected}" in warnings[0], warnings
    assert sorted(p.name for p in first.path.parent.iterdir()) == [first.path.name], "the damaged copy was left"
    assert not prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer).built


def test_truncated_tokenized_path_is_rebuilt_from_the_train_files_it_was_prepared_from(
    tmp_path: Path, corpus: Path, tiny_tokenizer
) -> None:
    target = tmp_path / "prepared"
    first = prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    before = ids(first.train)
    truncate(target / TOKENS)
    again = prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    assert again.built and ids(again.train) == before


def test_truncated_tokenized_path_without_its_raw_files_is_refused_and_left_alone(
    tmp_path: Path, corpus: Path, tiny_tokenizer
) -> None:
    target = tmp_path / "prepared"
    prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    size, expected = truncate(target / TOKENS)
    corpus.unlink()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as refused:
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    message = str(refused.value)
    assert message.startswith("tokenized_path: ") and f"{TOKENS}: {size} bytes, expected {expected}" in message
    assert "\n" not in message
    assert snapshot(tmp_path) == before, "a refused dataset must not be touched"


def test_truncated_tokenized_path_with_other_train_files_is_refused(
    tmp_path: Path, corpus: Path, tiny_tokenizer
) -> None:
    """Only the files it was built from may replace it (e.g. not the demo corpus that unset train_files means)."""
    target = tmp_path / "prepared"
    prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    truncate(target / TOKENS)
    other = write_jsonl(tmp_path / "other.jsonl", prose_records(40))
    with pytest.raises(ConfigError, match=rf"tokenized_path: .*{TOKENS}: .*not the unchanged ones.*corpus\.jsonl"):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target), train_files=[str(other)]), tiny_tokenizer)
    assert (target / META_FILE).is_file()


def test_deleted_file_is_detected(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    target = tmp_path / "prepared"
    prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)
    (target / "validation" / "store.json").unlink()
    corpus.unlink()
    with pytest.raises(ConfigError, match=r"tokenized_path: .*validation/store\.json: missing"):
        prepare_pretrain_data(data_args(tmp_path, tokenized_path=str(target)), tiny_tokenizer)


@pytest.mark.parametrize("name", [TOKENS, "train/store.json"])
def test_same_size_corruption_of_a_small_file_is_caught_by_its_hash(
    name: str, tmp_path: Path, corpus: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    before = ids(first.train)
    damaged = first.path / name
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0x01  # one flipped bit; in tokens.bin it lands in a token id: loads, silently wrong
    damaged.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.cache"):
        again = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    assert again.built and ids(again.train) == before
    assert f"{name}: content differs from the SHA-256" in caplog.text


def test_dataset_prepared_before_file_lists_is_checked_by_loading(
    tmp_path: Path, corpus: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    meta_path = first.path / META_FILE
    metadata = json.loads(meta_path.read_text())
    del metadata["files"]
    meta_path.write_text(json.dumps(metadata))
    assert not prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer).built  # intact: reused as before
    before = ids(first.train)
    truncate(first.path / TOKENS)
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.cache"):
        again = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    assert again.built and ids(again.train) == before
    assert f"{TOKENS}: " in caplog.text and "could not be loaded" in caplog.text
    assert "files" in json.loads(meta_path.read_text()), "the rebuilt copy records its files"


def test_unreadable_metadata_in_the_cache_is_rebuilt(tmp_path: Path, corpus: Path, tiny_tokenizer) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    meta_path = first.path / META_FILE
    meta_path.write_text(meta_path.read_text()[:40])
    assert prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer).built


# --- a refused run writes nothing ---


def checkpoint_of(tmp_path: Path, prepared: cache.PreparedData) -> Path:
    """A checkpoint folder whose manifest records the data ``prepared`` was built from, as training writes it."""
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    write_manifest(checkpoint, run_manifest({}, prepared.path, prepared.metadata, "run"), 2)
    return checkpoint


def train_args(allow_data_change: bool = False) -> TrainArguments:
    return SimpleNamespace(allow_data_change=allow_data_change, ignore_data_skip=False)  # type: ignore[return-value]


def test_a_resume_on_edited_data_is_refused_before_anything_is_tokenized(
    tmp_path: Path, corpus: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer)
    start = RunStart(resume_from=checkpoint_of(tmp_path, first), already_finished=False)
    same = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer, resume_data_check(start, train_args()))
    assert not same.built and same.identity_checked  # checked on the reused dataset's sources
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "a document that was not there when the run started"}\n')
    before = snapshot(tmp_path)
    for target in (None, tmp_path / "prepared"):
        args = data_args(tmp_path, tokenized_path=str(target) if target else None)
        with pytest.raises(ConfigError, match=rf"train_files: the training data changed since .*{corpus} changed \("):
            prepare_pretrain_data(args, tiny_tokenizer, resume_data_check(start, train_args()))
        assert snapshot(tmp_path) == before, "a refused resume wrote something"
    allowed = train_args(allow_data_change=True)
    with caplog.at_level(logging.WARNING):
        changed = prepare_pretrain_data(data_args(tmp_path), tiny_tokenizer, resume_data_check(start, allowed))
    assert changed.built and changed.identity_checked and allowed.ignore_data_skip
    assert len([r for r in caplog.records if "allow_data_change: resuming" in r.getMessage()]) == 1
    assert resume_data_check(None, train_args()) is None
    assert resume_data_check(RunStart(resume_from=None, already_finished=False), train_args()) is None


def test_an_all_blank_corpus_is_refused_without_leaving_a_dataset_or_a_cache_dir(
    tmp_path: Path, tiny_tokenizer
) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    args = data_args(tmp_path, validation_split_percentage=0.0, dataset_cache_dir=str(tmp_path / "cache" / "nested"))
    with pytest.raises(DataError, match=r"^train_files: 2 documents make no full block: every one is blank"):
        prepare_pretrain_data(args, tiny_tokenizer)
    assert not (tmp_path / "cache").exists(), "the cache dir the failed build created was left"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "another-dataset").mkdir()
    with pytest.raises(DataError, match="every one is blank"):
        prepare_pretrain_data(args, tiny_tokenizer)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["another-dataset"]


def test_files_left_out_of_a_folder_are_named_once_when_building(
    tmp_path: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "corpus"
    write_jsonl(folder / "a.JSONL", prose_records(30))
    (folder / "README.md").write_text("where the corpus came from")
    args = data_args(tmp_path, train_files=[str(folder)])
    with caplog.at_level(logging.WARNING):
        built = prepare_pretrain_data(args, tiny_tokenizer)
        assert not prepare_pretrain_data(args, tiny_tokenizer).built
    assert built.built and [entry["path"] for entry in built.metadata["sources"]["train"]] == [str(folder / "a.JSONL")]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"train_files: {folder}: took 1 data file; left out 1 this stage does not read: README.md"
    ]


def test_sft_folder_system_prompts_and_ignored_fields_reach_the_prepared_stats(
    tmp_path: Path, tiny_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    chat = [{"from": "human", "value": "Which module defines walk?"}, {"from": "gpt", "value": "os"}]
    folder = tmp_path / "chat"
    first = write_jsonl(folder / "a.JSONL", [{"system": "Be brief.", "conversations": chat, "id": i} for i in range(6)])
    write_jsonl(folder / "b.jsonl", [{"conversations": [{**turn, "weight": 1} for turn in chat]}] * 4)
    (folder / "corpus.txt").write_text("pretraining text, not conversations\n")
    args = SFTDataArguments(
        train_files=[str(folder)], validation_split_percentage=0.0, packing=False,
        dataset_cache_dir=str(tmp_path / "cache"), max_seq_length=256,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        prepared = prepare_sft_data(args, tiny_tokenizer)
    assert prepared.metadata["stats"]["kept"] == 10
    assert prepared.metadata["stats"]["ignored_fields"] == {
        "id": {"records": 6, "first": f"{first}:1"},
        "conversations[].weight": {"records": 4, "first": f"{folder / 'b.jsonl'}:1"},
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"train_files: {folder}: took 2 data files; left out 1 this stage does not read: corpus.txt",
        "ignored fields, not trained on (records holding each, where first seen): "
        f"id: 6 ({first}:1), conversations[].weight: 4 ({folder / 'b.jsonl'}:1)",
    ]
    assert "Be brief." in tiny_tokenizer.decode(prepared.train[0]["input_ids"])  # the top-level system prompt
