"""Preparing a pretraining corpus into a token store: disk, memory and speed, as ratios in one run.

    python -m bench.token_store [--megabytes 16] [--scale 8]

A synthetic JSON-lines corpus (the demo corpus's documents, numbered, repeated to ``--megabytes``
and to ``--scale`` times that) is prepared the way a user prepares one::

    python pretrain.py --prepare_only true --tokenized_path T --train_files C --preprocessing_num_workers 2

in a fresh process, ``HF_HOME`` and every cache pointed into a scratch directory, the process tree's
resident memory sampled every 20 ms. Figures (targets from the issue that asked for the store):

* **disk**: every byte written (token store + any cache) per token: <= 2.2 with the tiny 4,096-id
  tokenizer (uint16 ids), <= 4.2 with Qwen's 151,936 (uint32; measured when ``../shared`` has the
  Qwen2.5 tokenizer, else "not measured");
* **memory**: peak RSS of the ``--scale``x corpus / the small one: <= 1.15 (memory does not grow with the corpus),
  for preparing and for a short training run (tiny model) reading the prepared store;
* **speed**, in-process on the small corpus, one tokenizer thread everywhere: the whole pipeline
  (read, tokenize, write) with 2 workers / 1 worker >= 1.7, and 1 worker / a plain
  ``tokenizer(texts)`` batch call over the same texts already in memory >= 0.9.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import REPO_ROOT, Result, print_result, single_threaded_tokenizers, worker_build_rates
from llmtrain.paths import DEMO_CORPUS_PATH, TINY_MODEL_DIR

QWEN_TOKENIZER = REPO_ROOT.parent / "shared" / "qwen2.5-tokenizer"
QWEN_CONFIG = REPO_ROOT / "configs" / "model" / "qwen2.5-0.5b.json"
WORKERS = 2
SAMPLE_SECONDS = 0.02


def write_corpus(path: Path, megabytes: float) -> Path:
    """The demo corpus's documents, each prefixed with its number, repeated until ``megabytes``."""
    with DEMO_CORPUS_PATH.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    target, written, number = int(megabytes * 2**20), 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            line = json.dumps({"text": f"Document {number}. {texts[number % len(texts)]}"}) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            number += 1
    return path


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its descendants (the tokenizing workers); 0 once it is gone."""
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:  # it (or a child being listed) exited meanwhile
        return 0
    total = 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def run_watched(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``command``; its wall seconds and the peak resident MiB of its process tree (sampled every 20 ms)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watched = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(watched))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{command[1]} failed ({child.returncode}):\n{output.decode(errors='replace')[-3000:]}")
    return time.perf_counter() - start, peak / 2**20


def scratch_env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(scratch / "hf"), "HF_DATASETS_CACHE": str(scratch / "hf" / "datasets"),
            "XDG_CACHE_HOME": str(scratch / "xdg"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def train_rss(tokenized: Path, scratch: Path) -> float:
    """Peak RSS (MiB) of a short single-process pretraining run (tiny model) reading the prepared ``tokenized``."""
    command = [
        sys.executable, str(REPO_ROOT / "pretrain.py"), "--tokenized_path", str(tokenized), "--block_size", "256",
        "--max_steps", "6", "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--output_dir", str(scratch / "train-out"),
    ]  # fmt: skip
    shutil.rmtree(scratch / "train-out", ignore_errors=True)
    return run_watched(command, scratch, scratch_env(scratch))[1]


def prepare(corpus: Path, scratch: Path, workers: int, qwen: bool = False) -> dict[str, Any]:
    """Run ``pretrain.py --prepare_only`` on ``corpus`` in a fresh process; bytes written, tokens, peak RSS, wall."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    command = [
        sys.executable, str(REPO_ROOT / "pretrain.py"), "--prepare_only", "true",
        "--tokenized_path", str(scratch / "tokenized"), "--train_files", str(corpus),
        "--validation_split_percentage", "0", "--preprocessing_num_workers", str(workers),
        "--dataset_cache_dir", str(scratch / "cache"), "--output_dir", str(scratch / "out"), "--use_cpu", "true",
    ]  # fmt: skip
    if qwen:
        command += ["--config_name", str(QWEN_CONFIG), "--tokenizer_name_or_path", str(QWEN_TOKENIZER)]
    wall, peak = run_watched(command, scratch, scratch_env(scratch))
    stats = json.loads((scratch / "tokenized" / "llmtrain_meta.json").read_text())["stats"]
    written = directory_bytes(scratch)
    return {"tokens": stats["train_tokens"], "bytes": written, "bytes_per_token": written / stats["train_tokens"],
            "peak_rss_mb": peak, "wall_s": wall}  # fmt: skip


