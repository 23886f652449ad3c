"""Write the configuration reference, ``docs/configuration.md``, from the argument dataclasses themselves.

    python -m llmtrain.tools.config_reference           # rewrite docs/configuration.md
    python -m llmtrain.tools.config_reference --check   # exit 2, naming the page, when it is stale

Every row comes from :mod:`llmtrain.config.arguments`: a field's type and default from the
dataclass, its ``choices`` and ``help`` from its metadata, its field rule (what a resume does when
it changes) from :func:`~llmtrain.config.arguments.field_rules`; transformers' own
``TrainingArguments`` fields from the same function (their rules are
:data:`~llmtrain.config.arguments.TRAINING_ARGUMENT_RULES`); the renamed and refused flags from
:data:`llmtrain.config.parser.REPLACED_FLAGS`. Nothing else is read: no model, no tokenizer, no
network, and the output depends only on the code, so ``tests/unit/test_docs.py`` can fail when the
committed page differs from what this module writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from llmtrain.cli import run_cli
from llmtrain.config import arguments
from llmtrain.config.parser import REPLACED_FLAGS
from llmtrain.config.secrets import instead, is_secret_key
from llmtrain.errors import UserInputError
from llmtrain.paths import PROJECT_ROOT
from llmtrain.stages import STAGES

logger = logging.getLogger(__name__)

PAGE = PROJECT_ROOT / "docs" / "configuration.md"
COMMAND = "python -m llmtrain.tools.config_reference"
TRANSFORMERS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"

# The rule constants of llmtrain.config.arguments, by the name a table shows, with what a resume does.
RULES: tuple[tuple[str, arguments.FieldRule, str], ...] = (
    (
        "structural",
        arguments.STRUCTURAL,
        "decides which parameters exist or how they are shaped: resuming a checkpoint under another value is "
        "refused (it would load partially)",
    ),
    (
        "data",
        arguments.DATA,
        "which raw data is read, and how: part of the prepared-data cache key and recorded with the files' "
        "fingerprints; a changed value resumes with a warning, changed files are refused unless "
        "`allow_data_change`",
    ),
    (
        "prepared",
        arguments.PREPARED,
        "how the prepared rows are built: part of the cache key (another value prepares the data again); "
        "a resume warns",
    ),
    (
        "identity",
        arguments.IDENTITY,
        "anything else that shapes the result: a resume under another value warns naming it, and a finished "
        "model trained under another value is not overwritten",
    ),
    ("volatile", arguments.VOLATILE, "logging, topology, tracking, cache locations: free to change between launches"),
)
# The page's sections: a dataclass and the fields it declares itself (inherited ones are shown where declared).
SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("Model (both stages)", arguments.ModelArguments, "Which model to train and how it is loaded."),
    (
        "Data (both stages)",
        arguments.DataArguments,
        "Where the files are, the held-out split and the tokenize-once cache; both stages' data classes "
        "start with these.",
    ),
    ("Pretraining data", arguments.PretrainDataArguments, "Pretraining's own data fields."),
    ("SFT data", arguments.SFTDataArguments, "SFT's own data fields: encoding, length policy and packing."),
    ("Fine-tuning method: full, LoRA, partial (SFT)", arguments.FinetuneArguments, "How the weights are trained."),
    (
        "Training (both stages)",
        arguments.TrainArguments,
        "This project's fields on top of transformers' `TrainingArguments` (next section); `bf16` and "
        "`ddp_timeout` are transformers' fields with this project's defaults.",
    ),
)


def rule_name(rule: arguments.FieldRule | None) -> str:
    """The name the page gives ``rule`` (``structural``, ``prepared``, ...), or ``none`` for a missing one."""
    for name, constant, _ in RULES:
        if rule == constant:
            return name
    return "none"


def type_name(hint: Any) -> str:
    """``hint`` as it is written in the source (``str | None``, ``list[str] | None``).

    >>> type_name(int | None), type_name(list[str]), type_name(typing.Any)
    ('int | None', 'list[str]', 'Any')
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in typing.get_args(hint))}]"
    if hint is type(None):
        return "None"
    if hint is Any:
        return "Any"
    return str(getattr(hint, "__name__", hint))


def default_value(spec: dataclasses.Field[Any]) -> Any:
    """The field's default (a factory's product), with enums as their value."""
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return dataclasses.MISSING
    return value.value if isinstance(value, enum.Enum) else value


def show_value(value: Any) -> str:
    """A default as a YAML file writes it, in a table cell.

    >>> show_value(None), show_value(True), show_value("<|im_end|>"), show_value(1e-08), show_value([])
    ('unset', '`true`', '`<\\\\|im_end\\\\|>`', '`1e-08`', '`[]`')
    """
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value) if value == "" else value
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return "`" + text.replace("|", "\\|") + "`"


def cell(text: str) -> str:
    """Free text for a table cell: one line, pipes escaped, angle brackets as entities (not HTML tags)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def declared_fields(dataclass_type: type) -> list[dataclasses.Field[Any]]:
    """The fields ``dataclass_type`` declares itself (not those it inherits unchanged), users' only."""
    inherited: dict[str, dataclasses.Field[Any]] = {}
    for base in dataclass_type.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            for spec in dataclasses.fields(base):
                inherited.setdefault(spec.name, spec)
    return [spec for spec in dataclasses.fields(dataclass_type) if spec.init and inherited.get(spec.name) is not spec]


