"""Peak memory of one SFT step at Qwen2.5's real 151,936-token vocabulary: standard vs chunked loss.

    python -m bench.memory [--seq-len 2048] [--repeats 1]

A small Qwen2 (hidden 128, 2 layers, untied head) keeps the decoder's share of memory small so the
output layer's is visible, as it is for a 0.5B model at micro-batch 8 on a GPU. One forward +
backward of a 2048-token SFT row (half the labels -100), fp32, in a fresh process per measurement:
peak RSS (``ru_maxrss``) minus the RSS before the step, after the model and optimizer-free
batch are built. Sides: the model's own loss (fp32 logits ``[2048, 151936]`` = 1.2 GB, plus
their log-softmax and gradient), and ``llmtrain.loss``'s chunked loss (default chunk size, and
256-token chunks). Headline: standard / chunked (default chunks) peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import psutil
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.common import REPO_ROOT, Result, median, print_result

VOCAB_SIZE = 151936  # Qwen2.5's
TARGET = 2.0  # not in the issue: set here, the chunked loss should at least halve this step's peak
MODES = ("standard", "chunked", "chunked-256")


def worker(mode: str, seq_len: int) -> dict[str, float]:
    """Run one step in this process; return the step's peak memory above its starting RSS, in MiB."""
    from llmtrain.loss import enable_memory_efficient_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").train()
    if mode != "standard":
        enable_memory_efficient_loss(model, chunk_size=256 if mode == "chunked-256" else None)
    input_ids = torch.randint(0, VOCAB_SIZE, (1, seq_len))
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100  # the prompt half is not supervised
    before = psutil.Process().memory_info().rss
    # ru_maxrss is a lifetime peak: it must grow past the model build's peak for the step to show.
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model(input_ids=input_ids, labels=labels).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "step_peak_mib": (peak - before) / 2**20,
        "start_rss_mib": before / 2**20,
        "build_peak_above_start_mib": (build_peak - before) / 2**20,
    }


def measure(mode: str, seq_len: int) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--worker", mode, "--seq-len", str(seq_len)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(seq_len: int = 2048, repeats: int = 1) -> Result:
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            samples[mode].append(measure(mode, seq_len)["step_peak_mib"])
    peaks = {mode: median(values) for mode, values in samples.items()}
    logits_mib = seq_len * VOCAB_SIZE * 4 / 2**20
    detail = {
        "shape": f"1 x {seq_len} tokens, vocab {VOCAB_SIZE}, hidden 128, 2 layers, fp32",
        "fp32_logits_mib": round(logits_mib),
        **{f"{mode}_step_peak_mib": round(peak) for mode, peak in peaks.items()},
        "standard_vs_chunked_256": round(peaks["standard"] / peaks["chunked-256"], 2),
        "samples_mib": {mode: [round(v) for v in values] for mode, values in samples.items()},
    }
    ratio = peaks["standard"] / peaks["chunked"]
    return Result("SFT step peak memory, standard / chunked loss", ratio, TARGET, True, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per side (the figures barely vary)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len)))
        return
    result = run(args.seq_len, args.repeats)
    print_result(result)


if __name__ == "__main__":
    main()
