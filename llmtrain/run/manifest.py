"""The run manifest: what produced a checkpoint or a final model, written beside it.

``run_manifest.json`` holds the run id (SwanLab continues the same experiment on resume), the
resolved config (no secrets), package versions, the git commit
of this project when it is a checkout, the prepared dataset's location, data file fingerprints
and its sample, token and dropped counts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from llmtrain.paths import PROJECT_ROOT

MANIFEST_FILE = "run_manifest.json"
TRACKED_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "deepspeed", "peft", "swanlab", "torchdata")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the training stack (None for a package that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit of ``root`` (with ``-dirty`` when it has local changes), or None."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def run_manifest(
    run_config: dict[str, Any], data_path: Path, data_metadata: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Everything needed to say what produced a model (see module docstring).

    ``run_id`` names the run in trackers; a resumed run keeps the id its checkpoint holds.
    """
    return {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": run_config,
        "packages": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "data": {"path": str(data_path), **data_metadata},
    }


def write_manifest(directory: Path, manifest: dict[str, Any], global_step: int) -> None:
    """Write ``run_manifest.json`` (with the step it describes) atomically into ``directory``."""
    staging = directory / f".{MANIFEST_FILE}.tmp"
    staging.write_text(json.dumps({**manifest, "global_step": global_step}, indent=1, sort_keys=True, default=str))
    os.replace(staging, directory / MANIFEST_FILE)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The ``run_manifest.json`` in ``directory`` (a checkpoint or a final model), or {} where there is none."""
    path = directory / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
