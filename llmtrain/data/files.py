"""Find data files, fingerprint them, and split records into train and validation.

Which files a stage reads is decided here, once (:data:`STAGE_FILES`): pretraining's
:data:`~llmtrain.data.documents.DOCUMENT_FILES`, SFT's
:data:`~llmtrain.data.conversations.CONVERSATION_FILES`, by name, case-insensitively. Reading
pretraining documents is :mod:`llmtrain.data.documents` (streaming, file:line errors); reading
conversations is :mod:`llmtrain.data.conversations`.

Folder rules (:func:`resolve_data_files`): a folder is searched recursively and yields every file
its stage reads; any other file in it is named in one WARNING with the count taken (never an
error, never silence). A data path that is not a regular file (a device, a FIFO, a socket, a
broken symbolic link), whether named, matched by a pattern or found in a folder under a data
file's name, is one error saying what it is.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmtrain.config.sources import parse_sources
from llmtrain.data.conversations import CONVERSATION_FILES
from llmtrain.data.documents import DOCUMENT_FILES
from llmtrain.data.records import FileTypes
from llmtrain.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FULL_DIGEST_MAX_BYTES = 8 << 20  # data files up to this size are hashed whole (see file_digest)
DIGEST_SAMPLE_BYTES = 1 << 20
# Fixed so the held-out records stay the same across runs and seeds (and cached datasets stay valid).
VALIDATION_SPLIT_SEED = 20240601
# The files each stage reads (by the stage names of llmtrain.stages): the one place that decides.
STAGE_FILES: dict[str, FileTypes] = {"pretrain": DOCUMENT_FILES, "sft": CONVERSATION_FILES}
LEFT_OUT_SHOWN = 10  # names of left-out files in a folder's warning; the rest are counted
REGULAR, DIRECTORY, MISSING = "a regular file", "a directory", "missing"


def file_kind(path: Path) -> str:
    """What ``path`` is, following symbolic links: :data:`REGULAR`, :data:`DIRECTORY`, :data:`MISSING`, or a phrase.

    >>> file_kind(Path("/dev/null")), file_kind(Path("/")), file_kind(Path("/no/such/file"))
    ('a character device', 'a directory', 'missing')
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a broken symbolic link (to {os.readlink(path)})"
        return MISSING
    except OSError as error:  # a symbolic-link loop, a name too long, a folder without permission
        return f"unreadable ({error.strerror or error})"
    for test, kind in (
        (stat.S_ISREG, REGULAR),
        (stat.S_ISDIR, DIRECTORY),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _not_a_data_file(field_name: str, path: Path, kind: str) -> DataError:
    link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() and "symbolic link" not in kind else ""
    return DataError(f"{field_name}: {path}{link} is {kind}, not a data file")


def resolve_data_files(
    specs: Iterable[str], field_name: str, stage: str = "pretrain", notes: list[str] | None = None
) -> list[Path]:
    """Expand files, globs and directories (searched recursively) into a sorted, de-duplicated list.

    ``field_name`` is the argument the specs came from; it is named in every error. ``stage``
    (``pretrain``, ``sft``) picks the files read (:data:`STAGE_FILES`). A weighted ``train_files``
    entry (:mod:`llmtrain.data.sources`) counts by its spec.

    - A file named directly must be a regular file of a type the stage reads; a pattern's matches
      too (folders it matches are not searched: the pattern says which files).
    - A folder yields every file the stage reads; the other files in it are named in one warning
      per folder, with the count taken (logged, or appended to ``notes`` when given). A folder
      with none is an error, naming what it holds.
    - Anything that is not a regular file (device, FIFO, socket, broken symbolic link) is an error
      saying what it is: named, matched, or in a folder under a name the stage reads.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x"); _ = (d / "b.md").write_text("y")
    >>> _ = (d / "c.jsonl.zst").write_bytes(b""); _ = (d / "D.JSONL").write_text("")
    >>> notes = []
    >>> [p.name for p in resolve_data_files([str(d)], "train_files", notes=notes)]
    ['D.JSONL', 'a.txt', 'c.jsonl.zst']
    >>> [p.name for p in resolve_data_files([str(d)], "train_files", "sft", notes)]
    ['D.JSONL', 'c.jsonl.zst']
    >>> notes[-1].split(": ", 2)[2]
    'took 2 data files; left out 2 this stage does not read: a.txt, b.md'
    """
    reads = STAGE_FILES[stage]
    sources = parse_sources(list(specs), field_name)
    if sources[0].weight is not None and field_name != "train_files":
        raise ConfigError(f"{field_name}: weights are for train_files sources; give {field_name} without them")
    found: list[Path] = []
    for spec in (spec for source in sources for spec in source.specs):
        path = Path(spec).expanduser()
        kind = file_kind(path)
        if kind == DIRECTORY:
            matches = _scan_folder(path, spec, field_name, reads, notes)
        elif glob.has_magic(spec):
            matches = []
            for match in map(Path, sorted(glob.glob(str(path), recursive=True))):
                match_kind = file_kind(match)
                if match_kind == REGULAR:
                    matches.append(match)
                elif match_kind != DIRECTORY:
                    raise _not_a_data_file(field_name, match, match_kind)
            if not matches:
                raise DataError(f"{field_name}: pattern {spec} matches no files")
        elif kind == REGULAR:
            matches = [path]
        elif kind == MISSING:
            raise DataError(f"{field_name}: data file {spec} does not exist")
        else:
            raise _not_a_data_file(field_name, path, kind)
        for match in matches:
            if not reads.format_of(match):
                raise DataError(f"{field_name}: {match} has an unsupported type; use {reads.names()}")
        found += matches
    return sorted({p.resolve() for p in found})


def _scan_folder(folder: Path, spec: str, field_name: str, reads: FileTypes, notes: list[str] | None) -> list[Path]:
    """The files under ``folder`` that ``reads`` takes; the others named in one note (see resolve_data_files)."""
    taken: list[Path] = []
    left_out: list[str] = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        kind = file_kind(path)
        if kind == DIRECTORY:
            if path.is_symlink():  # rglob does not descend into linked folders: say so
                left_out.append(f"{name}/ (a symbolic link to a folder, not searched)")
        elif kind == REGULAR:
            if reads.format_of(path):
                taken.append(path)
            else:
                left_out.append(name)
        elif reads.format_of(path):
            raise _not_a_data_file(field_name, path, kind)
        else:
            left_out.append(f"{name} ({kind})")
    shown = ", ".join(left_out[:LEFT_OUT_SHOWN])
    if len(left_out) > LEFT_OUT_SHOWN:
        shown += f" and {len(left_out) - LEFT_OUT_SHOWN} more"
    if not taken:
        holds = f"; it holds: {shown}" if left_out else " (it is empty)"
        raise DataError(f"{field_name}: directory {spec} holds no data files ({reads.names()}){holds}")
    if left_out:
        note = (
            f"{field_name}: {spec}: took {len(taken)} data file{'s' if len(taken) > 1 else ''}; left out "
            f"{len(left_out)} this stage does not read: {shown}"
        )
        if notes is None:
            logger.warning("%s", note)
        else:
            notes.append(note)
    return taken


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
