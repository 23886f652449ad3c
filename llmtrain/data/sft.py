"""SFT data preparation: conversation files -> encoded (and packed) rows in the tokenize-once cache, with their stats.

The encoding contract is :mod:`llmtrain.data.chat_masks` (labels -100 outside the answers, every
answer in its inference context); the length policy and packing are :mod:`llmtrain.data.fitting`.
This module reads the files, splits off the validation conversations, encodes them in
``preprocessing_num_workers`` processes, checks the masks, packs, counts what was dropped or
skipped, and stores the result where :mod:`llmtrain.data.cache` keys it.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torchdata.nodes import IterableWrapper, Loader, Mapper, ParallelMapper
from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments, prepared_settings, stage_data_settings
from llmtrain.data import chat_masks, conversations, fitting, prefix_tree, sft_rows
from llmtrain.data.cache import (
    CheckSources,
    PreparedData,
    RawFiles,
    cache_key,
    load_or_build,
    locate_prepared_data,
    tokenizer_fingerprint,
)
from llmtrain.data.chat_masks import (
    check_chat_tokenizer,
    preview,
)
from llmtrain.data.collate import SEQUENCE_LAYOUT_KEY, SequenceLayout
from llmtrain.data.conversations import (
    IgnoredFields,
    InvalidRecords,
    Message,
    check_invalid_share,
    describe_invalid_records,
    iter_conversations,
)
from llmtrain.data.files import VALIDATION_SPLIT_SEED
from llmtrain.data.fitting import fit_conversation
from llmtrain.data.prefix_tree import tree_samples
from llmtrain.data.sft_rows import EncodedRows, SftRows, SftRowsWriter, open_rows, pack_split
from llmtrain.errors import DataError, UserInputError
from llmtrain.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Conversations per task of a prepare worker: enough to amortise the hand-off between processes, few
# enough that a batch of long conversations stays small in memory.
ENCODE_BATCH = 64
PROGRESS_EVERY_S = 30.0  # the longest silence while a large set is encoded


def template_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer plus its chat template (both shape the encoded tokens)."""
    return cache_key({"tokenizer": tokenizer_fingerprint(tokenizer), "template": tokenizer.chat_template})


def preparation_compat(
    data_args: SFTDataArguments, tokenizer: PreTrainedTokenizerBase, packed: bool, trees: bool
) -> dict[str, Any]:
    """What prepared SFT rows must match to be reused: their cache key's parts beside the raw files.

    The ``PREPARED`` fields of ``data_args`` (:func:`~llmtrain.config.arguments.prepared_settings`),
    with the values this run resolved where a field is a request (``packing`` and ``share_prefixes``:
    what the layout allows; ``chat_template_kwargs``: the parsed keywords), plus the tokenizer with
    its template and the encoding code's version.
    """
    return {
        **prepared_settings(data_args),
        "packing": packed,
        "share_prefixes": trees,
        "chat_template_kwargs": data_args.template_kwargs,
        "tokenizer": template_fingerprint(tokenizer),
        "code_version": sft_code_version(),
    }


