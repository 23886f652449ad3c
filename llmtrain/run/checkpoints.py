"""Crash-safe checkpoints: a completion marker written last, resume from complete ones, safe rotation.

A ``checkpoint-N`` folder counts only once it holds ``llmtrain_complete.json``
(:mod:`llmtrain.run.completeness`): a manifest of every file in the folder (its size; its SHA-256 too
under ``checkpoint_checksums``) written after all ranks finished their part of the save, to a temporary
name, fsynced and renamed into place. So a save cut off at any point leaves no marker, and resume skips
that folder with a logged reason. Resume compares every size and, where the marker records them, every SHA-256 (a file
changed in place, same size, is caught only then). The Trainer's own rotation (which orders by
mtime and runs before the other ranks are done) is replaced by :func:`rotate`, which only ever
deletes checkpoints older than the newest complete one, and checks sizes alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain.errors import StorageFull
from llmtrain.paths import nearest_existing
from llmtrain.run.completeness import (
    checkpoint_problem,
    list_checkpoints,
    write_completion_marker,
)
from llmtrain.run.faults import FaultInjector
from llmtrain.run.manifest import write_manifest

logger = logging.getLogger(__name__)

# A failed write with less than this left on the filesystem is taken for a full disk: torch.save then
# reports "basic_ios::clear" or "file write failed", not ENOSPC.
LOW_DISK_BYTES = 256 << 20


def disk_full_problem(error: BaseException, path: Path) -> str | None:
    """What to tell the user when writing ``path`` failed with ``error`` on a full disk; None when the disk is not full.

    >>> import tempfile
    >>> disk_full_problem(RuntimeError("unrelated"), Path(tempfile.gettempdir())) is None  # plenty of space here
    True
    """
    existing = nearest_existing(path)
    free = shutil.disk_usage(existing).free
    out_of_space = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not out_of_space and free >= LOW_DISK_BYTES:
        return None
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (
        f"the disk is full: writing {path} failed ({reason}); {free / 2**20:.1f} MiB free on the filesystem of "
        f"{existing}. Free some space (or move output_dir) and rerun the same command: it resumes from the newest "
        f"complete checkpoint, and the incomplete {path.name} is never trusted"
    )


@contextlib.contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Turn a write into ``path`` that fails on a full disk into one :class:`StorageFull` error."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        problem = disk_full_problem(error, path)
        if problem is None:
            raise
        raise StorageFull(problem) from error


def convert_to_universal(checkpoint: Path) -> Path:
    """Convert ``checkpoint``'s ZeRO shards to DeepSpeed's universal format (loadable on any world size).

    Writes ``global_stepN_universal/`` (built aside, then renamed) and ``latest_universal`` next to
    the original shards, which stay as they were. Returns the universal folder; an existing one is
    reused.
    """
    tag = (checkpoint / "latest").read_text().strip()
    universal = checkpoint / f"{tag}_universal"
    if not universal.is_dir():
        staging = checkpoint / f".{tag}_universal.partial"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint / tag),
            "--output_folder", str(staging), "--inject_missing_state",
        ]  # fmt: skip
        logger.info("converting %s to a universal checkpoint: %s", checkpoint, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = result.stdout[-2000:] + result.stderr[-2000:]
            raise RuntimeError(f"ds_to_universal failed on {checkpoint}:\n{output}")
        os.replace(staging, universal)
    latest = checkpoint / ".latest_universal.tmp"
    latest.write_text(universal.name)
    os.replace(latest, checkpoint / "latest_universal")
    return universal


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``; newer incomplete ones are logged and skipped.

    Complete means every file of the marker is there with its size and, where the marker records
    SHA-256s, its checksum (:func:`checkpoint_problem` with ``verify_checksums``).
    """
    for checkpoint in list_checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint, verify_checksums=True)
        if problem is None:
            return checkpoint
        logger.warning("skipping %s: %s", checkpoint, problem)
    return None


def rotate(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete checkpoints beyond the newest ``keep`` complete ones; return what was deleted.

    Only folders older than the newest complete checkpoint are candidates (newer ones may still
    be being written), so the last complete checkpoint survives until a newer one is complete.
    Incomplete folders older than it are leftovers of interrupted saves and are removed too.
    It runs after every save, so it checks sizes only, never checksums.
    """
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    complete = [c for c in checkpoints if checkpoint_problem(c) is None]
    if not complete:
        return []
    newest_step = int(complete[0].name.split("-")[1])
    kept = set(complete[: max(keep, 1)])
    doomed = [c for c in checkpoints if int(c.name.split("-")[1]) <= newest_step and c not in kept]
    for checkpoint in doomed:
        logger.info("rotating out %s (save_total_limit=%d)", checkpoint, keep)
        shutil.rmtree(checkpoint)
    return doomed


class CompleteCheckpointCallback(TrainerCallback):
    """After every save: wait for all ranks, then (rank 0) add the run manifest, write the marker, rotate."""

    def __init__(
        self, keep: int | None, manifest: dict[str, Any], faults: FaultInjector | None = None, checksums: bool = False
    ) -> None:
        self.keep = keep
        self.checksums = checksums
        self.manifest = manifest
        self.faults = faults or FaultInjector(None, "")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's optimizer shard and RNG state is on disk past this point
        self.faults.maybe_kill("kill_during_save", state.global_step)
        if state.is_world_process_zero:
            checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            write_manifest(checkpoint, self.manifest, state.global_step)
            details = {"global_step": state.global_step, "world_size": args.world_size}
            write_completion_marker(checkpoint, details, checksums=self.checksums)
            rotate(Path(str(args.output_dir)), self.keep)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank runs ahead (or gets killed) believing a save is done before the marker is
