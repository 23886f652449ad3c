"""The length policy and packing of SFT rows: what of a conversation fits ``max_seq_length``, and rows of several.

:func:`fit_conversation` encodes a conversation (:mod:`llmtrain.data.chat_masks`) under
``truncation_strategy``: it never cuts inside a message; ``drop_oldest_turns`` removes whole turns
from the front (the system prompt stays) until every row fits. :func:`pack_rows` groups encoded
rows into packed rows of at most ``max_seq_length`` tokens, next-fit in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation
from llmtrain.data.conversations import Message, template_messages
from llmtrain.errors import DataError
from llmtrain.loss import IGNORE_INDEX

DROP_TOO_LONG = "too_long"
DROP_NO_SUPERVISED = "no_supervised_tokens"


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
