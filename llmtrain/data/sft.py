"""SFT data preparation: conversation files -> encoded (and packed) rows in the tokenize-once cache, with their stats.

The encoding contract is :mod:`llmtrain.data.chat_masks` (labels -100 outside the answers, every
answer in its inference context); the length policy and packing are :mod:`llmtrain.data.fitting`.
This module reads the files, splits off the validation conversations, encodes them in
``preprocessing_num_workers`` processes, checks the masks, packs, counts what was dropped or
skipped, and stores the result where :mod:`llmtrain.data.cache` keys it.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.cache import (
    PreparedData,
    RawFiles,
    cache_key,
    load_arrow_splits,
    load_or_build,
    locate_prepared_data,
)
from llmtrain.data.chat_masks import (
    check_chat_tokenizer,
    encode_conversation,
    labels_from_spans,
    preview,
    render,
    supervised_char_spans,
)
from llmtrain.data.collate import SEQUENCE_LAYOUT_KEY, SequenceLayout
from llmtrain.data.conversations import read_conversation_files
from llmtrain.data.files import VALIDATION_SPLIT_SEED, train_validation_splits
from llmtrain.data.fitting import drop_trailing_user_turns, fit_conversation, pack_batch
from llmtrain.data.pretrain import tokenizer_fingerprint
from llmtrain.errors import DataError, InvalidRecord
from llmtrain.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

INVALID_LOCATIONS_SHOWN = 5  # first bad records named in the log and the manifest


def template_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer plus its chat template (both shape the encoded tokens)."""
    return cache_key({"tokenizer": tokenizer_fingerprint(tokenizer), "template": tokenizer.chat_template})


def prepare_sft_data(
    data_args: SFTDataArguments, tokenizer: PreTrainedTokenizerBase, layout: SequenceLayout | None = None
) -> PreparedData:
    """Load the encoded SFT dataset for this run, building (and checking) it first if needed.

    ``layout`` (:func:`llmtrain.data.collate.choose_layout`) says whether the rows are packed, and is
    recorded in the metadata (so in the run manifest); without it ``data_args.packing`` decides. A
    model whose mixers cannot be packed here trains a packing run on per-conversation rows.
    """
    end_of_turn_id = check_chat_tokenizer(tokenizer, data_args.end_of_turn_token)
    packed = data_args.packing if layout is None else layout.packed
    compat = {
        "max_seq_length": data_args.max_seq_length,
        "packing": packed,
        "train_on_last_turn_only": data_args.train_on_last_turn_only,
        "truncation_strategy": data_args.truncation_strategy,
        "default_system_prompt": data_args.default_system_prompt,
        "end_of_turn_token": data_args.end_of_turn_token,
        "chat_template_kwargs": data_args.template_kwargs,
        "invalid_records": data_args.invalid_records,
        "max_invalid_share": data_args.max_invalid_share,
        "tokenizer": template_fingerprint(tokenizer),
        "code_version": sft_code_version(),
    }
    location = locate_prepared_data(data_args, compat, "sft", {})

    def build(raw: RawFiles, staging: Path) -> dict[str, Any]:
        splits, stats = _build(data_args, tokenizer, raw.train_files, raw.validation_files, end_of_turn_id, packed)
        splits.save_to_disk(str(staging))
        return stats

    prepared = load_or_build(location, compat, build, load_arrow_splits, "tokenized_path")
    if layout is not None:
        prepared.metadata[SEQUENCE_LAYOUT_KEY] = {"name": layout.name, "reason": layout.reason}
    stats = prepared.metadata["stats"]
    logger.info(
        "SFT data: %d train rows, %d eval rows; %d conversations kept (%d trained in extra rows: %d tokens), "
        "dropped %s, %d truncated (%d turns removed); supervised share %.1f%% (%s)",
        len(prepared.train),
        len(prepared.eval) if prepared.eval is not None else 0,
        stats["kept"],
        stats.get("expanded_conversations", 0),
        stats.get("extra_tokens", 0),
        stats["dropped"],
        stats["truncated_samples"],
        stats["dropped_turns"],
        100 * stats["supervised_share"],
        prepared.path,
    )
    logger.info("encoded sample (supervised spans in [[ ]]):\n%s", stats["preview"])
    if stats.get("invalid_records", {}).get("skipped"):
        logger.warning("%s", describe_invalid_records(stats["invalid_records"]))
    return prepared


