"""A YAML run config read into a mapping, every problem one ``file:line`` error; light (PyYAML only).

The one reader of run config files: :mod:`llmtrain.config.parser` (the entry points and the
preflight) turns the mapping into arguments, and the launcher (:mod:`llmtrain.launch.plan`, before
anything starts) reads ``output_dir`` and ``use_cpu`` from it. Importing this module imports neither transformers
nor torch, so the launcher's check stays fast.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "run.yaml"
>>> _ = path.write_text("seed: 1\\nlearning_rate:\\n\\t- 2\\n")
>>> try:
...     read_run_config(path)
... except ConfigError as error:
...     message = str(error).replace(str(path.parent), "DIR")
>>> message.split(" found character")[0], message.endswith("(YAML indents with spaces, not tabs)")
('DIR/run.yaml:3:1: invalid YAML:', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmtrain.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class RunConfig:
    """A run config file's top-level ``field: value`` pairs and the line each field is on."""

    path: Path
    values: dict[str, Any]
    lines: dict[str, int]  # 1-based

    def where(self, key: str) -> str:
        """``path:line`` of ``key``, for error messages."""
        return f"{self.path}:{self.lines.get(key, '?')}"


def read_run_config(path: Path) -> RunConfig:
    """Read ``path`` as a YAML mapping of field: value.

    Raises :class:`ConfigError`, one line naming the file (and the line, where there is one), for
    a missing or unreadable file, bytes that are not UTF-8, invalid YAML (tabs, unclosed brackets
    or quotes, several documents, Python tags), a top level that is not a mapping, a key that is
    not a name, or a key set twice (YAML would silently keep the last value). An empty file is an
    empty mapping.
    """
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error})") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from error
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        values = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as error:
        raise ConfigError(_describe(path, error)) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from error
    finally:
        loader.dispose()
    if node is None or values is None:  # no document, or an empty one ("---" alone)
        return RunConfig(path, {}, {})
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the single value {values!r}"
        raise ConfigError(
            f"{path}:{node.start_mark.line + 1}: a run config must be a mapping of field: value, not {kind}"
        )
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        key = key_node.value
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            raise ConfigError(f"{path}:{line}: {key!r} is not a field name")
        if key in lines:
            raise ConfigError(f"{path}:{line}: '{key}' is set twice (first on line {lines[key]}); keep one")
        lines[key] = line
    return RunConfig(path, values, lines)


def _describe(path: Path, error: yaml.MarkedYAMLError) -> str:
    """One line for a PyYAML error: ``path:line:column: invalid YAML: problem (context)``."""
    mark = error.problem_mark or error.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = error.problem or error.context or "unreadable"
    if "'\\t'" in problem:
        detail = "YAML indents with spaces, not tabs"
    elif error.context and error.problem:
        detail = error.context
        if error.context_mark is not None and mark is not None and error.context_mark.line != mark.line:
            detail += f" started on line {error.context_mark.line + 1}"
    else:
        detail = ""
    message = f"{where}: invalid YAML: {problem}" + (f" ({detail})" if detail else "")
    return " ".join(message.split())


def split_config_path(argv: Sequence[str], default_config: Path | None) -> tuple[Path | None, list[str]]:
    """Split ``[config.yaml] --k v ...`` into the config path (or the default) and the overrides.

    DeepSpeed's launcher puts ``--local_rank=N`` before the script's own arguments; it is kept
    as an override, after the config.

    >>> split_config_path(["--local_rank=1", "run.yaml", "--seed", "3"], None)
    (PosixPath('run.yaml'), ['--local_rank=1', '--seed', '3'])
    """
    rest = list(argv)
    launcher_flags = []
    while rest and rest[0].startswith("--local_rank="):
        launcher_flags.append(rest.pop(0))
    if rest and not rest[0].startswith("-"):
        first = rest.pop(0)
        if not first.endswith(YAML_SUFFIXES):
            raise ConfigError(f"the first argument must be a .yaml run config or a --flag, got {first!r}")
        return Path(first), launcher_flags + rest
    return default_config, launcher_flags + rest
