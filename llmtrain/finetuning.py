"""Fine-tuning methods: full, LoRA through peft's ``get_peft_model``, or the last N layers only."""

from __future__ import annotations

import logging
import re

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llmtrain.config.arguments import FinetuneArguments
from llmtrain.errors import ConfigError
from llmtrain.modeling import parameter_count

logger = logging.getLogger(__name__)

# peft's "all-linear" is every Linear but the output head.
LORA_PRESETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# The layer types peft's LoRA can wrap (the list in its "Target module ... is not supported" error, peft 0.21).
# A name that matches only other modules, such as Qwen3's q_norm/k_norm (RMSNorm), would fail inside get_peft_model.
LORA_WRAPPABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.MultiheadAttention)


def num_layers(model: PreTrainedModel) -> int:
    """Number of decoder layers (``num_hidden_layers`` of the config)."""
    return int(model.config.num_hidden_layers)


def resolve_layers(spec: str | None, total: int) -> list[int] | None:
    """Parse ``layers_to_transform``: indices, ``last_half`` or ``first_half``; None means all.

    >>> resolve_layers("last_half", 4), resolve_layers("0, 2", 4), resolve_layers(None, 4)
    ([2, 3], [0, 2], None)
    """
    if spec is None:
        return None
    if spec == "last_half":
        return list(range(total // 2, total))
    if spec == "first_half":
        return list(range(total // 2))
    try:
        layers = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as error:
        raise ConfigError(f"layers_to_transform: expected indices, last_half or first_half, got {spec!r}") from error
    bad = [layer for layer in layers if not 0 <= layer < total]
    if not layers or bad:
        raise ConfigError(f"layers_to_transform: {spec!r} names layers outside 0..{total - 1}")
    return layers


def resolve_target_modules(model: PreTrainedModel, spec: str, layers: list[int] | None) -> list[str] | str:
    """Preset or explicit module names; every explicit name must match a layer LoRA can wrap in the chosen layers."""
    if spec in LORA_PRESETS:
        preset = LORA_PRESETS[spec]
        names = preset if isinstance(preset, list) else None
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if names is None:
        return "all-linear"
    available: set[str] = set()
    not_wrappable: dict[str, str] = {}  # module name -> its type, for modules LoRA cannot wrap
    for module_name, module in model.named_modules():
        match = LAYER_INDEX.search(module_name + ".")
        if layers is not None and (match is None or int(match.group(1)) not in layers):
            continue
        leaf = module_name.rsplit(".", 1)[-1]
        if isinstance(module, LORA_WRAPPABLE):
            available.add(leaf)
        else:
            not_wrappable.setdefault(leaf, type(module).__name__)
    missing = [name for name in names if name not in available and name not in not_wrappable]
    if missing:
        raise ConfigError(
            f"lora_target_modules: {', '.join(missing)} match(es) nothing in the model"
            f"{' layers ' + str(layers) if layers is not None else ''}; module names include "
            f"{', '.join(sorted(n for n in available if n.endswith('proj')))}"
        )
    unwrappable = [f"{name} ({not_wrappable[name]})" for name in names if name not in available]
    if unwrappable:
        raise ConfigError(
            f"lora_target_modules: {', '.join(unwrappable)} cannot carry a LoRA adapter (Linear and Embedding "
            "layers can); to train such weights use finetuning_type full or partial"
        )
    return names


def apply_finetuning_method(
    model: PreTrainedModel, args: FinetuneArguments, activation_checkpointing: bool, base_reference: str | None = None
) -> PreTrainedModel:
    """Freeze and wrap ``model`` for the chosen method and log the trainable share.

    LoRA returns peft's wrapper, which the Trainer and ``save_pretrained`` treat as a model. Its
    saved ``adapter_config.json`` names the base as ``base_reference`` (a hub id, or the path as the
    user gave it; see :func:`llmtrain.paths.portable_model_reference`) instead of the absolute path
    it was loaded from, which breaks once the adapter or the base moves.
    """
    if args.finetuning_type == "lora":
        layers = resolve_layers(args.layers_to_transform, num_layers(model))
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=resolve_target_modules(model, args.lora_target_modules, layers),
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        )
        if activation_checkpointing:
            # Frozen embeddings give checkpointed blocks inputs without grad; LoRA needs them to.
            model.enable_input_require_grads()
        model = get_peft_model(model, config)  # type: ignore[assignment]
        if base_reference is not None:
            model.peft_config["default"].base_model_name_or_path = base_reference
    elif args.finetuning_type == "partial":
        _freeze_all_but_last_layers(model, args)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    logger.info(
        "fine-tuning %s: %d of %d parameters trainable (%.2f%%)",
        args.finetuning_type,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def _freeze_all_but_last_layers(model: PreTrainedModel, args: FinetuneArguments) -> None:
    total = num_layers(model)
    if args.trainable_last_n_layers > total:
        raise ConfigError(f"trainable_last_n_layers={args.trainable_last_n_layers} but the model has {total} layers")
    first_trainable = total - args.trainable_last_n_layers
    for name, parameter in model.named_parameters():
        match = LAYER_INDEX.search(name)
        in_last_layers = match is not None and int(match.group(1)) >= first_trainable
        is_final_norm = args.train_final_norm and name.startswith("model.norm.")
        is_head = args.train_lm_head and (name.startswith("lm_head.") or "embed_tokens" in name)
        parameter.requires_grad = in_last_layers or is_final_norm or is_head
