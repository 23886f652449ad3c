"""The YAML + CLI parser that fills the argument dataclasses, and the resolved config a run records.

A run is configured by an optional YAML file given as the first argument plus ``--key value``
overrides::

    python pretrain.py configs/pretrain_qwen2.5-0.5b.yaml --learning_rate 3.0e-4

Precedence, lowest first: dataclass defaults < the YAML file (or the stage's default YAML when
none is given) < CLI overrides. A YAML key or CLI flag that no dataclass declares is an error
naming it and the flags it is close to: flags are never abbreviated (``--tokenizer`` is not
``--tokenizer_name_or_path``). A bare boolean flag (``--bf16``) means true. The flags of the
happy-llm recipe this project replaces, and of transformers 4, go through :data:`REPLACED_FLAGS`
first. Cross-field rules live in each dataclass's ``__post_init__``. The YAML file itself is read
by :mod:`llmtrain.config.yaml_file` (``file:line`` errors), which the launchers share. A credential
(``--hub_token``, a ``swanlab_api_key:`` key) is refused before anything else, naming the environment
variable to set instead (:mod:`llmtrain.config.secrets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from llmtrain.compat import parser_actions
from llmtrain.config.arguments import TrainArguments
from llmtrain.config.secrets import is_secret_key, redact_secrets, refuse_secret_settings
from llmtrain.config.yaml_file import RunConfig, read_run_config, split_config_path
from llmtrain.errors import ConfigError

logger = logging.getLogger(__name__)

RECIPE = "happy-llm recipe"  # Datawhale happy-llm chapter 6: its pretrain.sh, finetune.sh and dataclasses
TRANSFORMERS_4 = "transformers 4"
MAX_CANDIDATES = 5  # flags a "did you mean" names at most


def _dtype_name(value: str) -> str:
    """``torch.bfloat16`` (how torch prints a dtype) -> ``bfloat16``; the recipe's choices pass unchanged."""
    return value.removeprefix("torch.")


@dataclass(frozen=True)
class ReplacedFlag:
    """A flag of the replaced recipe (or of transformers 4) and what this project does with it.

    With ``field`` set, the flag sets that field (its value through ``translate``) and logs a
    deprecation warning, wherever the stage has that field. Without one it is refused with
    ``instead``, or, when ``ignored``, dropped with ``instead`` as the warning.
    """

    field: str | None = None
    instead: str = ""
    ignored: bool = False
    translate: Callable[[str], str] | None = None
    origin: str = RECIPE


# The one table of replaced flags (docs/migrating-from-happy-llm.md lists what each becomes).
REPLACED_FLAGS: dict[str, ReplacedFlag] = {
    "evaluation_strategy": ReplacedFlag("eval_strategy"),  # renamed in transformers 5
    "tokenizer_name": ReplacedFlag("tokenizer_name_or_path"),
    "torch_dtype": ReplacedFlag("dtype", translate=_dtype_name),
    # finetune.sh's sequence length; pretraining has a block_size field of its own, so it stays there
    "block_size": ReplacedFlag("max_seq_length"),
    # transformers 5 keeps these as deprecated aliases; the new names are the ones a run records
    "gradient_checkpointing": ReplacedFlag("activation_checkpointing"),
    "gradient_checkpointing_kwargs": ReplacedFlag("activation_checkpointing_kwargs", origin=TRANSFORMERS_4),
    "logging_dir": ReplacedFlag(
        ignored=True,
        instead="transformers 5 removed it; the launcher's console log goes to <output_dir>/logs, SwanLab's "
        "files to --swanlab_log_dir (default <output_dir>/swanlog), TensorBoard's to $TENSORBOARD_LOGGING_DIR",
    ),
    "resume_from_checkpoint": ReplacedFlag(
        instead="resume is automatic; the same command again resumes from the newest complete checkpoint in "
        "output_dir; to start from other weights, pass --model_name_or_path DIR with a new --output_dir",
    ),
    "overwrite_output_dir": ReplacedFlag(
        instead="transformers 5 removed it; pass --start_over to move what output_dir holds to "
        "output_dir/previous/ and train from step 0",
        origin=TRANSFORMERS_4,
    ),
    # use_auth_token (transformers 4) is a credential: llmtrain.config.secrets refuses it, naming HF_TOKEN.
}


def replacement(name: str, fields: Collection[str]) -> ReplacedFlag | None:
    """The entry of :data:`REPLACED_FLAGS` that applies to ``name`` among ``fields``, or None (used as is).

    A renamed flag applies only where its new field exists: ``block_size`` is the pretraining
    field itself, and SFT's ``max_seq_length``.

    >>> replacement("block_size", {"block_size"}) is None, replacement("block_size", {"max_seq_length"}).field
    (True, 'max_seq_length')
    """
    entry = REPLACED_FLAGS.get(name)
    if entry is None or (entry.field is not None and entry.field not in fields):
        return None
    return entry