def prepare_sft_data(
    data_args: SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    layout: SequenceLayout | None = None,
    check_sources: CheckSources | None = None,
) -> PreparedData:
    """Load the encoded SFT rows for this run, building (and checking) them first if needed.

    ``layout`` (:func:`llmtrain.data.collate.choose_layout`) says whether the rows are packed, and is
    recorded in the metadata (so in the run manifest); without it ``data_args.packing`` decides. A
    model whose mixers cannot be packed here trains a packing run on per-conversation rows.
    ``check_sources`` (a resume's data identity check) runs before anything is written.
    """
    check_chat_tokenizer(tokenizer, data_args.end_of_turn_token)  # before anything is read
    packed = data_args.packing if layout is None else layout.packed
    trees = layout is not None and layout.trees
    compat = preparation_compat(data_args, tokenizer, packed, trees)
    location = locate_prepared_data(data_args, compat, "sft", stage_data_settings(data_args))

    def build(raw: RawFiles, staging: Path) -> dict[str, Any]:
        return build_sft_rows(data_args, tokenizer, raw.train_files, raw.validation_files, staging, packed, trees)

    prepared = load_or_build(location, compat, build, load_sft_rows, "tokenized_path", check_sources)
    stats = prepared.metadata["stats"]
    if layout is not None:
        settled = layout.settled(stats.get("trees", 0))
        # "chosen" is what a resume compares: the choice before the data said whether it holds trees.
        prepared.metadata[SEQUENCE_LAYOUT_KEY] = {"name": settled.name, "chosen": layout.name, "reason": settled.reason}
    unit = "packed rows" if packed else "rows"
    logger.info(
        "SFT data: %d train %s, %d eval %s; %d conversations kept (%d trained in extra rows: %d tokens), "
        "dropped %s, %d truncated (%d turns removed); supervised share %.1f%% (%s)",
        len(prepared.train),
        unit,
        len(prepared.eval) if prepared.eval is not None else 0,
        unit,
        stats["kept"],
        stats.get("expanded_conversations", 0),
        stats.get("extra_tokens", 0),
        stats["dropped"],
        stats["truncated_samples"],
        stats["dropped_turns"],
        100 * stats["supervised_share"],
        prepared.path,
    )
    if stats.get("trees"):
        logger.info(
            "prefix sharing: %d conversation(s)' %d rows train as %d prefix tree(s): %d tokens per epoch instead of %d "
            "(%.1f%% of the repeated history removed)",
            stats["shared_conversations"], stats["tree_rows"], stats["trees"], stats["tokens"],
            stats["tokens_without_sharing"], 100 * stats["history_removed_share"],
        )  # fmt: skip
    if stats.get("expanded_conversations"):
        logger.info(
            "%d conversation(s) rendered earlier assistant turns differently as history (the chat template is not "
            "prefix-stable): %d extra row(s), %d extra tokens, so each turn is trained in its inference context",
            stats["expanded_conversations"],
            stats["extra_rows"],
            stats["extra_tokens"],
        )
    logger.info("encoded sample (supervised spans in [[ ]]):\n%s", stats["preview"])
    if stats.get("invalid_records", {}).get("skipped"):
        logger.warning("%s", describe_invalid_records(stats["invalid_records"]))
    return prepared


def load_sft_rows(path: Path) -> tuple[SftRows, SftRows | None]:
    """The train (and validation) examples of prepared SFT rows at ``path`` (a :data:`~llmtrain.data.cache.Load`)."""
    validation = SftRows(open_rows(path / "validation")) if (path / "validation").is_dir() else None
    return SftRows(open_rows(path / "train")), validation


@dataclass
class SplitCounts:
    """What encoding one split's conversations kept, dropped and cost: summed batch by batch, bounded memory."""

    conversations: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_turns: int = 0
    trailing_user_turns: int = 0
    truncated: int = 0  # kept conversations that lost turns
    kept: int = 0
    expanded_conversations: int = 0  # kept conversations with more than one row (see supervised_char_spans)
    extra_rows: int = 0
    extra_tokens: int = 0
    rows: int = 0  # training samples: rows, and prefix trees of several rows
    tokens: int = 0  # trained per epoch
    tokens_without_sharing: int = 0  # as per-turn rows: the prefix trees' rows counted in full
    trees: int = 0
    tree_rows: int = 0  # rows trained inside prefix trees
    shared_conversations: int = 0  # conversations with at least one prefix tree
    supervised_tokens: int = 0
    end_of_turn_supervised: int = 0

    def add_row(self, labels: Sequence[int], end_of_turn_id: int) -> None:
        """Count one kept sample's tokens, supervised tokens and supervised end-of-turn tokens."""
        array = np.asarray(labels)
        self.rows += 1
        self.tokens += len(array)
        self.supervised_tokens += int((array != IGNORE_INDEX).sum())
        self.end_of_turn_supervised += int((array == end_of_turn_id).sum())

    def add(self, other: SplitCounts) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(other, name)
            if isinstance(value, Counter):
                getattr(self, name).update(value)
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass
class ConversationBatch:
    """Conversations on their way to an encoder: ``(messages, source)`` and the split each goes to."""

    conversations: list[tuple[list[Message], str]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)


