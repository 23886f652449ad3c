"""Pretraining data: the token stream (EOS after every document), its store, blocks as windows, the hold-out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from llmtrain.config.arguments import PretrainDataArguments
from llmtrain.data.documents import iter_documents
from llmtrain.data.pretrain import (
    BatchTokenizer,
    DocumentBatch,
    build_token_stores,
    collate_blocks,
    concat_documents,
    held_out,
    load_blocks,
)
from llmtrain.data.token_store import (
    DOCUMENTS_FILE,
    STORE_FILE,
    TOKENS_FILE,
    StoreDamaged,
    TokenBlocks,
    TokenStoreWriter,
    open_store,
)
from llmtrain.errors import UserInputError
from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR

EOS = 99


def test_eos_follows_every_document() -> None:
    tokens, lengths = concat_documents([[1, 2, 3], [4], [5, 6]], eos_token_id=EOS, dtype=np.dtype("<u2"))
    assert tokens.tolist() == [1, 2, 3, EOS, 4, EOS, 5, 6, EOS] and lengths.tolist() == [4, 2, 3]
    empty, no_lengths = concat_documents([], eos_token_id=EOS, dtype=np.dtype("<u2"))
    assert empty.size == 0 and no_lengths.size == 0


@pytest.mark.parametrize("block_size", [1, 2, 5, 7, 64])
def test_blocks_are_windows_of_the_stream_and_only_the_final_remainder_is_lost(block_size: int, tmp_path: Path) -> None:
    documents = [list(range(10 * i, 10 * i + n)) for i, n in enumerate([3, 11, 1, 8, 20])]
    writer = TokenStoreWriter(tmp_path / "s", vocab_size=100, eos_token_id=EOS)
    for document in documents:  # one document per add: batching does not change the stream
        writer.add(*concat_documents([document], EOS, writer.dtype))
    writer.close()
    stream = [token for document in documents for token in [*document, EOS]]
    blocks = TokenBlocks(open_store(tmp_path / "s"), block_size)
    assert len(blocks) == len(stream) // block_size
    assert [t for i in range(len(blocks)) for t in blocks[i]["input_ids"].tolist()] == stream[
        : len(blocks) * block_size
    ]
    assert len(stream) - len(blocks) * block_size < block_size
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_the_store_is_readable_with_numpy_alone_and_the_index_locates_every_document(tmp_path: Path) -> None:
    writer = TokenStoreWriter(tmp_path / "s", vocab_size=70_000, eos_token_id=EOS)
    writer.add(*concat_documents([[1, 2], [69_999]], EOS, writer.dtype))
    writer.close()
    meta = json.loads((tmp_path / "s" / STORE_FILE).read_text())
    assert meta["dtype"] == "<u4"  # 70,000 ids do not fit in uint16
    tokens = np.memmap(tmp_path / "s" / TOKENS_FILE, dtype=meta["dtype"], mode="r")
    offsets = np.load(tmp_path / "s" / DOCUMENTS_FILE)
    assert [tokens[offsets[d] : offsets[d + 1]].tolist() for d in range(meta["documents"])] == [
        [1, 2, EOS],
        [69_999, EOS],
    ]


def test_batch_tokenizer_routes_documents_and_skips_blank_ones(tiny_tokenizer) -> None:
    tokenize = BatchTokenizer(tiny_tokenizer, np.dtype("<u2"))
    result = tokenize(
        DocumentBatch(
            ["first document", "   ", "held out", "second document"], ["train", "train", "validation", "train"]
        )
    )
    eos = tiny_tokenizer.eos_token_id
    expected = [t for text in ("first document", "second document")
                for t in [*tiny_tokenizer(text, add_special_tokens=False)["input_ids"], eos]]  # fmt: skip
    assert result.splits["train"][0].tolist() == expected
    assert tiny_tokenizer.decode(result.splits["validation"][0]) == "held out<|endoftext|>"
    assert result.documents == {"train": 3, "validation": 1} and result.blank == {"train": 1, "validation": 0}
    all_blank = tokenize(DocumentBatch(["", "  \n"], ["train", "train"]))  # the tokenizer refuses an empty batch
    assert all_blank.splits["train"][0].size == 0 and all_blank.blank["train"] == 2


def test_the_hold_out_depends_on_the_document_position_only() -> None:
    chosen = [i for i in range(20_000) if held_out(i, 5.0)]
    assert 800 < len(chosen) < 1200
    assert chosen == [i for i in range(20_000) if held_out(i, 5.0)]  # no hidden state
    assert not any(held_out(i, 0.0) for i in range(1000))


SLICE_DOCUMENTS = 400  # of the demo corpus's 2,418: dozens of batches of 7 per run; the rest only costs time


def demo_slice(tmp_path: Path) -> Path:
    """The first :data:`SLICE_DOCUMENTS` documents of the demo corpus, as a JSON-lines file."""
    path = tmp_path / "demo-slice.jsonl"
    if not path.exists():
        path.write_bytes(b"".join(DEMO_CORPUS_PATH.read_bytes().splitlines(keepends=True)[:SLICE_DOCUMENTS]))
    return path


def data_args(files: list[Path], tmp_path: Path, **overrides: object) -> PretrainDataArguments:
    settings: dict[str, object] = {"train_files": [str(f) for f in files], "dataset_cache_dir": str(tmp_path / "cache"),
                                   "validation_split_percentage": 0.0, "preprocessing_batch_size": 7}  # fmt: skip
    return PretrainDataArguments(**{**settings, **overrides})  # type: ignore[arg-type]


def expected_stream(paths: list[Path], tokenizer) -> list[int]:
    stream: list[int] = []
    for path in paths:
        for _, text in iter_documents(path):
            if text.strip():
                stream += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return stream


@pytest.mark.parametrize("copy", ["plain", "gz", "zst"])
def test_the_stream_is_every_document_tokenized_with_eos_exactly(copy: str, tiny_tokenizer, tmp_path: Path) -> None:
    corpus = tmp_path / f"corpus.jsonl{'' if copy == 'plain' else '.' + copy}"
    raw = demo_slice(tmp_path).read_bytes()
    compress = {"plain": lambda b: b, "gz": gzip.compress, "zst": zstandard.ZstdCompressor().compress}[copy]
    corpus.write_bytes(compress(raw))
    args = data_args([corpus], tmp_path)
    stats = build_token_stores(args, tiny_tokenizer, [[corpus]], [], tmp_path / "out")
    store = open_store(tmp_path / "out" / "train")
    assert store.tokens().tolist() == expected_stream([demo_slice(tmp_path)], tiny_tokenizer)
    assert stats["train_tokens"] == store.num_tokens and not (tmp_path / "out" / "validation").exists()


def test_two_workers_write_the_same_store_as_one(tiny_tokenizer, tmp_path: Path) -> None:
    corpus = demo_slice(tmp_path)
    for workers in (1, 2):
        args = data_args([corpus], tmp_path, preprocessing_num_workers=workers, validation_split_percentage=10.0)
        build_token_stores(args, tiny_tokenizer, [[corpus]], [], tmp_path / f"w{workers}")
    for split in ("train", "validation"):
        for name in (TOKENS_FILE, DOCUMENTS_FILE, STORE_FILE):
            assert (tmp_path / "w1" / split / name).read_bytes() == (tmp_path / "w2" / split / name).read_bytes()
    train, validation = load_blocks(tmp_path / "w1", block_size=16)
    assert validation is not None and len(train) > len(validation) > 0


def test_a_truncated_or_inconsistent_store_is_refused_naming_the_file(tiny_tokenizer, tmp_path: Path) -> None:
    corpus = demo_slice(tmp_path)
    build_token_stores(data_args([corpus], tmp_path), tiny_tokenizer, [[corpus]], [], tmp_path / "out")
    tokens = tmp_path / "out" / "train" / TOKENS_FILE
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-10])
    with pytest.raises(StoreDamaged, match=rf"{tokens}: {len(data) - 10} bytes, expected {len(data)}"):
        open_store(tmp_path / "out" / "train")
    shifted = bytearray(data)
    shifted[-2:] = b"\x01\x00"  # the last document's EOS overwritten
    tokens.write_bytes(bytes(shifted))
    with pytest.raises(StoreDamaged, match=r"does not end with EOS"):
        open_store(tmp_path / "out" / "train")


def test_collate_makes_labels_equal_to_inputs_with_no_ignore_index() -> None:
    batch = collate_blocks([{"input_ids": np.array([1, 2, 3], dtype=np.int64)}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].dtype.is_floating_point is False
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()


def test_inspect_data_prints_counts_and_decodes_a_block_or_a_document(
    tiny_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmtrain.tools import inspect_data

    corpus = demo_slice(tmp_path)
    build_token_stores(data_args([corpus], tmp_path), tiny_tokenizer, [[corpus]], [], tmp_path / "out")
    store = open_store(tmp_path / "out" / "train")
    inspect_data.main([str(tmp_path / "out"), "--block", "1", "--block_size", "8", "--tokenizer", str(TINY_MODEL_DIR)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == (f"train: {store.num_documents} documents, {store.num_tokens} tokens (<u2, EOS "
                        f"{tiny_tokenizer.eos_token_id}, vocabulary {len(tiny_tokenizer)}); {store.num_tokens // 8} "
                        f"blocks of 8, {store.num_tokens % 8} tokens left over")  # fmt: skip
    block = store.tokens()[8:16].tolist()
    assert lines[1] == f"ids: {block}" and out.split("\ntext: ", 1)[1] == f"{tiny_tokenizer.decode(block)}\n"
    inspect_data.main([str(tmp_path / "out" / "train"), "--document", "0", "--tokenizer", str(TINY_MODEL_DIR)])
    first = next(text for _, text in iter_documents(corpus) if text.strip())
    assert capsys.readouterr().out.split("\ntext: ", 1)[1] == f"{first}<|endoftext|>\n"
    (tmp_path / "out" / "train" / TOKENS_FILE).write_bytes(b"\0\0")
    with pytest.raises(UserInputError, match=r"damaged token store: .*tokens\.bin: 2 bytes, expected"):
        inspect_data.main([str(tmp_path / "out")])
