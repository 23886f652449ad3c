"""Pretraining data: documents -> tokens + EOS -> one token store per split, cut into fixed blocks.

Contract of one training example::

    input_ids: t t t t <eos> t t t <eos> t t ...   (exactly block_size ids)
    labels:    the same ids (the model shifts them by one internally)

Documents are concatenated with EOS after every document, so the model learns where a
document ends and never sees two documents run together without a separator. The stream is
written once, in one streaming pass over the files (:mod:`llmtrain.data.documents`), tokenized by
``preprocessing_num_workers`` processes (torchdata's ``ParallelMapper``, in order, a bounded number
of batches in flight), into a token store (:mod:`llmtrain.data.token_store`); training reads fixed
``block_size`` windows of it, so only the final remainder of each split is never trained on.
Without ``validation_files``, ``validation_split_percentage`` of the documents are held out by a
fixed hash of their position in the (sorted) train files.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchdata.nodes import IterableWrapper, Loader, Mapper, ParallelMapper
from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import PretrainDataArguments, stage_data_settings
from llmtrain.config.sources import parse_sources
from llmtrain.data.cache import (
    CheckSources,
    PreparedData,
    RawFiles,
    cache_key,
    load_or_build,
    locate_prepared_data,
    tokenizer_fingerprint,
)
from llmtrain.data.documents import iter_documents
from llmtrain.data.files import VALIDATION_SPLIT_SEED
from llmtrain.data.sources import WeightedBlocks
from llmtrain.data.token_store import STORE_FILE, TokenBlocks, TokenStoreWriter, open_store
from llmtrain.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
MASK64 = (1 << 64) - 1


def held_out(index: int, percentage: float, seed: int = VALIDATION_SPLIT_SEED) -> bool:
    """Whether document ``index`` (its position in the train files) is held out for validation.

    A fixed hash (splitmix64 of seed and index) makes the choice independent of batching, worker
    count and corpus size: appending documents never moves an earlier one between splits.

    >>> sum(held_out(i, 5.0) for i in range(100_000)) / 1000  # percent held out: about 5
    4.949
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & MASK64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & MASK64
    mixed ^= mixed >> 31
    return mixed / 2**64 < percentage / 100


