"""Tokenize once: processed datasets saved to disk and reused by later runs and restarts.

A prepared dataset is a directory the stage's build function fills (SFT: one row store per split,
:mod:`llmtrain.data.sft_rows`; pretraining: one token store per split) plus a
``llmtrain_meta.json`` that records what it was built from. Building happens in a temporary
sibling directory that is renamed into place when complete, so a crash mid-build never leaves
a half-written dataset that a later run would trust, and two nodes racing to build the same
key on a shared filesystem both end up with one complete copy.

Verification rule (a dataset damaged after it was built, e.g. a truncated copy, is never trusted):

- At build time the metadata's ``files`` lists every file of the saved dataset (path relative to
  it, size in bytes) and a SHA-256 for each file of at most :data:`HASH_SMALL_FILE_BYTES` (the
  JSON state files) and, when the whole dataset is at most :data:`HASH_DATASET_BYTES`, for its
  data files too. Above that only sizes are recorded, so neither building nor verifying
  ever reads a multi-GB dataset in full.
- Before reuse every listed file must exist with its recorded size and, where recorded, hash;
  files that are not listed are ignored. Then the dataset is loaded, which checks each store
  against its own index; an error while loading also counts as damage.
- Damaged and rebuildable (the cache-dir copy, keyed on its raw files; or ``tokenized_path``
  when this run's raw files resolve to the unchanged files recorded in its metadata): one WARNING
  names the file and the fault, the damaged copy is renamed aside and deleted, and the dataset is
  built again through the atomic path above. Otherwise one ``ConfigError`` names the field, the
  file and the fault, and nothing is written.

A refused run writes nothing: the caller's ``check_sources`` (a resumed run's data identity) runs on
the raw files' fingerprints before any output exists, and a build that fails (a bad record,
nothing to train on) leaves no staging directory, and no cache directory it created, behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.config.arguments import DataArguments
from llmtrain.config.sources import parse_sources
from llmtrain.data.files import file_fingerprints, resolve_data_files
from llmtrain.errors import ConfigError, DataError
from llmtrain.paths import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

META_FILE = "llmtrain_meta.json"
# Hashing 64 MiB takes ~0.1 s, negligible beside tokenizing; above that only sizes are checked.
HASH_DATASET_BYTES = 64 * 2**20
# datasets' JSON state files are a few hundred bytes: always hashed, whatever the dataset's size.
HASH_SMALL_FILE_BYTES = 2**20
# What a damaged store raises while loading (a missing or truncated file: OSError; an index that does not match
# its files: StoreDamaged, a ValueError; unreadable metadata: ValueError or KeyError).
LOAD_ERRORS = (OSError, ValueError, KeyError)
SHOWN_PROBLEMS = 3  # a message names this many damaged files, then counts the rest


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description.

    >>> cache_key({"block_size": 8}) == cache_key({"block_size": 8}), cache_key({"block_size": 8})[:4]
    (True, 'dc75')
    """
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return cache_key({"tokenizer": definition, "eos": tokenizer.eos_token})


@dataclass
class PreparedData:
    """A stage's tokenized train/eval sets, where they are stored, whether this run built them, and their metadata."""

    train: Any  # a datasets.Dataset (SFT) or token-store blocks (pretraining): indexable, with a length
    eval: Any
    path: Path
    built: bool
    metadata: dict[str, Any]  # compat, stats (the stage's counts), sources (file fingerprints), files (sizes, hashes)
    identity_checked: bool = False  # load_or_build ran the caller's check_sources on these sources


@dataclass
class RawFiles:
    """The raw files a prepared dataset is (or would be) built from."""

    train_files: list[Path]
    validation_files: list[Path]
    sources: dict[str, Any]  # file fingerprints and split settings, recorded in the metadata
    train_sources: list[tuple[str, list[Path]]]  # weighted pretraining sources: (name, files); else one
    notes: list[str] = field(default_factory=list)  # folder scans' warnings (files left out), logged when building


@dataclass
class DataLocation:
    """Where a stage's prepared dataset lives, and how to find the raw files it is built from."""

    path: Path
    keyed_on_sources: bool  # a dataset_cache_dir path: its name is a key of the raw files, so they are known
    raw_files: Callable[[], RawFiles]  # resolved and fingerprinted on first call, then cached; DataError if missing


# Writes the prepared splits of the raw files into the given (new, empty) directory; returns the stage's stats.
Build = Callable[[RawFiles, Path], dict[str, Any]]
# Opens the prepared splits in a directory: (train, eval or None); LOAD_ERRORS where the files are damaged.
Load = Callable[[Path], tuple[Any, Any]]
# Refuses (raises) data whose ``sources`` (file fingerprints) this run may not use, e.g. a resume on edited data.
CheckSources = Callable[[dict[str, Any]], None]


