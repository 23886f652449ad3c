"""SFT useful-token throughput: our packed path vs the replaced recipe's pad-everything-to-2048.

    python -m bench.sft_throughput [--samples 64] [--repeats 3]

Both sides train the same tiny model (the shipped tiny config, positions raised to 2048) on the
same synthetic BelleGroup-like conversations, one 2048-position micro-batch per optimizer step:

* **ours**: conversations encoded by ``llmtrain.data.sft.encode_conversation`` (labels -100 off the
  assistant turns), packed by ``pack_batch`` into rows of <= 2048 tokens, flattened by
  ``collate_packed`` with restarting position ids (no padding at all), chunked loss;
* **recipe**: every conversation alone, padded to 2048 with the pad id, attention mask, and the pad
  positions labelled with the pad id (the recipe's bug: padding is trained on), standard loss.

Reported: supervised (assistant) tokens per second of each side, their ratio, and each side's
padding share, plus "packing only" (our rows with the model's standard loss) to separate what
packing buys from what the loss buys. The sides alternate step by step (our row i, packing-only
row i, one recipe step), ``--repeats`` rounds; our pass time is the sum of each row's median.
Every recipe step has the same shape (one conversation, 2048 positions) whatever the
conversation, so its time for the N conversations is N x its median step time (a full recipe pass
over N conversations would take minutes on a CPU).

The length mix follows 1,000 real BELLE conversations tokenized with the Qwen2.5 tokenizer:
median 109 tokens, 90th percentile 261, none over 2048; padded to 2048, 93.2 % of positions are
padding and 3.2 % supervised (so ~47 % of a conversation's tokens are supervised).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from bench.common import Result, median, print_result, set_threads, timed
from llmtrain.data.sft import IGNORE_INDEX, collate_packed, encode_conversation, pack_batch
from llmtrain.loss import enable_memory_efficient_loss
from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR
from llmtrain.tiny_default import IM_END

SEQ_LEN = 2048  # the recipe's fixed padding length, and our packed row length
# BELLE facts (module docstring): lognormal through median 109 and p90 261.
BELLE_MEDIAN, BELLE_P90 = 109, 261
BELLE_PADDED_SUPERVISED_SHARE = 0.032
BELLE_PADDED_PADDING_SHARE = 0.932
SUPERVISED_SHARE = BELLE_PADDED_SUPERVISED_SHARE / (1 - BELLE_PADDED_PADDING_SHARE)  # of a conversation's tokens
TEMPLATE_TOKENS = 10  # ChatML headers and end-of-turn markers of a one-turn conversation, tiny tokenizer
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


def synthesise(tokenizer: PreTrainedTokenizerBase, count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Encoded one-turn conversations of BELLE-like lengths, ~47 % of each one supervised."""
    stream = corpus_tokens(tokenizer)
    rng = random.Random(seed + 1)
    samples = []
    for length in belle_like_lengths(count, seed):
        body = max(2, length - TEMPLATE_TOKENS)
        answer = max(1, round(length * SUPERVISED_SHARE) - 1)  # the end-of-turn marker is supervised too
        question = max(1, body - answer)
        start = rng.randrange(0, len(stream) - body - 1)
        messages = [
            {"role": "user", "content": tokenizer.decode(stream[start : start + question]).strip() or "?"},
            {"role": "assistant", "content": tokenizer.decode(stream[start + question : start + body]).strip() or "!"},
        ]
        samples.extend(
            {k: v[:SEQ_LEN] for k, v in row.items()} for row in encode_conversation(messages, tokenizer, IM_END)
        )
    return samples


def tiny_model() -> Qwen2ForCausalLM:
    config = Qwen2Config.from_pretrained(TINY_MODEL_DIR)
    config.max_position_embeddings = SEQ_LEN
    config.use_cache = False
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").train()


def our_batches(samples: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
    packed = pack_batch(
        {"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]}, SEQ_LEN
    )
    rows = [{k: packed[k][i] for k in packed} for i in range(len(packed["input_ids"]))]
    return [collate_packed([row]) for row in rows]


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


def run(samples: int = 64, repeats: int = 3, seed: int = 0) -> Result:
    set_threads()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    conversations = synthesise(tokenizer, samples, seed)
    lengths = [len(s["input_ids"]) for s in conversations]
    supervised = sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in conversations)
    ours, recipe = our_batches(conversations), recipe_batches(conversations, tokenizer.pad_token_id)
    our_model = tiny_model()
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
            ours_steps[i].append(timed(lambda row=row: train_steps(our_model, our_opt, [row])))
            packing_only_steps[i].append(
                timed(lambda row=row: train_steps(packing_only_model, packing_only_opt, [row]))
            )
            sample = recipe[(round_index * len(ours) + i) % len(recipe)]
            recipe_steps.append(timed(lambda sample=sample: train_steps(recipe_model, recipe_opt, [sample])))
    ours_seconds = sum(median(times) for times in ours_steps)
    packing_only_seconds = sum(median(times) for times in packing_only_steps)
    recipe_seconds = len(conversations) * median(recipe_steps)
    ours_rate, recipe_rate = supervised / ours_seconds, supervised / recipe_seconds
    positions_padded = len(conversations) * SEQ_LEN
    sorted_lengths = sorted(lengths)
    detail = {
        "conversations": len(conversations),
        "median_tokens": statistics.median(lengths),
        "p90_tokens": sorted_lengths[int(0.9 * (len(lengths) - 1))],
        "max_tokens": max(lengths),
        "supervised_tokens": supervised,
        "ours_supervised_tokens_per_s": round(ours_rate, 1),
        "recipe_supervised_tokens_per_s": round(recipe_rate, 1),
        "packing_only_supervised_tokens_per_s": round(supervised / packing_only_seconds, 1),
        "packing_only_ratio": round(recipe_seconds / packing_only_seconds, 2),
        "ours_padding_share": 0.0,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="conversations per pass")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    result = run(args.samples, args.repeats)
    print_result(result)


if __name__ == "__main__":
    main()
