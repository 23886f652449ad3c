"""Fine-tuning methods: LoRA presets and layer selection, target checks, partial unfreezing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmtrain.config.arguments import FinetuneArguments
from llmtrain.errors import ConfigError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.paths import TINY_MODEL_DIR


def tiny_model():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR))
    model.config.use_cache = False
    return model


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize(
    ("preset", "modules"),
    [("qv", {"q_proj", "v_proj"}), ("qkvo", {"q_proj", "k_proj", "v_proj", "o_proj"}),
     ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})],
)  # fmt: skip
def test_lora_presets_wrap_exactly_their_modules(preset: str, modules: set[str]) -> None:
    model = apply_finetuning_method(tiny_model(), FinetuneArguments(lora_target_modules=preset), False)
    names = trainable_names(model)
    assert names and all("lora_" in name for name in names)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names} == modules


def test_layers_to_transform_last_half_only_touches_those_layers() -> None:
    args = FinetuneArguments(lora_target_modules="q_proj,v_proj", layers_to_transform="last_half")
    names = trainable_names(apply_finetuning_method(tiny_model(), args, False))
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in names} == {2, 3}


def test_a_target_that_matches_nothing_is_an_error_not_a_silent_skip() -> None:
    with pytest.raises(ConfigError, match="lora_target_modules: qkv_proj match"):
        apply_finetuning_method(tiny_model(), FinetuneArguments(lora_target_modules="q_proj,qkv_proj"), False)
    with pytest.raises(ConfigError, match="layers_to_transform"):
        apply_finetuning_method(tiny_model(), FinetuneArguments(layers_to_transform="7"), False)


def test_lora_with_activation_checkpointing_trains() -> None:
    model = apply_finetuning_method(tiny_model(), FinetuneArguments(lora_target_modules="qv"), True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, 4000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]  # A gets none while B == 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_partial_unfreezes_the_last_layers_and_optionally_norm_and_head() -> None:
    args = FinetuneArguments(finetuning_type="partial", trainable_last_n_layers=2, train_final_norm=True)
    names = trainable_names(apply_finetuning_method(tiny_model(), args, False))
    assert names and all(".layers.2." in n or ".layers.3." in n or n.startswith("model.norm.") for n in names)
    assert "model.norm.weight" in names and not any("embed_tokens" in n for n in names)
    with_head = FinetuneArguments(finetuning_type="partial", trainable_last_n_layers=1, train_lm_head=True)
    assert any("embed_tokens" in n for n in trainable_names(apply_finetuning_method(tiny_model(), with_head, False)))
    with pytest.raises(ConfigError, match="trainable_last_n_layers=9"):
        apply_finetuning_method(
            tiny_model(), FinetuneArguments(finetuning_type="partial", trainable_last_n_layers=9), False
        )
