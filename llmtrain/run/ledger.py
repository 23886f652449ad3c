"""The data-order ledger: which batches each rank trained on at each optimizer step.

Every rank appends one JSON line per optimizer step to ``<output_dir>/data_ledger/rank-<R>.jsonl``:
``{"step": 7, "batches": ["9f1c…", "03ab…"], "samples": [[12, 40], [3, 7]]}``, one content hash per
micro-batch (input ids and labels) and the training-set indices of its samples. A resumed run
appends again from its checkpoint's step on, so the *effective* ledger keeps, for each step, the
line written last. Two runs trained on the same samples in the same order have equal effective
ledgers; a skipped or repeated batch shows as a difference. Runs on different rank counts with the
same global batch have equal :func:`samples_per_step`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

LEDGER_DIR = "data_ledger"


def batch_digest(batch: dict[str, Any]) -> str:
    """A short content hash of a micro-batch's ``input_ids`` and ``labels`` (identical tensors, same hash).

    >>> ids = torch.tensor([[1, 2, 3]])
    >>> batch_digest({"input_ids": ids, "labels": ids}) == batch_digest({"input_ids": ids.clone(), "labels": ids})
    True
    >>> batch_digest({"input_ids": ids}) == batch_digest({"input_ids": torch.tensor([[1, 2, 4]])})
    False
    """
    digest = hashlib.blake2b(digest_size=8)
    for key in ("input_ids", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class DataLedger:
    """Collects the micro-batches of the current step and appends their hashes at the step's end.

    Hashing waits for the step's end so that a GPU run pays one device-to-host copy per step,
    not one sync per micro-batch.
    """

    def __init__(self, output_dir: Path, rank: int, world_size: int = 1) -> None:
        self.path = output_dir / LEDGER_DIR / f"rank-{rank}.jsonl"
        self.world_size = world_size
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_samples: list[list[int]] = []

    def record(self, batch: dict[str, Any], sample_indices: torch.Tensor | None = None) -> None:
        self.pending.append(
            {k: batch[k].detach() for k in ("input_ids", "labels") if isinstance(batch.get(k), torch.Tensor)}
        )
        if sample_indices is not None:
            self.pending_samples.append(sample_indices.detach().to("cpu").tolist())

    def end_step(self, step: int) -> None:
        digests = [batch_digest(batch) for batch in self.pending]
        entry: dict[str, Any] = {"step": step, "batches": digests}
        if self.pending_samples:
            entry["samples"] = self.pending_samples
            entry["world_size"] = self.world_size
        self.pending, self.pending_samples = [], []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as ledger:
            ledger.write(json.dumps(entry) + "\n")


def read_ledger(output_dir: Path) -> dict[int, dict[int, list[str]]]:
    """The effective ledger: ``{rank: {step: [micro-batch hash, ...]}}``, the last line per step winning."""
    ledger: dict[int, dict[int, list[str]]] = {}
    for path in sorted((output_dir / LEDGER_DIR).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        steps: dict[int, list[str]] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps[int(entry["step"])] = list(entry["batches"])
        ledger[rank] = steps
    return ledger


def samples_per_step(output_dir: Path) -> dict[int, list[int]]:
    """The effective ledger's training-set indices per optimizer step, every rank's together, sorted.

    The same for any rank count at the same global batch (see :mod:`llmtrain.data.order`). A step
    trained again on fewer ranks after a resume counts the ranks of that last attempt only (rank 0's
    last line for the step says how many there were).
    """
    steps: dict[int, dict[int, dict[str, Any]]] = {}
    for path in sorted((output_dir / LEDGER_DIR).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps.setdefault(int(entry["step"]), {})[rank] = entry  # the last line per step wins
    result = {}
    for step, by_rank in steps.items():
        ranks = by_rank[0].get("world_size", len(by_rank)) if 0 in by_rank else len(by_rank)
        result[step] = sorted(
            index for rank in range(ranks) for batch in by_rank.get(rank, {}).get("samples", []) for index in batch
        )
    return result


def ledger_differences(expected: dict[int, dict[int, list[str]]], actual: dict[int, dict[int, list[str]]]) -> list[str]:
    """Human-readable differences between two effective ledgers (empty when the data order matched).

    >>> ledger_differences({0: {1: ["a"], 2: ["b"]}}, {0: {1: ["a"], 2: ["b"]}})
    []
    >>> ledger_differences({0: {1: ["a"], 2: ["b"]}}, {0: {1: ["a"], 2: ["a"]}})
    ["rank 0 step 2: expected batches ['b'], got ['a']"]
    """
    problems = []
    for rank in sorted(set(expected) | set(actual)):
        want, got = expected.get(rank, {}), actual.get(rank, {})
        for step in sorted(set(want) | set(got)):
            if step not in got:
                problems.append(f"rank {rank} step {step}: missing")
            elif step not in want:
                problems.append(f"rank {rank} step {step}: not in the reference run")
            elif want[step] != got[step]:
                problems.append(f"rank {rank} step {step}: expected batches {want[step]}, got {got[step]}")
    return problems
