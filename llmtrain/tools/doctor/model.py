"""The model checks: sources resolved without a network round trip, parameters counted on meta, length, tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from llmtrain.compat import without_deepspeed_zero3_init
from llmtrain.config.arguments import FinetuneArguments, ModelArguments, PretrainDataArguments, SFTDataArguments
from llmtrain.data.chat_masks import check_chat_tokenizer
from llmtrain.data.collate import choose_layout
from llmtrain.errors import DataError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.mixers import VARLEN_KERNELS, describe_recurrent_layers, layer_types, recurrent_layer_counts
from llmtrain.modeling import check_sequence_length, load_tokenizer_for, resolve_attn_implementation
from llmtrain.stages import SFT, Stage
from llmtrain.tools.doctor.report import OK, WARNING, PreflightError, Report

# Fields naming a model source, with the file whose presence in the hub cache makes it usable offline.
MODEL_SOURCE_FIELDS = (
    ("config_name", "config.json"),
    ("model_name_or_path", "config.json"),
    ("tokenizer_name_or_path", "tokenizer_config.json"),
)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the configured model, taken on the meta device (no memory, no weights)."""

    unique: int  # distinct parameters of the base model (tied weights once)
    saved: int  # state-dict entries: a tied lm_head counted again, as the DeepSpeed save writes it
    trainable: int  # what the optimizer holds: everything, the LoRA adapter, or the unfrozen layers
    adapter_only: bool  # LoRA: checkpoints and the final save hold the adapter, not the base

    @property
    def tied(self) -> int:
        """Parameters shared by the input embedding and the output head (0 when untied)."""
        return self.saved - self.unique


def count_parameters(
    model_config: PretrainedConfig, model_args: ModelArguments, method_args: FinetuneArguments | None = None
) -> ParameterCounts:
    """Build the model on the meta device and count; for SFT the fine-tuning method is applied too.

    Raises the fine-tuning method's :class:`~llmtrain.errors.ConfigError` (a LoRA target that
    matches nothing, more trainable layers than the model has).
    """
    # Parsing --deepspeed with a ZeRO-3 config makes transformers build every model inside deepspeed.zero.Init,
    # which needs the ranks' process group (in one process it looks for mpi4py); the count needs none of that.
    with without_deepspeed_zero3_init(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(model_config), trust_remote_code=model_args.trust_remote_code
        )
    unique = sum(parameter.numel() for parameter in model.parameters())
    saved = sum(parameter.numel() for _, parameter in model.named_parameters(remove_duplicate=False))
    adapter_only = method_args is not None and method_args.finetuning_type == "lora"
    if method_args is not None:
        model = apply_finetuning_method(model, method_args, activation_checkpointing=False)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return ParameterCounts(unique=unique, saved=saved, trainable=trainable, adapter_only=adapter_only)


