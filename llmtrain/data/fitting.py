"""The length policy and packing of SFT rows: what of a conversation fits ``max_seq_length``, and rows of several.

:func:`fit_conversation` encodes a conversation (:mod:`llmtrain.data.chat_masks`) under
``truncation_strategy``: it never cuts inside a message; ``drop_oldest_turns`` removes whole turns
from the front (the system prompt stays) until every row fits, the number of turns found by a
search (:func:`smallest_fitting`) rather than by re-encoding once per dropped turn, with the same
result. :func:`pack_rows` groups encoded rows into packed rows of at most ``max_seq_length``
tokens, next-fit in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation, labels_from_spans, render, supervised_char_spans
from llmtrain.data.conversations import REASONING_KEY, Message, template_messages
from llmtrain.errors import DataError
from llmtrain.loss import IGNORE_INDEX

DROP_TOO_LONG = "too_long"
DROP_NO_SUPERVISED = "no_supervised_tokens"
# Where the search for the turns to drop starts: a message is guessed at one token per 4 characters
# (BPE on English text) plus 5 for its chat-template header and end marker. A wrong guess costs a
# few more probes, never a different result.
CHARS_PER_TOKEN_GUESS = 4
TOKENS_PER_MESSAGE_GUESS = 5


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


def smallest_fitting(low: int, high: int, fits: Callable[[int], bool], guess: int | None = None) -> int | None:
    """The smallest ``k`` in ``[low, high]`` with ``fits(k)``, for ``fits`` false below some ``k`` and true from it.

    None when nothing in the range fits; ``low - 1`` is taken not to fit (the caller has seen it
    fail). The first probe is ``guess`` (default ``high``); from there the probes step away by 1, 2,
    4, ... (down while they fit, up while they do not) until the answer is bracketed, then bisect:
    ``O(log distance)`` probes from a guess, 2 from a right one. Dropping turns, a probe costs about
    what it keeps, so probing from ``high`` (the newest turn alone) up costs a few times what the
    answer keeps. The answer is always the last probe that fitted.

    >>> probes = []
    >>> def fits(k):
    ...     probes.append(k)
    ...     return k >= 37
    >>> smallest_fitting(1, 99, fits), probes
    (37, [99, 98, 96, 92, 84, 68, 36, 52, 44, 40, 38, 37])
    >>> probes.clear()
    >>> smallest_fitting(1, 99, fits, guess=30), probes
    (37, [30, 31, 33, 37, 35, 36])
    >>> smallest_fitting(1, 99, lambda k: True), smallest_fitting(1, 99, lambda k: False), smallest_fitting(3, 2, bool)
    (1, None, None)
    """
    if low > high:
        return None
    good, bad = high + 1, low - 1  # fits(good) (high + 1: none seen yet); not fits(bad)
    probe, step = high if guess is None else min(max(guess, low), high), 1
    while good - bad > 1:
        if fits(probe):
            good = probe
        else:
            bad = probe
        if low <= bad and good <= high:
            probe = (good + bad) // 2
        elif good <= high:
            probe, step = max(good - step, bad + 1), step * 2
        else:
            probe, step = min(bad + step, high), step * 2
    return good if good <= high else None


RowSpans = list[tuple[str, list[tuple[int, int]]]]  # supervised_char_spans: each row's text and supervised spans


class _KeptTurns:
    """``system + turns[k:]`` for the ``k`` that :func:`fit_conversation` tries: rendered, checked, tokenized.

    One per conversation. The whole-conversation rows probed stay tokenized while they fit (only
    rows that fit can be returned), so the answer's full encode reuses the probe that found it; the
    last full encode's texts and spans are kept, so the answer ``k = 0`` reuses the first check.
    """

    def __init__(
        self,
        system: list[Message],
        turns: list[list[Message]],
        tokenizer: PreTrainedTokenizerBase,
        data_args: SFTDataArguments,
        source: str,
    ) -> None:
        self.system, self.turns, self.tokenizer, self.data_args = system, turns, tokenizer, data_args
        self.source = source
        self.limit = data_args.max_seq_length
        self.whole_lengths: dict[int, int] = {}
        self.fitting_encodings: dict[str, Any] = {}
        self.spans: tuple[int, RowSpans] = (-1, [])  # of the last full encode
        self.fitting_rows: list[dict[str, list[int]]] = []  # of the last full encode that fitted
        self.excess = 0  # tokens over the limit of the first row found too long by the last full encode

    def messages(self, dropped: int) -> list[Message]:
        return [*self.system, *(message for turn in self.turns[dropped:] for message in turn)]

    def row_spans(self, dropped: int) -> RowSpans:
        """The rows' texts and supervised spans (:func:`supervised_char_spans`, with every check it makes)."""
        if self.spans[0] != dropped:
            spans = supervised_char_spans(
                self.messages(dropped),
                self.tokenizer,
                self.data_args.end_of_turn_token,
                self.data_args.train_on_last_turn_only,
                self.source,
                self.data_args.template_kwargs,
            )
            self.spans = (dropped, spans)
        return self.spans[1]

    def encoding(self, text: str, keep: bool = False) -> Any:
        """A row's tokenization as :func:`encode_conversation` makes it (ids and offsets).

        ``keep``: remember it for this conversation if it fits (a whole-conversation probe, which the
        answer's full encode then reuses; the rows of earlier answers are not kept, being many).
        """
        if text in self.fitting_encodings:
            return self.fitting_encodings[text]
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if keep and len(encoding["input_ids"]) <= self.limit:
            self.fitting_encodings[text] = encoding
        return encoding

    def whole_length(self, dropped: int) -> int:
        """Tokens in the whole-conversation row: one render and one tokenization (no per-turn renders)."""
        if dropped not in self.whole_lengths:
            if self.spans[0] == dropped:
                text = self.spans[1][-1][0]  # the conversation ends in an answer: its last row is the whole
            else:
                text = render(self.tokenizer, self.messages(dropped), template_kwargs=self.data_args.template_kwargs)
            self.whole_lengths[dropped] = len(self.encoding(text, keep=True)["input_ids"])
        return self.whole_lengths[dropped]

    def whole_fits(self, dropped: int) -> bool:
        return self.whole_length(dropped) <= self.limit

    def guess_whole_fits(self) -> int:
        """A first guess at the smallest ``k`` whose whole-conversation row fits, from the messages' lengths."""

        def tokens(messages: list[Message]) -> float:
            characters = sum(
                len(message.get("content") or "") + len(message.get(REASONING_KEY) or "") for message in messages
            )
            return characters / CHARS_PER_TOKEN_GUESS + TOKENS_PER_MESSAGE_GUESS * len(messages)

        room = self.limit - tokens(self.system)
        dropped = len(self.turns)
        while dropped > 0 and room >= tokens(self.turns[dropped - 1]):
            room -= tokens(self.turns[dropped - 1])
            dropped -= 1
        return min(dropped, len(self.turns) - 1)

    def longest(self, dropped: int) -> int:
        return max(len(self.encoding(text)["input_ids"]) for text, _ in self.row_spans(dropped))

    def fits(self, dropped: int) -> bool:
        """Whether every row fits once ``dropped`` turns are gone: a full encode, as :func:`encode_conversation`.

        Keeps the rows when they fit, else how far the first row found too long is over. The
        whole-conversation row (the last) is looked at first: usually already tokenized by a probe,
        and the longest under a prefix-stable template.
        """
        row_spans = self.row_spans(dropped)
        encodings = []
        for text, _ in reversed(row_spans):
            encodings.append(self.encoding(text))
            length = len(encodings[-1]["input_ids"])
            if len(encodings) == 1:
                self.whole_lengths[dropped] = length
            if length > self.limit:
                self.excess = length - self.limit
                return False
        self.fitting_rows = []
        for (_, spans), encoding in zip(row_spans, reversed(encodings), strict=True):
            input_ids = list(encoding["input_ids"])
            labels = labels_from_spans(input_ids, encoding["offset_mapping"], spans)
            self.fitting_rows.append({"input_ids": input_ids, "labels": labels})
        return True

    def guess_past_own_rows(self, dropped: int) -> int:
        """Where every row should fit, when a row of an earlier answer is too long at ``dropped``.

        Where turns are delimited by special tokens (ChatML, the Qwen templates), dropping a turn
        takes the same tokens off every row that holds it, so that row's excess must come off the
        whole-conversation row too: the guess is the smallest ``k`` whose whole-conversation row is
        that much shorter (else the newest turn alone). Only a guess: the search verifies it.
        """
        target = self.whole_length(dropped) - self.excess
        last = len(self.turns) - 1
        found = smallest_fitting(dropped + 1, last, lambda k: self.whole_length(k) <= target)
        return last if found is None else found


