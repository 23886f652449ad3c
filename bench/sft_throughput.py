"""SFT useful-token throughput: our packed path vs the replaced recipe's pad-everything-to-2048.

    python -m bench.sft_throughput [--samples 64] [--repeats 3] [--tokenizer DIR] [--data FILE]
    python -m bench.sft_throughput --prefix-trees [--samples 48] [--tokenizer DIR] [--data FILE]

Both sides train the same tiny model (the shipped tiny config, positions raised to 2048, vocabulary
``len(tokenizer)``) on the same conversations, one 2048-position micro-batch per optimizer step:

* **ours**: conversations encoded by ``llmtrain.data.chat_masks.encode_conversation`` (labels -100 off the
  assistant turns), packed by ``pack_batch`` into rows of <= 2048 tokens, one row per micro-batch
  collated by ``PackedRowsCollator`` (the sdpa layout: position ids restart per conversation, so
  transformers builds a block-diagonal causal mask; one row has no padding at all), chunked loss;
* **recipe**: every conversation alone, padded to 2048 with the pad id, attention mask, and the pad
  positions labelled with the pad id (the recipe's bug: padding is trained on), standard loss.

Reported: supervised (assistant) tokens per second of each side, their ratio, and each side's
padding share, plus "packing only" (our rows with the model's standard loss) to separate what
packing buys from what the loss buys. The sides alternate step by step (our row i, packing-only
row i, one recipe step), ``--repeats`` rounds; our pass time is the sum of each row's median.
Every recipe step has the same shape (one conversation, 2048 positions) whatever the
conversation, so its time for the N conversations is N x its median step time (a full recipe pass
over N conversations would take minutes on a CPU).

Conversations: by default synthetic one-turn conversations cut from the demo corpus, with the
length mix of 1,000 real BELLE conversations tokenized with the Qwen2.5 tokenizer: median 109
tokens, 90th percentile 261, none over 2048; padded to 2048, 93.2 % of positions are padding and
3.2 % supervised (so ~47 % of a conversation's tokens are supervised). ``--data FILE`` takes the
first ``--samples`` conversations of a real file instead (any format
``llmtrain.data.conversations.read_conversation_files`` reads), encoded by ``fit_conversation``
with ``max_seq_length`` 2048 as training encodes them. ``--tokenizer DIR`` (e.g. the real Qwen2.5
tokenizer, 151,665 ids) replaces the tiny 4,096-id one; the model's output layer grows with it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from bench.common import Result, median, print_result, set_threads, timed
from llmtrain.config.arguments import SFTDataArguments
from llmtrain.data.chat_masks import encode_conversation
from llmtrain.data.collate import PackedRowsCollator, TreeRowsCollator
from llmtrain.data.conversations import read_conversation_files, template_messages
from llmtrain.data.fitting import concatenate_rows, fit_conversation, pack_batch, pack_rows
from llmtrain.data.prefix_tree import PrefixTree, tree_samples
from llmtrain.loss import IGNORE_INDEX, enable_memory_efficient_loss
from llmtrain.metrics import PADDED_POSITIONS
from llmtrain.paths import DEMO_CONVERSATIONS_PATH, DEMO_CORPUS_PATH, TINY_MODEL_DIR, TINY_THINK_TEMPLATE
from llmtrain.tiny_default import IM_END

SEQ_LEN = 2048  # the recipe's fixed padding length, and our packed row length
# BELLE facts (module docstring): lognormal through median 109 and p90 261.
BELLE_MEDIAN, BELLE_P90 = 109, 261
BELLE_PADDED_SUPERVISED_SHARE = 0.032
BELLE_PADDED_PADDING_SHARE = 0.932
SUPERVISED_SHARE = BELLE_PADDED_SUPERVISED_SHARE / (1 - BELLE_PADDED_PADDING_SHARE)  # of a conversation's tokens
MIN_TOKENS = 24
TARGET = 10.0


def belle_like_lengths(count: int, seed: int) -> list[int]:
    """Token lengths from a lognormal through the BELLE median and 90th percentile, clipped to [24, 2048]."""
    rng = random.Random(seed)
    mu = math.log(BELLE_MEDIAN)
    sigma = (math.log(BELLE_P90) - mu) / statistics.NormalDist().inv_cdf(0.9)
    return [min(SEQ_LEN, max(MIN_TOKENS, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def corpus_tokens(tokenizer: PreTrainedTokenizerBase, max_chars: int = 400_000) -> list[int]:
    """A token stream from the demo corpus to cut conversations from (tokenized in pieces)."""
    texts, size = [], 0
    with DEMO_CORPUS_PATH.open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size > max_chars:
                break
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [token for ids in encoded for token in ids]


def template_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the chat template adds to a one-turn conversation: 10 for the tiny tokenizer's ChatML,
    more where the template adds a default system prompt (Qwen2.5's)."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    (row,) = encode_conversation(messages, tokenizer, IM_END)
    return len(row["input_ids"]) - 2


def synthesise(tokenizer: PreTrainedTokenizerBase, count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Encoded one-turn conversations of BELLE-like lengths, ~47 % of each one supervised."""
    stream = corpus_tokens(tokenizer)
    overhead = template_tokens(tokenizer)
    rng = random.Random(seed + 1)
    samples: list[dict[str, list[int]]] = []
    for length in belle_like_lengths(count, seed):
        body = max(2, length - overhead)
        answer = max(1, round(length * SUPERVISED_SHARE) - 1)  # the end-of-turn marker is supervised too
        question = max(1, body - answer)
        start = rng.randrange(0, len(stream) - body - 1)
        messages = [
            {"role": "user", "content": str(tokenizer.decode(stream[start : start + question])).strip() or "?"},
            {
                "role": "assistant",
                "content": str(tokenizer.decode(stream[start + question : start + body])).strip() or "!",
            },
        ]
        samples.extend(
            {k: v[:SEQ_LEN] for k, v in row.items()} for row in encode_conversation(messages, tokenizer, IM_END)
        )
    return samples