def _deprecated(old: str, entry: ReplacedFlag, kind: str, where: str = "") -> str:
    """The one-line warning for a renamed (``field``) or ignored flag; ``kind`` is "flag" or "key"."""
    prefix = f"{where}: " if where else ""
    spell = (lambda name: f"--{name}") if kind == "flag" else (lambda name: f"'{name}'")
    if entry.field is not None:
        return f"{prefix}{spell(old)} is deprecated ({entry.origin} {kind}): use {spell(entry.field)}"
    return f"{prefix}{spell(old)} is ignored ({entry.origin} {kind}): {entry.instead}"


def _refused(old: str, entry: ReplacedFlag, kind: str, where: str = "") -> ConfigError:
    prefix = f"{where}: " if where else ""
    name = f"--{old}" if kind == "flag" else f"'{old}'"
    return ConfigError(f"{prefix}{name} is not supported ({entry.origin} {kind}): {entry.instead}")


def translate_cli_flags(argv: Sequence[str], fields: Collection[str]) -> list[str]:
    """``argv`` with the replaced flags of :data:`REPLACED_FLAGS` rewritten (warned) or refused.

    Raises :class:`ConfigError` for a refused flag, or for a replaced flag given together with
    its new name (``--evaluation_strategy no --eval_strategy steps``).

    >>> translate_cli_flags(["--torch_dtype=torch.bfloat16", "--logging_dir", "o/logs", "--bf16"], {"dtype"})
    ['--dtype=bfloat16', '--bf16']
    """
    given = {token[2:].partition("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    translated: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name, has_value, value = token[2:].partition("=")
        entry = replacement(name.replace("-", "_"), fields) if token.startswith("--") else None
        if entry is None:
            translated.append(token)
            continue
        value_follows = not has_value and index < len(argv) and not argv[index].startswith("--")
        if entry.field is None and not entry.ignored:
            raise _refused(name, entry, "flag")
        if entry.field is not None and entry.field in given:
            raise ConfigError(f"--{name} and --{entry.field} set the same field; keep --{entry.field}")
        logger.warning(_deprecated(name, entry, "flag"))
        if entry.field is None:  # ignored, with its value
            index += int(value_follows)
            continue
        translate = entry.translate or str
        if has_value:
            translated.append(f"--{entry.field}={translate(value)}")
        else:
            translated.append(f"--{entry.field}")
            if value_follows:
                translated.append(translate(argv[index]))
                index += 1
    return translated


def yaml_to_argv(config: RunConfig, parser: HfArgumentParser) -> list[str]:
    """Turn a YAML run config (as :func:`~llmtrain.config.yaml_file.read_run_config` reads it) into ``--key value``
    tokens that ``parser`` accepts.

    Lists become several tokens (for list fields), dicts become JSON, booleans ``true``/``false``,
    and ``null`` leaves the field at its default. Keys of :data:`REPLACED_FLAGS` are read as their
    new field (warned) or refused, as on the command line.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "run.yaml"; _ = p.write_text("block_size: 64\\nprepare_only: true\\n")
    >>> from llmtrain.config.arguments import PretrainDataArguments
    >>> yaml_to_argv(read_run_config(p), HfArgumentParser(PretrainDataArguments))
    ['--block_size', '64', '--prepare_only', 'true']
    """
    actions = {action.dest: action for action in parser_actions(parser) if action.dest != "help"}
    argv: list[str] = []
    for written_key, written_value in config.values.items():
        key, value = written_key, written_value
        entry = replacement(written_key, actions)
        if entry is not None and (value is None or value == []):
            continue  # unset, as older saved run configs write resume_from_checkpoint and the like
        if entry is not None:
            where = config.where(written_key)
            if entry.field is None:
                if not entry.ignored:
                    raise _refused(written_key, entry, "key", where)
                logger.warning(_deprecated(written_key, entry, "key", where))
                continue
            if entry.field in config.values:
                raise ConfigError(
                    f"{where}: '{written_key}' and '{entry.field}' set the same field; keep '{entry.field}'"
                )
            logger.warning(_deprecated(written_key, entry, "key", where))
            key = entry.field
            if entry.translate is not None and isinstance(value, str):
                value = entry.translate(value)
        if key not in actions:
            raise ConfigError(f"{config.where(key)}: unknown key '{key}'{_did_you_mean(key, actions, quote=True)}")
        if value is None or value == []:  # unset: keep the field's default
            continue
        action = actions[key]
        if isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ConfigError(f"{config.where(written_key)}: '{key}' takes a single value, not a list")
            argv += [f"--{key}", *(_scalar_to_token(item) for item in value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", _scalar_to_token(value)]
    return argv


def _scalar_to_token(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def close_flags(name: str, known: Collection[str]) -> list[str]:
    """The known flag names an unknown ``name`` may stand for: those it begins, else near spellings.

    >>> close_flags("tokenizer", ["tokenizer_name_or_path", "seed"]), close_flags("learnig_rate", ["learning_rate"])
    (['tokenizer_name_or_path'], ['learning_rate'])
    """
    name = name.replace("-", "_")
    started = sorted(flag for flag in known if flag.startswith(name))
    return started or difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)


def _did_you_mean(name: str, known: Collection[str], quote: bool = False) -> str:
    """``"; did you mean --a or --b?"`` for an unknown ``name``, or "" when nothing is close."""
    candidates = close_flags(name, known)
    if not candidates:
        return ""
    spelled = [f"'{flag}'" if quote else f"--{flag}" for flag in candidates[:MAX_CANDIDATES]]
    more = f" (or {len(candidates) - MAX_CANDIDATES} more)" if len(candidates) > MAX_CANDIDATES else ""
    return f"; did you mean {' or '.join(spelled)}{more}?"


def _unknown_arguments(unknown: Sequence[str], parser: HfArgumentParser) -> ConfigError:
    """One error for what the parser did not take, naming the flags each unknown one is close to."""
    known = [
        option[2:]
        for action in parser_actions(parser)
        for option in action.option_strings
        if option.startswith("--") and "-" not in option[2:]
    ]
    flags = [token[2:].partition("=")[0] for token in unknown if token.startswith("--")]
    hints = [(flag, hint) for flag in flags if (hint := _did_you_mean(flag, known))]
    message = f"unknown argument(s): {' '.join(redact_secrets(unknown))}"
    if len(flags) == 1 and hints:
        message += hints[0][1]
    elif hints:
        message += "; " + "; ".join(f"--{flag}: {hint.removeprefix('; ')}" for flag, hint in hints)
    return ConfigError(message)


def _bare_booleans_mean_true(parser: HfArgumentParser) -> None:
    """Let ``--bf16`` alone mean true for the ``bool | None`` fields too (``None``: decided later).

    HfArgumentParser makes a bare flag of a ``bool`` field, but a ``bool | None`` field with a
    ``None`` default, such as :class:`TrainArguments`'s ``bf16``, would demand a value.
    """
    for action in parser_actions(parser):
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True


def make_parser(dataclass_types: Sequence[type]) -> HfArgumentParser:
    """The parser of ``dataclass_types``: no abbreviated flags, bare booleans, errors raised not printed."""
    parser = HfArgumentParser(list(dataclass_types), allow_abbrev=False)  # type: ignore[arg-type]
    parser.exit_on_error = False  # a bad value raises ArgumentError (one line) instead of printing the usage
    _bare_booleans_mean_true(parser)
    return parser


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str],
    default_config: Path | None = None,
) -> tuple[Any, ...]:
    """Parse ``[config.yaml] [--key value ...]`` into one instance per dataclass type.

    Raises :class:`ConfigError` for a missing config file, a credential given as a flag or key
    (:func:`~llmtrain.config.secrets.refuse_secret_settings`, checked first, before anything is
    logged), an unknown key or flag (naming the close ones), a refused or doubly given replaced
    flag, or a rule broken in a ``__post_init__``.
    """
    config_path, given_overrides = split_config_path(argv, default_config)
    config = read_run_config(config_path) if config_path is not None else None
    refuse_secret_settings(given_overrides, config)
    parser = make_parser(dataclass_types)
    fields = {action.dest for action in parser_actions(parser)}
    yaml_argv = yaml_to_argv(config, parser) if config is not None else []
    overrides = translate_cli_flags(given_overrides, fields)
    try:
        *instances, unknown = parser.parse_args_into_dataclasses(
            args=yaml_argv + overrides, return_remaining_strings=True
        )
    except (ValueError, argparse.ArgumentError) as error:
        raise ConfigError(str(error)) from error
    if unknown:
        raise _unknown_arguments(unknown, parser)
    if config_path is not None:
        logger.info("run config: %s (CLI overrides: %s)", config_path, " ".join(redact_secrets(overrides)) or "none")
    return tuple(instances)


def resolved_config(*instances: Any) -> dict[str, Any]:
    """The run's resolved configuration as one flat, YAML-safe dict, secrets removed.

    Only fields a user can set are included, under their current names (not the replaced ones of
    :data:`REPLACED_FLAGS`), so the dict can be saved and fed back as a config.
    """
    fields = {spec.name for instance in instances for spec in dataclasses.fields(instance)}
    config: dict[str, Any] = {}
    for instance in instances:
        for spec in dataclasses.fields(instance):
            if not spec.init or is_secret_key(spec.name) or replacement(spec.name, fields) is not None:
                continue
            config[spec.name] = _yaml_safe(getattr(instance, spec.name))
        if isinstance(instance, TrainArguments):
            config.update(instance.recorded_settings())  # report_to and save_total_limit as the user set them
    return config


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):  # IntervalStrategy and friends subclass str: test this first
        return _yaml_safe(value.value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_yaml_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _yaml_safe(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _yaml_safe(dataclasses.asdict(value))
    return str(value)
