"""Reading a run config file: every bad file is one ConfigError naming the file and line, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmtrain.config.yaml_file import read_run_config, split_config_path
from llmtrain.errors import ConfigError


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "run.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("seed: 1\nlearning_rate:\n\t- 2\n", r"run\.yaml:3:1: invalid YAML: .*'\\t'.*indents with spaces, not tabs"),
        ("seed: 1\n\tblock_size: 2\n", r"run\.yaml:2:1: invalid YAML: .*tabs"),
        ("- seed: 1\n- block_size: 2\n", r"run\.yaml:1: a run config must be a mapping of field: value, not a list"),
        ("just words\n", r"run\.yaml:1: a run config must be a mapping .*not the single value 'just words'"),
        (b"seed: 1\noutput_dir: caf\xe9\n", r"run\.yaml:2:16: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
        ("seed: 1\ntrain_files: [a.txt\n", r"run\.yaml:3:1: invalid YAML: expected ',' or '\]'.*started on line 2"),
        ("seed: 1\noutput_dir: 'out\n", r"run\.yaml:3:1: .*end of stream.*quoted scalar started on line 2"),
        ("seed: 1\n---\nseed: 2\n", r"run\.yaml:2:1: invalid YAML: but found another document"),
        ("seed: !!python/object:os.system x\n", r"run\.yaml:1:7: invalid YAML: could not determine a constructor"),
        ("seed: 1\nlearning_rate: 0.1\nseed: 2\n", r"run\.yaml:3: 'seed' is set twice \(first on line 1\); keep one"),
        ("seed: 1\n1: 2\n", r"run\.yaml:2: '1' is not a field name"),
    ],
    ids=[
        "tab-in-a-list", "tab-indent", "top-level-list", "top-level-scalar", "non-utf8-byte", "unclosed-bracket",
        "unclosed-quote", "two-documents", "python-tag", "duplicate-key", "numeric-key",
    ],
)  # fmt: skip
def test_a_bad_config_file_is_one_line_naming_file_and_line(tmp_path: Path, content: str | bytes, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        read_run_config(write(tmp_path, content))
    message = str(raised.value)
    assert "\n" not in message
    assert re.search(error, message), message


def test_values_and_key_lines(tmp_path: Path) -> None:
    config = read_run_config(write(tmp_path, "\ufeff# a comment\nseed: 3\n\ntrain_files: [a, b]\nbf16: true\n"))
    assert config.values == {"seed": 3, "train_files": ["a", "b"], "bf16": True}
    assert config.lines == {"seed": 2, "train_files": 4, "bf16": 5}
    assert config.where("train_files").endswith("run.yaml:4")


@pytest.mark.parametrize("content", ["", "# only comments\n", "---\n"])
def test_an_empty_config_is_an_empty_mapping(tmp_path: Path, content: str) -> None:
    assert read_run_config(write(tmp_path, content)).values == {}


def test_missing_or_directory_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        read_run_config(tmp_path / "nope.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"config file .*dir\.yaml is a directory"):
        read_run_config(tmp_path / "dir.yaml")


def test_split_config_path() -> None:
    default = Path("default.yaml")
    assert split_config_path(["--seed", "1"], default) == (default, ["--seed", "1"])
    assert split_config_path(["run.yml", "--seed", "1"], default) == (Path("run.yml"), ["--seed", "1"])
    with pytest.raises(ConfigError, match=r"first argument must be a \.yaml run config or a --flag, got 'run\.txt'"):
        split_config_path(["run.txt"], default)