def read_samples(path: Path, tokenizer: PreTrainedTokenizerBase, count: int) -> tuple[list[dict[str, list[int]]], int]:
    """The training rows of the first ``count`` conversations of a real file, as training encodes them.

    ``fit_conversation`` with ``max_seq_length`` 2048 and the default length policy (oldest turns
    dropped until the conversation fits); also returns how many conversations that policy dropped.
    """
    data_args = SFTDataArguments(train_files=[str(path)], max_seq_length=SEQ_LEN, end_of_turn_token=IM_END)
    conversations = read_conversation_files([path])
    samples, dropped = [], 0
    for record in conversations.select(range(min(count, len(conversations)))):
        fitted = fit_conversation(record["messages"], tokenizer, data_args, record["source"])
        if fitted["drop_reason"]:
            dropped += 1
        else:
            samples.extend(fitted["rows"])
    return samples, dropped


def tiny_model(vocab_size: int, positions: int = SEQ_LEN) -> Qwen2ForCausalLM:
    """The shipped tiny config with ``positions`` positions (2048) and ``vocab_size`` ids, sdpa, train mode."""
    config = Qwen2Config.from_pretrained(TINY_MODEL_DIR)
    config.max_position_embeddings = positions
    config.vocab_size = vocab_size
    config.use_cache = False
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").train()