@dataclass
class EncodedBatch:
    """A batch's rows per split (ids and labels), its counts per split, or the bad input that stopped it."""

    rows: dict[str, EncodedRows] = field(default_factory=dict)
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    failure: UserInputError | None = None


class ConversationEncoder:
    """The map function the prepare workers run: a :class:`ConversationBatch` -> an :class:`EncodedBatch`.

    Each conversation goes through the length policy (:func:`~llmtrain.data.fitting.fit_conversation`);
    its rows, or the reason it was dropped, are counted for its split.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, data_args: SFTDataArguments, end_of_turn_id: int, trees: bool
    ) -> None:
        """``trees``: a conversation's rows that share prefixes become prefix trees (:func:`tree_samples`)."""
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.end_of_turn_id = end_of_turn_id
        self.trees = trees

    def __call__(self, batch: ConversationBatch | UserInputError) -> EncodedBatch:
        if isinstance(batch, UserInputError):
            return EncodedBatch(failure=batch)
        encoded = EncodedBatch()
        samples: dict[str, list[dict[str, list[int]]]] = {}
        try:
            for (messages, source), split in zip(batch.conversations, batch.splits, strict=True):
                self._encode(messages, source, samples.setdefault(split, []),
                             encoded.counts.setdefault(split, SplitCounts()))  # fmt: skip
        except UserInputError as error:
            return EncodedBatch(failure=error)
        encoded.rows = {
            split: EncodedRows.of([sample["input_ids"] for sample in split_samples],
                                  [sample["labels"] for sample in split_samples],
                                  [sample.get("position_ids") for sample in split_samples])
            for split, split_samples in samples.items()
        }  # fmt: skip
        return encoded

    def _encode(
        self, messages: list[Message], source: str, samples: list[dict[str, list[int]]], counts: SplitCounts
    ) -> None:
        fitted = fit_conversation(messages, self.tokenizer, self.data_args, source)
        counts.conversations += 1
        counts.dropped_turns += fitted["dropped_turns"]
        counts.trailing_user_turns += fitted["trailing_user_turns"]
        if fitted["drop_reason"]:
            counts.dropped[fitted["drop_reason"]] += 1
            return
        counts.kept += 1
        counts.truncated += fitted["dropped_turns"] > 0
        encoded = fitted["rows"]
        counts.expanded_conversations += len(encoded) > 1
        counts.extra_rows += len(encoded) - 1
        counts.extra_tokens += sum(len(row["input_ids"]) for row in encoded[:-1])
        counts.tokens_without_sharing += sum(len(row["input_ids"]) for row in encoded)
        shared = tree_samples(encoded, self.data_args.max_seq_length) if self.trees and len(encoded) > 1 else encoded
        trees = [sample for sample in shared if "position_ids" in sample]
        counts.trees += len(trees)
        counts.tree_rows += len(encoded) - (len(shared) - len(trees))  # the rows not left as rows
        counts.shared_conversations += bool(trees)
        for sample in shared:
            counts.add_row(sample["labels"], self.end_of_turn_id)
            samples.append(sample)


def held_out_records(count: int, percentage: float) -> np.ndarray:
    """Which of ``count`` records are held out: ``ceil(percentage% x count)`` of them, by a fixed-seed permutation.

    The same records as ``datasets``' ``train_test_split(test_size, seed=VALIDATION_SPLIT_SEED)``
    holds out, as a mask in file order (``count`` bytes), so the stream never needs the records at once.

    >>> held_out_records(10, 20.0).nonzero()[0].tolist()
    [0, 3]
    """
    held = np.zeros(count, dtype=bool)
    if percentage <= 0:
        return held
    test = math.ceil(percentage / 100 * count)
    if test >= count:
        raise DataError(
            f"validation_split_percentage={percentage} leaves no train conversations out of {count}: lower it, "
            "or give validation_files"
        )
    held[np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(count)[:test]] = True
    return held


