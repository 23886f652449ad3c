"""Argument dataclasses shared by both stages; cross-field rules live in each ``__post_init__``.

``ModelArguments`` and ``TrainArguments`` serve both stages; ``DataArguments`` holds the data
fields every stage has and ``PretrainDataArguments`` / ``SFTDataArguments`` add each stage's own;
``FinetuneArguments`` is SFT's method (full, LoRA, partial). Which stage takes which dataclasses is
:mod:`llmtrain.stages`; the YAML + CLI parser that fills them is :mod:`llmtrain.config.parser`.

A field with a fixed set of values declares it once, as ``choices`` in its metadata: argparse
rejects anything else on the command line or in a YAML file, and :func:`check_choices` (called by
every ``__post_init__``) does the same for instances built in code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from llmtrain.config.secrets import is_secret_key
from llmtrain.config.sources import parse_sources
from llmtrain.config.template_kwargs import parse_template_kwargs
from llmtrain.errors import ConfigError
from llmtrain.paths import DEMO_CONVERSATIONS_PATH, DEMO_CORPUS_PATH, TINY_MODEL_DIR, portable_model_reference

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "bfloat16", "float16", "auto")
TXT_SAMPLE_BY_CHOICES = ("line", "paragraph", "document")
SWANLAB_MODE_CHOICES = ("cloud", "local", "offline", "disabled")
TRUNCATION_STRATEGIES = ("drop_oldest_turns", "drop", "error")
FINETUNING_TYPES = ("full", "lora", "partial")
NONFINITE_POLICIES = ("stop", "skip")
LOSS_IMPLEMENTATIONS = ("auto", "chunked", "liger", "standard")
INVALID_RECORD_POLICIES = ("error", "skip")
SHARE_PREFIXES_CHOICES = ("auto", "true", "false")
# ZeRO-3 keys that make the Trainer's save gather the partitioned weights into one model file (the second is
# DeepSpeed's older spelling).
ZERO3_GATHER_KEYS = ("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save")


def check_choices(instance: Any) -> None:
    """Raise :class:`ConfigError` for a field whose value is not among its declared ``choices``.

    >>> check_choices(FinetuneArguments.__new__(FinetuneArguments))  # nothing set yet: nothing to check
    >>> args = FinetuneArguments.__new__(FinetuneArguments); args.finetuning_type = "qlora"
    >>> check_choices(args)
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: finetuning_type must be one of full, lora, partial, got 'qlora'
    """
    for spec in dataclasses.fields(instance):
        choices = spec.metadata.get("choices")
        value = getattr(instance, spec.name, None)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{spec.name} must be one of {', '.join(choices)}, got {value!r}")


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
    # How a LoRA adapter names its base (adapter_config.json): the hub id, or the path as the user gave it.
    base_model_reference: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.config_name and self.model_name_or_path:
            raise ConfigError(
                "config_name and model_name_or_path are mutually exclusive: set config_name to train from "
                "scratch, or model_name_or_path to continue from pretrained weights"
            )
        if not self.config_name and not self.model_name_or_path:
            self.config_name = str(TINY_MODEL_DIR)
            logger.info("neither config_name nor model_name_or_path set: using the embedded tiny Qwen2 config")
        if self.model_name_or_path:
            self.base_model_reference = portable_model_reference(self.model_name_or_path)
        if self.model_name_or_path and Path(self.model_name_or_path).is_dir():
            # Recorded in run configs and manifests: it must resolve from any directory.
            self.model_name_or_path = str(Path(self.model_name_or_path).resolve())
        if self.tokenizer_name_or_path is None:
            if self.model_name_or_path:
                self.tokenizer_name_or_path = self.model_name_or_path
            elif self.config_name and Path(self.config_name).is_dir():
                self.tokenizer_name_or_path = self.config_name
            else:
                raise ConfigError(f"tokenizer_name_or_path is required when config_name is a file ({self.config_name})")

    @property
    def from_scratch(self) -> bool:
        """True when the weights are freshly initialised from ``config_name``."""
        return self.model_name_or_path is None


@dataclass
class DataArguments:
    """Data fields shared by every stage: where files are, splits, and the tokenize-once cache."""

    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Files, globs or directories of training data. Unset: the stage's embedded demo set. "
            "Pretraining: entries may carry a weight, web/*.jsonl:0.7,code/:0.3 (each one a source)."
        },
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
        parse_sources(self.train_files)  # a weight error names train_files here, before anything runs
        if not 0.0 <= self.validation_split_percentage < 50.0:
            raise ConfigError(f"validation_split_percentage must be in [0, 50), got {self.validation_split_percentage}")
        if self.prepare_only and not self.tokenized_path:
            raise ConfigError("prepare_only needs tokenized_path: where should the prepared dataset go?")


@dataclass
class PretrainDataArguments(DataArguments):
    """Pretraining data: where the text comes from and how it becomes token blocks."""

    text_field: str = field(default="text", metadata={"help": "Record field holding the document text."})
    txt_sample_by: str = field(
        default="line",
        metadata={"help": "How a .txt file splits into documents.", "choices": TXT_SAMPLE_BY_CHOICES},
    )
    block_size: int = field(default=1024, metadata={"help": "Tokens per training sequence (block)."})
    preprocessing_batch_size: int = field(
        default=1000, metadata={"help": "Documents per tokenization batch (one task of a prepare worker)."}
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self._check_common(DEMO_CORPUS_PATH, "demo corpus")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be at least 2, got {self.block_size}")
        if self.preprocessing_batch_size < 1:
            raise ConfigError(f"preprocessing_batch_size must be positive, got {self.preprocessing_batch_size}")


@dataclass
class SFTDataArguments(DataArguments):
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
    share_prefixes: str = field(
        default="auto",
        metadata={
            "help": "Train a conversation's per-turn rows (templates that rewrite history, e.g. Qwen3) as one prefix "
            "tree, each shared prefix computed once. auto: where it is exact (sdpa or eager attention, no "
            "recurrent mixers); true: refuse where it is not; false: rows.",
            "choices": SHARE_PREFIXES_CHOICES,
        },
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
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keywords the chat template reads, as a JSON object (YAML: a mapping), e.g. "
            '{"enable_thinking": false}; recorded with the model, so llmtrain.tools.chat renders alike.'
        },
    )
    invalid_records: str = field(
        default="error",
        metadata={
            "help": "A record that is not a usable conversation: error stops with its file:line; skip leaves it "
            "out, counted by reason (log and run manifest), within max_invalid_share.",
            "choices": INVALID_RECORD_POLICIES,
        },
    )
    max_invalid_share: float = field(
        default=0.01,
        metadata={"help": "invalid_records: skip refuses to start when more than this share of records is bad."},
    )

    def __post_init__(self) -> None:
        self.share_prefixes = str(self.share_prefixes).lower()  # YAML reads true / false as booleans
        check_choices(self)
        self._check_common(DEMO_CONVERSATIONS_PATH, "demo conversations")
        assert self.train_files is not None
        if parse_sources(self.train_files)[0].weight is not None:
            raise ConfigError("train_files: weights are for pretraining sources; SFT trains every conversation given")
        if self.max_seq_length < 8:
            raise ConfigError(f"max_seq_length must be at least 8, got {self.max_seq_length}")
        if not 0.0 <= self.max_invalid_share < 1.0:
            raise ConfigError(f"max_invalid_share must be in [0, 1), got {self.max_invalid_share}")
        self.chat_template_kwargs = parse_template_kwargs(self.chat_template_kwargs)

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """``chat_template_kwargs`` as keywords for ``apply_chat_template`` (empty when unset)."""
        assert not isinstance(self.chat_template_kwargs, str)  # parsed in __post_init__
        return dict(self.chat_template_kwargs or {})


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
        metadata={
            "help": "Preset (qv, qkvo: softmax attention; attention: every token mixer; all-linear: every Linear "
            "but the output head; presets leave out linear attention's per-head gates) or comma-separated module "
            "names, e.g. q_proj,v_proj."
        },
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
        check_choices(self)
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
    allow_data_change: bool = field(
        default=False,
        metadata={
            "help": "Resume although the training data changed since the checkpoint was written: the changes are "
            "logged and the data order starts a fresh pass over the new data (refused by default)."
        },
    )
    swanlab_project: str = field(default="llmtrain", metadata={"help": "SwanLab project name."})
    swanlab_experiment_name: str | None = field(
        default=None, metadata={"help": "SwanLab experiment name; defaults to the output_dir's name."}
    )
    swanlab_mode: str | None = field(
        default=None,
        metadata={
            "help": "cloud/local/offline/disabled. Unset: cloud with an API key, else local (no network).",
            "choices": SWANLAB_MODE_CHOICES,
        },
    )
    swanlab_log_dir: str | None = field(
        default=None, metadata={"help": "Where SwanLab writes run files; defaults to <output_dir>/swanlog."}
    )
    nonfinite_policy: str = field(
        default="stop",
        metadata={
            "help": "A NaN/inf loss or gradient norm never reaches the weights (that optimizer update is "
            "skipped). stop: then end the run with an error naming the step (exit 3); skip: log it and go on.",
            "choices": NONFINITE_POLICIES,
        },
    )
    loss_implementation: str = field(
        default="auto",
        metadata={
            "help": "Training loss without full-vocabulary fp32 logits. auto: Liger-Kernel's fused linear "
            "cross-entropy on GPU when installed, else our chunked one; chunked; liger; standard: the model's own.",
            "choices": LOSS_IMPLEMENTATIONS,
        },
    )
    checkpoint_checksums: bool = field(
        default=False,
        metadata={
            "help": "Record a SHA-256 of every checkpoint file and verify it before resuming (reads every byte at "
            "each save and resume). Off: file sizes alone are recorded and checked."
        },
    )
    # Set from report_to: transformers' own SwanLab hook crashes with swanlab >= 0.8, so we route it.
    use_swanlab: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError(
                f"max_steps={self.max_steps}, num_train_epochs={self.num_train_epochs} trains nothing: set max_steps "
                "to a positive number of optimizer steps, or leave it at -1 and set num_train_epochs > 0"
            )
        if self.bf16 is None:
            self.bf16 = _bf16_supported(self.use_cpu)
        if self.eval_on_start and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            logger.info("eval_strategy 'no' turns every evaluation off, eval_on_start's too")
            self.eval_on_start = False
        if self.use_cpu:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        hf_deepspeed_config = getattr(self, "hf_deepspeed_config", None)  # set by the parent from --deepspeed
        if hf_deepspeed_config is not None:
            check_deepspeed_config(hf_deepspeed_config.config, self.deepspeed)
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


def check_deepspeed_config(config: dict[str, Any], source: object) -> None:
    """Refuse a DeepSpeed config whose run would end without a loadable model.

    Under ZeRO-3 each rank holds a slice of every weight. Only with
    ``stage3_gather_16bit_weights_on_model_save: true`` does the Trainer's save gather them into
    ``model.safetensors``; without it the Trainer writes DeepSpeed's shards instead and logs a warning:
    the run exits 0 and ``from_pretrained(output_dir)`` fails ("no file named model.safetensors").

    >>> check_deepspeed_config({"zero_optimization": {"stage": 2}}, "ds_config_zero2.json")
    >>> check_deepspeed_config({"zero_optimization": {"stage": 3}}, "x.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llmtrain.errors.ConfigError: deepspeed: x.json is a ZeRO-3 config without "stage3_gather_16bit_weights_on_...
    """
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3 and not any(zero.get(key) for key in ZERO3_GATHER_KEYS):
        described = source if isinstance(source, str | os.PathLike) else "the config"
        raise ConfigError(
            f'deepspeed: {described} is a ZeRO-3 config without "{ZERO3_GATHER_KEYS[0]}": true, so the final '
            "save would write DeepSpeed shards instead of model.safetensors (no loader reads them); set it "
            "(ds_config_zero3.json does)"
        )


def _bf16_supported(use_cpu: bool) -> bool:
    import torch

    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