def _build(
    data_args: SFTDataArguments,
    tokenizer: PreTrainedTokenizerBase,
    train_files: list[Path],
    validation_files: list[Path],
    end_of_turn_id: int,
    packed: bool,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    skipped: list[InvalidRecord] | None = [] if data_args.invalid_records == "skip" else None
    conversations = read_conversation_files(train_files, data_args.default_system_prompt, skipped)
    validation = (
        read_conversation_files(validation_files, data_args.default_system_prompt, skipped)
        if validation_files
        else None
    )
    splits = train_validation_splits(conversations, validation, data_args.validation_split_percentage, "conversations")

    stats: dict[str, Any] = {"conversations": sum(len(split) for split in splits.values())}
    if skipped is not None:
        stats["invalid_records"] = invalid_record_stats(skipped, stats["conversations"] + len(skipped))
        check_invalid_share(stats["invalid_records"], data_args.max_invalid_share)
    encoded_splits = {}
    for name, split in splits.items():
        encoded = split.map(
            _encode_batch,
            fn_kwargs={"tokenizer": tokenizer, "data_args": data_args},
            batched=True,
            batch_size=100,
            remove_columns=split.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"encode {name} conversations",
        )
        reasons = pc.value_counts(encoded.data.column("drop_reason")).to_pylist()
        dropped = {item["values"]: item["counts"] for item in reasons if item["values"]}
        stats.setdefault("dropped", {})
        for reason, count in dropped.items():
            stats["dropped"][reason] = stats["dropped"].get(reason, 0) + count
        dropped_turns = encoded.data.column("dropped_turns")
        stats["dropped_turns"] = stats.get("dropped_turns", 0) + int(pc.sum(dropped_turns).as_py() or 0)
        trailing = int(pc.sum(encoded.data.column("trailing_user_turns")).as_py() or 0)
        stats["trailing_user_turns_removed"] = stats.get("trailing_user_turns_removed", 0) + trailing
        truncated = pc.sum(pc.and_(pc.greater(dropped_turns, 0), pc.equal(encoded.data.column("drop_reason"), "")))
        stats["truncated_samples"] = stats.get("truncated_samples", 0) + int(truncated.as_py() or 0)
        encoded = encoded.filter(lambda reason: reason == "", input_columns="drop_reason")
        if name == "train":
            stats.update(_expansion_stats(encoded))
        encoded_splits[name] = encoded.remove_columns(
            ["drop_reason", "dropped_turns", "trailing_user_turns", "expanded_rows", "extra_row"]
        )
        if len(encoded_splits[name]) == 0:
            raise DataError(
                f"{'train_files' if name == 'train' else 'validation data'}: no conversation is left to train on "
                f"after the length policy and mask check (dropped: {dropped or 'none'}, "
                f"max_seq_length={data_args.max_seq_length})"
            )
    train = encoded_splits["train"]
    stats.update(check_masks(train, end_of_turn_id))
    stats["preview"] = preview(train[0]["input_ids"], train[0]["labels"], tokenizer)
    if packed:
        for name, split in encoded_splits.items():
            encoded_splits[name] = split.shuffle(seed=VALIDATION_SPLIT_SEED).map(
                pack_batch,
                fn_kwargs={"max_length": data_args.max_seq_length},
                batched=True,
                batch_size=1000,
                remove_columns=split.column_names,
                desc=f"pack {name}",
            )
    return datasets.DatasetDict(encoded_splits), stats


def _encode_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, data_args: SFTDataArguments
) -> dict[str, list[Any]]:
    """``datasets.map`` (batched): conversations -> their training rows, with what the counts need.

    A conversation's first row carries its ``dropped_turns`` and ``expanded_rows`` (rows beyond
    one); ``extra_row`` marks those beyond one. A dropped conversation keeps one empty row, for the counts.
    """
    columns = (
        "input_ids",
        "labels",
        "dropped_turns",
        "trailing_user_turns",
        "drop_reason",
        "expanded_rows",
        "extra_row",
    )
    out: dict[str, list[Any]] = {column: [] for column in columns}
    for messages, source in zip(batch["messages"], batch["source"], strict=True):
        fitted = fit_conversation(messages, tokenizer, data_args, source)
        rows = fitted["rows"] or [{"input_ids": [], "labels": []}]
        for position, row in enumerate(rows):
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
            out["dropped_turns"].append(fitted["dropped_turns"] if position == 0 else 0)
            out["trailing_user_turns"].append(fitted["trailing_user_turns"] if position == 0 else 0)
            out["drop_reason"].append(fitted["drop_reason"])
            out["expanded_rows"].append(len(rows) - 1 if position == 0 else 0)
            out["extra_row"].append(position < len(rows) - 1)
    return out


