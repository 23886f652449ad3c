"""Fitting a conversation into max_seq_length: the fast path gives exactly the reference loop's result.

:func:`llmtrain.data.fitting.fit_conversation` searches for the number of oldest turns to drop;
:func:`llmtrain.data.fitting._fit_conversation_reference` is the plain loop it replaced (encode after
dropping 0, 1, 2, ... turns). Property test: random conversations (1-40 turns, 1-24 under the
official Qwen3 templates, where the reference is slowest; empty-ish to very long answers, with or
without a system prompt, reasoning in ``reasoning_content`` or inline ``<think>``, trailing
questions) under every template at hand, at lengths that keep every turn, drop some, or drop the
conversation, under the three strategies and ``train_on_last_turn_only``. The outcome, rows or the
error raised, must be identical. Seeded, so a failure names a case that reproduces.

Templates: the tiny ChatML and tiny think templates (hermetic); the real Qwen2.5 tokenizer, Qwen3's
official template and the Qwen3.5 think / no-think templates when ``../shared`` has them.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data import fitting
from llmtrain.data.chat_masks import encode_conversation, render
from llmtrain.data.conversations import Message
from llmtrain.data.fitting import _fit_conversation_reference, fit_conversation, smallest_fitting
from llmtrain.paths import PROJECT_ROOT, TINY_MODEL_DIR, TINY_THINK_TEMPLATE

SHARED = PROJECT_ROOT.parent / "shared"
SHARED_QWEN25 = SHARED / "qwen2.5-tokenizer"
SHARED_QWEN3 = SHARED / "qwen3-tokenizer"
# template -> (tokenizer folder, template file or None for the tokenizer's own, whether it renders reasoning)
TEMPLATES: dict[str, tuple[Path, Path | None, bool]] = {
    "tiny-chatml": (TINY_MODEL_DIR, None, False),
    "tiny-think": (TINY_MODEL_DIR, TINY_THINK_TEMPLATE, True),
    "qwen2.5": (SHARED_QWEN25, None, False),
    "qwen3": (SHARED_QWEN3, None, True),
    "qwen3.5-think": (SHARED_QWEN3, SHARED_QWEN3 / "templates" / "qwen3_5_think.jinja", True),
    "qwen3.5-nothink": (SHARED_QWEN3, SHARED_QWEN3 / "templates" / "qwen3_5_nothink.jinja", True),
}
CASES = {"tiny-chatml": 40, "tiny-think": 16, "qwen2.5": 20, "qwen3": 12, "qwen3.5-think": 12, "qwen3.5-nothink": 16}
# The reference loop under the official Qwen3 templates costs ~turns^3 renders (seconds at 40 turns):
# fewer turns there, so that this file stays a few seconds. Longer sweeps: raise CASES and MOST_TURNS.
MOST_TURNS = {"qwen3": 24, "qwen3.5-think": 24, "qwen3.5-nothink": 24}
# enable_thinking, drawn per conversation (None: unset); the no-think template refuses reasoning unless it is on.
THINKING = {"qwen3": (None, None, True, False), "qwen3.5-think": (None, None, True, False),
            "qwen3.5-nothink": (True, True, None, False)}  # fmt: skip
SEED = 20261207
WORDS = ("the", "model", "answers", "a", "question", "about", "tokens", "and", "turns", "你好", "世界", "😀", "x=1;",
         "\n", "\n\n", "  ", "--", "é", "<tag>", "{json: 1}")  # fmt: skip


@functools.cache
def loaded(folder: Path) -> tuple[PreTrainedTokenizerBase, str | None]:
    """A tokenizer (the real ones take ~0.6 s to load: once per folder) and its own chat template."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer, tokenizer.chat_template


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The template's tokenizer, with that template set (the tests run one at a time)."""
    folder, template, _ = TEMPLATES[name]
    if not folder.is_dir() or (template is not None and not template.is_file()):
        pytest.skip(f"{folder if not folder.is_dir() else template} absent (../shared is optional)")
    tokenizer, own_template = loaded(folder)
    tokenizer.chat_template = template.read_text(encoding="utf-8") if template else own_template
    return tokenizer


