"""Which checkpoints are complete: the completion marker, written last, and the check resume makes against it.

A ``checkpoint-N`` folder counts only once it holds ``llmtrain_complete.json``: a manifest of every
file in the folder (its size; its SHA-256 too under ``checkpoint_checksums``), fsynced and renamed into
place after every rank finished its part of the save (:mod:`llmtrain.run.checkpoints`). The standard
library only: the launcher judges an attempt's progress with the same rule (:mod:`llmtrain.launch.progress`)
without importing the training stack.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmtrain.paths import file_sha256

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "llmtrain_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sha256_files(paths: Sequence[Path], workers: int | None = None) -> dict[Path, str]:
    """The SHA-256 of every file in ``paths``, several files at a time.

    ``workers`` threads (default: one per available CPU, at most one per file) each hash whole
    files, largest first, so that the biggest file does not start last. Each digest is the plain
    SHA-256 of the file; a single file is not split (its digest would no longer be ``sha256sum``'s).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a").write_bytes(b"abc")
    >>> sha256_files([folder / "a"])[folder / "a"][:16]
    'ba7816bf8f01cfea'
    """
    if not paths:
        return {}
    ordered = sorted(paths, key=lambda path: path.stat().st_size, reverse=True)
    threads = max(1, min(workers or available_cpus(), len(ordered)))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sha256") as pool:
        return dict(zip(ordered, pool.map(file_sha256, ordered), strict=True))


def _timed_sha256(checkpoint: Path, paths: Sequence[Path], done: str) -> dict[Path, str]:
    """:func:`sha256_files`, with its cost logged at INFO: the user pays it at every save and resume."""
    start = time.perf_counter()
    digests = sha256_files(paths)
    seconds = time.perf_counter() - start
    gigabytes = sum(path.stat().st_size for path in paths) / 1e9
    logger.info(
        "SHA-256 of %d files (%.2f GB) of %s %s in %.2f s (%.2f GB/s)",
        len(paths), gigabytes, checkpoint, done, seconds, gigabytes / max(seconds, 1e-9),
    )  # fmt: skip
    return digests


def write_completion_marker(checkpoint: Path, details: dict[str, Any], checksums: bool = False) -> None:
    """Record every file of ``checkpoint`` in the marker, atomically and last.

    Each file's size always; its SHA-256 too with ``checksums`` (hashed in parallel, time logged).
    The marker's ``"checksums"`` says which: ``"sha256"`` or ``"none"``.
    """
    paths = [
        path
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and not path.name.startswith(".") and path.name != COMPLETE_MARKER
    ]
    files: dict[str, dict[str, Any]] = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size} for path in paths
    }
    if checksums:
        for path, digest in _timed_sha256(checkpoint, paths, "computed").items():
            files[path.relative_to(checkpoint).as_posix()]["sha256"] = digest
    marker = {**details, "checksums": "sha256" if checksums else "none", "files": files}
    staging = checkpoint / f".{COMPLETE_MARKER}.tmp"
    with staging.open("w") as stream:
        json.dump(marker, stream, indent=1, sort_keys=True)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(staging, checkpoint / COMPLETE_MARKER)


def checkpoint_problem(checkpoint: Path, verify_checksums: bool = False) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when its marker and files agree.

    Sizes are always compared. With ``verify_checksums``, so are the SHA-256s the marker records
    (it reads every byte; time logged); a marker written without them is checked on sizes alone.
    """
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return "no completion marker (the save did not finish, or another tool wrote it)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"unreadable completion marker ({error})"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the marker says {expected['size']}"
    recorded = {checkpoint / name: entry["sha256"] for name, entry in files.items() if "sha256" in entry}
    if verify_checksums and recorded:
        digests = _timed_sha256(checkpoint, list(recorded), "checked")
        for path in sorted(recorded):
            if digests[path] != recorded[path]:
                name = path.relative_to(checkpoint).as_posix()
                return (
                    f"{name} does not match its checksum (SHA-256 {digests[path][:12]}..., the marker says "
                    f"{recorded[path][:12]}...): changed or damaged after the save"
                )
    return None


def saved_world_size(checkpoint: Path) -> int | None:
    """The number of ranks that wrote ``checkpoint`` (from its completion marker), if recorded."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.is_file():
        return None
    size = json.loads(marker.read_text()).get("world_size")
    return int(size) if size is not None else None
