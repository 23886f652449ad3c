"""Argument dataclasses shared by every stage, and the YAML + CLI parser that fills them.

A run is configured by an optional YAML file given as the first argument plus ``--key value``
overrides::

    python pretrain.py configs/pretrain_qwen2.5-0.5b.yaml --learning_rate 3.0e-4

Precedence, lowest first: dataclass defaults < the YAML file (or the stage's default YAML when
none is given) < CLI overrides. A YAML key or CLI flag that no dataclass declares is an error
naming it; cross-field rules live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from llmtrain.errors import ConfigError
from llmtrain.tiny_default import DEMO_CONVERSATIONS_PATH, DEMO_CORPUS_PATH, TINY_MODEL_DIR

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
TXT_SAMPLE_BY_CHOICES = ("line", "paragraph", "document")
SWANLAB_MODE_CHOICES = ("cloud", "local", "offline", "disabled")
TRUNCATION_STRATEGIES = ("drop_oldest_turns", "drop", "error")
FINETUNING_TYPES = ("full", "lora", "partial")
NONFINITE_POLICIES = ("stop", "skip")
LOSS_IMPLEMENTATIONS = ("auto", "chunked", "liger", "standard")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class ModelArguments:
    """Which model to train and how to load it (shared by pretraining and SFT)."""

    config_name: str | None = field(
        default=None,
        metadata={"help": "Model config (file or dir) to train FROM SCRATCH. Exclusive with model_name_or_path."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained weights (local dir or hub id) to continue from. Exclusive with config_name."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer dir or hub id; defaults to model_name_or_path, or config_name if a directory."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are created or loaded in. Keep float32 with --bf16 for mixed precision "
            "(fp32 master weights); 'auto' takes the checkpoint's dtype.",
            "choices": DTYPE_CHOICES,
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel: sdpa, eager, flash_attention_2; auto = flash-attention 2 if installed "
            "on a GPU, else sdpa (both honour packed position ids)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with a checkpoint. Off unless you trust it."}
    )

    def __post_init__(self) -> None:
        if self.config_name and self.model_name_or_path:
            raise ConfigError(
                "config_name and model_name_or_path are mutually exclusive: set config_name to train from "
                "scratch, or model_name_or_path to continue from pretrained weights"
            )
        if not self.config_name and not self.model_name_or_path:
            self.config_name = str(TINY_MODEL_DIR)
            logger.info("neither config_name nor model_name_or_path set: using the embedded tiny Qwen2 config")
        if self.model_name_or_path and Path(self.model_name_or_path).is_dir():
            # Recorded in adapter configs and run configs: it must resolve from any directory.
            self.model_name_or_path = str(Path(self.model_name_or_path).resolve())
        if self.tokenizer_name_or_path is None:
            if self.model_name_or_path:
                self.tokenizer_name_or_path = self.model_name_or_path
            elif self.config_name and Path(self.config_name).is_dir():
                self.tokenizer_name_or_path = self.config_name
            else:
                raise ConfigError(f"tokenizer_name_or_path is required when config_name is a file ({self.config_name})")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")

    @property
    def from_scratch(self) -> bool:
        """True when the weights are freshly initialised from ``config_name``."""
        return self.model_name_or_path is None


@dataclass
class CommonDataArguments:
    """Data fields shared by every stage: where files are, splits, and the tokenize-once cache."""

    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Files, globs or directories of training data. Unset: the stage's embedded demo set."},
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files; when set, validation_split_percentage is not used."}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training records held out for eval when no validation_files."}
    )
    tokenized_path: str | None = field(
        default=None,
        metadata={"help": "Where the tokenized dataset lives. Existing: trained from as is, raw files unread."},
    )
    dataset_cache_dir: str = field(
        default="~/.cache/llmtrain/tokenized",
        metadata={"help": "Tokenize-once cache used when tokenized_path is unset, keyed on data+tokenizer+code."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    prepare_only: bool = field(
        default=False, metadata={"help": "Build the tokenized dataset at tokenized_path, then exit."}
    )

    def _check_common(self, demo_path: Path, demo_name: str) -> None:
        if self.train_files is None:
            self.train_files = [str(demo_path)]
            logger.info("train_files not set: using the embedded %s %s", demo_name, demo_path)
        if not 0.0 <= self.validation_split_percentage < 50.0:
            raise ConfigError(f"validation_split_percentage must be in [0, 50), got {self.validation_split_percentage}")
        if self.prepare_only and not self.tokenized_path:
            raise ConfigError("prepare_only needs tokenized_path: where should the prepared dataset go?")


@dataclass
class DataArguments(CommonDataArguments):
    """Pretraining data: where the text comes from and how it becomes token blocks."""

    text_field: str = field(default="text", metadata={"help": "Record field holding the document text."})
    txt_sample_by: str = field(
        default="line",
        metadata={"help": "How a .txt file splits into documents.", "choices": TXT_SAMPLE_BY_CHOICES},
    )
    block_size: int = field(default=1024, metadata={"help": "Tokens per training sequence (block)."})
    preprocessing_batch_size: int = field(
        default=1000, metadata={"help": "Documents per tokenize-and-group batch; each batch drops < 1 block."}
    )

    def __post_init__(self) -> None:
        self._check_common(DEMO_CORPUS_PATH, "demo corpus")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be at least 2, got {self.block_size}")
        if self.txt_sample_by not in TXT_SAMPLE_BY_CHOICES:
            raise ConfigError(f"txt_sample_by must be one of {', '.join(TXT_SAMPLE_BY_CHOICES)}")
        if self.preprocessing_batch_size < 1:
            raise ConfigError(f"preprocessing_batch_size must be positive, got {self.preprocessing_batch_size}")


@dataclass
class SFTDataArguments(CommonDataArguments):
    """SFT data: conversation files, chat-template encoding, length policy and packing."""

    max_seq_length: int = field(default=1024, metadata={"help": "Longest encoded conversation (and packed row)."})
    truncation_strategy: str = field(
        default="drop_oldest_turns",
        metadata={
            "help": "Over-long conversations: drop the oldest whole turns (system kept), drop the sample, or error.",
            "choices": TRUNCATION_STRATEGIES,
        },
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Pack conversations into rows of max_seq_length, padding-free; false: pad per batch."},
    )
    train_on_last_turn_only: bool = field(
        default=False, metadata={"help": "Supervise only the last assistant turn (default: every assistant turn)."}
    )
    default_system_prompt: str | None = field(
        default=None, metadata={"help": "System message added to conversations that have none."}
    )
    end_of_turn_token: str = field(
        default="<|im_end|>", metadata={"help": "Token closing each turn in the chat template; it is supervised."}
    )

    def __post_init__(self) -> None:
        self._check_common(DEMO_CONVERSATIONS_PATH, "demo conversations")
        if self.max_seq_length < 8:
            raise ConfigError(f"max_seq_length must be at least 8, got {self.max_seq_length}")
        if self.truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ConfigError(f"truncation_strategy must be one of {', '.join(TRUNCATION_STRATEGIES)}")


@dataclass
class FinetuneArguments:
    """How the weights are fine-tuned: full, LoRA (through peft) or the last layers only."""

    finetuning_type: str = field(
        default="lora", metadata={"help": "full, lora or partial.", "choices": FINETUNING_TYPES}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "Preset (qv, qkvo, all-linear) or comma-separated module names, e.g. q_proj,v_proj."},
    )
    layers_to_transform: str | None = field(
        default=None,
        metadata={"help": "Layers that get LoRA: comma-separated indices, 'last_half' or 'first_half'. Unset: all."},
    )
    trainable_last_n_layers: int = field(
        default=1, metadata={"help": "partial: number of final decoder layers left trainable."}
    )
    train_final_norm: bool = field(default=True, metadata={"help": "partial: also train the final RMSNorm."})
    train_lm_head: bool = field(default=False, metadata={"help": "partial: also train lm_head (tied: embeddings)."})

    def __post_init__(self) -> None:
        if self.finetuning_type not in FINETUNING_TYPES:
            raise ConfigError(f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ConfigError("lora_r and lora_alpha must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.trainable_last_n_layers < 1:
            raise ConfigError(f"trainable_last_n_layers must be positive, got {self.trainable_last_n_layers}")


@dataclass
class TrainArguments(TrainingArguments):
    """transformers' TrainingArguments plus this project's run-management and tracking fields."""

    # None = decide from the hardware in __post_init__; the parent's plain bool cannot say "unset".
    bf16: bool | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "bf16 mixed precision. Unset: on where the GPU supports it, off on CPU."}
    )
    ddp_timeout: int = field(
        default=10800,
        metadata={"help": "Seconds ranks wait at a barrier; long so rank 0 can tokenize a big corpus first."},
    )
    start_over: bool = field(
        default=False,
        metadata={"help": "Archive what output_dir holds (to output_dir/previous/) and train from step 0."},
    )
    swanlab_project: str = field(default="llmtrain", metadata={"help": "SwanLab project name."})
    swanlab_experiment_name: str | None = field(
        default=None, metadata={"help": "SwanLab experiment name; defaults to the output_dir's name."}
    )
    swanlab_mode: str | None = field(
        default=None,
        metadata={"help": "cloud/local/offline/disabled. Unset: cloud with an API key, else local (no network)."},
    )
    swanlab_log_dir: str | None = field(
        default=None, metadata={"help": "Where SwanLab writes run files; defaults to <output_dir>/swanlog."}
    )
    nonfinite_policy: str = field(
        default="stop",
        metadata={
            "help": "A NaN/inf loss or gradient norm never reaches the weights (that optimizer update is "
            "skipped). stop: then end the run with an error naming the step (exit 3); skip: log it and go on."
        },
    )
    loss_implementation: str = field(
        default="auto",
        metadata={
            "help": "Training loss without full-vocabulary fp32 logits. auto: Liger-Kernel's fused linear "
            "cross-entropy on GPU when installed, else our chunked one; chunked; liger; standard: the model's own."
        },
    )
    # Set from report_to: transformers' own SwanLab hook crashes with swanlab >= 0.8, so we route it.
    use_swanlab: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = _bf16_supported(self.use_cpu)
        if self.use_cpu:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if self.swanlab_mode is not None and self.swanlab_mode not in SWANLAB_MODE_CHOICES:
            raise ConfigError(f"swanlab_mode must be one of {', '.join(SWANLAB_MODE_CHOICES)}")
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ConfigError(f"loss_implementation must be one of {', '.join(LOSS_IMPLEMENTATIONS)}")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ConfigError(f"nonfinite_policy must be one of {', '.join(NONFINITE_POLICIES)}")
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if isinstance(self.report_to, list) and "swanlab" in self.report_to:
            self.report_to = [name for name in self.report_to if name != "swanlab"]
            self.use_swanlab = True
        if self.swanlab_log_dir is None:
            self.swanlab_log_dir = os.path.join(str(self.output_dir), "swanlog")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled copies (the Trainer's ``training_args.bin``) carry no credentials."""
        state = dict(self.__dict__)
        for key in state:
            if is_secret_key(key) and state[key] is not None:
                state[key] = None
        return state

    def report_to_setting(self) -> str:
        """``report_to`` as a user would write it (``"swanlab,tensorboard"``, or ``"none"``)."""
        names = [*self.report_to, *(["swanlab"] if self.use_swanlab else [])] if self.report_to is not None else []
        return ",".join(names) or "none"