def our_batches(samples: list[dict[str, list[int]]], pad_id: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """One packed row per micro-batch in the sdpa layout, and the padded positions (none: a row is the batch)."""
    packed = pack_batch(
        {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}, SEQ_LEN
    )
    collate = PackedRowsCollator(pad_id)
    batches, padded = [], 0
    for i in range(len(packed["input_ids"])):
        batch = collate([{k: packed[k][i] for k in packed}])
        padded += int(batch.pop(PADDED_POSITIONS))  # a count for the token counter, not a model input
        batches.append(batch)
    return batches, padded


def recipe_batches(samples: list[dict[str, list[int]]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for sample in samples:
        length = len(sample["input_ids"])
        input_ids = torch.full((1, SEQ_LEN), pad_id, dtype=torch.long)
        input_ids[0, :length] = torch.tensor(sample["input_ids"])
        labels = torch.full((1, SEQ_LEN), pad_id, dtype=torch.long)  # padding labelled with the pad id: trained on
        labels[0, :length] = torch.tensor(sample["labels"])
        attention_mask = torch.zeros((1, SEQ_LEN), dtype=torch.long)
        attention_mask[0, :length] = 1
        batches.append({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask})
    return batches


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]]) -> None:
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(
    samples: int = 64, repeats: int = 3, seed: int = 0, tokenizer_dir: Path | None = None, data: Path | None = None
) -> Result:
    set_threads()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or TINY_MODEL_DIR)
    dropped = 0
    if data is None:
        conversations = synthesise(tokenizer, samples, seed)
    else:
        conversations, dropped = read_samples(data, tokenizer, samples)
    lengths = [len(s["input_ids"]) for s in conversations]
    supervised = sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in conversations)
    ours, ours_padded = our_batches(conversations, tokenizer.pad_token_id)
    recipe = recipe_batches(conversations, tokenizer.pad_token_id)
    our_model = tiny_model(len(tokenizer))
    recipe_model = copy.deepcopy(our_model)
    packing_only_model = copy.deepcopy(our_model)  # ours with the standard loss: what packing alone buys
    enable_memory_efficient_loss(our_model)
    our_opt = torch.optim.AdamW(our_model.parameters(), lr=1e-4)
    recipe_opt = torch.optim.AdamW(recipe_model.parameters(), lr=1e-4)
    packing_only_opt = torch.optim.AdamW(packing_only_model.parameters(), lr=1e-4)
    train_steps(our_model, our_opt, ours)  # warm-up: every row shape once, allocator, kernels
    train_steps(packing_only_model, packing_only_opt, ours)
    train_steps(recipe_model, recipe_opt, recipe[:1])
    # Step-level interleaving (ours row i, packing-only row i, one recipe step, ...): on a shared box
    # adjacent steps see the same load, whole passes do not.
    ours_steps: list[list[float]] = [[] for _ in ours]
    packing_only_steps: list[list[float]] = [[] for _ in ours]
    recipe_steps: list[float] = []
    for round_index in range(repeats):
        for i, row in enumerate(ours):
            ours_steps[i].append(timed(functools.partial(train_steps, our_model, our_opt, [row])))
            packing_only_steps[i].append(
                timed(functools.partial(train_steps, packing_only_model, packing_only_opt, [row]))
            )
            sample = recipe[(round_index * len(ours) + i) % len(recipe)]
            recipe_steps.append(timed(functools.partial(train_steps, recipe_model, recipe_opt, [sample])))
    ours_seconds = sum(median(times) for times in ours_steps)
    packing_only_seconds = sum(median(times) for times in packing_only_steps)
    recipe_seconds = len(conversations) * median(recipe_steps)
    ours_rate, recipe_rate = supervised / ours_seconds, supervised / recipe_seconds
    positions_padded = len(conversations) * SEQ_LEN
    sorted_lengths = sorted(lengths)
    detail = {
        "tokenizer": f"{tokenizer_dir or 'tiny'} ({len(tokenizer)} ids)",
        "data": f"{data} (first {samples} conversations, {dropped} dropped)" if data else "synthetic",
        "conversations": len(conversations),
        "median_tokens": statistics.median(lengths),
        "p90_tokens": sorted_lengths[int(0.9 * (len(lengths) - 1))],
        "max_tokens": max(lengths),
        "supervised_tokens": supervised,
        "ours_supervised_tokens_per_s": round(ours_rate, 1),
        "recipe_supervised_tokens_per_s": round(recipe_rate, 1),
        "packing_only_supervised_tokens_per_s": round(supervised / packing_only_seconds, 1),
        "packing_only_ratio": round(recipe_seconds / packing_only_seconds, 2),
        "ours_padding_share": round(ours_padded / (ours_padded + sum(lengths)), 4),
        "ours_rows": len(ours),
        "ours_row_fill": round(sum(lengths) / (len(ours) * SEQ_LEN), 3),
        "recipe_padding_share": round(1 - sum(lengths) / positions_padded, 4),
        "recipe_supervised_share": round(supervised / positions_padded, 4),
        "limit_all_positions_real": round(positions_padded / sum(lengths), 2),
        "ours_seconds_per_pass": round(ours_seconds, 2),
        "packing_only_seconds_per_pass": round(packing_only_seconds, 2),
        "recipe_median_step_s": round(median(recipe_steps), 3),
        "recipe_seconds_per_pass": round(recipe_seconds, 1),
    }
    return Result("SFT supervised tokens/s, ours / recipe", ours_rate / recipe_rate, TARGET, True, detail)


