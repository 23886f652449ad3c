"""Find data files, fingerprint them, and split records into train and validation.

Reading pretraining documents is :mod:`llmtrain.data.documents` (streaming, file:line errors);
reading conversations is :mod:`llmtrain.data.conversations`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from llmtrain.config.sources import parse_sources
from llmtrain.data.documents import data_suffix, supported_names
from llmtrain.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FULL_DIGEST_MAX_BYTES = 8 << 20  # data files up to this size are hashed whole (see file_digest)
DIGEST_SAMPLE_BYTES = 1 << 20
# Fixed so the held-out records stay the same across runs and seeds (and cached datasets stay valid).
VALIDATION_SPLIT_SEED = 20240601


def resolve_data_files(specs: Iterable[str], field_name: str) -> list[Path]:
    """Expand files, globs and directories (searched recursively) into a sorted, de-duplicated list.

    ``field_name`` is the argument the specs came from; it is named in every error. A weighted
    ``train_files`` entry (:mod:`llmtrain.data.sources`) counts by its spec.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x"); _ = (d / "b.md").write_text("y")
    >>> _ = (d / "c.jsonl.zst").write_bytes(b"")
    >>> [p.name for p in resolve_data_files([str(d)], "train_files")]
    ['a.txt', 'c.jsonl.zst']
    """
    sources = parse_sources(list(specs), field_name)
    if sources[0].weight is not None and field_name != "train_files":
        raise ConfigError(f"{field_name}: weights are for train_files sources; give {field_name} without them")
    found: list[Path] = []
    for spec in (spec for source in sources for spec in source.specs):
        path = Path(spec).expanduser()
        if path.is_dir():
            matches = [p for p in sorted(path.rglob("*")) if p.is_file() and data_suffix(p)]
            if not matches:
                raise DataError(f"{field_name}: directory {spec} holds no data files ({supported_names()})")
        elif glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
            if not matches:
                raise DataError(f"{field_name}: pattern {spec} matches no files")
        elif path.is_file():
            matches = [path]
        else:
            raise DataError(f"{field_name}: data file {spec} does not exist")
        for match in matches:
            if not data_suffix(match):
                raise DataError(f"{field_name}: {match} has an unsupported type; use {supported_names()}")
        found += matches
    return sorted({p.resolve() for p in found})


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content, or (above FULL_DIGEST_MAX_BYTES) of its size and three samples.

    Files up to 8 MiB are hashed whole; a larger one by its size plus 1 MiB each from its start,
    middle and end, so fingerprinting a multi-GB corpus reads a few MiB per file. An edit that keeps
    the size and touches none of the samples goes unnoticed (the modification time, in the cache
    key, still rebuilds the tokenized data).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.txt"; _ = p.write_text("abc")
    >>> file_digest(p)[:20]
    'sha256:ba7816bf8f01c'
    """
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= FULL_DIGEST_MAX_BYTES:
            for chunk in iter(lambda: handle.read(DIGEST_SAMPLE_BYTES), b""):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        for offset in (0, (size - DIGEST_SAMPLE_BYTES) // 2, size - DIGEST_SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(DIGEST_SAMPLE_BYTES))
    return f"sha256-sampled:{digest.hexdigest()}"


def file_fingerprints(paths: Iterable[Path]) -> list[dict[str, object]]:
    """Identity of each file: absolute path, size, modification time (cache keys) and content digest (resume)."""
    return [
        {
            "path": str(path),
            "size": path.stat().st_size,
            "mtime_ns": path.stat().st_mtime_ns,
            "digest": file_digest(path),
        }
        for path in paths
    ]


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two recorded data identities (the ``sources`` of a manifest), one line per file.

    Files are compared by path, size and content digest; a new modification time alone is no change.

    >>> old = {"train": [{"path": "/d/a.jsonl", "size": 10, "digest": "x"}, {"path": "/d/b.jsonl", "size": 5}]}
    >>> data_changes(old, {"train": [{"path": "/d/a.jsonl", "size": 12, "digest": "y"}]})
    ['train_files: /d/a.jsonl changed (10 -> 12 bytes)', 'train_files: /d/b.jsonl removed']
    """
    changes = []
    for split in ("train", "validation"):
        before = {str(entry["path"]): entry for entry in saved.get(split, [])}
        after = {str(entry["path"]): entry for entry in current.get(split, [])}
        for path in sorted(set(before) | set(after)):
            old, new = before.get(path), after.get(path)
            if old is None:
                changes.append(f"{split}_files: {path} added")
            elif new is None:
                changes.append(f"{split}_files: {path} removed")
            elif old["size"] != new["size"]:
                changes.append(f"{split}_files: {path} changed ({old['size']} -> {new['size']} bytes)")
            elif old.get("digest") and new.get("digest") and old["digest"] != new["digest"]:
                changes.append(f"{split}_files: {path} changed (same size, other content)")
    return changes


def train_validation_splits(
    records: datasets.Dataset, validation: datasets.Dataset | None, percentage: float, unit: str
) -> dict[str, datasets.Dataset]:
    """``{"train", "validation"}``: the given validation set, or ``percentage``% of ``records`` held out.

    The hold-out uses a fixed seed; ``percentage == 0`` and no validation set means train only.
    ``unit`` ("documents", "conversations") names what is counted in the error for a split that
    would leave nothing out.
    """
    if validation is not None:
        return {"train": records, "validation": validation}
    if percentage <= 0:
        return {"train": records}
    try:
        divided = records.train_test_split(test_size=percentage / 100, seed=VALIDATION_SPLIT_SEED)
    except ValueError as error:
        raise DataError(
            f"validation_split_percentage={percentage} leaves no validation {unit} out of {len(records)}: {error}"
        ) from error
    return {"train": divided["train"], "validation": divided["test"]}
