"""Run every CPU benchmark and print each ratio beside its target.

    python -m bench [--out bench-results.json] [--only sft,trainer,preprocessing,memory,packed_memory,...]

A few minutes on a 2-core CPU. The GPU benchmark is separate: ``python -m bench.gpu_bench --out FILE``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

from bench import (
    memory,
    packed_memory,
    preprocessing,
    sft_fitting,
    sft_prepare,
    sft_throughput,
    token_store,
    trainer_overhead,
)
from bench.common import Result, machine, set_threads, table, write_json

BENCHMARKS: dict[str, Callable[[], Result]] = {
    "sft": sft_throughput.run,
    "trainer": trainer_overhead.run,
    "preprocessing": preprocessing.run,
    "memory": memory.run,
    "packed_memory": packed_memory.run,
    "prepare_disk": token_store.run_disk,
    "prepare_disk_qwen": token_store.run_disk_qwen,
    "prepare_memory": token_store.run_memory,
    "train_memory": token_store.run_train_memory,
    "prepare_workers": token_store.run_workers,
    "prepare_single_worker": token_store.run_single_worker,
    "sft_fitting": sft_fitting.run,
    "sft_prepare_memory": sft_prepare.run_memory,
    "sft_prepare_workers": sft_prepare.run_workers,
    "prefix_tree_tokens": sft_throughput.run_tree_tokens,
    "prefix_tree_speed": sft_throughput.run_tree_speed,
    "prefix_tree_memory": sft_throughput.run_tree_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of the default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads()
    about = machine()
    print(f"machine: {about['cpu']}, {about['torch_threads']} torch threads, torch {about['torch']}, {about['date']}")
    results, durations = [], {}
    for name in args.only.split(","):
        start = time.perf_counter()
        result = BENCHMARKS[name]()
        durations[name] = round(time.perf_counter() - start, 1)
        results.append(result)
        print(f"\n{result.name}: {result.ratio:.2f}x (target {result.target_text}) [{durations[name]} s]")
        for key, value in result.detail.items():
            print(f"  {key}: {value}")
    print("\n" + table(results))
    if args.out:
        write_json(args.out, results, {"machine": about, "seconds": durations})
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