def _fitted(rows: list[dict[str, list[int]]], dropped_turns: int, trailing_user_turns: int) -> dict[str, Any]:
    supervised = any(label != IGNORE_INDEX for row in rows for label in row["labels"])
    return {
        "rows": rows,
        "dropped_turns": dropped_turns,
        "trailing_user_turns": trailing_user_turns,
        "drop_reason": "" if supervised else DROP_NO_SUPERVISED,
    }


def _too_long(dropped_turns: int, trailing_user_turns: int) -> dict[str, Any]:
    return {
        "rows": [],
        "dropped_turns": dropped_turns,
        "trailing_user_turns": trailing_user_turns,
        "drop_reason": DROP_TOO_LONG,
    }


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
    system prompt stays) until they do, and drops the conversation (``too_long``) when even its
    last turn alone does not fit; ``drop`` drops the sample; ``error`` raises :class:`DataError`
    naming ``source``.

    The result is exactly :func:`_fit_conversation_reference`'s, the plain loop that encodes
    ``system + turns[k:]`` for k = 0, 1, 2, ... until every row fits: that loop re-encodes the
    rest for every dropped turn, quadratic in the conversation's length. Here the conversation is
    encoded once, and then only candidates for what is kept, ``O(log turns)`` of them:

    1. The conversation as it is (``k = 0``) goes through every check of
       :func:`supervised_char_spans`, so a template or record error is raised as before. Under
       ``drop``, ``error``, or with one turn, its rows decide, as before.
    2. Under ``drop_oldest_turns``, the smallest ``k`` whose **whole-conversation row** fits is
       searched for (:func:`smallest_fitting`, from a guess made from the messages' lengths; a
       probe is one render and one tokenization of ``system + turns[k:]``, no per-turn renders).
       The conversation ends in an answer, so that row is always one of its rows: no smaller
       ``k`` can fit.
    3. That ``k`` is encoded in full. Under a prefix-stable template (ChatML, Qwen2.5) its one row
       is the probe just made, so it fits: the answer. Under a template that rewrites history
       (Qwen3 gives each earlier answer a row of its own, with its think block) such a row may
       still be too long; then the search goes on with full encodes over the larger ``k``, from a
       guess of how many turns the excess takes (:meth:`_KeptTurns.guess_past_own_rows`).

    Each answer ``k`` was seen not to fit at ``k - 1``; that nothing below it fits rests on a row
    never growing when a turn before it is dropped (``tests/unit/test_sft_fitting.py`` compares
    both paths on random conversations under ChatML, Qwen2.5, Qwen3 and Qwen3.5 templates). A
    conversation that does not end in an answer (a system message after it) takes the reference
    loop: its whole-conversation row need not be a row.

    >>> from llmtrain.paths import TINY_MODEL_DIR
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    >>> chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(100)]
    >>> tight = SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=64)
    >>> fitted = fit_conversation(chat, tok, tight, "chat.jsonl:1")
    >>> fitted["dropped_turns"], fitted["drop_reason"], len(fitted["rows"][0]["input_ids"])
    (47, '', 60)
    >>> tok.decode(fitted["rows"][0]["input_ids"])[:24]
    '<|im_start|>user\\nturn 94'
    >>> fitted == _fit_conversation_reference(chat, tok, tight, "chat.jsonl:1")
    True
    """
    answered, trailing_user_turns = drop_trailing_user_turns(template_messages(messages))
    if not any(message["role"] == "assistant" for message in answered):
        return {"rows": [], "dropped_turns": 0, "trailing_user_turns": 0, "drop_reason": DROP_NO_SUPERVISED}
    if answered[-1]["role"] != "assistant":
        return _fit_conversation_reference(messages, tokenizer, data_args, source)
    system, turns = split_turns(answered)
    kept = _KeptTurns(system, turns, tokenizer, data_args, source)
    last = len(turns) - 1  # the most turns that can go: the newest answered turn stays

    kept.row_spans(0)
    if data_args.truncation_strategy != "drop_oldest_turns" or last == 0:
        if kept.fits(0):
            return _fitted(kept.fitting_rows, 0, trailing_user_turns)
        if data_args.truncation_strategy == "error":
            raise DataError(
                f"{source}: {kept.longest(0)} tokens exceed max_seq_length={data_args.max_seq_length} "
                "(truncation_strategy: error)"
            )
        return _too_long(0, trailing_user_turns)

    first = smallest_fitting(0, last, kept.whole_fits, kept.guess_whole_fits())
    if first is None:
        return _too_long(last, trailing_user_turns)
    if kept.fits(first):
        return _fitted(kept.fitting_rows, first, trailing_user_turns)
    # A row of an earlier answer is too long at `first`, so at every k up to it.
    dropped = smallest_fitting(first + 1, last, kept.fits, kept.guess_past_own_rows(first))
    if dropped is None:
        return _too_long(last, trailing_user_turns)
    return _fitted(kept.fitting_rows, dropped, trailing_user_turns)


def _fit_conversation_reference(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    data_args: SFTDataArguments,
    source: str,
) -> dict[str, Any]:
    """:func:`fit_conversation`'s contract as a plain loop: encode after dropping 0, 1, 2, ... oldest turns.

    Quadratic in the conversation's length (each try re-encodes the rest); kept as the reference the
    tests and ``bench/sft_fitting.py`` compare :func:`fit_conversation` with.
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


def concatenate_rows(rows: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One packed row of ``rows``: their ids and labels back to back, position ids restarting at each row.

    A row's own ``position_ids`` (a prefix tree's depths) are kept; others count 0, 1, 2, ...

    >>> concatenate_rows([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}])
    {'input_ids': [5, 6, 7], 'labels': [-100, 6, 7], 'position_ids': [0, 1, 0]}
    """
    packed: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        packed["input_ids"] += row["input_ids"]
        packed["labels"] += row["labels"]
        packed["position_ids"] += row.get("position_ids") or list(range(len(row["input_ids"])))
    return packed


def pack_batch(batch: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    """Encoded rows (columns ``input_ids``, ``labels``) -> packed rows (:func:`pack_rows`, :func:`concatenate_rows`)."""
    packed: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for group in pack_rows([len(ids) for ids in batch["input_ids"]], max_length):
        row = concatenate_rows([{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in group])
        for key, values in row.items():
            packed[key].append(values)
    return packed
