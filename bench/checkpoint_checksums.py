"""What ``checkpoint_checksums`` costs: SHA-256 of a checkpoint against the time to write it.

    python -m bench.checkpoint_checksums [--params 494032768] [--dir /tmp] [--repeats 2]

Writes the two big files a one-rank ZeRO-2 checkpoint of Qwen2.5-0.5B holds (494 M parameters):
``model.safetensors`` (fp32 weights, ~2.0 GB, ``safetensors.torch.save_file``) and the optimizer
shard (fp32 master weights + Adam's two moments, ~5.9 GB, ``torch.save``), timed as the Trainer
writes them (no fsync: what the training waits for). Then hashes them, alternating the sides:

* **sequential**: one file after the other (``sha256_files(paths, workers=1)``);
* **parallel**: ``llmtrain.run.completeness.sha256_files`` as a save runs it (one thread per CPU,
  whole files, largest first);
* **split** (not implemented, measured to decide): the same threads on 1 GiB segments, so one big
  file is hashed by several threads (its digest would then not be ``sha256sum``'s).

Each side is timed twice over: from the page cache (the files were just written: what the hash at
save time reads), and after evicting the files from it (fsync + ``posix_fadvise(DONTNEED)`` per file,
which needs no privilege and touches no other process's cache: what a resume on a fresh process
reads; on a virtual machine the host may still cache the disk). ``--params`` scales the checkpoint
down (16 bytes per parameter on disk, 12 in memory at once); it is scaled down by itself, and says
so, when the disk or memory cannot hold it. The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import save_file

from bench.common import Result, machine, median, print_result, set_threads, timed
from llmtrain.run.completeness import available_cpus, sha256_files

QWEN_0_5B_PARAMS = 494_032_768  # configs/model/qwen2.5-0.5b.json, tied embeddings
QWEN_0_5B_EMBEDDING = 151_936 * 896
LAYERS = 24
DISK_BYTES_PER_PARAM = 16  # fp32 weights in model.safetensors + fp32 master, exp_avg, exp_avg_sq in the shard
MEMORY_BYTES_PER_PARAM = 12  # the shard's three tensors are in memory together
HEADROOM = 1.25  # leave a quarter free on the disk and in memory
SEGMENT_BYTES = 1 << 30
READ_BYTES = 1 << 20
TARGET = 1.0  # not in the issue: set here, hashing at save should cost no more than writing the files


def fitting_params(requested: int, directory: Path) -> tuple[int, str]:
    """``requested``, or fewer when ``directory``'s disk or this machine's memory cannot hold the checkpoint."""
    free_disk = shutil.disk_usage(directory).free
    free_memory = psutil.virtual_memory().available
    params = min(
        requested,
        int(free_disk / HEADROOM / DISK_BYTES_PER_PARAM),
        int(free_memory / HEADROOM / MEMORY_BYTES_PER_PARAM),
    )
    note = f"{free_disk / 1e9:.0f} GB free on {directory}'s disk, {free_memory / 1e9:.1f} GB memory available"
    if params < requested:
        note += f": scaled down from {requested:,} to {params:,} parameters"
    return params, note


def write_checkpoint(folder: Path, params: int) -> dict[str, float]:
    """The weights and the optimizer shard of a one-rank ZeRO-2 checkpoint in ``folder``; seconds each write took."""
    generator = torch.Generator().manual_seed(0)
    embedding = min(QWEN_0_5B_EMBEDDING * params // QWEN_0_5B_PARAMS, params)
    layer = (params - embedding) // LAYERS
    sizes = {"embed_tokens.weight": embedding, **{f"layers.{n}.weight": layer for n in range(LAYERS)}}
    sizes["norm.weight"] = params - sum(sizes.values())
    weights = {name: torch.rand(size, generator=generator) for name, size in sizes.items()}
    seconds = {"model.safetensors": timed(lambda: save_file(weights, str(folder / "model.safetensors")))}
    weights.clear()  # frees 4 bytes per parameter before the shard takes 12
    shard = {
        "fp32_flat_groups": [torch.rand(params, generator=generator)],
        "optimizer_state_dict": {"exp_avg": torch.rand(params, generator=generator),
                                 "exp_avg_sq": torch.rand(params, generator=generator)},
    }  # fmt: skip
    (folder / "global_step1").mkdir()
    name = "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    seconds[name] = timed(lambda: torch.save(shard, folder / name))
    return seconds


def sync_and_evict(paths: list[Path]) -> None:
    """Flush ``paths`` to disk and drop them (only them) from the page cache."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def segment_digest(job: tuple[Path, int, int]) -> str:
    """SHA-256 of ``length`` bytes of a file from ``offset``."""
    path, offset, length = job
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(READ_BYTES))
    with path.open("rb", buffering=0) as stream:
        stream.seek(offset)
        while length > 0 and (read := stream.readinto(buffer[: min(READ_BYTES, length)])):
            digest.update(buffer[:read])
            length -= read
    return digest.hexdigest()