def load_or_build(
    location: DataLocation,
    compat: dict[str, Any],
    build: Build,
    load: Load,
    field_name: str,
    check_sources: CheckSources | None = None,
) -> PreparedData:
    """Load the prepared dataset at ``location.path`` after verifying it, or build and save it there.

    ``compat`` describes what the dataset must match to be reused (tokenizer, block size, code
    version); an existing dataset whose ``compat`` differs is refused with an error naming
    ``field_name``, never silently trained on. A damaged one is rebuilt or refused by the rule in
    the module docstring. ``build`` writes the splits from the raw files into a staging directory
    and returns the stats to store; the raw files' ``sources`` and the written files' sizes and
    hashes are recorded beside them. ``load`` opens the splits. ``check_sources`` is given the
    sources of the data this run would train on, the recorded ones of a reused dataset or the raw
    files' before anything is built, so a refusal writes nothing; a failed build removes what it wrote.
    """
    path = location.path
    if path.exists():
        metadata, problems = _read_metadata(path, field_name)
        if metadata is not None:
            _check_compatible(metadata["compat"], compat, path, field_name)
            problems = find_damage(path, metadata)
        if not problems:
            assert metadata is not None
            if check_sources is not None:
                check_sources(metadata.get("sources") or {})
            try:
                prepared = _loaded(path, metadata, load, built=False)
            except LOAD_ERRORS as error:
                problems = [f"could not be loaded ({_one_line(error)})"]
            else:
                logger.info("reusing the tokenized dataset at %s (no re-tokenization)", path)
                prepared.identity_checked = check_sources is not None
                return prepared
        _refuse_or_move_aside(location, metadata, problems, field_name)

    raw = location.raw_files()
    if check_sources is not None:
        check_sources(raw.sources)
    for note in raw.notes:
        logger.warning("%s", note)
    logger.info("tokenizing into %s", path)
    created = _missing_ancestors(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        stats = build(raw, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # deepest first; one another process has filled since stays
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    metadata = {"compat": compat, "stats": stats, "sources": raw.sources, "files": file_manifest(staging)}
    (staging / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    try:
        os.rename(staging, path)
    except OSError:
        if not (path / META_FILE).is_file():
            raise
        logger.info("another process finished %s first; using its copy", path)
        shutil.rmtree(staging, ignore_errors=True)
    prepared = _loaded(path, metadata, load, built=True)
    prepared.identity_checked = check_sources is not None
    return prepared


def _missing_ancestors(directory: Path) -> list[Path]:
    """``directory`` and its parents that do not exist yet, deepest first (what ``mkdir(parents=True)`` creates).

    >>> [p.name for p in _missing_ancestors(Path("/tmp/no-such-llmtrain-dir/a/b"))]
    ['b', 'a', 'no-such-llmtrain-dir']
    """
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"?}}`` for every file under ``directory`` but the metadata.

    A file is hashed when it is small (the JSON state files) or the whole dataset is small; a
    multi-GB dataset's data files get sizes only, so the manifest costs nothing to build.
    """
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META_FILE)
    sizes = {file: file.stat().st_size for file in files}
    hash_everything = sum(sizes.values()) <= HASH_DATASET_BYTES
    manifest: dict[str, dict[str, Any]] = {}
    for file in files:
        entry: dict[str, Any] = {"size": sizes[file]}
        if hash_everything or sizes[file] <= HASH_SMALL_FILE_BYTES:
            entry["sha256"] = file_sha256(file)
        manifest[file.relative_to(directory).as_posix()] = entry
    return manifest


def find_damage(path: Path, metadata: dict[str, Any]) -> list[str]:
    """What is wrong with the files of the prepared dataset at ``path``, one ``"file: fault"`` each.

    Checks the ``files`` recorded in ``metadata`` (presence, size, hash where recorded). A dataset
    whose metadata has no file list (prepared by an older llmtrain) gets no file checks here;
    loading it is its only check.
    """
    files = metadata.get("files")
    if files is None:
        logger.info("%s was prepared before file lists were recorded: only loading it can check it", path)
        return []
    problems = []
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif (size := file.stat().st_size) != expected["size"]:
            problems.append(f"{name}: {size} bytes, expected {expected['size']}")
        elif "sha256" in expected and file_sha256(file) != expected["sha256"]:
            problems.append(f"{name}: content differs from the SHA-256 recorded when it was built")
    return problems


def _read_metadata(path: Path, field_name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The metadata, or ``None`` and why it is unreadable; a directory without one is not ours to touch."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ConfigError(f"{field_name}: {path} exists but is not a dataset prepared by llmtrain")
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, ValueError) as error:
        return None, [f"{META_FILE}: unreadable ({_one_line(error)})"]
    if not isinstance(metadata, dict) or not isinstance(metadata.get("compat"), dict):
        return None, [f"{META_FILE}: no compat record"]
    return metadata, []


def _loaded(path: Path, metadata: dict[str, Any], load: Load, built: bool) -> PreparedData:
    train, evaluation = load(path)
    return PreparedData(train, evaluation, path, built, metadata)


def _refuse_or_move_aside(
    location: DataLocation, metadata: dict[str, Any] | None, problems: list[str], field_name: str
) -> None:
    """Refuse (ConfigError, nothing touched) unless the raw files are known; else warn and remove the copy."""
    path = location.path
    summary = "; ".join(problems[:SHOWN_PROBLEMS])
    if len(problems) > SHOWN_PROBLEMS:
        summary += f"; {len(problems) - SHOWN_PROBLEMS} more"
    unknown = _why_raw_files_unknown(location, metadata)
    if unknown is not None:
        raise ConfigError(
            f"{field_name}: the prepared dataset {path} is damaged ({summary}) and cannot be rebuilt: {unknown}; "
            f"delete {path}, or rerun with the train_files it was prepared from, to tokenize again"
        )
    logger.warning("the prepared dataset %s is damaged (%s); deleting it and tokenizing again", path, summary)
    aside = path.parent / f".{path.name}.damaged-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        logger.info("another process already moved the damaged %s aside", path)
    shutil.rmtree(aside, ignore_errors=True)


def _why_raw_files_unknown(location: DataLocation, metadata: dict[str, Any] | None) -> str | None:
    """``None`` when this run can rebuild the very dataset that was at ``location.path``; else why not."""
    if location.keyed_on_sources:
        return None
    if metadata is None:
        return "its metadata is unreadable, so the raw files it was built from are unknown"
    try:
        raw = location.raw_files()
    except DataError as error:
        return f"its raw files are not available ({error})"
    if raw.sources != metadata.get("sources"):
        recorded = [entry["path"] for entry in (metadata.get("sources") or {}).get("train", [])]
        shown = ", ".join(recorded[:SHOWN_PROBLEMS]) + (", ..." if len(recorded) > SHOWN_PROBLEMS else "")
        return (
            f"this run's raw files or split settings are not the unchanged ones it was prepared from "
            f"(train_files: {shown or 'unknown'})"
        )
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _check_compatible(saved: dict[str, Any], wanted: dict[str, Any], path: Path, field_name: str) -> None:
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise ConfigError(
                f"{field_name}: {path} was prepared with {key}={saved.get(key)!r} but this run needs "
                f"{wanted.get(key)!r}; delete it or point {field_name} elsewhere"
            )


def locate_prepared_data(
    data_args: DataArguments, compat: dict[str, Any], stage: str, settings: dict[str, Any]
) -> DataLocation:
    """Where the prepared dataset goes, and its raw files: resolved now unless ``tokenized_path`` exists.

    An existing ``tokenized_path`` is used as is: its raw files are resolved only if it turns out
    damaged (to rebuild it from them). Otherwise the dataset goes to ``tokenized_path`` when set,
    or to ``dataset_cache_dir`` under ``<stage>-<key>``, the key hashing ``compat``, the file
    fingerprints and ``settings`` (the stage's reading options).
    """
    resolve = functools.cache(lambda: _resolve_raw_files(data_args, settings, stage))
    if data_args.tokenized_path:
        return DataLocation(Path(data_args.tokenized_path), False, resolve)
    path = Path(data_args.dataset_cache_dir).expanduser() / f"{stage}-{cache_key({**compat, **resolve().sources})}"
    return DataLocation(path, True, resolve)


def _resolve_raw_files(data_args: DataArguments, settings: dict[str, Any], stage: str) -> RawFiles:
    """The raw files the stage reads (``STAGE_FILES``), fingerprinted; folder notes kept for the build to log."""
    assert data_args.train_files is not None
    notes: list[str] = []
    train_files = resolve_data_files(data_args.train_files, "train_files", stage, notes)
    weighted = parse_sources(data_args.train_files)
    train_sources = (
        [(source.name, resolve_data_files(list(source.specs), "train_files", stage, [])) for source in weighted]
        if weighted[0].weight is not None
        else [("train_files", train_files)]
    )
    validation_files = (
        resolve_data_files(data_args.validation_files, "validation_files", stage, notes)
        if data_args.validation_files
        else []
    )
    sources = {
        "train": file_fingerprints(train_files),
        "validation": file_fingerprints(validation_files),
        "validation_split_percentage": data_args.validation_split_percentage,
        **settings,
    }
    if len(train_sources) > 1 or weighted[0].weight is not None:  # which files make which store
        sources["train_sources"] = [[name, [str(path) for path in files]] for name, files in train_sources]
    return RawFiles(train_files, validation_files, sources, train_sources, notes)
