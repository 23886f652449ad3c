"""SFT data: conversations -> chat-template tokens with -100 on every non-assistant position.

Contract of one encoded conversation (ChatML shown; any template works)::

    text:   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
    labels: -100 ...............................................  Hello!<|im_end|>  -100

The whole conversation is rendered with the tokenizer's own chat template and tokenized in one
call, so training sees exactly the tokens inference will see. A template that renders an earlier
answer differently once it is history (Qwen3 drops its think block) gives that answer a row of its
own, rendered as inference renders it (:func:`supervised_char_spans`). A token is supervised iff its
characters overlap an assistant message's content or the end-of-turn marker that closes it.
Assistant spans are derived from the template itself by rendering prefixes: the generation
prompt for turn *i* (messages before *i* + ``add_generation_prompt``) ends where the answer
starts, so no ``{% generation %}`` tags are needed. A token that straddles the boundary (Qwen's
BPE merges the header's newline with an answer's leading newline) overlaps the answer and is
supervised.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
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
from llmtrain.data.collate import SEQUENCE_LAYOUT_KEY, SequenceLayout
from llmtrain.data.conversations import REASONING_KEY, Message, read_conversation_files, template_messages
from llmtrain.data.files import VALIDATION_SPLIT_SEED, train_validation_splits
from llmtrain.data.pretrain import tokenizer_fingerprint
from llmtrain.errors import ConfigError, DataError, InvalidRecord
from llmtrain.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

DROP_TOO_LONG = "too_long"
DROP_NO_SUPERVISED = "no_supervised_tokens"
PREVIEW_OPEN, PREVIEW_CLOSE = "[[", "]]"
INVALID_LOCATIONS_SHOWN = 5  # first bad records named in the log and the manifest


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    generation_prompt: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The tokenizer's chat template applied to ``messages``, as text; ``template_kwargs`` reach the template."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **(template_kwargs or {})
    )
    assert isinstance(text, str)
    return text


def drop_trailing_user_turns(messages: Sequence[Message]) -> tuple[list[Message], int]:
    """``messages`` without the user messages after the last answer, and how many were removed.

    A trailing question has no answer to learn; kept, it would only be dead context (and could make
    ``drop_oldest_turns`` drop a conversation whose last answered pair fits).

    >>> kept, removed = drop_trailing_user_turns([{"role": "user", "content": "a"},
    ...     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    >>> [m["content"] for m in kept], removed
    (['a', 'b'], 1)
    """
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "user":
        end -= 1
    return list(messages[:end]), len(messages) - end


def first_difference(first: str, second: str, context: int = 24) -> str:
    """Where two renderings part, each shown around the first differing character.

    >>> first_difference("<a>Hi<b>", "<a>Ho<b>", context=3)
    "at character 4: 'a>Hi<b' vs 'a>Ho<b'"
    """
    index = next(
        (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), min(len(first), len(second))
    )
    window = slice(max(0, index - context), index + context)
    return f"at character {index}: {first[window]!r} vs {second[window]!r}"


def supervised_char_spans(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    end_of_turn: str,
    last_turn_only: bool = False,
    source: str = "",
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Render ``messages`` into training rows: each row's text and the character spans it supervises.

    Assistant turn *i* is trained in the context inference gives it: ``render(messages[:i],
    add_generation_prompt=True)``, then supervised through the end-of-turn marker of
    ``render(messages[:i+1])`` (the newline after the marker is not included). Where the template
    renders turn *i* in the whole conversation exactly as it does as the last turn (ChatML, Qwen2.5:
    prefix-stable), the turn is supervised inside the one row of the whole conversation. Where it
    does not (Qwen3 renders an earlier answer without its think block once it is history), turn *i*
    gets a row of its own, ``render(messages[:i+1])`` up to its marker, and is supervised there only.
    Rows for such earlier turns come first; the whole conversation's row, which holds the last turn,
    comes last. No turn is supervised twice and none is lost.

    An answer's ``reasoning_content`` must be rendered inside its supervised span (Qwen3's
    templates put it in a think block); a template that drops it raises :class:`DataError` naming
    ``source`` instead of training on an answer without its reasoning.

    Raises :class:`ConfigError` when a turn's rendering does not continue its own generation
    prompt (naming ``source``, the conversation's file:line, and the first difference) or closes a
    turn without ``end_of_turn``. ``template_kwargs`` (e.g. ``enable_thinking``) reach every render.

    >>> from llmtrain.paths import TINY_MODEL_DIR
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    >>> rows = supervised_char_spans(
    ...     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tok, "<|im_end|>")
    >>> [[text[start:end] for start, end in spans] for text, spans in rows]
    [['Yo<|im_end|>']]
    """
    text = render(tokenizer, messages, template_kwargs=template_kwargs)
    where = f"{source}: " if source else ""
    shared: list[tuple[int, int]] = []
    own_rows: list[tuple[str, list[tuple[int, int]]]] = []
    assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    for index in assistant_turns[-1:] if last_turn_only else assistant_turns:
        prompt = render(tokenizer, messages[:index], generation_prompt=True, template_kwargs=template_kwargs)
        through_turn = render(tokenizer, messages[: index + 1], template_kwargs=template_kwargs)
        reasoning = (messages[index].get(REASONING_KEY) or "").strip()
        if not through_turn.startswith(prompt):
            hint = (
                f"; the turn has {REASONING_KEY} but the generation prompt closes the think block (is thinking "
                "turned off in chat_template_kwargs?)"
                if reasoning
                else ""
            )
            raise ConfigError(
                f"tokenizer_name_or_path: {where}the chat template renders assistant turn {index} so that its "
                "generation prompt is not a prefix of it; training and inference would see different tokens "
                f"(generation prompt vs the rendered turn, {first_difference(prompt, through_turn)}){hint}"
            )
        marker = through_turn.rfind(end_of_turn, len(prompt))
        if marker < 0:
            raise ConfigError(f"end_of_turn_token: the chat template closes assistant turns without {end_of_turn!r}")
        end = marker + len(end_of_turn)
        if reasoning and reasoning not in through_turn[len(prompt) : end]:
            raise DataError(
                f"{where}assistant turn {index} has {REASONING_KEY}, but the chat template does not render it "
                "in the answer, so it would be dropped without a word; use a template that renders reasoning "
                "(Qwen3's), or put the reasoning into the content"
            )
        if text.startswith(through_turn[:end]):
            shared.append((len(prompt), end))
        else:
            own_rows.append((through_turn[:end], [(len(prompt), end)]))
    return [*own_rows, (text, shared)] if shared or not own_rows else own_rows


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Label each token with its id if its characters overlap a span, else -100.

    >>> labels_from_spans([10, 11, 12, 13], [(0, 3), (3, 5), (5, 9), (9, 10)], [(4, 9)])
    [-100, 11, 12, -100]
    """
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    supervised = np.zeros(len(offsets), dtype=bool)
    for span_start, span_end in spans:
        supervised |= (starts < span_end) & (ends > span_start) & (ends > starts)
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.where(supervised, ids, IGNORE_INDEX).tolist()


def encode_conversation(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    end_of_turn: str,
    last_turn_only: bool = False,
    source: str = "",
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, list[int]]]:
    """Each training row of the conversation (:func:`supervised_char_spans`), tokenized in one call with its labels.

    One row for a prefix-stable template (see module docstring); under a template that renders
    history differently (Qwen3), one more row for each earlier assistant turn.
    """
    rows = []
    spans_per_row = supervised_char_spans(messages, tokenizer, end_of_turn, last_turn_only, source, template_kwargs)
    for text, spans in spans_per_row:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        input_ids = list(encoding["input_ids"])
        rows.append({"input_ids": input_ids, "labels": labels_from_spans(input_ids, encoding["offset_mapping"], spans)})
    return rows


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Split into the leading system messages and turns (each starts at a user message).

    >>> system, turns = split_turns([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
    ...     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    >>> len(system), [[m["content"] for m in t] for t in turns]
    (1, [['a', 'b'], ['c']])
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns: list[list[Message]] = []
    for message in messages[len(system) :]:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return system, turns


def fit_conversation(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    data_args: SFTDataArguments,
    source: str,
) -> dict[str, Any]:
    """Encode one conversation under the length policy; never cuts inside a message.

    Returns ``rows`` (see :func:`encode_conversation`), ``dropped_turns``, ``trailing_user_turns``
    (user messages after the last answer, removed first) and ``drop_reason`` ("" when kept). Every
    row must fit ``max_seq_length``: ``drop_oldest_turns`` removes whole turns from the front (the
    system prompt stays) until they do; ``drop`` drops the sample; ``error`` raises
    :class:`DataError` naming ``source``.
    """
    answered, trailing_user_turns = drop_trailing_user_turns(template_messages(messages))
    if not any(message["role"] == "assistant" for message in answered):
        return {"rows": [], "dropped_turns": 0, "trailing_user_turns": 0, "drop_reason": DROP_NO_SUPERVISED}
    system, turns = split_turns(answered)
    dropped_turns = 0
    while True:
        kept = [*system, *(m for turn in turns[dropped_turns:] for m in turn)]
        rows = encode_conversation(
            kept,
            tokenizer,
            data_args.end_of_turn_token,
            data_args.train_on_last_turn_only,
            source,
            data_args.template_kwargs,
        )
        longest = max(len(row["input_ids"]) for row in rows)
        if longest <= data_args.max_seq_length:
            break
        if data_args.truncation_strategy == "error":
            raise DataError(
                f"{source}: {longest} tokens exceed max_seq_length={data_args.max_seq_length} "
                "(truncation_strategy: error)"
            )
        if data_args.truncation_strategy == "drop" or dropped_turns + 1 >= len(turns):
            return {
                "rows": [],
                "dropped_turns": dropped_turns,
                "trailing_user_turns": trailing_user_turns,
                "drop_reason": DROP_TOO_LONG,
            }
        dropped_turns += 1
    supervised = any(label != IGNORE_INDEX for row in rows for label in row["labels"])
    return {
        "rows": rows,
        "dropped_turns": dropped_turns,
        "trailing_user_turns": trailing_user_turns,
        "drop_reason": "" if supervised else DROP_NO_SUPERVISED,
    }


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows whose total length stays within ``max_length`` (next-fit, in order).

    >>> pack_rows([3, 4, 2, 5, 1], max_length=6)
    [[0], [1, 2], [3, 4]]
    """
    rows: list[list[int]] = []
    room = 0
    for index, length in enumerate(lengths):
        if not rows or length > room:
            rows.append([])
            room = max_length
        rows[-1].append(index)
        room -= length
    return rows


def pack_batch(batch: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """``datasets.map`` function: encoded conversations -> packed rows with restarting position ids."""
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in pack_rows([len(ids) for ids in batch["input_ids"]], max_length):
        packed["input_ids"].append([t for i in row for t in batch["input_ids"][i]])
        packed["labels"].append([t for i in row for t in batch["labels"][i]])
        packed["position_ids"].append([p for i in row for p in range(len(batch["input_ids"][i]))])
    return packed


def preview(input_ids: Sequence[int], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """Decode a sample with its supervised runs wrapped in ``[[ ]]``.

    >>> from llmtrain.paths import TINY_MODEL_DIR
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    >>> ids = tok("ab", add_special_tokens=False)["input_ids"]
    >>> preview(ids + ids, [-100] * len(ids) + ids, tok)
    'ab[[ab]]'
    """
    pieces: list[str] = []
    run: list[int] = []
    supervised = False
    for token, label in [*zip(input_ids, labels, strict=True), (None, IGNORE_INDEX)]:
        now = label != IGNORE_INDEX
        if now != supervised and run:
            text = str(tokenizer.decode(run))
            pieces.append(f"{PREVIEW_OPEN}{text}{PREVIEW_CLOSE}" if supervised else text)
            run = []
        supervised = now
        if token is not None:
            run.append(token)
    return "".join(pieces)


def template_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer plus its chat template (both shape the encoded tokens)."""
    return cache_key({"tokenizer": tokenizer_fingerprint(tokenizer), "template": tokenizer.chat_template})


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, end_of_turn: str) -> int:
    """The end-of-turn token's id; a clear error when the tokenizer cannot do chat SFT."""
    if not tokenizer.chat_template:
        raise ConfigError("tokenizer_name_or_path: the tokenizer has no chat template")
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"end_of_turn_token: {end_of_turn!r} is not a single token of this tokenizer")
    return int(ids[0])


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
