"""Peak memory of one packed SFT step under sdpa: rows kept as rows vs dynamic padding vs one flattened sequence.

    python -m bench.packed_memory [--rows 8] [--tokenizer DIR] [--repeats 1]

The same conversations, one training step (forward + backward, train mode, ``use_cache=False``,
sdpa, the chunked loss as ``loss_implementation: auto`` gives on a CPU, no optimizer), three layouts:

* **rows**: ``pack_batch`` fills ``--rows`` rows of <= 2048 tokens, ``PackedRowsCollator`` keeps
  them as the batch dimension (padded to the longest row, position ids restarting per
  conversation): transformers builds a block-diagonal causal mask per row, rows x L²;
* **padding**: every conversation that went into those rows is a row of its own, padded to the
  longest (``PaddingCollator``, attention mask): what ``packing: false`` trains on, conversations x L_max²;
* **flattened** (reference): the same rows as one ``[1, rows x L]`` sequence (``FlatPackedCollator``,
  flash-attention's layout) under sdpa: one ``(rows x L)²`` mask.

Conversations: the BELLE-like lengths of ``bench.sft_throughput`` (median 109, p90 261 tokens), the
tiny tokenizer and the tiny model (positions raised to 2048) unless ``--tokenizer`` names another
(the model's vocabulary is then ``len(tokenizer)``). The batches are built here; each measurement
runs in a fresh process that loads its batch and builds the model, then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``; where that is refused, ``ru_maxrss``, a lifetime peak, is
read instead and the build's own peak reported beside it) and runs the step: step peak = peak RSS
during the step minus the RSS before it. Headline: rows / padding peak (issue 15: <= 1.3x).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bench.common import REPO_ROOT, Result, median, print_result, set_threads
from bench.sft_throughput import BELLE_MEDIAN, SEQ_LEN, synthesise, tiny_model
from llmtrain.data.collate import FlatPackedCollator, PackedRowsCollator, PaddingCollator
from llmtrain.data.fitting import pack_batch, pack_rows
from llmtrain.loss import enable_memory_efficient_loss
from llmtrain.metrics import PADDED_POSITIONS
from llmtrain.paths import TINY_MODEL_DIR

MODES = ("rows", "padding", "flattened")
TARGET = 1.3  # issue 15: packed rows may cost at most 1.3x the memory of dynamic padding on the same conversations
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # clear_refs: reset the peak resident set size (VmHWM) to the current RSS (Linux >= 4.0)


def step_conversations(tokenizer: PreTrainedTokenizerBase, rows: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """The first conversations of ``synthesise`` that fill ``rows`` packed rows of <= 2048 tokens.

    The rows are closed: the conversation after them did not fit in the last one, so each is as
    full as packing leaves it in training.
    """
    count = rows * SEQ_LEN // BELLE_MEDIAN
    while True:
        samples = synthesise(tokenizer, count, seed)  # the same first conversations for any count
        groups = pack_rows([len(s["input_ids"]) for s in samples], SEQ_LEN)
        if len(groups) > rows:
            return samples[: groups[rows][0]]
        count *= 2


def layouts(conversations: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """The step's batch in each layout (module docstring), model inputs only."""
    packed = pack_batch(
        {"input_ids": [c["input_ids"] for c in conversations], "labels": [c["labels"] for c in conversations]},
        SEQ_LEN,
    )
    rows = [{key: packed[key][i] for key in packed} for i in range(len(packed["input_ids"]))]
    batches = {
        "rows": PackedRowsCollator(pad_token_id)(rows),
        "padding": PaddingCollator(pad_token_id)(conversations),
        "flattened": FlatPackedCollator()(rows),
    }
    for batch in batches.values():
        batch.pop(PADDED_POSITIONS, None)  # a count for the token counter, not a model input
    return batches


def mask_elements(batch: dict[str, torch.Tensor]) -> int:
    """Elements of the attention mask transformers builds for this batch under sdpa: batch x length²."""
    rows, length = batch["input_ids"].shape
    return rows * length * length


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not permitted."""
    try:
        PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def peak_bytes(after_reset: bool) -> int:
    """Peak RSS since the reset (``VmHWM``), or the process's lifetime peak (``ru_maxrss``) without one."""
    if after_reset:
        found = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(batch_path: Path, vocab_size: int) -> dict[str, Any]:
    """Run one step in this process; return its peak memory above the starting RSS, in MiB."""
    set_threads()
    model = tiny_model(vocab_size)
    enable_memory_efficient_loss(model)
    batch = torch.load(batch_path)
    gc.collect()
    before = resident_bytes()
    build_peak = peak_bytes(after_reset=False)
    was_reset = reset_peak()
    start = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_bytes(was_reset)
    return {
        "step_peak_mib": (peak - before) / 2**20,
        "start_rss_mib": before / 2**20,
        "build_peak_above_start_mib": (build_peak - before) / 2**20,
        "peak_reset": was_reset,
        "step_s": seconds,
    }


def measure(batch_path: Path, vocab_size: int) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.packed_memory", "--worker", str(batch_path), "--vocab-size", str(vocab_size)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(rows: int = 8, repeats: int = 1, tokenizer_dir: Path | None = None) -> Result:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or TINY_MODEL_DIR)
    conversations = step_conversations(tokenizer, rows)
    batches = layouts(conversations, tokenizer.pad_token_id)
    real_tokens = sum(len(c["input_ids"]) for c in conversations)
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="packed-memory-") as scratch:
        paths = {mode: Path(scratch) / f"{mode}.pt" for mode in MODES}
        for mode, path in paths.items():
            torch.save(batches[mode], path)
        for _ in range(repeats):
            for mode in MODES:
                samples[mode].append(measure(paths[mode], len(tokenizer)))
    peaks = {mode: median([s["step_peak_mib"] for s in samples[mode]]) for mode in MODES}
    detail: dict[str, object] = {
        "conversations": len(conversations),
        "real_tokens": real_tokens,
        "model": f"tiny (4 layers, hidden 128), vocab {len(tokenizer)}, positions {SEQ_LEN}, fp32, sdpa",
    }
    for mode in MODES:
        shape = tuple(batches[mode]["input_ids"].shape)
        detail[f"{mode}_shape"] = "x".join(str(size) for size in shape)
        detail[f"{mode}_padding_share"] = round(1 - real_tokens / (shape[0] * shape[1]), 3)
        detail[f"{mode}_mask_elements_M"] = round(mask_elements(batches[mode]) / 1e6, 1)
        detail[f"{mode}_step_peak_mib"] = round(peaks[mode])
        detail[f"{mode}_step_s"] = round(median([s["step_s"] for s in samples[mode]]), 2)
    detail["flattened_vs_rows"] = round(peaks["flattened"] / peaks["rows"], 2)
    detail["peak_reset"] = all(s["peak_reset"] for values in samples.values() for s in values)
    detail["build_peak_above_start_mib"] = {
        mode: [round(s["build_peak_above_start_mib"]) for s in values] for mode, values in samples.items()
    }
    detail["samples_mib"] = {mode: [round(s["step_peak_mib"]) for s in values] for mode, values in samples.items()}
    ratio = peaks["rows"] / peaks["padding"]
    return Result("Packed SFT step peak memory, rows / dynamic padding", ratio, TARGET, False, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="packed rows of <= 2048 tokens in the step")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per layout (the figures barely vary)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the tiny tokenizer)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab_size)))
        return
    print_result(run(args.rows, args.repeats, args.tokenizer))


if __name__ == "__main__":
    main()
