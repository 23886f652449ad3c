"""Chat masks: a conversation -> chat-template token ids, with -100 on every position that is not an answer.

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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from llmtrain.data.conversations import REASONING_KEY, Message
from llmtrain.errors import ConfigError, DataError
from llmtrain.loss import IGNORE_INDEX

PREVIEW_OPEN, PREVIEW_CLOSE = "[[", "]]"


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


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase, end_of_turn: str) -> int:
    """The end-of-turn token's id; a clear error when the tokenizer cannot do chat SFT."""
    if not tokenizer.chat_template:
        raise ConfigError("tokenizer_name_or_path: the tokenizer has no chat template")
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"end_of_turn_token: {end_of_turn!r} is not a single token of this tokenizer")
    return int(ids[0])