def build_sft_rows(
    data_args: SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_files: Sequence[Path],
    validation_files: Sequence[Path],
    staging: Path,
    packed: bool,
    trees: bool = False,
) -> dict[str, Any]:
    """Encode every conversation once into ``staging/train`` (and ``staging/validation``); returns the counts.

    Two streaming passes over the files, memory bounded by a few batches whatever the data size:
    the first reads and checks every record (invalid ones counted or refused by ``invalid_records``)
    and counts them, which fixes the held-out conversations; the second encodes batches of
    conversations in ``preprocessing_num_workers`` processes (torchdata's ``ParallelMapper``, in
    order) and appends their rows to the split's :class:`~llmtrain.data.sft_rows.SftRowsWriter`.
    Progress (conversations per second) is logged at least every :data:`PROGRESS_EVERY_S` seconds.
    Packed splits are then packed from the row lengths alone. With ``trees``, a conversation's rows
    that share prefixes are stored as prefix trees (:func:`~llmtrain.data.prefix_tree.tree_samples`).
    """
    end_of_turn_id = check_chat_tokenizer(tokenizer, data_args.end_of_turn_token)
    skip = data_args.invalid_records == "skip"
    invalid = InvalidRecords() if skip else None
    ignored = IgnoredFields()  # fields no conversation trains on: one warning, and counted in the stats
    system = data_args.default_system_prompt
    train_count = sum(1 for _ in iter_conversations(train_files, system, invalid, ignored))
    validation_count = sum(1 for _ in iter_conversations(validation_files, system, invalid, ignored))
    if not train_count:
        raise DataError("train_files: no valid conversation in the files given")
    ignored.warn()
    stats: dict[str, Any] = {"conversations": train_count + validation_count, "ignored_fields": ignored.stats()}
    if invalid is not None:
        stats["invalid_records"] = invalid.stats(stats["conversations"] + len(invalid))
        check_invalid_share(stats["invalid_records"], data_args.max_invalid_share)
    holdout = held_out_records(train_count, 0.0 if validation_files else data_args.validation_split_percentage)
    splits = ["train", *(["validation"] if validation_files or holdout.any() else [])]
    max_position = data_args.max_seq_length if trees else None
    writers = {split: SftRowsWriter(staging / split, len(tokenizer), max_position) for split in splits}
    counts = {split: SplitCounts() for split in splits}
    encoder = ConversationEncoder(tokenizer, data_args, end_of_turn_id, trees)
    batches = IterableWrapper(_batches(train_files, validation_files, holdout, data_args, skip))
    workers = data_args.preprocessing_num_workers or 0
    if workers > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker is one core; no threads per worker on top
        node: Any = ParallelMapper(batches, encoder, num_workers=workers, in_order=True, method="process",
                                   max_concurrent=workers)  # fmt: skip
    else:
        node = Mapper(batches, encoder)
    loader = Loader(node)
    progress = Progress(stats["conversations"])
    try:
        for result in loader:
            if result.failure is not None:
                raise result.failure
            for split, rows in result.rows.items():
                writers[split].add(rows)
            for split, split_counts in result.counts.items():
                counts[split].add(split_counts)
                progress.advance(split_counts.conversations)
    finally:
        del loader, node  # stop the workers now, while the interpreter is whole
        gc.collect()
    for writer in writers.values():
        writer.close()
    for split, split_counts in counts.items():
        if split_counts.rows == 0:
            raise DataError(
                f"{'train_files' if split == 'train' else 'validation data'}: no conversation is left to train on "
                f"after the length policy and mask check (dropped: {dict(split_counts.dropped) or 'none'}, "
                f"max_seq_length={data_args.max_seq_length})"
            )
    stats.update(_counts_stats(counts))
    stats.update(check_masks(counts["train"], end_of_turn_id))
    first = SftRows(open_rows(staging / "train")).row(0)
    stats["preview"] = preview(first["input_ids"], first["labels"], tokenizer)
    if packed:
        for split in splits:
            stats[f"{split}_packed_rows"] = pack_split(staging / split, data_args.max_seq_length, VALIDATION_SPLIT_SEED)
    return stats