def local_source(source: str, filename: str) -> Path | None:
    """``source`` itself when it exists locally, else its snapshot dir in the hub cache, else None.

    Lets ``--fast`` load a cached hub model without a network round trip (an uncached hub id with
    no network costs ~25 s of retries).
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, filename)
    except ValueError:  # HFValidationError: not a hub id (a relative path such as ../x)
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def resolve_model_sources(report: Report, model_args: ModelArguments, fast: bool) -> ModelArguments | None:
    """``model_args`` with each source replaced by a local directory (the hub cache's snapshot for a hub id).

    A missing local path (or any uncached source with ``HF_HUB_OFFLINE``) is an error, found without
    a network round trip (an uncached hub id with no network costs ~25 s of retries). An uncached
    hub id is left for the loaders to download, except with ``fast``: then it is a warning and None
    is returned, since ``--fast`` makes no network request.
    """
    from huggingface_hub import constants

    replacements: dict[str, Any] = {}
    for field_name, filename in MODEL_SOURCE_FIELDS:
        source = getattr(model_args, field_name)
        if source is None:
            continue
        local = local_source(source, filename)
        if local is not None:
            replacements[field_name] = str(local)
            continue
        if source.startswith((".", "/", "~")) or Path(Path(source).parts[0]).is_dir():
            hint = " (run bash pretrain.sh first: it writes it)" if source.rstrip("/").endswith("pretrain-tiny") else ""
            raise PreflightError(f"{field_name}: {source} does not exist{hint}")
        if constants.HF_HUB_OFFLINE:
            raise PreflightError(f"{field_name}: {source} is not in the hub cache and HF_HUB_OFFLINE is set")
        if fast:
            report.add(
                WARNING,
                "model",
                f"{field_name}: {source} is not in the hub cache; training would download it (not checked in --fast)",
            )
            return None
    return dataclasses.replace(model_args, **replacements)


def check_length(report: Report, length: int, model_config: PretrainedConfig, field_name: str) -> None:
    """``field_name``'s sequence length within the model's position range."""
    check_sequence_length(length, model_config, field_name)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None:
        report.add(WARNING, "sequence length", f"{field_name}={length}: the model config states no position limit")
    else:
        report.add(OK, "sequence length", f"{field_name}={length} <= max_position_embeddings={limit}")


def check_tokenizer(
    report: Report,
    stage: Stage,
    model_args: ModelArguments,
    data_args: PretrainDataArguments | SFTDataArguments,
    model_config: PretrainedConfig | None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and check what the stage needs from it; errors name the field."""
    tokenizer = load_tokenizer_for(model_args)
    details = [f"{type(tokenizer).__name__}, {len(tokenizer)} tokens"]
    if stage is SFT:
        assert isinstance(data_args, SFTDataArguments)
        end_of_turn_id = check_chat_tokenizer(tokenizer, data_args.end_of_turn_token)
        details.append(f"chat template present, end of turn {data_args.end_of_turn_token!r} = id {end_of_turn_id}")
        if not data_args.packing and tokenizer.pad_token_id is None:
            raise DataError("tokenizer_name_or_path: the tokenizer has no pad token, needed with packing: false")
    else:
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer_name_or_path: the tokenizer has no EOS token; pretraining needs one")
        details.append(f"EOS {tokenizer.eos_token!r} = id {tokenizer.eos_token_id}")
    if model_config is not None and len(tokenizer) > model_config.vocab_size:
        if model_args.from_scratch:
            raise DataError(
                f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but config_name's "
                f"vocab_size is {model_config.vocab_size}"
            )
        report.add(
            WARNING,
            "tokenizer",
            f"{len(tokenizer)} tokens > vocab_size {model_config.vocab_size}: embeddings will be resized",
        )
    report.add(OK, "tokenizer", f"{model_args.tokenizer_name_or_path}: {'; '.join(details)}")
    return tokenizer


def check_token_mixers(
    report: Report, model_config: PretrainedConfig, attn_implementation: str, packing: bool | None, use_cpu: bool
) -> None:
    """For a model with recurrent mixers (Qwen3.5's linear attention): the kernels on a GPU, and SFT's layout.

    Without flash-linear-attention and causal-conv1d, transformers runs Gated DeltaNet on its
    reference PyTorch path (fp32, about 2x slower on a GPU), and packed SFT rows cannot be kept apart
    (:func:`llmtrain.data.collate.choose_layout`). ``packing`` is None for pretraining.
    """
    counts = recurrent_layer_counts(model_config)
    if not counts:
        return
    layers = describe_recurrent_layers(counts, len(layer_types(model_config)))
    on_gpu = torch.cuda.is_available() and not use_cpu
    missing = [package for package, module in VARLEN_KERNELS.items() if importlib.util.find_spec(module) is None]
    if on_gpu and missing:
        report.add(
            WARNING,
            "token mixers",
            f"{layers}, and {', '.join(missing)} is not installed: transformers runs them on its reference PyTorch "
            "path (fp32, about 2x slower); pip install -r requirements-gpu.txt",
        )
    else:
        report.add(OK, "token mixers", f"{layers}" + ("" if on_gpu else " (CPU: reference PyTorch path)"))
    if packing is not None:
        layout = choose_layout(packing, resolve_attn_implementation(attn_implementation), model_config)
        level = WARNING if layout.fallback and on_gpu else OK
        report.add(level, "token mixers", f"SFT layout {layout.name}: {layout.reason}")
