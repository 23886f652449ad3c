"""Tokenize once: processed datasets saved to disk and reused by later runs and restarts.

A prepared dataset is a ``datasets.DatasetDict`` saved with ``save_to_disk`` plus a
``llmtrain_meta.json`` that records what it was built from. Building happens in a temporary
sibling directory that is renamed into place when complete, so a crash mid-build never leaves
a half-written dataset that a later run would trust, and two nodes racing to build the same
key on a shared filesystem both end up with one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from llmtrain.config.arguments import DataArguments
from llmtrain.data.files import file_fingerprints, resolve_data_files
from llmtrain.errors import ConfigError

logger = logging.getLogger(__name__)

META_FILE = "llmtrain_meta.json"


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description.

    >>> cache_key({"block_size": 8}) == cache_key({"block_size": 8}), cache_key({"block_size": 8})[:4]
    (True, 'dc75')
    """
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    """A stage's tokenized train/eval sets, where they are stored, whether this run built them, and their metadata."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    path: Path
    built: bool
    metadata: dict[str, Any]  # compat, stats (the stage's counts), sources (file fingerprints)


def load_or_build(
    path: Path,
    compat: dict[str, Any],
    build: Callable[[], tuple[datasets.DatasetDict, dict[str, Any]]],
    field_name: str,
    sources: dict[str, Any] | None = None,
) -> PreparedData:
    """Load the prepared dataset at ``path``, or build and save it there.

    ``compat`` describes what the dataset must match to be reused (tokenizer, block size, code
    version); an existing dataset whose ``compat`` differs is refused with an error naming
    ``field_name``, never silently trained on. ``build`` returns the datasets and stats to store;
    ``sources`` (data file fingerprints) is recorded beside them.
    """
    meta_path = path / META_FILE
    if path.exists():
        if not meta_path.is_file():
            raise ConfigError(f"{field_name}: {path} exists but is not a dataset prepared by llmtrain")
        metadata = json.loads(meta_path.read_text())
        _check_compatible(metadata["compat"], compat, path, field_name)
        logger.info("reusing the tokenized dataset at %s (no re-tokenization)", path)
        return _loaded(path, metadata, built=False)

    logger.info("tokenizing into %s", path)
    prepared, stats = build()
    metadata = {"compat": compat, "stats": stats, "sources": sources or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    prepared.save_to_disk(str(staging))
    (staging / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    try:
        os.rename(staging, path)
    except OSError:
        if not meta_path.is_file():
            raise
        logger.info("another process finished %s first; using its copy", path)
        shutil.rmtree(staging, ignore_errors=True)
    return _loaded(path, metadata, built=True)


def _loaded(path: Path, metadata: dict[str, Any], built: bool) -> PreparedData:
    splits = datasets.load_from_disk(str(path))
    assert isinstance(splits, datasets.DatasetDict)
    return PreparedData(splits["train"], splits.get("validation"), path, built, metadata)


def _check_compatible(saved: dict[str, Any], wanted: dict[str, Any], path: Path, field_name: str) -> None:
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"{field_name}: {path} was prepared with {key}={saved.get(key)!r} but this run needs "
                f"{wanted.get(key)!r}; delete it or point {field_name} elsewhere"
            )


@dataclass
class DataLocation:
    """Where a stage's prepared dataset lives, and the raw files it is (or would be) built from."""

    path: Path
    train_files: list[Path]
    validation_files: list[Path]
    sources: dict[str, Any]  # file fingerprints and split settings, recorded in the metadata


def locate_prepared_data(
    data_args: DataArguments, compat: dict[str, Any], stage: str, settings: dict[str, Any]
) -> DataLocation:
    """An existing ``tokenized_path`` as is (raw files unread); else resolve and fingerprint the files.

    The dataset then goes to ``tokenized_path`` when set, or to ``dataset_cache_dir`` under
    ``<stage>-<key>``, the key hashing ``compat``, the file fingerprints and ``settings`` (the
    stage's reading options).
    """
    if data_args.tokenized_path and Path(data_args.tokenized_path).exists():
        return DataLocation(Path(data_args.tokenized_path), [], [], {})
    assert data_args.train_files is not None
    train_files = resolve_data_files(data_args.train_files, "train_files")
    validation_files = (
        resolve_data_files(data_args.validation_files, "validation_files") if data_args.validation_files else []
    )
    sources = {
        "train": file_fingerprints(train_files),
        "validation": file_fingerprints(validation_files),
        "validation_split_percentage": data_args.validation_split_percentage,
        **settings,
    }
    path = (
        Path(data_args.tokenized_path)
        if data_args.tokenized_path
        else Path(data_args.dataset_cache_dir).expanduser() / f"{stage}-{cache_key({**compat, **sources})}"
    )
    return DataLocation(path, train_files, validation_files, sources)