def text(rng: random.Random, long_words: int, long_weight: int = 1) -> str:
    """Empty-ish, short, medium or long text (``long_weight`` in 12 of the draws)."""
    sizes = [0, rng.randint(1, 6), rng.randint(10, 40), rng.randint(long_words // 3, long_words)]
    size = rng.choices(sizes, [1, 6, 5 - long_weight, long_weight])[0]
    if size == 0:
        return rng.choice(["", " ", "\n", "."])
    return " ".join(rng.choice(WORDS) for _ in range(size))


def conversation(rng: random.Random, reasoning: bool, most_turns: int = 40) -> list[Message]:
    """A random conversation; answers may carry reasoning (field or inline) where the template renders it.

    Long conversations get shorter long answers: the reference loop costs turns x tokens x rows.
    """
    turns = rng.choices([rng.randint(1, 4), rng.randint(5, 12), rng.randint(13, most_turns)], [6, 5, 1])[0]
    long_words = 200 if turns <= 12 else 50
    messages: list[Message] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": text(rng, long_words) or "Be brief."})
    for _ in range(turns):
        messages.append({"role": "user", "content": text(rng, long_words)})
        answer: Message = {"role": "assistant", "content": text(rng, long_words)}
        # Reasoning under a template that drops it is an error both paths must raise alike: rarely.
        if rng.random() < (0.3 if reasoning else 0.03):
            if rng.random() < 0.5:
                answer["reasoning_content"] = text(rng, long_words, long_weight=3)
            else:
                answer["content"] = f"<think>\n{text(rng, long_words, long_weight=3)}\n</think>\n\n{answer['content']}"
        messages.append(answer)
    messages += [{"role": "user", "content": text(rng, long_words)} for _ in range(rng.choice([0, 0, 0, 1, 2]))]
    return messages


@functools.cache
def data_args(
    max_seq_length: int, strategy: str, last_turn_only: bool, thinking: bool | None = None
) -> SFTDataArguments:
    return SFTDataArguments(
        train_files=["unused.jsonl"],
        max_seq_length=max_seq_length,
        truncation_strategy=strategy,
        train_on_last_turn_only=last_turn_only,
        chat_template_kwargs=None if thinking is None else {"enable_thinking": thinking},
    )


def outcome(fit: Any, messages: list[Message], tokenizer: PreTrainedTokenizerBase, args: SFTDataArguments) -> Any:
    """The result, or the error raised (type and message)."""
    try:
        return fit(messages, tokenizer, args, "f.jsonl:3")
    except Exception as error:
        return type(error).__name__, str(error)


def lengths_to_try(
    rng: random.Random, messages: list[Message], tokenizer: PreTrainedTokenizerBase, thinking: bool | None
) -> list[int]:
    """Three lengths around the rows' (the longest, the whole conversation's) and the last turn's alone.

    Just under the longest row where that is an earlier answer's own row (a template that rewrites
    history): the rare case where the whole conversation's row fits and another does not.
    """
    unlimited = data_args(10**6, "drop_oldest_turns", False, thinking)
    try:
        rows = _fit_conversation_reference(messages, tokenizer, unlimited, "lengths")["rows"]
    except Exception:
        return [64]  # a template or record error: any length shows it
    if not rows:
        return [64]
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    users = [i for i, message in enumerate(messages[: answers[-1]]) if message["role"] == "user"]
    system = messages[:1] if messages[0]["role"] == "system" else []
    newest = [*system, *messages[users[-1] if users else 0 : answers[-1] + 1]]
    tail = len(tokenizer(render(tokenizer, newest, template_kwargs=unlimited.template_kwargs))["input_ids"])
    whole, longest = len(rows[-1]["input_ids"]), max(len(row["input_ids"]) for row in rows)
    candidates = [8, whole, whole - 1, whole + 50, tail, tail - 1, rng.randint(8, whole)]
    own_row_binds = longest - rng.choice([1, rng.randint(1, 40)]) if longest > whole else rng.choice(candidates)
    return sorted({max(8, length) for length in [*rng.sample(candidates, 2), own_row_binds]})


def compare_on_random_conversations(name: str, cases: int, seed: str) -> set[str]:
    """Fit ``cases`` random conversations both ways under template ``name``; assert equal; the outcomes seen."""
    tokenizer = load_tokenizer(name)
    rng = random.Random(seed)
    kinds = set()
    for case in range(cases):
        messages = conversation(rng, TEMPLATES[name][2], MOST_TURNS.get(name, 40))
        thinking = rng.choice(THINKING.get(name, (None,)))
        for max_seq_length in lengths_to_try(rng, messages, tokenizer, thinking):
            strategy = rng.choices(["drop_oldest_turns", "drop", "error"], [6, 1, 1])[0]
            args = data_args(max_seq_length, strategy, rng.random() < 0.2, thinking)
            expected = outcome(_fit_conversation_reference, messages, tokenizer, args)
            got = outcome(fit_conversation, messages, tokenizer, args)
            assert got == expected, (
                f"{name} {seed} case {case}: max_seq_length={max_seq_length} {strategy} "
                f"last_turn_only={args.train_on_last_turn_only} thinking={thinking}\n{messages}"
            )
            if not isinstance(expected, dict):
                kinds.add(expected[0])  # the error's type
            elif expected["rows"]:
                kinds.add("trimmed" if expected["dropped_turns"] else "kept")
            else:
                kinds.add(expected["drop_reason"])
    return kinds


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_fast_fitting_equals_the_reference_on_random_conversations(name: str) -> None:
    kinds = compare_on_random_conversations(name, CASES[name], f"{SEED}-{name}")
    # The generator reaches every outcome: nothing dropped, some turns dropped, the conversation dropped.
    assert {"kept", "trimmed", "too_long"} <= kinds, kinds


@pytest.mark.parametrize("chars_per_token", [1, 10**6], ids=["guess-drops-too-many", "guess-keeps-too-many"])
def test_where_the_search_starts_changes_no_result(chars_per_token: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first guess at the turns to drop (from the messages' lengths) is a matter of time only."""
    monkeypatch.setattr(fitting, "CHARS_PER_TOKEN_GUESS", chars_per_token)
    for name in ("tiny-chatml", "tiny-think"):
        assert "trimmed" in compare_on_random_conversations(name, 6, f"{SEED}-{name}-guess")


@pytest.mark.parametrize("name", [name for name, (_, _, rewrites_history) in TEMPLATES.items() if rewrites_history])
def test_own_rows_bind_under_a_history_rewriting_template(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier answer's own row (with its long think block) is what forces turns out: the rare path, every length."""
    tokenizer = load_tokenizer(name)
    own_rows_bound: list[int] = []
    guess = fitting._KeptTurns.guess_past_own_rows

    def counted_guess(kept: fitting._KeptTurns, dropped: int) -> int:
        own_rows_bound.append(dropped)
        return guess(kept, dropped)

    monkeypatch.setattr(fitting._KeptTurns, "guess_past_own_rows", counted_guess)
    messages: list[Message] = [{"role": "system", "content": "Be brief."}]
    for turn in range(8):
        messages.append({"role": "user", "content": f"question {turn}"})
        reasoning = "why " * (150 if turn in (2, 5) else 2)  # shows only in the answer's own row, not in the whole
        messages.append({"role": "assistant", "content": f"answer {turn}", "reasoning_content": reasoning})
    thinking = True if name == "qwen3.5-nothink" else None  # its default generation prompt closes the think block
    rows = fit_conversation(messages, tokenizer, data_args(10**6, "drop_oldest_turns", False, thinking), "f:1")["rows"]
    longest, whole = max(len(row["input_ids"]) for row in rows), len(rows[-1]["input_ids"])
    assert longest > whole
    dropped = set()
    for max_seq_length in [*range(8, longest, 29), longest]:
        args = data_args(max_seq_length, "drop_oldest_turns", False, thinking)
        fitted = fit_conversation(messages, tokenizer, args, "f:1")
        assert fitted == _fit_conversation_reference(messages, tokenizer, args, "f:1"), max_seq_length
        dropped.add(fitted["dropped_turns"])
    assert own_rows_bound and 0 in dropped and len(dropped) >= 4, (own_rows_bound, dropped)


def test_a_long_conversation_costs_about_one_encode_however_many_turns_go(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The issue's stall (the reference loop re-encodes the rest once per dropped turn: here ~290 times)."""
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "word " * 20} for i in range(600)
    ]
    args = data_args(256, "drop_oldest_turns", False)
    start = time.perf_counter()
    fitted = fit_conversation(messages, tiny_tokenizer, args, "f:1")
    fitting = time.perf_counter() - start
    start = time.perf_counter()
    encode_conversation(messages, tiny_tokenizer, args.end_of_turn_token)
    one_encode = time.perf_counter() - start
    assert fitted["drop_reason"] == "" and fitted["dropped_turns"] > 290
    assert fitting < 3 * one_encode + 0.5, f"fitting {fitting:.2f} s, one encode of the whole {one_encode:.2f} s"


def test_smallest_fitting_finds_the_boundary_from_any_guess_probing_each_k_once() -> None:
    for high in range(1, 24):
        for boundary in range(1, high + 2):
            for guess in (None, 1, boundary, high):
                probes: list[int] = []

                def fits(k: int, boundary: int = boundary, probes: list[int] = probes) -> bool:
                    probes.append(k)
                    return k >= boundary

                found = smallest_fitting(1, high, fits, guess)
                assert found == (boundary if boundary <= high else None), (high, boundary, guess)
                assert len(probes) == len(set(probes)), probes
