"""Reading data files: formats (plain and compressed), globs/dirs, and one clear error per kind of bad file."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llmtrain.data.documents import iter_documents
from llmtrain.data.files import resolve_data_files
from llmtrain.errors import DataError

from ..conftest import write_jsonl


def test_each_supported_format_loads_into_a_text_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}])
    (tmp_path / "b.json").write_text('[{"text": "gamma"}]')
    (tmp_path / "c.txt").write_text("delta\nepsilon\n")
    pq.write_table(pa.table({"text": ["zeta"]}), tmp_path / "d.parquet")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b'{"text": "eta"}\n'))
    (tmp_path / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"theta\niota\n"))
    files = resolve_data_files([str(tmp_path)], "train_files")
    texts = [text for path in files for _, text in iter_documents(path, "text", "line")]
    assert texts == ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]


def test_txt_documents_by_line_paragraph_or_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one\r\ntwo\n\n\nthree\n", encoding="utf-8")
    assert [text for _, text in iter_documents(path, "text", "line")] == ["one", "two", "", "", "three"]
    assert list(iter_documents(path, "text", "paragraph")) == [(f"{path}:1", "one\ntwo"), (f"{path}:5", "three")]
    assert [text for _, text in iter_documents(path, "text", "document")] == ["one\ntwo\n\n\nthree"]


def test_a_corrupt_compressed_file_is_one_error_naming_it(tmp_path: Path) -> None:
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot be read"):
        list(iter_documents(cut))
    garbage = tmp_path / "garbage.txt.zst"
    garbage.write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"garbage\.txt\.zst: cannot be decompressed"):
        list(iter_documents(garbage))


def test_parquet_without_the_field_or_with_a_null_names_the_file(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no field 'text' \(fields: body\)"):
        list(iter_documents(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: row 2 has no 'text'"):
        list(iter_documents(tmp_path / "b.parquet"))


def test_text_field_is_configurable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "hello"}])
    assert [text for _, text in iter_documents(path, "content", "line")] == ["hello"]


def test_globs_and_directories_expand_sorted_and_deduplicated(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    specs = [str(tmp_path / "*.jsonl"), str(tmp_path), str(tmp_path / "a.jsonl")]
    assert [p.name for p in resolve_data_files(specs, "train_files")] == ["a.jsonl", "b.jsonl", "c.txt"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.jsonl", r"train_files: data file .*missing\.jsonl does not exist"),
        ("*.nothing", r"train_files: pattern .* matches no files"),
        ("notes.md", r"notes\.md has an unsupported type"),
    ],
)
def test_bad_file_specs_name_the_field(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=message):
        resolve_data_files([str(tmp_path / spec)], "train_files")


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        list(iter_documents(path, "text", "line"))


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        list(iter_documents(path, "text", "line"))


def test_missing_text_field_in_every_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"body": "y"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing field 'text' \(fields: body\)"):
        list(iter_documents(path, "text", "line"))


def test_missing_text_field_in_one_record_names_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}, {"body": "z"}])
    with pytest.raises(DataError, match=r"a\.jsonl:3: missing field 'text'"):
        list(iter_documents(path, "text", "line"))


def test_non_string_text_names_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": 7}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'text' must be a string, got int"):
        list(iter_documents(path, "text", "line"))


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        list(iter_documents(path, "text", "line"))
