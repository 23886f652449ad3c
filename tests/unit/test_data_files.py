"""Reading data files: formats (plain and compressed), globs/dirs, and one clear error per kind of bad file."""

from __future__ import annotations

import gzip
import logging
import os
import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llmtrain.data.documents import data_suffix, iter_documents
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


# --- folder scans: any suffix case, every compressed form, nothing left out in silence ---


def write_mixed_folder(folder: Path) -> None:
    """Data files in every suffix case and compression, beside files no stage reads."""
    line = b'{"text": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}\n'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_bytes(line)
    (folder / "part2.jsonl.gz").write_bytes(gzip.compress(line))
    (folder / "part3.JSONL").write_bytes(line)
    (folder / "sub").mkdir()
    (folder / "sub" / "c.Jsonl").write_bytes(line)
    (folder / "d.json.gz").write_bytes(gzip.compress(b"[" + line.strip() + b"]"))
    (folder / "e.jsonl.GZ").write_bytes(gzip.compress(line))
    (folder / "f.Json.Zst").write_bytes(zstandard.ZstdCompressor().compress(line))
    (folder / "notes.md").write_text("about the data")
    (folder / "x.bin").write_bytes(b"\0")
    (folder / "g.TXT").write_text("plain text\n")


def test_a_folder_takes_every_data_file_in_any_case_and_compression_for_both_stages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llmtrain.data.conversations import read_conversations

    folder = tmp_path / "data"
    write_mixed_folder(folder)
    conversations = ["a.jsonl", "d.json.gz", "e.jsonl.GZ", "f.Json.Zst", "part2.jsonl.gz", "part3.JSONL", "c.Jsonl"]
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.files"):
        sft = resolve_data_files([str(folder)], "train_files", "sft")
        pretrain = resolve_data_files([str(folder)], "train_files", "pretrain")
    assert [p.name for p in sft] == conversations
    assert [p.name for p in pretrain] == [*conversations[:4], "g.TXT", *conversations[4:]]
    assert [r.getMessage() for r in caplog.records] == [
        f"train_files: {folder}: took 7 data files; left out 3 this stage does not read: g.TXT, notes.md, x.bin",
        f"train_files: {folder}: took 8 data files; left out 2 this stage does not read: notes.md, x.bin",
    ]
    assert all(len(read_conversations(path)) == 1 for path in sft)  # every taken file reads, decompressed
    assert [text for path in pretrain for _, text in iter_documents(path)] == ["t"] * 4 + ["plain text"] + ["t"] * 3


def test_a_folder_with_nothing_the_stage_reads_names_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    pq.write_table(pa.table({"text": ["zeta"]}), tmp_path / "d.parquet")
    with pytest.raises(
        DataError, match=r"train_files: directory .* holds no data files \(\.jsonl, .*; it holds: d\.parquet, notes\.md"
    ):
        resolve_data_files([str(tmp_path)], "train_files", "sft")
    assert [p.name for p in resolve_data_files([str(tmp_path)], "train_files", "pretrain", notes=[])] == ["d.parquet"]


def test_named_files_of_another_stage_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("x\n")
    with pytest.raises(DataError, match=r"c\.txt has an unsupported type; use \.jsonl, \.json, \.jsonl\.gz"):
        resolve_data_files([str(tmp_path / "c.txt")], "train_files", "sft")
    assert resolve_data_files([str(tmp_path / "c.txt")], "train_files", "pretrain")


def make_special(path: Path, kind: str) -> str:
    """Create ``path`` as a non-regular file of ``kind``; return how the error must describe it."""
    if kind == "dev-null-link":
        path.symlink_to("/dev/null")
        return rf"{re.escape(str(path))} \(a symbolic link to /dev/null\) is a character device, not a data file"
    if kind == "broken-link":
        path.symlink_to(path.parent / "gone.jsonl")
        return rf"{re.escape(str(path))} is a broken symbolic link \(to .*gone\.jsonl\), not a data file"
    if kind == "fifo":
        os.mkfifo(path)
        return rf"{re.escape(str(path))} is a FIFO \(named pipe\), not a data file"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return rf"{re.escape(str(path))} is a socket, not a data file"


@pytest.mark.parametrize("kind", ["dev-null-link", "broken-link", "fifo", "socket"])
@pytest.mark.parametrize("how", ["named", "glob", "folder"])
def test_a_data_path_that_is_not_a_regular_file_is_one_error_saying_what_it_is(
    tmp_path: Path, kind: str, how: str
) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "x"}\n')
    message = make_special(folder / "b.jsonl", kind)
    spec = {"named": folder / "b.jsonl", "glob": folder / "*.jsonl", "folder": folder}[how]
    with pytest.raises(DataError, match=rf"^train_files: {message}$"):
        resolve_data_files([str(spec)], "train_files")


def test_a_non_regular_file_without_a_data_name_in_a_folder_is_left_out_by_name(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    os.mkfifo(tmp_path / "control.pipe")
    (tmp_path / "linked").symlink_to(tmp_path.parent)
    notes: list[str] = []
    assert [p.name for p in resolve_data_files([str(tmp_path)], "train_files", notes=notes)] == ["a.jsonl"]
    assert notes == [
        f"train_files: {tmp_path}: took 1 data file; left out 2 this stage does not read: control.pipe (a FIFO "
        "(named pipe)), linked/ (a symbolic link to a folder, not searched)"
    ]


def test_suffix_rules_and_json_arrays_ignore_case_and_compression(tmp_path: Path) -> None:
    from llmtrain.data.records import is_json_array, name_suffixes, open_binary

    assert name_suffixes(Path("x.tar.gz")) == (".tar", ".gz") and data_suffix(Path("x.tar.gz")) == ""
    array = tmp_path / "A.JSON.GZ"
    array.write_bytes(gzip.compress(b'\xef\xbb\xbf  [{"text": "a"}, {"text": "b"}]'))
    assert is_json_array(array)
    with open_binary(array) as stream:
        assert stream.read(5) == b"\xef\xbb\xbf  "
    assert [text for _, text in iter_documents(array)] == ["a", "b"]
    lines = tmp_path / "B.Json.Zst"
    lines.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "c"}\n'))
    assert not is_json_array(lines) and [text for _, text in iter_documents(lines)] == ["c"]
    assert not is_json_array(tmp_path / "C.JSONL")  # not a .json name: never opened
