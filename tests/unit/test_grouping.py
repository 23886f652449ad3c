"""Pretraining data logic: EOS between documents, block sizes, remainder, collation."""

from __future__ import annotations

import numpy as np
import pytest

from llmtrain.data.pretrain import collate_blocks, group_into_blocks, tokenize_and_group

EOS = 99


def test_eos_follows_every_document_and_blocks_are_contiguous() -> None:
    blocks = group_into_blocks([[1, 2, 3], [4], [5, 6]], block_size=3, eos_token_id=EOS)
    assert blocks.tolist() == [[1, 2, 3], [EOS, 4, EOS], [5, 6, EOS]]


@pytest.mark.parametrize("block_size", [1, 2, 5, 7, 64])
def test_every_block_has_block_size_tokens_and_only_the_tail_is_dropped(block_size: int) -> None:
    documents = [list(range(10 * i, 10 * i + n)) for i, n in enumerate([3, 11, 1, 8, 20])]
    blocks = group_into_blocks(documents, block_size=block_size, eos_token_id=EOS)
    stream = [token for document in documents for token in [*document, EOS]]
    n_blocks = len(stream) // block_size
    assert blocks.shape == (n_blocks, block_size)
    assert blocks.reshape(-1).tolist() == stream[: n_blocks * block_size]
    assert len(stream) - blocks.size < block_size  # remainder policy: less than one block lost


def test_too_little_text_gives_no_block_and_empty_input_is_fine() -> None:
    assert group_into_blocks([[1, 2]], block_size=4, eos_token_id=EOS).shape == (0, 4)
    assert group_into_blocks([], block_size=4, eos_token_id=EOS).shape == (0, 4)


def test_blocks_are_int32_to_halve_disk_use() -> None:
    assert group_into_blocks([[1, 2, 3]], block_size=2, eos_token_id=EOS).dtype == np.int32


def test_tokenize_and_group_separates_documents_with_the_tokenizer_eos(tiny_tokenizer) -> None:
    texts = ["first document", "   ", "second document"]
    blocks = tokenize_and_group({"text": texts}, tiny_tokenizer, block_size=2)["input_ids"]
    stream = blocks.reshape(-1).tolist()
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for text in ("first document", "second document"):  # the blank document is skipped
        expected += [*tiny_tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    assert stream == expected[: len(stream)]
    assert stream.count(eos) >= 1
    assert tiny_tokenizer.decode(stream).startswith("first document<|endoftext|>second")


def test_collate_makes_labels_equal_to_inputs_with_no_ignore_index() -> None:
    batch = collate_blocks([{"input_ids": np.array([1, 2, 3], dtype=np.int32)}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].dtype.is_floating_point is False
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()


def test_a_batch_of_blank_documents_gives_no_block_instead_of_a_tokenizer_error(tiny_tokenizer) -> None:
    """``--preprocessing_batch_size 1`` with one blank document, or an all-blank corpus."""
    blocks = tokenize_and_group({"text": ["", "   \n"]}, tiny_tokenizer, block_size=8)["input_ids"]
    assert blocks.shape == (0, 8) and blocks.dtype == np.int32