def field_rows(dataclass_type: type) -> list[str]:
    """One Markdown table row per field ``dataclass_type`` declares: name, type, default, choices, rule, help."""
    hints = typing.get_type_hints(dataclass_type)
    rules = arguments.field_rules(dataclass_type)
    rows = []
    for spec in declared_fields(dataclass_type):
        choices = ", ".join(f"`{choice}`" for choice in spec.metadata.get("choices", ()))
        rows.append(
            f"| `{spec.name}` | `{cell(type_name(hints[spec.name]))}` | {show_value(default_value(spec))} | "
            f"{choices} | {rule_name(rules.get(spec.name))} | {cell(spec.metadata.get('help', ''))} |"
        )
    return rows


def transformers_rows() -> list[str]:
    """transformers' ``TrainingArguments`` fields as this project parses them: name, default, rule."""
    rules = arguments.field_rules(arguments.TrainArguments)
    own = {spec.name for spec in declared_fields(arguments.TrainArguments)}
    fields = {spec.name: spec for spec in dataclasses.fields(TrainingArguments)}
    rows = []
    for name in sorted(name for name in rules if name not in own and name in fields):
        shown = f"refused: {cell(instead(name))}" if is_secret_key(name) else show_value(default_value(fields[name]))
        rows.append(f"| `{name}` | {shown} | {rule_name(rules[name])} |")
    return rows


def replaced_rows() -> list[str]:
    """The flags of the replaced recipe and of transformers 4: what each becomes here."""
    rows = []
    for name, entry in sorted(REPLACED_FLAGS.items()):
        if entry.field is not None:
            what = f"renamed `--{entry.field}` where the stage has that field (a warning says so), else used as is"
        elif entry.ignored:
            what = f"ignored with a warning: {cell(entry.instead)}"
        else:
            what = f"refused (exit 2): {cell(entry.instead)}"
        rows.append(f"| `--{name}` | {entry.origin} | {what} |")
    return rows


def table(header: Iterable[str], rows: list[str]) -> list[str]:
    names = list(header)
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names), *rows]


def render() -> str:
    """The whole page, as :data:`PAGE` must hold it."""
    stages = "; ".join(
        f"`{stage.entry_file}` parses {', '.join(f'`{name}`' for name in stage.argument_names)}"
        for stage in STAGES.values()
    )
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from llmtrain/config/arguments.py; do not edit by hand. -->",
        "",
        "A run is configured by an optional YAML file, given first, and `--field value` overrides:",
        "dataclass defaults < the YAML file (or the stage's default config when none is given) < the command",
        "line. A key or flag no dataclass declares is an error naming it and the known ones close to it; flags",
        "are never abbreviated; a bare boolean flag (`--bf16`) means true; a choice outside a field's `choices`",
        "is an error. Write YAML floats as `1.0e-4` (PyYAML reads `1e-4` as a string, which the field's type",
        "then converts). The resolved configuration is saved as `run_config.yaml` in the output dir and can be",
        "fed back as a config file. Credentials are never fields: they come from the environment",
        "([README](../README.md#credentials)).",
        "",
        f"Which stage reads which dataclasses: {stages}.",
        "",
        "## Field rules: what a resumed run does when a field changes",
        "",
        "Every field declares one rule, in its annotation (`lora_r: Annotated[int, STRUCTURAL]`); what depends",
        "on the rules (the output dir's resume checks, the prepared-data cache key) is derived from them.",
        "",
        *table(("rule", "what a resume does when the value changes"), [f"| {n} | {w} |" for n, _, w in RULES]),
    ]
    for title, dataclass_type, about in SECTIONS:
        lines += [
            "",
            f"## {title}",
            "",
            f"`{dataclass_type.__name__}`: {about}",
            "",
            *table(("field", "type", "default", "choices", "rule", "help"), field_rows(dataclass_type)),
        ]
    lines += [
        "",
        "## transformers' `TrainingArguments`",
        "",
        "Every field of transformers' `TrainingArguments` is accepted, with transformers' meaning",
        f"([its reference]({TRANSFORMERS_DOCS})); the rules are this project's.",
        "The defaults are transformers' own; the shipped configs set the ones that matter for each run.",
        "",
        *table(("field", "default", "rule"), transformers_rows()),
        "",
        "## Old flag names",
        "",
        "Flags of the happy-llm recipe and of transformers 4 that mean something else here; every other flag of",
        "theirs is accepted as it is ([migrating](migrating-from-happy-llm.md)).",
        "",
        *table(("flag", "from", "here"), replaced_rows()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 2 when the page is stale")
    parser.add_argument("--output", type=Path, default=PAGE, help="where the page goes (default: %(default)s)")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != page:
            raise UserInputError(f"{args.output} is stale: run `{COMMAND}` and commit the result")
        logger.info("%s is up to date", args.output)
        return
    args.output.write_text(page, encoding="utf-8")
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    sys.exit(run_cli(main))
