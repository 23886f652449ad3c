"""Read JSON records from ``.jsonl`` / ``.json`` files with errors that name the file and the line.

The one JSON reader of the project: the pretraining file diagnosis, the conversation reader and
the preflight (``doctor``) all go through it, so a bad record is described the same way wherever
it is found::

    path:LINE: not valid UTF-8 (invalid start byte at byte 5 of the line)
    path:LINE: invalid JSON (Expecting value, column 1)

A ``.jsonl`` file, and a ``.json`` file that does not start with ``[`` (``datasets`` reads those
as JSON lines too), yields one record per non-blank line, located as ``path:LINE``. A ``.json``
array yields its elements, located as ``path: record N``. A leading UTF-8 byte-order mark is
ignored. Lines are split on ``\\n`` only: ``str.splitlines`` would also split at U+2028, which JSON
strings may hold unescaped. Any of them may be compressed (``.gz``, ``.zst``: decompressed on the
fly); suffixes are matched case-insensitively (:class:`FileTypes` is a reader's rule for names).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.errors import DataError, InvalidRecord

UTF8_BOM = b"\xef\xbb\xbf"
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSIONS = (".gz", ".zst")  # read line by line, decompressed on the fly


def name_suffixes(path: Path) -> tuple[str, str]:
    """The format suffix and the compression suffix of ``path``'s name, lower-cased ("" where there is none).

    >>> name_suffixes(Path("e.jsonl.GZ")), name_suffixes(Path("part3.JSONL")), name_suffixes(Path("x.zst"))
    (('.jsonl', '.gz'), ('.jsonl', ''), ('', '.zst'))
    """
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        return (suffixes[0] if len(suffixes) == 2 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


@dataclass(frozen=True)
class FileTypes:
    """The data files one reader takes, decided by name alone (case-insensitively): its formats, plain or compressed.

    The one rule for a stage's files: its reader refuses other names, and a folder scan takes
    exactly these (:func:`llmtrain.data.files.resolve_data_files`).

    >>> conversations = FileTypes("conversation", (".jsonl", ".json"), compressible=(".jsonl", ".json"))
    >>> [conversations.format_of(Path(n)) for n in ("a.JSONL", "d.json.gz", "e.Jsonl.GZ", "n.txt", "x.gz")]
    ['.jsonl', '.json', '.jsonl', '', '']
    >>> conversations.names()
    '.jsonl, .json, .jsonl.gz, .jsonl.zst, .json.gz, .json.zst'
    """

    what: str  # names the files in messages: "conversation", "pretraining data"
    formats: tuple[str, ...]
    compressible: tuple[str, ...]  # the formats also read as .gz / .zst (streamed, or for an array, read whole)

    def format_of(self, path: Path) -> str:
        """The format of ``path`` (".jsonl", ...), or "" when this reader does not take it."""
        fmt, compression = name_suffixes(path)
        return fmt if fmt in (self.compressible if compression else self.formats) else ""

    def names(self) -> str:
        """Every name this reader takes, for messages."""
        compressed = [f"{fmt}{compression}" for fmt in self.compressible for compression in COMPRESSIONS]
        return ", ".join([*self.formats, *compressed])


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[io.BufferedIOBase]:
    """``path`` opened for reading bytes, decompressed on the fly for ``.gz`` and ``.zst`` (any case)."""
    compression = name_suffixes(path)[1]
    if compression == ".gz":
        with gzip.open(path, "rb") as stream:
            yield stream
    elif compression == ".zst":
        with path.open("rb") as raw:
            yield io.BufferedReader(ZstdReader(raw), buffer_size=1 << 20)
    else:
        with path.open("rb") as stream:
            yield stream


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a ``.zst`` stream (frames back to back, as ``zstd`` and ``pzstd`` write them).

    Unlike ``zstandard``'s own stream reader, a stream cut off inside a frame raises ``EOFError``
    instead of ending quietly with the records before the cut.
    """

    def __init__(self, raw: io.BufferedIOBase) -> None:
        import zstandard

        self._raw = raw
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._in_frame = False  # the current frame has started and not ended
        self._out = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset == len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the compressed stream ends inside a frame (a cut-off .zst file)")
                return 0
            self._out, self._offset = self._decompress(chunk), 0
        size = min(len(buffer), len(self._out) - self._offset)
        buffer[:size] = self._out[self._offset : self._offset + size]
        self._offset += size
        return size

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:
                self._frame = self._new_frame()
            out.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


@contextlib.contextmanager
def read_errors_named(path: Path) -> Iterator[None]:
    """Turn an unreadable, cut-off or corrupt (compressed) file into one :class:`DataError` naming ``path``."""
    try:
        yield
    except (OSError, EOFError) as error:  # EOFError: a truncated .gz; BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from error
    except Exception as error:
        if type(error).__name__ != "ZstdError":
            raise
        raise DataError(f"{path}: cannot be decompressed ({error})") from error


ARRAY_PROBE_BYTES = 64  # enough to see past a BOM and leading whitespace to a ``[``


def is_json_array(path: Path) -> bool:
    """True for a ``.json`` file (also ``.json.gz`` / ``.json.zst``, any case) whose first non-blank character is ``[``.

    Raises :class:`DataError` naming ``path`` when it cannot be read or decompressed.
    """
    if name_suffixes(path)[0] != ".json":
        return False
    with read_errors_named(path), open_binary(path) as stream:
        start = stream.read(ARRAY_PROBE_BYTES).removeprefix(UTF8_BOM).lstrip()
    return start[:1] == b"["


