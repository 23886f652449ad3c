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
from llmtrain.mixers import recurrent_mixers
from llmtrain.modeling import parameter_count

logger = logging.getLogger(__name__)

# qv / qkvo name softmax attention's projections; "attention" adds every other token mixer's (a hybrid model's
# linear-attention layers); peft's "all-linear" is every Linear but the output head. In a model with recurrent
# mixers (llmtrain.mixers) the last two are resolved here, without the per-head gates (see per_head_gates).
LORA_PRESETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}
SOFTMAX_PRESETS = ("qv", "qkvo")
# A per-head gate projection (Gated DeltaNet's in_proj_a / in_proj_b: one scalar per value head) is at
# least this many times narrower than its input; an adapter on it adds almost nothing and vLLM may not serve it.
GATE_NARROWING = 16
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


def per_head_gates(model: nn.Module) -> set[str]:
    """Leaf names of the Linear layers inside recurrent mixers that output one value per head (gates).

    >>> from transformers import Qwen3_5TextConfig, Qwen3_5ForCausalLM
    >>> sorted(per_head_gates(Qwen3_5ForCausalLM(Qwen3_5TextConfig(hidden_size=64, num_hidden_layers=4,
    ...     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    ...     num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32, vocab_size=32))))
    ['in_proj_a', 'in_proj_b']
    """
    gates = set()
    for mixer in recurrent_mixers(model):
        for name, module in model.get_submodule(mixer).named_modules():
            if isinstance(module, nn.Linear) and module.out_features * GATE_NARROWING <= module.in_features:
                gates.add(name.rsplit(".", 1)[-1])
    return gates


def recurrent_mixer_linears(model: nn.Module) -> set[str]:
    """Leaf names of the Linear layers in recurrent mixers but the gates (Qwen3.5: in_proj_qkv, in_proj_z, out_proj)."""
    names = {
        name.rsplit(".", 1)[-1]
        for mixer in recurrent_mixers(model)
        for name, module in model.get_submodule(mixer).named_modules()
        if isinstance(module, nn.Linear)
    }
    return names - per_head_gates(model)


def preset_modules(model: PreTrainedModel, spec: str) -> list[str] | None:
    """The module names a preset stands for in ``model`` (None: peft's own "all-linear")."""
    preset = LORA_PRESETS[spec]
    if not recurrent_mixers(model):
        return list(preset) if isinstance(preset, list) else None
    if spec in SOFTMAX_PRESETS:
        logger.warning(
            "lora_target_modules: %s adapts the softmax-attention layers only; this model's linear-attention layers "
            "get no adapter in their token mixer (the 'attention' or 'all-linear' preset adapts them too)",
            spec,
        )
        return list(preset)
    mixers = set(LORA_PRESETS["qkvo"]) | recurrent_mixer_linears(model)
    if spec == "attention":
        return sorted(mixers)
    linears = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    output_layer = model.get_output_embeddings()
    heads = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is output_layer}
    return sorted(linears - per_head_gates(model) - heads)


def resolve_target_modules(model: PreTrainedModel, spec: str, layers: list[int] | None) -> list[str] | str:
    """Preset or explicit module names; every explicit name must match a layer LoRA can wrap in the chosen layers.

    A preset leaves out the per-head gates of recurrent mixers (:func:`per_head_gates`); an explicit name never is.
    """
    if spec in LORA_PRESETS:
        names = preset_modules(model, spec)
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