def _expansion_stats(encoded: datasets.Dataset) -> dict[str, int]:
    """Kept conversations, and what training every turn in its inference context cost (see supervised_char_spans)."""
    extra = encoded.data.column("extra_row")
    lengths = pc.list_value_length(encoded.data.column("input_ids"))
    expanded = pc.sum(pc.greater(encoded.data.column("expanded_rows"), 0)).as_py() or 0
    stats = {
        "kept": len(encoded) - int(pc.sum(extra).as_py() or 0),
        "expanded_conversations": int(expanded),
        "extra_rows": int(pc.sum(encoded.data.column("expanded_rows")).as_py() or 0),
        "extra_tokens": int(pc.sum(pc.filter(lengths, extra)).as_py() or 0),
    }
    if stats["expanded_conversations"]:
        logger.info(
            "%d conversation(s) rendered earlier assistant turns differently as history (the chat template is not "
            "prefix-stable): %d extra row(s), %d extra tokens, so each turn is trained in its inference context",
            stats["expanded_conversations"],
            stats["extra_rows"],
            stats["extra_tokens"],
        )
    return stats


def invalid_record_stats(skipped: Sequence[InvalidRecord], records: int) -> dict[str, Any]:
    """What ``invalid_records: skip`` left out: counts by reason and the first few locations.

    >>> stats = invalid_record_stats([InvalidRecord("a.jsonl:3", "no_content", "turn 2 (gpt) has no content")], 200)
    >>> stats["skipped"], stats["records"], stats["by_reason"], stats["first"]
    (1, 200, {'no_content': 1}, ['a.jsonl:3: turn 2 (gpt) has no content'])
    """
    return {
        "skipped": len(skipped),
        "records": records,
        "share": len(skipped) / records if records else 0.0,
        "by_reason": dict(Counter(invalid.reason for invalid in skipped).most_common()),
        "first": [str(invalid) for invalid in skipped[:INVALID_LOCATIONS_SHOWN]],
    }


def describe_invalid_records(stats: Mapping[str, Any]) -> str:
    """What :func:`invalid_record_stats` counted, for the log: counts first, then the first locations."""
    reasons = ", ".join(f"{reason}: {count}" for reason, count in stats["by_reason"].items())
    first = "".join(f"\n  {location}" for location in stats["first"])
    return (
        f"invalid_records: skip left out {stats['skipped']} of {stats['records']} records "
        f"({100 * stats['share']:.2f}%; {reasons}); the first:{first}"
    )


def check_invalid_share(stats: Mapping[str, Any], max_share: float) -> None:
    """Refuse to build when more than ``max_share`` of the records are invalid (a wrong file, not a few bad lines)."""
    if stats["skipped"] and stats["share"] > max_share:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in stats["by_reason"].items())
        first = "".join(f"\n  {location}" for location in stats["first"])
        raise DataError(
            f"train_files: {stats['skipped']} of {stats['records']} records are invalid "
            f"({100 * stats['share']:.2f}%), more than max_invalid_share={max_share:g} ({reasons}); fix them, or "
            f"raise max_invalid_share if leaving them out is intended; the first:{first}"
        )


def check_masks(encoded: datasets.Dataset, end_of_turn_id: int) -> dict[str, Any]:
    """Refuse to train on masks that cannot be right; return token counts for the log.

    Errors: no supervised token at all, or the end-of-turn token never supervised (the model
    would never learn to stop).
    """
    labels = encoded.data.column("labels").combine_chunks().flatten().to_numpy()
    supervised = labels != IGNORE_INDEX
    if not supervised.any():
        raise DataError("train_files: no token is supervised (no assistant content survived encoding)")
    if not (labels == end_of_turn_id).any():
        raise DataError("end_of_turn_token: the end-of-turn token is never supervised; the model would not stop")
    return {
        "tokens": int(labels.size),
        "supervised_tokens": int(supervised.sum()),
        "supervised_share": float(supervised.mean()),
    }


def sft_code_version() -> str:
    """Hash of the encoding code: a prepared dataset built by other code is rebuilt, never reused."""
    encoding_code = (
        render,
        drop_trailing_user_turns,
        supervised_char_spans,
        labels_from_spans,
        encode_conversation,
        fit_conversation,
        _encode_batch,
    )
    return cache_key({"source": "".join(inspect.getsource(f) for f in (*encoding_code, pack_batch))})
