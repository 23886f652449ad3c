"""Preparing SFT conversations: peak memory against the data size, and the speed of 2 workers against 1.

    python -m bench.sft_prepare [--conversations 20000] [--scale 8]

A synthetic multi-turn ShareGPT file (the demo conversations, three to six of them chained into one,
numbered, repeated to ``--conversations`` and to ``--scale`` times that) is prepared the way a user
prepares one::

    python finetune.py --prepare_only true --tokenized_path T --train_files C --preprocessing_num_workers 2

in a fresh process, every cache pointed into a scratch directory, the process tree's resident memory
sampled every 20 ms (:func:`bench.token_store.run_watched`). Figures (targets from the issue that
asked for bounded SFT preparation):

* **memory**: peak RSS of the ``--scale``x file / the 1x file: <= 1.15 (memory does not grow with the data);
* **speed**, in-process on the 1x file, one tokenizer thread per process: the whole build
  (read, check, encode, write, pack) with 2 workers / 1 worker >= 1.7.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, Result, print_result, single_threaded_tokenizers, worker_build_rates
from bench.token_store import run_watched, scratch_env
from llmtrain.paths import DEMO_CONVERSATIONS_PATH, TINY_MODEL_DIR

WORKERS = 2
MAX_SEQ_LENGTH = 1024  # the tiny model's positions; the chained conversations fit or lose early turns


def write_conversations(path: Path, count: int) -> Path:
    """``count`` multi-turn conversations chained from the demo ones (3-6 each), numbered so none repeats."""
    with DEMO_CONVERSATIONS_PATH.open(encoding="utf-8") as handle:
        demo = [json.loads(line)["conversations"] for line in handle if line.strip()]
    with path.open("w", encoding="utf-8") as out:
        for number in range(count):
            turns: list[dict[str, str]] = []
            for part in range(3 + number % 4):
                turns += [turn for turn in demo[(number * 7 + part) % len(demo)] if turn["from"] != "system"]
            turns[0] = {"from": "human", "value": f"({number}) {turns[0]['value']}"}
            out.write(json.dumps({"conversations": turns}) + "\n")
    return path


def prepare(data: Path, scratch: Path, workers: int) -> dict[str, Any]:
    """Run ``finetune.py --prepare_only`` on ``data`` in a fresh process: rows, peak RSS (MiB), wall seconds."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    command = [
        sys.executable, str(REPO_ROOT / "finetune.py"), "--model_name_or_path", str(TINY_MODEL_DIR),
        "--prepare_only", "true", "--tokenized_path", str(scratch / "tokenized"), "--train_files", str(data),
        "--max_seq_length", str(MAX_SEQ_LENGTH), "--preprocessing_num_workers", str(workers),
        "--output_dir", str(scratch / "out"), "--use_cpu", "true",
    ]  # fmt: skip
    wall, peak = run_watched(command, scratch, scratch_env(scratch))
    stats = json.loads((scratch / "tokenized" / "llmtrain_meta.json").read_text())["stats"]
    return {"conversations": stats["conversations"], "train_rows": stats["train_rows"], "peak_rss_mb": peak,
            "wall_s": wall}  # fmt: skip


def build_speed(data: Path, scratch: Path) -> dict[str, float]:
    """Conversations per second in-process: the whole build with 1 and 2 workers, alternated, medians of 3."""
    from transformers import AutoTokenizer

    from llmtrain.config.arguments import SFTDataArguments
    from llmtrain.data.sft import build_sft_rows

    with single_threaded_tokenizers():
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
        count = sum(1 for _ in data.open(encoding="utf-8"))

        def build(workers: int, out: Path) -> None:
            args = SFTDataArguments(train_files=[str(data)], max_seq_length=MAX_SEQ_LENGTH,
                                    preprocessing_num_workers=workers)  # fmt: skip
            build_sft_rows(args, tokenizer, [data], [], out, True)

        return worker_build_rates(scratch, count, build)


@functools.cache
def measure(conversations: int = 20_000, scale: int = 8) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-sft-prepare-"))
    try:
        small = write_conversations(root / "small.jsonl", conversations)
        large = write_conversations(root / "large.jsonl", conversations * scale)
        return {
            "small": prepare(small, root / "run-small", WORKERS),
            "large": prepare(large, root / "run-large", WORKERS),
            "speed_conversations_per_s": build_speed(small, root / "speed"),
            "megabytes": {"small": small.stat().st_size / 2**20, "large": large.stat().st_size / 2**20},
            "scale": scale,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_memory(figures: dict[str, Any] | None = None) -> Result:
    figures = figures or measure()
    ratio = figures["large"]["peak_rss_mb"] / figures["small"]["peak_rss_mb"]
    detail = {
        "small": {key: round(value, 1) for key, value in figures["small"].items()},
        "large": {key: round(value, 1) for key, value in figures["large"].items()},
        "file_mb": {key: round(value, 1) for key, value in figures["megabytes"].items()},
    }
    return Result(f"SFT prepare: peak RSS, {figures['scale']}x conversations / 1x", ratio, 1.15, False, detail)


def run_workers(figures: dict[str, Any] | None = None) -> Result:
    speed = (figures or measure())["speed_conversations_per_s"]
    detail = {name: round(value, 1) for name, value in speed.items()}
    return Result("SFT prepare: conversations/s, 2 workers / 1", speed["workers_2"] / speed["workers_1"], 1.7, True,
                  detail)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--scale", type=int, default=8)
    args = parser.parse_args()
    figures = measure(args.conversations, args.scale)
    for run in (run_memory, run_workers):
        print_result(run(figures))


if __name__ == "__main__":
    main()
