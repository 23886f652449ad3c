"""The YAML + CLI parser that fills the argument dataclasses, and the resolved config a run records.

A run is configured by an optional YAML file given as the first argument plus ``--key value``
overrides::

    python pretrain.py configs/pretrain_qwen2.5-0.5b.yaml --learning_rate 3.0e-4

Precedence, lowest first: dataclass defaults < the YAML file (or the stage's default YAML when
none is given) < CLI overrides. A YAML key or CLI flag that no dataclass declares is an error
naming it; cross-field rules live in each dataclass's ``__post_init__``. The YAML file itself is
read by :mod:`llmtrain.config.yaml_file` (``file:line`` errors), which the launchers share.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from llmtrain.config.arguments import TrainArguments
from llmtrain.config.secrets import is_secret_key, redact_secrets
from llmtrain.config.yaml_file import read_run_config, split_config_path
from llmtrain.errors import ConfigError

logger = logging.getLogger(__name__)


def yaml_to_argv(path: Path, parser: HfArgumentParser) -> list[str]:
    """Turn a YAML run config into ``--key value`` tokens that ``parser`` accepts.

    Lists become several tokens (for list fields), dicts become JSON, booleans ``true``/``false``,
    and ``null`` leaves the field at its default.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "run.yaml"; _ = p.write_text("block_size: 64\\nprepare_only: true\\n")
    >>> from llmtrain.config.arguments import PretrainDataArguments
    >>> yaml_to_argv(p, HfArgumentParser(PretrainDataArguments))
    ['--block_size', '64', '--prepare_only', 'true']
    """
    config = read_run_config(path)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    argv: list[str] = []
    for key, value in config.values.items():
        if key not in actions:
            raise ConfigError(f"{config.where(key)}: unknown key '{key}'")
        if value is None or value == []:  # unset: keep the field's default
            continue
        action = actions[key]
        if isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ConfigError(f"{config.where(key)}: '{key}' takes a single value, not a list")
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


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str],
    default_config: Path | None = None,
) -> tuple[Any, ...]:
    """Parse ``[config.yaml] [--key value ...]`` into one instance per dataclass type.

    Raises :class:`ConfigError` for a missing config file, an unknown key or flag, or a rule
    broken in a ``__post_init__``.
    """
    config_path, overrides = split_config_path(argv, default_config)
    parser = HfArgumentParser(list(dataclass_types))  # type: ignore[arg-type]
    parser.exit_on_error = False  # a bad value raises ArgumentError (one line) instead of printing the usage
    yaml_argv = yaml_to_argv(config_path, parser) if config_path is not None else []
    try:
        *instances, unknown = parser.parse_args_into_dataclasses(
            args=yaml_argv + overrides, return_remaining_strings=True
        )
    except (ValueError, argparse.ArgumentError) as error:
        raise ConfigError(str(error)) from error
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)}")
    if config_path is not None:
        logger.info("run config: %s (CLI overrides: %s)", config_path, " ".join(redact_secrets(overrides)) or "none")
    return tuple(instances)


def resolved_config(*instances: Any) -> dict[str, Any]:
    """The run's resolved configuration as one flat, YAML-safe dict, secrets removed.

    Only fields a user can set are included, so the dict can be saved and fed back as a config.
    """
    config: dict[str, Any] = {}
    for instance in instances:
        for spec in dataclasses.fields(instance):
            if not spec.init or is_secret_key(spec.name):
                continue
            config[spec.name] = _yaml_safe(getattr(instance, spec.name))
        if isinstance(instance, TrainArguments):
            config["report_to"] = instance.report_to_setting()
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