def _bf16_supported(use_cpu: bool) -> bool:
    import torch

    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _yaml_key_lines(path: Path, text: str) -> dict[str, int]:
    """Map each top-level key of a YAML mapping to its 1-based line number."""
    node = yaml.compose(text)
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: a run config must be a mapping of field: value")
    return {key.value: key.start_mark.line + 1 for key, _ in node.value}


def yaml_to_argv(path: Path, parser: HfArgumentParser) -> list[str]:
    """Turn a YAML run config into ``--key value`` tokens that ``parser`` accepts.

    Lists become several tokens (for list fields), dicts become JSON, booleans ``true``/``false``,
    and ``null`` leaves the field at its default.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "run.yaml"; _ = p.write_text("block_size: 64\\nprepare_only: true\\n")
    >>> yaml_to_argv(p, HfArgumentParser(DataArguments))
    ['--block_size', '64', '--prepare_only', 'true']
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        lines = _yaml_key_lines(path, text)
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from error
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    argv: list[str] = []
    for key, value in values.items():
        if key not in actions:
            raise ConfigError(f"{path}:{lines.get(str(key), '?')}: unknown key '{key}'")
        if value is None or value == []:  # unset: keep the field's default
            continue
        action = actions[key]
        if isinstance(value, list):
            if action.nargs not in ("+", "*"):
                raise ConfigError(f"{path}:{lines[key]}: '{key}' takes a single value, not a list")
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


# Keys whose value must never reach a log, a saved config or an experiment tracker.
SECRET_KEY_MARKERS = ("token", "api_key", "secret", "password")
TOKENIZER_KEYS = frozenset({"tokenizer_name_or_path"})


def is_secret_key(key: str) -> bool:
    """True for keys such as ``hub_token`` whose values are credentials."""
    lowered = key.lower()
    return key not in TOKENIZER_KEYS and any(marker in lowered for marker in SECRET_KEY_MARKERS)


def redact_secrets(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag replaced, for logging.

    >>> redact_secrets(["--hub_token", "hf_x", "--seed", "1", "--hub_token=hf_y"])
    ['--hub_token', '***', '--seed', '1', '--hub_token=***']
    """
    redacted: list[str] = []
    hide_next = False
    for item in argv:
        flag, has_value, _ = item.partition("=")
        if hide_next:
            redacted.append("***")
            hide_next = False
        elif flag.startswith("--") and is_secret_key(flag[2:]):
            redacted.append(f"{flag}=***" if has_value else item)
            hide_next = not has_value
        else:
            redacted.append(item)
    return redacted


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
