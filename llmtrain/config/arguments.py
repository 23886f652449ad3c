"""Argument dataclasses shared by both stages; cross-field rules live in each ``__post_init__``.

``ModelArguments`` and ``TrainArguments`` serve both stages; ``DataArguments`` holds the data
fields every stage has and ``PretrainDataArguments`` / ``SFTDataArguments`` add each stage's own;
``FinetuneArguments`` is SFT's method (full, LoRA, partial). Which stage takes which dataclasses is
:mod:`llmtrain.stages`; the YAML + CLI parser that fills them is :mod:`llmtrain.config.parser`.

A field with a fixed set of values declares it once, as ``choices`` in its metadata: argparse
rejects anything else on the command line or in a YAML file, and :func:`check_choices` (called by
every ``__post_init__``) does the same for instances built in code.

Field rules. Every field a user sets declares, once and on the field, how a resumed run treats a
change to it and whether it is part of the prepared-data cache key: a :class:`FieldRule` in its
annotation, ``lora_r: Annotated[int, STRUCTURAL]``. The five rules:

* ``STRUCTURAL``: decides which parameters exist and how they are shaped or initialised (the model,
  the fine-tuning method). A checkpoint written under another value would load partially, so
  resuming it is refused.
* ``DATA``: which raw data is read, and how (files, held-out share, a stage's reading options). It
  is part of the prepared-data cache key and is recorded with the files' fingerprints (the
  ``sources`` of the data's metadata and of every checkpoint's manifest); a resume on changed files
  is refused unless ``allow_data_change``.
* ``PREPARED``: how the prepared rows are built from that data (SFT's length policy, packing,
  template options). It is part of the cache key: another value builds other prepared data.
* ``IDENTITY``: anything else that shapes the result (optimizer, schedule, batch, precision).
  Changed between launches, the resume goes on with a warning naming it, and a finished model
  trained under another value is not overwritten.
* ``VOLATILE``: logging, launch topology, tracking, cache locations, worker counts; may differ
  between launches of one run.

``DATA``, ``PREPARED`` and ``IDENTITY`` fields are all part of the run's identity; only
``VOLATILE`` ones are not. The sets other modules use are derived from the rules, never listed:
:func:`resume_keys` gives :mod:`llmtrain.run.output_dir` its volatile and structural keys,
:func:`prepared_settings` the SFT cache key's settings, :func:`stage_data_settings` a stage's own
reading options. transformers' ``TrainingArguments`` fields cannot carry this project's
annotations: :data:`TRAINING_ARGUMENT_RULES` declares theirs, in one table. A new field (ours, or
one a transformers upgrade adds) that declares no rule fails ``tests/unit/test_field_rules.py``.
The rule is in the annotation, not in ``metadata`` beside ``choices``, because
``HfArgumentParser`` hands a field's metadata to argparse's ``add_argument``, which rejects keys
it does not know; type hints reach the parser with the ``Annotated`` extras stripped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

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
RESUME_KINDS = ("structural", "data", "identity", "volatile")


@dataclass(frozen=True)
class FieldRule:
    """How a resumed run treats a field, and whether the prepared-data cache key includes it (module docstring)."""

    resume: str  # one of RESUME_KINDS
    cache_key: bool = False


STRUCTURAL = FieldRule("structural")
DATA = FieldRule("data", cache_key=True)
PREPARED = FieldRule("identity", cache_key=True)
IDENTITY = FieldRule("identity")
VOLATILE = FieldRule("volatile")


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

    config_name: Annotated[str | None, STRUCTURAL] = field(
        default=None,
        metadata={"help": "Model config (file or dir) to train FROM SCRATCH. Exclusive with model_name_or_path."},
    )
    model_name_or_path: Annotated[str | None, STRUCTURAL] = field(
        default=None,
        metadata={"help": "Pretrained weights (local dir or hub id) to continue from. Exclusive with config_name."},
    )
    tokenizer_name_or_path: Annotated[str | None, STRUCTURAL] = field(
        default=None,
        metadata={"help": "Tokenizer dir or hub id; defaults to model_name_or_path, or config_name if a directory."},
    )
    dtype: Annotated[str, IDENTITY] = field(
        default="float32",
        metadata={
            "help": "dtype the weights are created or loaded in. Keep float32 with --bf16 for mixed precision "
            "(fp32 master weights); 'auto' takes the checkpoint's dtype.",
            "choices": DTYPE_CHOICES,
        },
    )
    attn_implementation: Annotated[str, IDENTITY] = field(
        default="auto",
        metadata={
            "help": "Attention kernel: sdpa, eager, flash_attention_2; auto = flash-attention 2 if installed "
            "on a GPU, else sdpa (both honour packed position ids)."
        },
    )
    trust_remote_code: Annotated[bool, IDENTITY] = field(
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

    train_files: Annotated[list[str] | None, DATA] = field(
        default=None,
        metadata={
            "help": "Files, globs or directories of training data. Unset: the stage's embedded demo set. "
            "Pretraining: entries may carry a weight, web/*.jsonl:0.7,code/:0.3 (each one a source)."
        },
    )
    validation_files: Annotated[list[str] | None, DATA] = field(
        default=None, metadata={"help": "Held-out files; when set, validation_split_percentage is not used."}
    )
    validation_split_percentage: Annotated[float, DATA] = field(
        default=5.0, metadata={"help": "Percent of training records held out for eval when no validation_files."}
    )
    tokenized_path: Annotated[str | None, VOLATILE] = field(
        default=None,
        metadata={"help": "Where the tokenized dataset lives. Existing: trained from as is, raw files unread."},
    )
    dataset_cache_dir: Annotated[str, VOLATILE] = field(
        default="~/.cache/llmtrain/tokenized",
        metadata={"help": "Tokenize-once cache used when tokenized_path is unset, keyed on data+tokenizer+code."},
    )
    preprocessing_num_workers: Annotated[int | None, VOLATILE] = field(
        default=None,
        metadata={"help": "Tokenizing processes (torchdata ParallelMapper, order kept); unset or 1: in this process."},
    )
    prepare_only: Annotated[bool, VOLATILE] = field(
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

    text_field: Annotated[str, DATA] = field(
        default="text", metadata={"help": "Record field holding the document text."}
    )
    txt_sample_by: Annotated[str, DATA] = field(
        default="line",
        metadata={"help": "How a .txt file splits into documents.", "choices": TXT_SAMPLE_BY_CHOICES},
    )
    block_size: Annotated[int, IDENTITY] = field(
        default=1024, metadata={"help": "Tokens per training sequence (block)."}
    )
    preprocessing_batch_size: Annotated[int, IDENTITY] = field(
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

    max_seq_length: Annotated[int, PREPARED] = field(
        default=1024, metadata={"help": "Longest encoded conversation (and packed row)."}
    )
    truncation_strategy: Annotated[str, PREPARED] = field(
        default="drop_oldest_turns",
        metadata={
            "help": "Over-long conversations: drop the oldest whole turns (system kept), drop the sample, or error.",
            "choices": TRUNCATION_STRATEGIES,
        },
    )
    packing: Annotated[bool, PREPARED] = field(
        default=True,
        metadata={"help": "Pack conversations into rows of max_seq_length, padding-free; false: pad per batch."},
    )
    share_prefixes: Annotated[str, PREPARED] = field(
        default="auto",
        metadata={
            "help": "Train a conversation's per-turn rows (templates that rewrite history, e.g. Qwen3) as one prefix "
            "tree, each shared prefix computed once. auto: where it is exact (sdpa or eager attention, no "
            "recurrent mixers); true: refuse where it is not; false: rows.",
            "choices": SHARE_PREFIXES_CHOICES,
        },
    )
    train_on_last_turn_only: Annotated[bool, PREPARED] = field(
        default=False, metadata={"help": "Supervise only the last assistant turn (default: every assistant turn)."}
    )
    default_system_prompt: Annotated[str | None, PREPARED] = field(
        default=None, metadata={"help": "System message added to conversations that have none."}
    )
    end_of_turn_token: Annotated[str, PREPARED] = field(
        default="<|im_end|>", metadata={"help": "Token closing each turn in the chat template; it is supervised."}
    )
    chat_template_kwargs: Annotated[dict[str, Any] | str | None, PREPARED] = field(
        default=None,
        metadata={
            "help": "Keywords the chat template reads, as a JSON object (YAML: a mapping), e.g. "
            '{"enable_thinking": false}; recorded with the model, so llmtrain.tools.chat renders alike.'
        },
    )
    invalid_records: Annotated[str, PREPARED] = field(
        default="error",
        metadata={
            "help": "A record that is not a usable conversation: error stops with its file:line; skip leaves it "
            "out, counted by reason (log and run manifest), within max_invalid_share.",
            "choices": INVALID_RECORD_POLICIES,
        },
    )
    max_invalid_share: Annotated[float, PREPARED] = field(
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

    finetuning_type: Annotated[str, STRUCTURAL] = field(
        default="lora", metadata={"help": "full, lora or partial.", "choices": FINETUNING_TYPES}
    )
    lora_r: Annotated[int, STRUCTURAL] = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: Annotated[int, STRUCTURAL] = field(
        default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."}
    )
    lora_dropout: Annotated[float, STRUCTURAL] = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: Annotated[str, STRUCTURAL] = field(
        default="all-linear",
        metadata={
            "help": "Preset (qv, qkvo: softmax attention; attention: every token mixer; all-linear: every Linear "
            "but the output head; presets leave out linear attention's per-head gates) or comma-separated module "
            "names, e.g. q_proj,v_proj."
        },
    )
    layers_to_transform: Annotated[str | None, STRUCTURAL] = field(
        default=None,
        metadata={"help": "Layers that get LoRA: comma-separated indices, 'last_half' or 'first_half'. Unset: all."},
    )
    trainable_last_n_layers: Annotated[int, STRUCTURAL] = field(
        default=1, metadata={"help": "partial: number of final decoder layers left trainable."}
    )
    train_final_norm: Annotated[bool, STRUCTURAL] = field(
        default=True, metadata={"help": "partial: also train the final RMSNorm."}
    )
    train_lm_head: Annotated[bool, STRUCTURAL] = field(
        default=False, metadata={"help": "partial: also train lm_head (tied: embeddings)."}
    )

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
    bf16: Annotated[bool | None, IDENTITY] = field(  # type: ignore[assignment]
        default=None, metadata={"help": "bf16 mixed precision. Unset: on where the GPU supports it, off on CPU."}
    )
    ddp_timeout: Annotated[int, VOLATILE] = field(
        default=10800,
        metadata={"help": "Seconds ranks wait at a barrier; long so rank 0 can tokenize a big corpus first."},
    )
    start_over: Annotated[bool, VOLATILE] = field(
        default=False,
        metadata={"help": "Archive what output_dir holds (to output_dir/previous/) and train from step 0."},
    )
    allow_data_change: Annotated[bool, VOLATILE] = field(
        default=False,
        metadata={
            "help": "Resume although the training data changed since the checkpoint was written: the changes are "
            "logged and the data order starts a fresh pass over the new data (refused by default)."
        },
    )
    swanlab_project: Annotated[str, VOLATILE] = field(default="llmtrain", metadata={"help": "SwanLab project name."})
    swanlab_experiment_name: Annotated[str | None, VOLATILE] = field(
        default=None, metadata={"help": "SwanLab experiment name; defaults to the output_dir's name."}
    )
    swanlab_mode: Annotated[str | None, VOLATILE] = field(
        default=None,
        metadata={
            "help": "cloud/local/offline/disabled. Unset: cloud with an API key, else local (no network).",
            "choices": SWANLAB_MODE_CHOICES,
        },
    )
    swanlab_log_dir: Annotated[str | None, VOLATILE] = field(
        default=None, metadata={"help": "Where SwanLab writes run files; defaults to <output_dir>/swanlog."}
    )
    nonfinite_policy: Annotated[str, IDENTITY] = field(
        default="stop",
        metadata={
            "help": "A NaN/inf loss or gradient norm never reaches the weights (that optimizer update is "
            "skipped). stop: then end the run with an error naming the step (exit 3); skip: log it and go on.",
            "choices": NONFINITE_POLICIES,
        },
    )
    loss_implementation: Annotated[str, IDENTITY] = field(
        default="auto",
        metadata={
            "help": "Training loss without full-vocabulary fp32 logits. auto: Liger-Kernel's fused linear "
            "cross-entropy on GPU when installed, else our chunked one; chunked; liger; standard: the model's own.",
            "choices": LOSS_IMPLEMENTATIONS,
        },
    )
    checkpoint_checksums: Annotated[bool, VOLATILE] = field(
        default=False,
        metadata={
            "help": "Record a SHA-256 of every checkpoint file and verify it before resuming (reads every byte at "
            "each save and resume). Off: file sizes alone are recorded and checked."
        },
    )
    # Set from report_to: transformers' own SwanLab hook crashes with swanlab >= 0.8, so we route it.
    use_swanlab: bool = field(default=False, init=False)
    # The user's save_total_limit, held by the project: llmtrain.run.checkpoints.rotate applies it after each
    # checkpoint's completion marker. The Trainer's own field is left at None, so its rotation (by mtime, before
    # the other ranks have finished saving) never runs.
    checkpoint_limit: int | None = field(default=None, init=False)

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
        self.checkpoint_limit, self.save_total_limit = self.save_total_limit, None

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

    def recorded_settings(self) -> dict[str, Any]:
        """The fields whose recorded value is the user's, not what the Trainer was given.

        ``report_to`` without SwanLab (this project routes it) and ``save_total_limit`` at None (this
        project holds it as :attr:`checkpoint_limit`): a run config records what the user set.
        """
        return {"report_to": self.report_to_setting(), "save_total_limit": self.checkpoint_limit}


# The rules of the fields transformers' TrainingArguments declares (module docstring), which cannot carry this
# project's annotations. None of them is part of the prepared-data cache key. bf16 and ddp_timeout are redeclared
# by TrainArguments and declare theirs there. A transformers upgrade that adds a field fails
# tests/unit/test_field_rules.py until the field is placed here.
TRAINING_ARGUMENT_RULES: dict[str, FieldRule] = {
    # Logging, checkpoint cadence and rotation, launch topology, trackers, worker counts.
    **dict.fromkeys(
        (
            "logging_strategy", "logging_steps", "logging_first_step", "log_level", "log_level_replica",
            "disable_tqdm", "report_to", "run_name", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
            "use_cpu", "dataloader_num_workers", "deepspeed", "local_rank",
        ),
        VOLATILE,
    ),
    # The rest shapes what is trained, or has never been judged harmless to change mid-run.
    **dict.fromkeys(
        (
            "output_dir", "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate",
            "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay",
            "adam_beta1", "adam_beta2", "adam_epsilon", "optim_target_modules", "gradient_accumulation_steps",
            "average_tokens_across_devices", "max_grad_norm", "label_smoothing_factor", "fp16", "bf16_full_eval",
            "fp16_full_eval", "tf32", "activation_checkpointing", "activation_checkpointing_kwargs",
            "gradient_checkpointing", "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend",
            "torch_compile_mode", "use_liger_kernel", "liger_kernel_config", "use_cache", "neftune_noise_alpha",
            "torch_empty_cache_steps", "auto_find_batch_size", "log_on_each_node", "logging_nan_inf_filter",
            "include_num_input_tokens_seen", "project", "trackio_space_id", "trackio_bucket_id",
            "trackio_static_space_id", "eval_strategy", "eval_delay", "per_device_eval_batch_size",
            "prediction_loss_only", "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object",
            "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "save_only_model",
            "save_on_each_node", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo",
            "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "load_best_model_at_end",
            "metric_for_best_model", "greater_is_better", "ignore_data_skip",
            "restore_callback_states_from_checkpoint", "full_determinism", "seed", "data_seed", "accelerator_config",
            "parallelism_config", "dataloader_drop_last", "dataloader_pin_memory", "dataloader_persistent_workers",
            "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
            "remove_unused_columns", "label_names", "train_sampling_strategy", "length_column_name",
            "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
            "ddp_backend", "fsdp", "fsdp_config", "debug", "skip_memory_metrics", "do_train", "do_eval", "do_predict",
            "resume_from_checkpoint",
        ),
        IDENTITY,
    ),
}  # fmt: skip
# field_rules' answers, per dataclass: a class's rules are fixed once it is defined.
_FIELD_RULES: dict[type, dict[str, FieldRule | None]] = {}
# Every argument dataclass of both stages (llmtrain.stages says which stage parses which).
ARGUMENT_DATACLASSES: tuple[type, ...] = (
    ModelArguments, PretrainDataArguments, SFTDataArguments, FinetuneArguments, TrainArguments,
)  # fmt: skip


def field_rules(dataclass_type: type) -> dict[str, FieldRule | None]:
    """Every field of ``dataclass_type`` a user sets, with its :class:`FieldRule`; None where it declares none.

    The rule is the one in the field's annotation, else, for a field of transformers'
    ``TrainingArguments``, its entry in :data:`TRAINING_ARGUMENT_RULES`. Fields with ``init=False``
    are set by ``__post_init__``, not by users, and have no rule.

    >>> field_rules(FinetuneArguments)["lora_r"], field_rules(TrainArguments)["logging_steps"].resume
    (FieldRule(resume='structural', cache_key=False), 'volatile')
    """
    if dataclass_type in _FIELD_RULES:
        return _FIELD_RULES[dataclass_type]
    hints = typing.get_type_hints(dataclass_type, include_extras=True)
    inherited = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    rules: dict[str, FieldRule | None] = {}
    for spec in dataclasses.fields(dataclass_type):
        if not spec.init:
            continue
        extras = typing.get_args(hints[spec.name])[1:] if typing.get_origin(hints[spec.name]) is Annotated else ()
        declared = [item for item in extras if isinstance(item, FieldRule)]
        if declared:
            rules[spec.name] = declared[0]
        elif spec.name in inherited and issubclass(dataclass_type, TrainingArguments):
            rules[spec.name] = TRAINING_ARGUMENT_RULES.get(spec.name)
        else:
            rules[spec.name] = None
    _FIELD_RULES[dataclass_type] = rules
    return rules


def resume_keys(resume: str) -> frozenset[str]:
    """The fields of every argument dataclass whose rule's ``resume`` is ``resume`` (one of :data:`RESUME_KINDS`).

    A field that declares no rule is in none of these sets (so it counts as run identity), and fails
    ``tests/unit/test_field_rules.py``.

    >>> sorted(resume_keys("structural"))[:3]
    ['config_name', 'finetuning_type', 'layers_to_transform']
    """
    if resume not in RESUME_KINDS:
        raise ValueError(f"resume must be one of {', '.join(RESUME_KINDS)}, got {resume!r}")
    return frozenset(
        name
        for dataclass_type in ARGUMENT_DATACLASSES
        for name, rule in field_rules(dataclass_type).items()
        if rule is not None and rule.resume == resume
    )


def prepared_settings(data_args: DataArguments) -> dict[str, Any]:
    """``data_args``'s ``PREPARED`` fields (cache key, not data identity), by name, as the instance holds them.

    >>> sorted(prepared_settings(PretrainDataArguments()))
    []
    """
    return {
        name: getattr(data_args, name)
        for name, rule in field_rules(type(data_args)).items()
        if rule is not None and rule.cache_key and rule.resume != "data"
    }


def stage_data_settings(data_args: DataArguments) -> dict[str, Any]:
    """The ``DATA`` fields a stage adds to :class:`DataArguments` (its reading options), by name.

    The shared ``DATA`` fields (the files and the held-out share) enter the data's ``sources`` as
    file fingerprints, resolved by :mod:`llmtrain.data.cache`; these enter them as they are.

    >>> stage_data_settings(PretrainDataArguments())
    {'text_field': 'text', 'txt_sample_by': 'line'}
    """
    shared = {spec.name for spec in dataclasses.fields(DataArguments)}
    return {
        name: getattr(data_args, name)
        for name, rule in field_rules(type(data_args)).items()
        if rule is not None and rule.resume == "data" and name not in shared
    }


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