def pipeline_speed(corpus: Path, scratch: Path) -> dict[str, float]:
    """MB/s in-process: the whole prepare pipeline with 1 and 2 workers, and a plain batch call, single-threaded."""
    from transformers import AutoTokenizer

    from llmtrain.config.arguments import PretrainDataArguments
    from llmtrain.data.pretrain import build_token_stores

    with single_threaded_tokenizers():  # the plain call too
        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
        with corpus.open(encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle]
        megabytes = corpus.stat().st_size / 2**20
        batches = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]

        def build(workers: int, out: Path) -> None:
            args = PretrainDataArguments(train_files=[str(corpus)], validation_split_percentage=0.0,
                                         preprocessing_num_workers=workers)  # fmt: skip
            build_token_stores(args, tokenizer, [[corpus]], [], out)

        plain = {"plain": lambda: [tokenizer(batch) for batch in batches]}
        return worker_build_rates(scratch, megabytes, build, plain)


@functools.cache
def measure(megabytes: float = 16.0, scale: int = 8) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-token-store-"))
    try:
        small = write_corpus(root / "small.jsonl", megabytes)
        large = write_corpus(root / "large.jsonl", megabytes * scale)
        figures: dict[str, Any] = {
            "small": prepare(small, root / "run-small", WORKERS),
            "large": prepare(large, root / "run-large", WORKERS),
            "train_rss_mb": {
                "small": train_rss(root / "run-small" / "tokenized", root / "run-small"),
                "large": train_rss(root / "run-large" / "tokenized", root / "run-large"),
            },
            "speed_MB_per_s": pipeline_speed(small, root / "speed"),
            "megabytes": megabytes,
            "scale": scale,
        }
        figures["qwen"] = prepare(small, root / "run-qwen", WORKERS, qwen=True) if QWEN_TOKENIZER.is_dir() else None
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def rounded(figures: dict[str, Any] | None) -> dict[str, Any] | str:
    if figures is None:
        return "not measured (no ../shared/qwen2.5-tokenizer)"
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in figures.items()}


def run_disk(figures: dict[str, Any] | None = None) -> Result:
    figures = figures or measure()
    detail = {"small": rounded(figures["small"]), "large": rounded(figures["large"]), "qwen": rounded(figures["qwen"])}
    ratio = max(figures["small"]["bytes_per_token"], figures["large"]["bytes_per_token"])
    return Result("Prepare: bytes written per token, tiny tokenizer", ratio, 2.2, False, detail)


def run_disk_qwen(figures: dict[str, Any] | None = None) -> Result:
    figures = figures or measure()
    qwen = figures["qwen"]
    ratio = qwen["bytes_per_token"] if qwen is not None else float("nan")
    return Result("Prepare: bytes written per token, Qwen vocabulary", ratio, 4.2, False, {"qwen": rounded(qwen)})


def run_memory(figures: dict[str, Any] | None = None) -> Result:
    figures = figures or measure()
    ratio = figures["large"]["peak_rss_mb"] / figures["small"]["peak_rss_mb"]
    detail = {"small_peak_rss_mb": round(figures["small"]["peak_rss_mb"], 1),
              "large_peak_rss_mb": round(figures["large"]["peak_rss_mb"], 1), "scale": figures["scale"]}  # fmt: skip
    return Result(f"Prepare: peak RSS, {figures['scale']}x corpus / 1x", ratio, 1.15, False, detail)


def run_train_memory(figures: dict[str, Any] | None = None) -> Result:
    rss = (figures or measure())["train_rss_mb"]
    detail = {name: round(value, 1) for name, value in rss.items()}
    return Result("Training peak RSS, 8x corpus / 1x", rss["large"] / rss["small"], 1.15, False, detail)


def run_workers(figures: dict[str, Any] | None = None) -> Result:
    speed = (figures or measure())["speed_MB_per_s"]
    detail = {name: round(value, 2) for name, value in speed.items()}
    return Result("Prepare MB/s, 2 workers / 1 worker", speed["workers_2"] / speed["workers_1"], 1.7, True, detail)


def run_single_worker(figures: dict[str, Any] | None = None) -> Result:
    speed = (figures or measure())["speed_MB_per_s"]
    detail = {name: round(value, 2) for name, value in speed.items()}
    return Result(
        "Prepare MB/s, 1 worker / plain tokenizer call", speed["workers_1"] / speed["plain"], 0.9, True, detail
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=16.0)
    parser.add_argument("--scale", type=int, default=8)
    args = parser.parse_args()
    figures = measure(args.megabytes, args.scale)
    for run in (run_disk, run_disk_qwen, run_memory, run_train_memory, run_workers, run_single_worker):
        print_result(run(figures))


if __name__ == "__main__":
    main()
