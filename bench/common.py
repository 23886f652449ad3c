"""Shared helpers for the CPU benchmarks: timing, medians, thread count, the result table.

Every benchmark measures a ratio inside one process: the sides run alternately (A, B, A, B, ...,
step by step or batch by batch) so that a noisy neighbour slows both, and medians are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS = 2  # the CPU boxes these figures come from have 2 cores; every benchmark uses both


def set_threads(threads: int = THREADS) -> None:
    """One intra-op thread count for every benchmark, so the two sides of a ratio get the same CPU."""
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Result:
    """One benchmark's headline ratio and whether it meets its target."""

    name: str
    ratio: float
    target: float
    higher_is_better: bool
    detail: dict[str, object]

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    @property
    def target_text(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}x"


def timed(work: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def single_threaded_tokenizers() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` inside (one thread per tokenizer), the caller's setting restored after."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def worker_build_rates(
    scratch: Path,
    amount: float,
    build: Callable[[int, Path], object],
    others: Mapping[str, Callable[[], object]] | None = None,
    repeats: int = 3,
) -> dict[str, float]:
    """``amount`` per second of ``build(workers, output_dir)`` with 1 and 2 workers (``workers_1``,
    ``workers_2``) and of each of ``others``, alternated, medians of ``repeats``; each build writes
    into an empty directory under ``scratch``, removed after."""
    others = dict(others or {})
    rates: dict[str, list[float]] = {name: [] for name in [*others, "workers_1", "workers_2"]}
    for repeat in range(repeats):
        for name, work in others.items():
            rates[name].append(amount / timed(work))
        for workers in (1, 2):
            out = scratch / f"speed-{workers}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            rates[f"workers_{workers}"].append(amount / timed(lambda w=workers, o=out: build(w, o)))
            shutil.rmtree(out, ignore_errors=True)
    return {name: median(values) for name, values in rates.items()}


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_result(result: Result) -> None:
    """One benchmark's ratio beside its target, then its details, for the single-benchmark entry points."""
    print(f"{result.name}: {result.ratio:.3f}x (target {result.target_text})")
    for key, value in result.detail.items():
        print(f"  {key}: {value}")


def table(results: list[Result]) -> str:
    """Markdown table: name, ratio, target, pass/fail."""
    lines = ["| benchmark | ratio | target | result |", "|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.ratio:.2f}x | {r.target_text} | {'PASS' if r.passed else 'FAIL'} |")
    return "\n".join(lines)


def write_json(path: Path, results: list[Result], extra: dict[str, object]) -> None:
    payload = {**extra, "results": [{**dataclasses.asdict(r), "passed": r.passed} for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
