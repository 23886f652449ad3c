"""Stream pretraining documents out of data files, one at a time, with errors that name file and line.

The one reader of pretraining text: memory is bounded by the longest line (a ``.json`` array and a
``.txt`` read as one ``document`` are parsed whole), never by the corpus. Supported::

    .jsonl  .jsonl.gz  .jsonl.zst     one JSON object per line, the text in ``text_field``
    .json   .json.gz   .json.zst      JSON lines, or an array of objects
    .txt    .txt.gz    .txt.zst       split by ``txt_sample_by``: line, paragraph (blank-line separated), document
    .parquet                          the ``text_field`` column, read one record batch at a time

Suffixes are matched case-insensitively (``part3.JSONL``, ``e.jsonl.GZ``); :data:`DOCUMENT_FILES` is
the rule, which folder scans use too.

Each document is yielded as ``(where, text)``; ``where`` is ``path:LINE`` (``path: record N`` in a
``.json`` array, ``path: row N`` in parquet). A record without the field, with a non-string in it,
invalid JSON or invalid UTF-8 raises :class:`~llmtrain.errors.DataError` naming ``where``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmtrain.data.records import FileTypes, decode_line, iter_json_records, open_binary, read_errors_named
from llmtrain.errors import DataError

# Parquet is read by column from its own footer, so it has no compressed form here (it compresses inside).
DOCUMENT_FILES = FileTypes("pretraining data", (".jsonl", ".json", ".txt", ".parquet"), (".jsonl", ".json", ".txt"))
PARQUET_BATCH_ROWS = 1024


def data_suffix(path: Path) -> str:
    """The data format of ``path`` ignoring a compression suffix; "" when it is no supported data file.

    >>> data_suffix(Path("web/part-0.jsonl.zst")), data_suffix(Path("A.PARQUET")), data_suffix(Path("a.json.GZ"))
    ('.jsonl', '.parquet', '.json')
    >>> data_suffix(Path("a.parquet.gz")), data_suffix(Path("notes.md"))
    ('', '')
    """
    return DOCUMENT_FILES.format_of(path)


def supported_names() -> str:
    """The supported file names, for error messages."""
    return DOCUMENT_FILES.names()


def iter_documents(path: Path, text_field: str = "text", txt_sample_by: str = "line") -> Iterator[tuple[str, str]]:
    """Yield ``(where, text)`` for every document of ``path``, in file order (blank ones included).

    Raises :class:`DataError` naming the file (and line) when it is empty, unreadable, not valid
    UTF-8 / JSON, cannot be decompressed, or a record has no string in ``text_field``.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "c.jsonl"; _ = p.write_text('{"text": "a b"}\\n\\n{"text": "c"}\\n')
    >>> [(where.rsplit("/", 1)[1], text) for where, text in iter_documents(p)]
    [('c.jsonl:1', 'a b'), ('c.jsonl:3', 'c')]
    """
    suffix = data_suffix(path)
    if not suffix:
        raise DataError(f"{path}: unsupported data file type; use {supported_names()}")
    with read_errors_named(path):
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        if suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        elif suffix == ".txt":
            yield from _text_documents(path, txt_sample_by)
        else:
            yield from _record_documents(path, text_field)


def _record_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    found = False
    for where, record in iter_json_records(path):
        found = True
        yield where, record_text(record, text_field, where)
    if not found:
        raise DataError(f"{path}: the file holds no records")


def record_text(record: object, text_field: str, where: str) -> str:
    """The document text of one JSON record, or a :class:`DataError` at ``where`` saying what is wrong.

    >>> record_text({"text": "hi"}, "text", "a.jsonl:1")
    'hi'
    >>> record_text({"content": "hi"}, "text", "a.jsonl:2")
    Traceback (most recent call last):
    ...
    llmtrain.errors.DataError: a.jsonl:2: missing field 'text' (fields: content)
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(text_field)
    if value is None:
        raise DataError(f"{where}: missing field '{text_field}' (fields: {', '.join(record) or 'none'})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' must be a string, got {type(value).__name__}")
    return value


def _text_documents(path: Path, sample_by: str) -> Iterator[tuple[str, str]]:
    """Lines, paragraphs (runs of non-blank lines) or the whole file, each located by its first line."""
    paragraph: list[str] = []
    start = 0
    lines = []
    with open_binary(path) as stream:
        for number, raw_line in enumerate(stream, start=1):
            where = f"{path}:{number}"
            line = decode_line(raw_line.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw_line, where)
            line = line.removesuffix("\n").removesuffix("\r")
            if sample_by == "line":
                yield where, line
            elif sample_by == "document":
                lines.append(line)
            elif line.strip():
                start = start or number
                paragraph.append(line)
            elif paragraph:
                yield f"{path}:{start}", "\n".join(paragraph)
                paragraph, start = [], 0
    if paragraph:
        yield f"{path}:{start}", "\n".join(paragraph)
    if sample_by == "document":
        yield f"{path}:1", "\n".join(lines)


def _parquet_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as parquet ({error})") from error
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(
            f"{path}: no field '{text_field}' (fields: {', '.join(schema.names) or 'none'}); set --text_field"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: field '{text_field}' holds {column_type}, not text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: the file holds no records")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                raise DataError(f"{path}: row {row} has no '{text_field}'")
            yield f"{path}: row {row}", value