def _counts_stats(counts: dict[str, SplitCounts]) -> dict[str, Any]:
    """The stats the log and the manifest report: drops summed over the splits, the rest of the train split."""
    train = counts["train"]
    dropped: Counter[str] = Counter()
    for split_counts in counts.values():
        dropped.update(split_counts.dropped)
    return {
        "dropped": dict(dropped),
        "dropped_turns": sum(c.dropped_turns for c in counts.values()),
        "trailing_user_turns_removed": sum(c.trailing_user_turns for c in counts.values()),
        "truncated_samples": sum(c.truncated for c in counts.values()),
        "kept": train.kept,
        "expanded_conversations": train.expanded_conversations,
        "extra_rows": train.extra_rows,
        "extra_tokens": train.extra_tokens,
        "trees": train.trees,
        "tree_rows": train.tree_rows,
        "shared_conversations": train.shared_conversations,
        "tokens_without_sharing": train.tokens_without_sharing,
        "history_removed_share": 1 - train.tokens / train.tokens_without_sharing
        if train.tokens_without_sharing
        else 0.0,
        **{f"{split}_rows": split_counts.rows for split, split_counts in counts.items()},
    }


def _batches(
    train_files: Sequence[Path],
    validation_files: Sequence[Path],
    holdout: np.ndarray,
    data_args: SFTDataArguments,
    skip: bool,
) -> Iterator[ConversationBatch | UserInputError]:
    """The conversations of every file in order, in batches of :data:`ENCODE_BATCH`, each with its split."""
    batch = ConversationBatch()
    system = data_args.default_system_prompt
    try:  # counted by the first pass: the invalid records and unused fields are only skipped here
        streams = [(iter_conversations(train_files, system, InvalidRecords() if skip else None, IgnoredFields()),
                    "train"),
                   (iter_conversations(validation_files, system, InvalidRecords() if skip else None, IgnoredFields()),
                    "validation")]  # fmt: skip
        index = 0
        for stream, split in streams:
            for conversation in stream:
                batch.conversations.append(conversation)
                if split == "train":
                    batch.splits.append("validation" if holdout[index] else "train")
                    index += 1
                else:
                    batch.splits.append(split)
                if len(batch.conversations) == ENCODE_BATCH:
                    yield batch
                    batch = ConversationBatch()
    except UserInputError as error:  # a file changed between the passes
        yield error
        return
    if batch.conversations:
        yield batch


class Progress:
    """Logs the conversations encoded so far, and their rate, at most every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = self.last = time.monotonic()

    def advance(self, conversations: int) -> None:
        self.done += conversations
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            logger.info(
                "encoded %d of %d conversations (%.0f%%, %.0f conversations/s)",
                self.done, self.total, 100 * self.done / max(1, self.total), self.done / (now - self.started),
            )  # fmt: skip


def check_masks(counts: SplitCounts, end_of_turn_id: int) -> dict[str, Any]:
    """Refuse to train on masks that cannot be right; return token counts for the log.

    Errors: no supervised token at all, or the end-of-turn token never supervised (the model
    would never learn to stop).

    >>> check_masks(SplitCounts(tokens=10, supervised_tokens=4, end_of_turn_supervised=1), 7)
    {'tokens': 10, 'supervised_tokens': 4, 'supervised_share': 0.4}
    """
    if not counts.supervised_tokens:
        raise DataError("train_files: no token is supervised (no assistant content survived encoding)")
    if not counts.end_of_turn_supervised:
        raise DataError("end_of_turn_token: the end-of-turn token is never supervised; the model would not stop")
    return {
        "tokens": counts.tokens,
        "supervised_tokens": counts.supervised_tokens,
        "supervised_share": counts.supervised_tokens / counts.tokens,
    }


ROW_SHAPING_MODULES = (conversations, chat_masks, fitting, prefix_tree, sft_rows)


def _row_shaping_code() -> tuple[Any, ...]:
    return (ConversationEncoder, held_out_records, build_sft_rows, _batches)


def sft_code_version() -> str:
    """Hash of the code that turns conversations into rows: rows built by other code are rebuilt, never reused.

    Whole modules where every line shapes a row (reading records, rendering and masks, fitting, prefix
    trees, the row store), and the parts of this module that encode, split and pack.
    """
    sources = [inspect.getsource(part) for part in (*ROW_SHAPING_MODULES, *_row_shaping_code())]
    return cache_key({"source": "".join(sources)})
