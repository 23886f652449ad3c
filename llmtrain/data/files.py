"""Find data files and read them into ``datasets`` tables, with errors that name file and line.

Reading goes through ``datasets``' fast Arrow readers. Only when a file fails to load, or a
record lacks the requested field, is it re-read line by line in Python to say exactly where
and what is wrong, so the common path stays fast.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from llmtrain.data.records import decode_line, iter_json_records
from llmtrain.errors import DataError

logger = logging.getLogger(__name__)

# Suffix -> datasets builder name.
BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
UTF8_CHECK_CHUNK_BYTES = 1 << 24  # bounded memory while validating multi-GB files
FULL_DIGEST_MAX_BYTES = 8 << 20  # data files up to this size are hashed whole (see file_digest)
DIGEST_SAMPLE_BYTES = 1 << 20
# Fixed so the held-out records stay the same across runs and seeds (and cached datasets stay valid).
VALIDATION_SPLIT_SEED = 20240601


def resolve_data_files(specs: Iterable[str], field_name: str) -> list[Path]:
    """Expand files, globs and directories (searched recursively) into a sorted, de-duplicated list.

    ``field_name`` is the argument the specs came from; it is named in every error.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x"); _ = (d / "b.md").write_text("y")
    >>> [p.name for p in resolve_data_files([str(d)], "train_files")]
    ['a.txt']
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            matches = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in BUILDERS]
            if not matches:
                raise DataError(f"{field_name}: directory {spec} holds no {'/'.join(BUILDERS)} files")
        elif glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
            if not matches:
                raise DataError(f"{field_name}: pattern {spec} matches no files")
        elif path.is_file():
            matches = [path]
        else:
            raise DataError(f"{field_name}: data file {spec} does not exist")
        for match in matches:
            if match.suffix not in BUILDERS:
                raise DataError(f"{field_name}: {match} has an unsupported type; use {', '.join(BUILDERS)}")
        found += matches
    return sorted({p.resolve() for p in found})


def load_text_file(path: Path, text_field: str, txt_sample_by: str) -> datasets.Dataset:
    """Load one data file as a dataset with a single ``text`` column of non-null strings.

    Raises :class:`DataError` naming ``path`` (and the line, where there is one) when the file is
    empty, not valid JSON / UTF-8, or a record lacks ``text_field`` or holds a non-string there.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    builder = BUILDERS[path.suffix]
    if builder != "parquet" and not _is_utf8(path):
        raise DataError(_diagnose(path, text_field) or f"{path}: not valid UTF-8")
    kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
    try:
        with _datasets_errors_silenced():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as error:  # Arrow and datasets raise many types here; we diagnose them all.
        raise DataError(_diagnose(path, text_field) or f"{path}: cannot be read: {error}") from error
    assert isinstance(dataset, datasets.Dataset)
    column = "text" if builder == "text" else text_field
    if column not in dataset.column_names:
        found = ", ".join(dataset.column_names) or "none"
        raise DataError(f"{path}: no field '{text_field}' in the records (fields: {found}); set --text_field")
    values = dataset.data.column(column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        message = _diagnose(path, text_field) or f"{path}: field '{text_field}' holds {values.type}, not text"
        raise DataError(message)
    if values.null_count:
        first_null = pc.indices_nonzero(pc.is_null(values)).to_pylist()[0]
        message = _diagnose(path, text_field) or f"{path}: record {first_null + 1} has no '{text_field}'"
        raise DataError(message)
    if len(dataset) == 0:
        raise DataError(f"{path}: the file holds no records")
    extra = [name for name in dataset.column_names if name != column]
    dataset = dataset.remove_columns(extra)
    return dataset.rename_column(column, "text") if column != "text" else dataset


@contextlib.contextmanager
def _datasets_errors_silenced() -> Iterator[None]:
    """datasets logs its own ERROR line on a bad file; ours, with the line number, replaces it."""
    datasets_logger = logging.getLogger("datasets")
    previous = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(previous)


def _is_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (Arrow's JSON reader lets bad bytes through)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(UTF8_CHECK_CHUNK_BYTES):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _diagnose(path: Path, text_field: str) -> str | None:
    """Re-read ``path`` in Python and describe its first bad record as ``file:line: problem``."""
    if path.suffix == ".parquet":
        return None
    try:
        if path.suffix == ".txt":
            with path.open("rb") as stream:
                for number, raw_line in enumerate(stream, start=1):
                    decode_line(raw_line, f"{path}:{number}")
            return None
        for where, record in iter_json_records(path):
            problem = _record_problem(record, text_field)
            if problem:
                return f"{where}: {problem}"
    except DataError as error:
        return str(error)
    return None


def _record_problem(record: object, text_field: str) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if text_field not in record or record[text_field] is None:
        return f"missing field '{text_field}' (fields: {', '.join(record) or 'none'})"
    if not isinstance(record[text_field], str):
        return f"field '{text_field}' must be a string, got {type(record[text_field]).__name__}"
    return None


def load_text_files(paths: Iterable[Path], text_field: str, txt_sample_by: str) -> datasets.Dataset:
    """Load and concatenate several files (see :func:`load_text_file`) in the given order."""
    parts = [load_text_file(path, text_field, txt_sample_by) for path in paths]
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


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
