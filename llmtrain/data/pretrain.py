"""Pretraining data: documents -> tokens + EOS -> fixed-size causal-LM blocks, tokenized once.

Contract of one training example::

    input_ids: t t t t <eos> t t t <eos> t t ...   (exactly block_size ids)
    labels:    the same ids (the model shifts them by one internally)

Documents are concatenated with EOS after every document, so the model learns where a
document ends and never sees two documents run together without a separator.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import PretrainDataArguments
from llmtrain.data.cache import PreparedData, RawFiles, cache_key, load_or_build, locate_prepared_data
from llmtrain.data.files import load_text_files, train_validation_splits
from llmtrain.errors import DataError

logger = logging.getLogger(__name__)


def group_into_blocks(token_ids: Sequence[Sequence[int]], block_size: int, eos_token_id: int) -> np.ndarray:
    """Append EOS to every document, concatenate, and cut into rows of ``block_size`` tokens.

    Remainder policy: the tokens after the last full block (fewer than ``block_size``) are
    dropped, once per call. Called once per preprocessing batch, a corpus loses fewer than
    ``block_size`` tokens per ``preprocessing_batch_size`` documents.

    >>> group_into_blocks([[1, 2], [3, 4, 5]], block_size=2, eos_token_id=0).tolist()
    [[1, 2], [0, 3], [4, 5]]
    >>> group_into_blocks([[1]], block_size=4, eos_token_id=0).shape   # too short: no block
    (0, 4)
    """
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
    total = int(lengths.sum()) + len(lengths)
    flat = np.empty(total, dtype=np.int32)
    eos_positions = np.cumsum(lengths + 1) - 1
    is_token = np.ones(total, dtype=bool)
    is_token[eos_positions] = False
    flat[is_token] = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=total - len(lengths))
    flat[eos_positions] = eos_token_id
    n_blocks = total // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)


def tokenize_and_group(
    batch: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> dict[str, np.ndarray]:
    """``datasets.map`` function: a batch of ``{"text": [...]}`` -> ``{"input_ids": blocks}``.

    Blank documents are skipped (they would only add a lone EOS).
    """
    texts = [text for text in batch["text"] if text.strip()]
    assert tokenizer.eos_token_id is not None
    if not texts:  # a batch of blank documents (the tokenizer refuses an empty batch)
        return {"input_ids": np.empty((0, block_size), dtype=np.int32)}
    token_ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": group_into_blocks(token_ids, block_size, tokenizer.eos_token_id)}


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; labels are the input ids (no padding exists to mask).

    >>> collate_blocks([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])["labels"].tolist()
    [[1, 2], [3, 4]]
    """
    input_ids = torch.from_numpy(np.stack([np.asarray(f["input_ids"], dtype=np.int64) for f in features]))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return cache_key({"tokenizer": definition, "eos": tokenizer.eos_token})


# Hash of the code that turns text into blocks: editing it invalidates every cached dataset.
PREPROCESSING_CODE_VERSION = cache_key(
    {"source": inspect.getsource(group_into_blocks) + inspect.getsource(tokenize_and_group)}
)


def prepare_pretrain_data(data_args: PretrainDataArguments, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load the tokenized dataset for this run, building it first if it does not exist yet.

    With ``tokenized_path`` set and present, the raw files are not read at all. Otherwise the
    dataset lives in ``dataset_cache_dir`` under a key of (data files with sizes and mtimes,
    split settings, tokenizer, block size, preprocessing code version).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; pretraining needs one between documents")
    compat = {
        "block_size": data_args.block_size,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code_version": PREPROCESSING_CODE_VERSION,
    }
    settings = {"text_field": data_args.text_field, "txt_sample_by": data_args.txt_sample_by}
    location = locate_prepared_data(data_args, compat, "pretrain", settings)

    def build(raw: RawFiles) -> tuple[datasets.DatasetDict, dict[str, Any]]:
        return _build(data_args, tokenizer, raw.train_files, raw.validation_files)

    prepared = load_or_build(location, compat, build, "tokenized_path")
    stats = prepared.metadata["stats"]
    logger.info(
        "pretraining data: %d train blocks, %d eval blocks of %d tokens (%s)",
        stats["train_blocks"],
        stats["eval_blocks"],
        data_args.block_size,
        prepared.path,
    )
    return prepared


def _build(
    data_args: PretrainDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_files: list[Path],
    validation_files: list[Path],
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    documents = load_text_files(train_files, data_args.text_field, data_args.txt_sample_by)
    validation = (
        load_text_files(validation_files, data_args.text_field, data_args.txt_sample_by) if validation_files else None
    )
    splits = train_validation_splits(documents, validation, data_args.validation_split_percentage, "documents")
    stats: dict[str, Any] = {"documents": len(documents)}
    blocks = {}
    for name, split in splits.items():
        stats[f"{name}_blank_documents"] = int(
            pc.sum(pc.equal(pc.utf8_trim_whitespace(split.data.column("text")), "")).as_py() or 0
        )
        blocks[name] = split.map(
            tokenize_and_group,
            fn_kwargs={"tokenizer": tokenizer, "block_size": data_args.block_size},
            batched=True,
            batch_size=data_args.preprocessing_batch_size,
            remove_columns=split.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"tokenize + group {name}",
        )
        if len(blocks[name]) == 0:
            field_name = "train_files" if name == "train" else "validation data"
            raise DataError(
                f"{field_name}: {len(split)} documents make no full block of block_size={data_args.block_size} "
                "tokens; add data or lower block_size"
            )
    stats["train_blocks"] = len(blocks["train"])
    stats["eval_blocks"] = len(blocks["validation"]) if "validation" in blocks else 0
    stats["tokens_in_blocks"] = (stats["train_blocks"] + stats["eval_blocks"]) * data_args.block_size
    return datasets.DatasetDict(blocks), stats