# --------------------------------------------------------------------------- prefix trees vs per-turn rows

TREE_TARGETS = {"tokens": 1.25, "speed": 3.0, "memory": 1.3}  # issue 24's targets


def reasoning_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Multi-turn reasoning conversations from the demo set: 6-20 answers, each with a short reasoning trace.

    Questions and answers are the demo conversations' (a sentence each), a trace the first sentence
    of a demo-corpus docstring. Under a template that rewrites history every answer is a row of its
    own carrying all the turns before it, so the rows repeat the history quadratically: here, as on
    the real multi-turn chat file that motivated prefix trees, most tokens of the rows are history.
    """
    with DEMO_CONVERSATIONS_PATH.open(encoding="utf-8") as handle:
        pairs = [
            [turn["value"] for turn in json.loads(line)["conversations"] if turn["from"] != "system"][:2]
            for line in handle
        ]
    with DEMO_CORPUS_PATH.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        messages: list[dict[str, str]] = []
        for _ in range(rng.randint(6, 20)):
            question, answer = rng.choice(pairs)
            reasoning = rng.choice(texts).split(". ")[0]
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer, "reasoning_content": reasoning}]  # fmt: skip
        conversations.append(messages)
    return conversations


def unique_tokens(rows: list[dict[str, list[int]]]) -> int:
    """A conversation's distinct tokens: each token once per distinct context, i.e. one prefix tree of all its rows.

    What the rows would cost if every repeated prefix were computed once; the per-turn rows pay the
    history again in every row, the trees pay it again only where a tree must be split to fit.
    """
    tree = PrefixTree(max_tokens=sum(len(row["input_ids"]) for row in rows))
    for row in rows:
        tree.add(row)
    return len(tree)


def packed_batches(samples: list[dict[str, list[int]]], collate: Any, length: int) -> list[dict[str, torch.Tensor]]:
    """``samples`` packed next-fit into rows of <= ``length`` tokens, one row per micro-batch."""
    batches = []
    for group in pack_rows([len(sample["input_ids"]) for sample in samples], length):
        batch = collate([concatenate_rows([samples[i] for i in group])])
        batch.pop(PADDED_POSITIONS, None)
        batches.append(batch)
    return batches


TREE_SEQ_LEN = 4096  # max_seq_length of the prefix-tree comparison: multi-turn reasoning rows run long


def run_prefix_trees(
    conversations: int = 48, repeats: int = 3, tokenizer_dir: Path | None = None, data: Path | None = None
) -> list[Result]:
    """Per-turn rows vs prefix trees on multi-turn reasoning data: tokens per epoch, supervised tokens/s, memory.

    The template must rewrite history (the tiny think template for the tiny tokenizer; a
    ``--tokenizer`` brings its own, e.g. Qwen3's). Both sides pack into rows of <= SEQ_LEN tokens:
    per-turn rows through ``PackedRowsCollator``, trees through ``TreeRowsCollator``; the same
    supervised tokens each epoch, so speed is epoch time, sides alternating batch by batch.
    """
    from bench.packed_memory import measure as step_peak

    set_threads()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or TINY_MODEL_DIR)
    if tokenizer_dir is None:
        tokenizer.chat_template = TINY_THINK_TEMPLATE.read_text(encoding="utf-8")
    if data is None:
        records = [(messages, "synthetic") for messages in reasoning_conversations(conversations)]
    else:
        rows_of = read_conversation_files([data]).select(range(conversations))
        records = [(template_messages(r["messages"]), r["source"]) for r in rows_of]
    data_args = SFTDataArguments(train_files=[str(DEMO_CONVERSATIONS_PATH)], max_seq_length=TREE_SEQ_LEN)
    rows, trees, unique = [], [], 0
    for messages, source in records:
        fitted = fit_conversation(messages, tokenizer, data_args, source)
        if fitted["drop_reason"]:
            continue
        rows += fitted["rows"]
        trees += tree_samples(fitted["rows"], TREE_SEQ_LEN)
        unique += unique_tokens(fitted["rows"])
    row_tokens, tree_tokens = (sum(len(s["input_ids"]) for s in side) for side in (rows, trees))
    supervised = sum(label != IGNORE_INDEX for s in trees for label in s["labels"])
    row_batches = packed_batches(rows, PackedRowsCollator(tokenizer.pad_token_id), TREE_SEQ_LEN)
    tree_batches = packed_batches(trees, TreeRowsCollator(tokenizer.pad_token_id), TREE_SEQ_LEN)
    models = {side: tiny_model(len(tokenizer), TREE_SEQ_LEN) for side in ("rows", "trees")}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    for model in models.values():
        enable_memory_efficient_loss(model)
    sides = {"rows": row_batches, "trees": tree_batches}
    for name in sides:  # warm-up: each row shape once
        train_steps(models[name], optimizers[name], sides[name])
    seconds: dict[str, list[float]] = {"rows": [], "trees": []}
    for _ in range(repeats):
        for name, batches in sides.items():
            seconds[name].append(timed(functools.partial(train_steps, models[name], optimizers[name], batches)))
    epoch = {name: median(times) for name, times in seconds.items()}
    with tempfile.TemporaryDirectory() as scratch:
        peaks = {}
        for name, batches in sides.items():
            longest = max(batches, key=lambda batch: batch["input_ids"].shape[1])
            path = Path(scratch) / f"{name}.pt"
            torch.save(longest, path)
            peaks[name] = step_peak(path, len(tokenizer))["step_peak_mib"]
    detail = {
        "tokenizer": f"{tokenizer_dir or 'tiny (think template)'} ({len(tokenizer)} ids)",
        "data": str(data) if data else f"synthetic: {conversations} demo reasoning conversations",
        "rows": len(rows), "trees_and_rows": len(trees), "unique_tokens": unique, "row_tokens": row_tokens,
        "tree_tokens": tree_tokens, "rows_per_unique": round(row_tokens / unique, 2),
        "supervised_tokens": supervised,
        "rows_supervised_tokens_per_s": round(supervised / epoch["rows"], 1),
        "trees_supervised_tokens_per_s": round(supervised / epoch["trees"], 1),
        "step_peak_mib": {name: round(peak, 1) for name, peak in peaks.items()},
    }  # fmt: skip
    return [
        Result("Prefix trees: tokens per epoch / unique tokens", tree_tokens / unique, TREE_TARGETS["tokens"], False,
               detail),
        Result("Prefix trees: supervised tokens/s, trees / per-turn rows", epoch["rows"] / epoch["trees"],
               TREE_TARGETS["speed"], True, detail),
        Result("Prefix trees: step peak memory, trees / per-turn rows", peaks["trees"] / peaks["rows"],
               TREE_TARGETS["memory"], False, detail),
    ]  # fmt: skip


@functools.cache
def prefix_tree_results() -> tuple[Result, ...]:
    """:func:`run_prefix_trees` once, for ``python -m bench``'s three rows."""
    return tuple(run_prefix_trees())


def run_tree_tokens() -> Result:
    return prefix_tree_results()[0]


def run_tree_speed() -> Result:
    return prefix_tree_results()[1]


def run_tree_memory() -> Result:
    return prefix_tree_results()[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, help="conversations per pass (default: 64; 48 with --prefix-trees)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the tiny tokenizer)")
    parser.add_argument("--data", type=Path, help="real conversation file (default: synthetic BELLE-like lengths)")
    parser.add_argument(
        "--prefix-trees", action="store_true", help="multi-turn reasoning: prefix trees vs per-turn rows instead"
    )
    args = parser.parse_args()
    if args.prefix_trees:
        for result in run_prefix_trees(args.samples or 48, args.repeats, args.tokenizer, args.data):
            print_result(result)
        return
    result = run(args.samples or 64, args.repeats, tokenizer_dir=args.tokenizer, data=args.data)
    print_result(result)


if __name__ == "__main__":
    main()