def concat_documents(
    token_ids: Sequence[Sequence[int]], eos_token_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Every document followed by EOS, back to back, and each document's length with its EOS.

    >>> tokens, lengths = concat_documents([[1, 2], [3, 4, 5]], eos_token_id=0, dtype=np.dtype("<u2"))
    >>> tokens.tolist(), lengths.tolist()
    ([1, 2, 0, 3, 4, 5, 0], [3, 4])
    """
    lengths = np.fromiter((len(ids) + 1 for ids in token_ids), dtype=np.int64, count=len(token_ids))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=dtype)
    eos_positions = np.cumsum(lengths) - 1
    is_token = np.ones(total, dtype=bool)
    is_token[eos_positions] = False
    flat[is_token] = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=dtype, count=total - len(lengths))
    flat[eos_positions] = eos_token_id
    return flat, lengths


@dataclass
class DocumentBatch:
    """Documents on their way to the tokenizer: texts and, per text, the store it goes to.

    A destination is ``"validation"``, ``"train"`` (one source) or ``"train/K"`` (weighted source K).
    """

    texts: list[str]
    destinations: list[str]


@dataclass
class ReadFailure:
    """A bad file met while reading: passed through the workers so the main process raises it as it is."""

    error: DataError


@dataclass
class TokenizedBatch:
    """A batch's tokens per destination (``(tokens, lengths)``) and counts of documents and blank ones."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    documents: dict[str, int]
    blank: dict[str, int]


class BatchTokenizer:
    """The map function the prepare workers run: a :class:`DocumentBatch` -> a :class:`TokenizedBatch`.

    Blank documents are skipped (they would only add a lone EOS) and counted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> None:
        assert tokenizer.eos_token_id is not None
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.dtype = dtype

    def __call__(self, batch: DocumentBatch | ReadFailure) -> TokenizedBatch | ReadFailure:
        if isinstance(batch, ReadFailure):
            return batch
        kept = [index for index, text in enumerate(batch.texts) if text.strip()]
        ids: list[list[int]] = []
        if kept:  # the tokenizer refuses an empty batch
            texts = [batch.texts[index] for index in kept]
            ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)[
                "input_ids"
            ]
        result = TokenizedBatch({}, {}, {})
        for destination in sorted(set(batch.destinations)):
            chosen = [i for i, index in enumerate(kept) if batch.destinations[index] == destination]
            result.splits[destination] = concat_documents([ids[i] for i in chosen], self.eos_token_id, self.dtype)
            result.documents[destination] = batch.destinations.count(destination)
            result.blank[destination] = result.documents[destination] - len(chosen)
        return result


def train_destinations(train_sources: Sequence[Sequence[Path]]) -> list[str]:
    """The store of each train source: ``train`` for one, ``train/0``, ``train/1``, ... for weighted ones.

    >>> train_destinations([["a"]]), train_destinations([["a"], ["b"]])
    (['train'], ['train/0', 'train/1'])
    """
    return ["train"] if len(train_sources) == 1 else [f"train/{index}" for index in range(len(train_sources))]


def document_batches(
    train_sources: Sequence[Sequence[Path]], validation_files: Sequence[Path], data_args: PretrainDataArguments
) -> Iterator[DocumentBatch | ReadFailure]:
    """The documents of every file, in order, in batches of ``preprocessing_batch_size``, each with its store.

    ``train_sources`` holds the files of each source (one source: one list). Documents are counted
    across all train files for the hold-out. Streaming: one batch of texts is held at a time. A bad
    file ends the stream with a :class:`ReadFailure`.
    """
    holdout = 0.0 if validation_files else data_args.validation_split_percentage
    files: list[tuple[Path, str]] = []
    for destination, paths in zip(train_destinations(train_sources), train_sources, strict=True):
        files += [(path, destination) for path in paths]
    files += [(path, "validation") for path in validation_files]
    batch = DocumentBatch([], [])
    index = 0  # of the train documents, for the hold-out
    try:
        for path, destination in files:
            for _, text in iter_documents(path, data_args.text_field, data_args.txt_sample_by):
                batch.texts.append(text)
                if destination == "validation":
                    batch.destinations.append(destination)
                else:
                    batch.destinations.append("validation" if holdout and held_out(index, holdout) else destination)
                    index += 1
                if len(batch.texts) == data_args.preprocessing_batch_size:
                    yield batch
                    batch = DocumentBatch([], [])
    except DataError as error:
        yield ReadFailure(error)
        return
    if batch.texts:
        yield batch


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; labels are the input ids (no padding exists to mask).

    >>> collate_blocks([{"input_ids": [1, 2]}, {"input_ids": [3, 4]}])["labels"].tolist()
    [[1, 2], [3, 4]]
    """
    input_ids = torch.from_numpy(np.stack([np.asarray(f["input_ids"], dtype=np.int64) for f in features]))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# Hash of the code that turns text into the token stream: editing it invalidates every prepared store.
PREPROCESSING_CODE_VERSION = cache_key(
    {
        "source": "".join(
            inspect.getsource(function)
            for function in (
                held_out,
                concat_documents,
                BatchTokenizer,
                document_batches,
                iter_documents,
                train_destinations,
            )
        )
    }
)


def prepare_pretrain_data(
    data_args: PretrainDataArguments, tokenizer: PreTrainedTokenizerBase, check_sources: CheckSources | None = None
) -> PreparedData:
    """Load the token stores for this run, building them first if they do not exist yet.

    With ``tokenized_path`` set and present, the raw files are not read at all. Otherwise the
    stores live in ``dataset_cache_dir`` under a key of (data files with sizes and mtimes,
    split settings, tokenizer, preprocessing code version); the block size is not part of the key:
    blocks are windows of the stream, cut at load time. ``check_sources`` (a resume's data
    identity check) runs before anything is written (:func:`~llmtrain.data.cache.load_or_build`).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; pretraining needs one between documents")
    compat = {"tokenizer": tokenizer_fingerprint(tokenizer), "code_version": PREPROCESSING_CODE_VERSION}
    location = locate_prepared_data(data_args, compat, "pretrain", stage_data_settings(data_args))

    def build(raw: RawFiles, staging: Path) -> dict[str, Any]:
        train_sources = [files for _, files in raw.train_sources]
        return build_token_stores(data_args, tokenizer, train_sources, raw.validation_files, staging)

    assert data_args.train_files is not None
    sources = parse_sources(data_args.train_files)
    weights = [source.weight for source in sources if source.weight is not None]

    def load(path: Path) -> tuple[TokenBlocks | WeightedBlocks, TokenBlocks | None]:
        return load_blocks(path, data_args.block_size, weights or None)

    prepared = load_or_build(location, compat, build, load, "tokenized_path", check_sources)
    check_blocks(prepared, data_args.block_size, [source.name for source in sources])
    stats = prepared.metadata["stats"]
    eval_blocks = len(prepared.eval) if prepared.eval is not None else 0
    # This run's cut of the stream, for the run manifest (the stores themselves do not depend on it).
    stats.update(block_size=data_args.block_size, train_blocks=len(prepared.train), eval_blocks=eval_blocks)
    if isinstance(prepared.train, WeightedBlocks):
        stats["source_shares"] = [
            {"name": source.name, "store": f"train/{index}", **share}
            for index, (source, share) in enumerate(
                zip(sources, prepared.train.shares(data_args.block_size), strict=True)
            )
        ]
        for share in stats["source_shares"]:
            logger.info(
                "source %s: weight %.3f, %d blocks held, %d drawn per epoch: %.1f%% of the tokens (%.2f passes)",
                share["name"], share["weight"], share["blocks"], share["drawn_per_epoch"],
                100 * share["token_share"], share["passes_per_epoch"],
            )  # fmt: skip
    logger.info(
        "pretraining data: %d train blocks, %d eval blocks of %d tokens from %d + %d documents "
        "(%d + %d tokens; %d tokens of the final remainders not trained on) (%s)",
        len(prepared.train),
        eval_blocks,
        data_args.block_size,
        stats["train_documents"],
        stats["validation_documents"],
        stats["train_tokens"],
        stats["validation_tokens"],
        stats["train_tokens"] + stats["validation_tokens"] - (len(prepared.train) + eval_blocks) * data_args.block_size,
        prepared.path,
    )
    return prepared


def load_blocks(
    path: Path, block_size: int, weights: list[float] | None = None
) -> tuple[TokenBlocks | WeightedBlocks, TokenBlocks | None]:
    """The train (and validation) blocks of the stores at ``path`` (a :data:`~llmtrain.data.cache.Load`).

    Weighted sources (``train/0``, ``train/1``, ...) are drawn by ``weights``, one per source.
    """
    validation = TokenBlocks(open_store(path / "validation"), block_size) if (path / "validation").is_dir() else None
    if (path / "train" / STORE_FILE).is_file():
        if weights is not None:
            raise DataError(
                f"tokenized_path: {path} holds one train source, but train_files gives {len(weights)} weighted ones; "
                "prepare the weighted sources (or drop the weights)"
            )
        return TokenBlocks(open_store(path / "train"), block_size), validation
    stores = sorted((p for p in (path / "train").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    if weights is None or len(weights) != len(stores):
        raise DataError(
            f"tokenized_path: {path} holds {len(stores)} weighted train sources, but train_files gives "
            f"{len(weights or [])} weights; name the same sources, each with its weight"
        )
    return WeightedBlocks([TokenBlocks(open_store(store), block_size) for store in stores], weights), validation


def check_blocks(prepared: PreparedData, block_size: int, names: Sequence[str] = ()) -> None:
    """Refuse a split, or a weighted source (``names``: their specs), that holds no full block."""
    stats = prepared.metadata["stats"]
    if isinstance(prepared.train, WeightedBlocks):
        for name, source, blocks in zip(names, stats["train_sources"], prepared.train.blocks, strict=True):
            if len(blocks) == 0:
                raise DataError(
                    f"train_files: source {name}: {source['documents']} documents make no full block of "
                    f"block_size={block_size} tokens ({source['tokens']} tokens with EOS); add data or drop the source"
                )
    for split, blocks in (("train", prepared.train), ("validation", prepared.eval)):
        if blocks is not None and len(blocks) == 0:
            field_name = "train_files" if split == "train" else "validation data"
            raise DataError(
                f"{field_name}: {stats[f'{split}_documents']} documents make no full block of block_size={block_size} "
                f"tokens ({stats[f'{split}_tokens']} tokens with EOS, {stats[f'{split}_blank_documents']} blank "
                "documents); add data or lower block_size"
            )


def build_token_stores(
    data_args: PretrainDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_sources: Sequence[Sequence[Path]],
    validation_files: Sequence[Path],
    staging: Path,
) -> dict[str, Any]:
    """Tokenize every document once into ``staging/train`` (and ``staging/validation``); returns the counts.

    ``train_sources`` holds each source's files; several (weighted) sources get a store each,
    ``staging/train/0``, ``staging/train/1``, ...

    The files are read in the main process; ``preprocessing_num_workers`` > 1 processes tokenize
    batches of documents in order, at most one batch each in flight, so memory stays bounded by a
    few batches whatever the corpus size.
    """
    assert tokenizer.eos_token_id is not None
    vocab_size = len(tokenizer)
    destinations = train_destinations(train_sources)
    if validation_files or data_args.validation_split_percentage > 0:
        destinations.append("validation")
    writers = {name: TokenStoreWriter(staging / name, vocab_size, tokenizer.eos_token_id) for name in destinations}
    workers = data_args.preprocessing_num_workers or 0
    map_fn = BatchTokenizer(tokenizer, writers[destinations[0]].dtype)
    source = IterableWrapper(document_batches(train_sources, validation_files, data_args))
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker is one core; no threads per worker on top
        node: Any = ParallelMapper(source, map_fn, num_workers=workers, in_order=True, method="process",
                                   max_concurrent=workers)  # fmt: skip
    else:
        node = Mapper(source, map_fn)
    loader = Loader(node)
    documents = dict.fromkeys(destinations, 0)
    blank = dict.fromkeys(destinations, 0)
    try:
        for result in loader:
            if isinstance(result, ReadFailure):
                raise result.error
            for destination, (tokens, lengths) in result.splits.items():
                documents[destination] += result.documents[destination]
                blank[destination] += result.blank[destination]
                writers[destination].add(tokens, lengths)
    finally:
        del loader, node  # stop the workers now, while the interpreter is whole
        gc.collect()
    stores = {destination: writer.close() for destination, writer in writers.items()}
    trains = [destination for destination in destinations if destination != "validation"]

    def total(split: str, counts: dict[str, int]) -> int:
        return sum(counts[d] for d in trains) if split == "train" else counts.get("validation", 0)

    tokens = {destination: store["tokens"] for destination, store in stores.items()}
    stats: dict[str, Any] = {
        **{f"{split}_documents": total(split, documents) for split in SPLITS},
        **{f"{split}_blank_documents": total(split, blank) for split in SPLITS},
        **{f"{split}_tokens": total(split, tokens) for split in SPLITS},
        "token_dtype": stores[destinations[0]]["dtype"],
        "tokenizer_name_or_path": tokenizer.name_or_path or None,  # what inspect_data decodes with
    }
    stats["documents"] = stats["train_documents"] + stats["validation_documents"]
    if len(trains) > 1:
        names = [str(index) for index in range(len(trains))]
        stats["train_sources"] = [
            {"name": name, "documents": documents[d], "blank_documents": blank[d], "tokens": tokens[d]}
            for name, d in zip(names, trains, strict=True)
        ]
    if "validation" in writers and stores["validation"]["documents"] == 0 and not validation_files:
        raise DataError(
            f"validation_split_percentage={data_args.validation_split_percentage} leaves no validation documents "
            f"out of {stats['documents']}; raise it, give validation_files, or set it to 0"
        )
    for index, destination in enumerate(destinations):  # refused here, so the empty stores are not kept
        if tokens[destination] == 0:
            field_name = "validation data" if destination == "validation" else "train_files"
            source = f"source {index + 1} of {len(trains)}: " if len(trains) > 1 and destination in trains else ""
            raise DataError(
                f"{field_name}: {source}{documents[destination]} documents make no full block: every one is blank "
                "(nothing to train on); add text"
            )
    return stats
