"""``train_files`` entries with a weight: the syntax of weighted pretraining sources.

A ``train_files`` entry may end with ``:WEIGHT``; several weighted entries may share one argument,
comma-separated (the CLI form), or be YAML list items::

    --train_files "web/*.jsonl:0.7,code/:0.3"
    train_files: ["web/*.jsonl:0.7", "code/:0.3"]

Each weighted entry is a *source* with a token store of its own (how blocks are drawn by weight is
:mod:`llmtrain.data.sources`); without weights all entries form one source, trained as written.
Weights are relative (normalised to sum to 1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import ConfigError

WEIGHT_SUFFIX = re.compile(r"^(?P<spec>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class Source:
    """One pretraining source: the file specs it reads and its weight (None: the one unweighted source)."""

    name: str
    specs: tuple[str, ...]
    weight: float | None


def split_weight(entry: str) -> tuple[str, float | None]:
    """``(spec, weight)`` of one ``train_files`` entry; an existing path is never read as weighted.

    >>> split_weight("web/*.jsonl:0.7"), split_weight("corpus.jsonl")
    (('web/*.jsonl', 0.7), ('corpus.jsonl', None))
    """
    match = WEIGHT_SUFFIX.match(entry)
    if match is None or Path(entry).expanduser().exists():
        return entry, None
    return match["spec"], float(match["weight"])


def parse_sources(train_files: list[str], field_name: str = "train_files") -> list[Source]:
    """The sources ``train_files`` describes (see the module docstring).

    Raises :class:`ConfigError` naming ``field_name`` when some entries carry a weight and others
    do not, or a weight is not positive.

    >>> [(s.name, s.weight) for s in parse_sources(["web/*.jsonl:3,code/:1"])]
    [('web/*.jsonl', 0.75), ('code/', 0.25)]
    >>> parse_sources(["a.jsonl", "b.jsonl"])[0].specs
    ('a.jsonl', 'b.jsonl')
    """
    entries: list[tuple[str, float | None]] = []
    for argument in train_files:
        parts = argument.split(",")
        split = [split_weight(part.strip()) for part in parts]
        if len(parts) > 1 and all(weight is not None for _, weight in split):
            entries += split
        else:
            entries.append(split_weight(argument))
    weighted = [weight is not None for _, weight in entries]
    if not any(weighted):
        return [Source("train_files", tuple(spec for spec, _ in entries), None)]
    if not all(weighted):
        unweighted = ", ".join(spec for spec, weight in entries if weight is None)
        raise ConfigError(
            f"{field_name}: some entries have a weight and {unweighted} has none; give every entry a weight "
            "(web/*.jsonl:0.7,code/:0.3) or none"
        )
    weights = [float(weight) for _, weight in entries if weight is not None]
    if any(not math.isfinite(weight) or weight <= 0 for weight in weights):
        raise ConfigError(f"{field_name}: weights must be positive, got {weights}")
    total = sum(weights)
    return [Source(spec, (spec,), weight / total) for (spec, _), weight in zip(entries, weights, strict=True)]