def split_digests(paths: list[Path], workers: int) -> list[str]:
    """Every 1 GiB segment of every file hashed on its own, ``workers`` at a time, largest first."""
    jobs = [
        (path, offset, min(SEGMENT_BYTES, path.stat().st_size - offset))
        for path in paths
        for offset in range(0, max(path.stat().st_size, 1), SEGMENT_BYTES)
    ]
    jobs.sort(key=lambda job: job[2], reverse=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(segment_digest, jobs))


def measure(params: int, directory: Path, repeats: int) -> dict[str, Any]:
    """Write the checkpoint ``repeats`` times; after each write, alternate the hashing sides, cached then evicted."""
    workers = available_cpus()
    sides: dict[str, Callable[[list[Path]], object]] = {
        "sequential": lambda paths: sha256_files(paths, workers=1),
        "parallel": lambda paths: sha256_files(paths),
        "split": lambda paths: split_digests(paths, workers),
    }
    times: dict[str, list[float]] = {"write": []}
    times.update({f"{side} {cache}": [] for cache in ("cached", "evicted") for side in sides})
    digests: dict[str, object] = {}
    for repeat in range(repeats):
        folder = Path(tempfile.mkdtemp(prefix=f"checkpoint-checksums-{repeat}-", dir=directory))
        try:
            written = write_checkpoint(folder, params)
            times["write"].append(sum(written.values()))
            paths = [folder / name for name in written]
            sizes = {name: (folder / name).stat().st_size for name in written}
            for cache in ("cached", "evicted"):
                for side, work in sides.items():
                    if cache == "evicted":
                        sync_and_evict(paths)
                    start = time.perf_counter()
                    digests[side] = work(paths)
                    times[f"{side} {cache}"].append(time.perf_counter() - start)
            assert digests["parallel"] == digests["sequential"], "parallel digests differ from sequential ones"
        finally:
            shutil.rmtree(folder)
    total = sum(sizes.values())
    bound = total / max(max(sizes.values()), total / workers)  # whole files on `workers` threads
    return {"seconds": {k: median(v) for k, v in times.items()}, "runs": times, "sizes": sizes, "bound": bound,
            "workers": workers}  # fmt: skip


def run(params: int = QWEN_0_5B_PARAMS, directory: Path | None = None, repeats: int = 2) -> Result:
    set_threads()
    directory = directory or Path(tempfile.gettempdir())
    params, note = fitting_params(params, directory)
    load_before = os.getloadavg()[0]
    figures = measure(params, directory, repeats)
    seconds = figures["seconds"]
    gigabytes = sum(figures["sizes"].values()) / 1e9
    detail: dict[str, object] = {
        "checkpoint": f"{params:,} parameters, {gigabytes:.2f} GB in "
        + ", ".join(f"{name} {size / 1e9:.2f} GB" for name, size in figures["sizes"].items()),
        "space": note,
        "threads": f"{figures['workers']} (CPUs available); whole-file parallel bound {figures['bound']:.2f}x",
        "write s (median of runs)": f"{seconds['write']:.1f} ({gigabytes / seconds['write']:.2f} GB/s)",
    }
    for cache in ("cached", "evicted"):
        for side in ("sequential", "parallel", "split"):
            took = seconds[f"{side} {cache}"]
            detail[f"{side} hash, {cache}"] = (
                f"{took:.1f} s ({gigabytes / took:.2f} GB/s), hash/write {took / seconds['write']:.2f}x"
            )
        detail[f"speed-up parallel, {cache}"] = f"{seconds[f'sequential {cache}'] / seconds[f'parallel {cache}']:.2f}x"
        detail[f"speed-up split, {cache}"] = f"{seconds[f'sequential {cache}'] / seconds[f'split {cache}']:.2f}x"
    detail["runs s"] = {side: [round(t, 2) for t in runs] for side, runs in figures["runs"].items()}
    detail["load average (1 min) before / after"] = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    detail["machine"] = machine()
    ratio = seconds["parallel cached"] / seconds["write"]
    return Result("Checkpoint SHA-256 at save (parallel, page cache) / write time", ratio, TARGET, False, detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=QWEN_0_5B_PARAMS, help="parameters of the model checkpointed")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=2, help="checkpoints written (each hashed by every side)")
    args = parser.parse_args()
    print_result(run(args.params, args.dir, args.repeats))


if __name__ == "__main__":
    main()