def decode_line(raw_line: bytes, where: str) -> str:
    """``raw_line`` as text, or a :class:`DataError` at ``where`` naming the bad byte.

    >>> decode_line(b"caf\\xe9 au lait", "c.txt:2")
    Traceback (most recent call last):
    ...
    llmtrain.errors.InvalidRecord: c.txt:2: not valid UTF-8 (invalid continuation byte at byte 3 of the line)
    """
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"not valid UTF-8 ({error.reason} at byte {error.start} of the line)"
        raise InvalidRecord(where, "invalid_utf8", problem) from error


def parse_json_line(line: str, where: str) -> object:
    """One JSON value, or a :class:`DataError` at ``where`` with the parser's reason and column.

    >>> parse_json_line('{"text": "hi"}', "a.jsonl:1")
    {'text': 'hi'}
    >>> parse_json_line('{"text": ', "a.jsonl:7")
    Traceback (most recent call last):
    ...
    llmtrain.errors.InvalidRecord: a.jsonl:7: invalid JSON (Expecting value, column 10)
    >>> parse_json_line('{"text": "\\\\ud800"}', "a.jsonl:2")
    Traceback (most recent call last):
    ...
    llmtrain.errors.InvalidRecord: a.jsonl:2: a lone UTF-16 surrogate escape ('\\ud800') is not text
    """
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidRecord(where, "invalid_json", f"invalid JSON ({error.msg}, column {error.colno})") from error
    if "\\ud" in line.lower():  # JSON may escape a lone UTF-16 surrogate, which is no text at all
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as error:
            surrogate = error.object[error.start]
            problem = f"a lone UTF-16 surrogate escape ({surrogate!r}) is not text"
            raise InvalidRecord(where, "invalid_json", problem) from error
    return value


def iter_json_records(path: Path, yield_invalid: bool = False) -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for every record of a JSON-lines file or ``.json`` array, in order.

    JSON lines are streamed (memory bounded by the longest line); an array is parsed whole.
    Raises :class:`DataError` naming ``path`` and the line for invalid UTF-8 or JSON; with
    ``yield_invalid``, a JSON line that cannot be read is yielded as ``(where, InvalidRecord)``
    instead and reading goes on (a broken ``.json`` array still raises: it has no next record).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "d.jsonl"; _ = p.write_bytes(b'{"a": 1}\\n\\n[2]\\n')
    >>> [(where.rsplit("/", 1)[1], record) for where, record in iter_json_records(p)]
    [('d.jsonl:1', {'a': 1}), ('d.jsonl:3', [2])]
    """
    if is_json_array(path):
        yield from _array_records(path)
        return
    for found in _line_records(path, budget_bytes=None, yield_invalid=yield_invalid):
        assert found is not None  # only a byte budget cuts the file short
        yield found


def first_json_record(path: Path, max_bytes: int) -> tuple[str, object] | None:
    """``(where, record)`` of the first record, reading at most ``max_bytes`` of the file.

    Returns None when the first record lies beyond that cap (the preflight reads only what is
    cheap). Raises :class:`DataError` when the file holds no records or its first record is not
    valid UTF-8 / JSON.
    """
    if is_json_array(path):
        with read_errors_named(path):
            return _first_array_record(path, max_bytes)
    with read_errors_named(path):
        for found in _line_records(path, budget_bytes=max_bytes):
            return found
    raise DataError(f"{path}: the file holds no records")


def _line_records(
    path: Path, budget_bytes: int | None, yield_invalid: bool = False
) -> Iterator[tuple[str, object] | None]:
    """``(path:LINE, record)`` per non-blank line; a single None once ``budget_bytes`` are read."""
    read = 0
    with open_binary(path) as stream:
        for number, raw_line in enumerate(iter(lambda: stream.readline(budget_bytes or -1), b""), start=1):
            read += len(raw_line)
            if budget_bytes is not None and (
                read > budget_bytes or (len(raw_line) == budget_bytes and raw_line[-1:] != b"\n")
            ):
                yield None
                return
            if number == 1:
                raw_line = raw_line.removeprefix(UTF8_BOM)
            where = f"{path}:{number}"
            try:
                line = decode_line(raw_line, where)
                record = parse_json_line(line, where) if line.strip() else None
            except InvalidRecord as invalid:
                if not yield_invalid:
                    raise
                yield where, invalid
                continue
            if line.strip():
                yield where, record


def _array_records(path: Path) -> Iterator[tuple[str, object]]:
    with open_binary(path) as stream:
        raw = stream.read().removeprefix(UTF8_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from error
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from error
    for index, record in enumerate(records, start=1):
        yield f"{path}: record {index}", record


def _first_array_record(path: Path, max_bytes: int) -> tuple[str, object] | None:
    """The first element of a ``.json`` array, parsed from the file's first ``max_bytes`` only."""
    with open_binary(path) as stream:
        head = stream.read(max_bytes)
    complete = len(head) < max_bytes
    try:  # a cut-off read may end inside a multi-byte character
        text = head.removeprefix(UTF8_BOM).decode("utf-8", errors="strict" if complete else "ignore")
    except UnicodeDecodeError as error:
        line = head.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({error.reason})") from error
    body = text.lstrip()[1:].lstrip()  # after the opening "["
    if body.startswith("]"):
        raise DataError(f"{path}: the file holds no records")
    try:
        record, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as error:
        if not complete:
            return None
        line = text[: len(text) - len(body) + error.pos].count("\n") + 1
        raise DataError(f"{path}:{line}: invalid JSON ({error.msg}, column {error.colno})") from error
    return f"{path}: record 1", record
