"""SFT preparation cost at a short vs a long ``max_seq_length``: fitting multi-turn conversations (issue 23).

    python -m bench.sft_fitting [--conversations 150] [--repeats 3] [--tokenizer DIR] [--data FILE]

``fit_conversation`` (fitting + encoding: every row a conversation trains on, under
``truncation_strategy: drop_oldest_turns``) over one set of multi-turn conversations at
``max_seq_length`` 512 (the shipped tiny config's value: most conversations lose their oldest turns)
and 40960 (nothing is dropped). Four sides, interleaved conversation by conversation: **after**
(``fit_conversation``, the search of :mod:`llmtrain.data.fitting`) and **before**
(``_fit_conversation_reference``, the loop it replaced: one full encode per dropped turn), each at
both lengths. A side's time is the sum over conversations of its median of ``--repeats``; the
before side at 512 runs once per conversation (it is the slow one). Every conversation's result is
compared between before and after at both lengths: the run fails on any difference.

Headline: after, time at 512 / time at 40960 (target <= 1.5: dropping turns may cost at most half
again what encoding everything costs; the loop it replaced read ~16x on real data).

Conversations: by default chained from the demo set's question-answer pairs
(``llmtrain/assets/demo/sft_conversations.jsonl``): 2-80 turns (lognormal, median 12), an answer
one to three demo answers long, a third with the demo system prompt; seeded. ``--data FILE`` takes
the first ``--conversations`` of a real file instead (any format the training reads);
``--tokenizer DIR`` replaces the tiny tokenizer (e.g. the real Qwen2.5 one).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.common import Result, median, print_result, set_threads
from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.conversations import Message, read_conversation_files
from llmtrain.data.fitting import _fit_conversation_reference, fit_conversation
from llmtrain.demo_conversations import SYSTEM_PROMPT
from llmtrain.paths import DEMO_CONVERSATIONS_PATH, TINY_MODEL_DIR

SHORT, LONG = 512, 40960  # the shipped tiny config's max_seq_length; one that drops nothing
TARGET = 1.5
MEDIAN_TURNS, P90_TURNS, MOST_TURNS = 12, 40, 80
SYSTEM_SHARE = 1 / 3
SEED = 23

Fit = Callable[[list[Message], PreTrainedTokenizerBase, SFTDataArguments, str], dict[str, Any]]


def demo_pairs() -> list[tuple[str, str]]:
    """Every (question, answer) of the demo set, in file order."""
    pairs = []
    for line in DEMO_CONVERSATIONS_PATH.read_text(encoding="utf-8").splitlines():
        turns = [turn for turn in json.loads(line)["conversations"] if turn["from"] != "system"]
        pairs += [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    return pairs


def demo_multi_turn(count: int, seed: int = SEED) -> list[list[Message]]:
    """``count`` multi-turn conversations chained from the demo pairs (see the module docstring)."""
    rng = random.Random(seed)
    pairs = demo_pairs()
    mu = math.log(MEDIAN_TURNS)
    sigma = (math.log(P90_TURNS) - mu) / statistics.NormalDist().inv_cdf(0.9)
    conversations = []
    for _ in range(count):
        turns = min(MOST_TURNS, max(2, round(rng.lognormvariate(mu, sigma))))
        messages: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < SYSTEM_SHARE else []
        for _ in range(turns):
            chosen = rng.sample(pairs, rng.randint(1, 3))
            messages.append({"role": "user", "content": chosen[0][0]})
            messages.append({"role": "assistant", "content": " ".join(answer for _, answer in chosen)})
        conversations.append(messages)
    return conversations


def read_file(path: Path, count: int) -> list[list[Message]]:
    rows = read_conversation_files([path])
    return [rows[i]["messages"] for i in range(min(count, len(rows)))]


def run(
    conversations: int = 150, repeats: int = 3, tokenizer_dir: Path | None = None, data: Path | None = None
) -> Result:
    set_threads()
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(tokenizer_dir or TINY_MODEL_DIR)
    chats = read_file(data, conversations) if data else demo_multi_turn(conversations)
    lengths = {
        length: SFTDataArguments(train_files=["unused.jsonl"], max_seq_length=length) for length in (SHORT, LONG)
    }
    sides: dict[str, tuple[Fit, int, int]] = {  # name -> (fit, max_seq_length, repeats)
        "after_long": (fit_conversation, LONG, repeats),
        "after_short": (fit_conversation, SHORT, repeats),
        "before_long": (_fit_conversation_reference, LONG, repeats),
        "before_short": (_fit_conversation_reference, SHORT, 1),
    }
    seconds = dict.fromkeys(sides, 0.0)
    fit_conversation(chats[0], tokenizer, lengths[SHORT], "warm-up")
    dropped_turns, tokens, kept = [], 0, 0
    for index, messages in enumerate(chats):
        source = f"conversation {index}"
        results: dict[str, dict[str, Any]] = {}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(repeats):
            for name, (fit, length, side_repeats) in sides.items():
                if round_ >= side_repeats:
                    continue
                start = time.perf_counter()
                results[name] = fit(messages, tokenizer, lengths[length], source)
                times[name].append(time.perf_counter() - start)
        for name in sides:
            seconds[name] += median(times[name])
        for when in ("long", "short"):
            if results[f"after_{when}"] != results[f"before_{when}"]:
                raise AssertionError(f"{source}: fit_conversation differs from the reference at max_seq_length {when}")
        dropped_turns.append(results["after_short"]["dropped_turns"])
        kept += not results["after_short"]["drop_reason"]
        tokens += sum(len(row["input_ids"]) for row in results["after_long"]["rows"])
    turns = [sum(message["role"] == "user" for message in messages) for messages in chats]
    ratio = seconds["after_short"] / seconds["after_long"]
    detail = {
        "tokenizer": f"{tokenizer_dir or 'tiny'} ({len(tokenizer)} ids)",
        "data": f"{data} (first {len(chats)} conversations)" if data else f"demo multi-turn, seed {SEED}",
        "conversations": len(chats),
        "turns_median_p90_max": [statistics.median(turns), sorted(turns)[int(0.9 * (len(turns) - 1))], max(turns)],
        "tokens_at_40960": tokens,
        f"kept_at_{SHORT}": kept,
        f"trimmed_at_{SHORT}": sum(1 for dropped in dropped_turns if dropped),
        f"dropped_turns_at_{SHORT}": sum(dropped_turns),
        "identical_before_after": f"{len(chats)}/{len(chats)} at both lengths",
        **{f"{name}_s": round(value, 2) for name, value in seconds.items()},
        "before_ratio_512_over_40960": round(seconds["before_short"] / seconds["before_long"], 2),
        "speedup_at_512": round(seconds["before_short"] / seconds["after_short"], 1),
        "after_over_before_at_40960": round(seconds["after_long"] / seconds["before_long"], 3),
    }
    return Result("SFT preparation time, max_seq_length 512 / 40960", ratio, TARGET, False, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=150, help="conversations prepared per side")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the before side at 512: one)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the tiny tokenizer)")
    parser.add_argument("--data", type=Path, help="real conversation file (default: demo-generated multi-turn)")
    args = parser.parse_args()
    print_result(run(args.conversations, args.repeats, tokenizer_dir=args.tokenizer, data=args.data))


if __name__ == "__main__":
    main()
