"""Fine-tuning methods: LoRA presets and layer selection, target checks, partial unfreezing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmtrain.config.arguments import FinetuneArguments, ModelArguments
from llmtrain.errors import ConfigError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.modeling import stop_at_end_of_turn
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.tiny_default import IM_END

from ..conftest import save_random_tiny_model


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


# --- outputs that serve anywhere -------------------------------------------------------------

SNAPSHOT_REVISION = "0123456789abcdef0123456789abcdef01234567"


def lora_adapter_of(model_args: ModelArguments, directory: Path) -> Path:
    """Train nothing: load the base as finetune.py does, wrap it with LoRA, save the adapter."""
    assert model_args.model_name_or_path is not None
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    wrapped = apply_finetuning_method(model, FinetuneArguments(), False, model_args.base_model_reference)
    wrapped.save_pretrained(directory)
    return directory


def recorded_base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_a_copied_adapter_names_its_base_as_the_user_gave_it_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    save_random_tiny_model(tmp_path / "models" / "base")
    model_args = ModelArguments(model_name_or_path="models/base")
    assert Path(str(model_args.model_name_or_path)).is_absolute()  # loaded (and recorded in run configs) absolute
    adapter = lora_adapter_of(model_args, tmp_path / "run" / "adapter")
    assert recorded_base(adapter) == "models/base"
    copied = Path(shutil.copytree(adapter, tmp_path / "elsewhere" / "adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(copied)
    assert loaded.peft_config["default"].base_model_name_or_path == "models/base"


def test_an_adapter_on_a_hub_download_names_the_hub_id_and_loads_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import
    cache = tmp_path / "hub"
    repo = cache / "models--llmtrain--tiny-base"
    snapshot = save_random_tiny_model(repo / "snapshots" / SNAPSHOT_REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT_REVISION)
    model_args = ModelArguments(model_name_or_path=str(snapshot))  # what a resolved hub download looks like
    assert model_args.base_model_reference == "llmtrain/tiny-base"
    adapter = lora_adapter_of(model_args, tmp_path / "adapter")
    assert recorded_base(adapter) == "llmtrain/tiny-base"
    copied = Path(shutil.copytree(adapter, tmp_path / "elsewhere"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(copied, cache_dir=str(cache), local_files_only=True)
    assert type(loaded.get_base_model()).__name__ == "Qwen2ForCausalLM"


def test_generation_stops_at_the_end_of_turn_and_at_eos(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = tiny_model()
    stop_at_end_of_turn(model, tokenizer, IM_END)
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
    assert saved.eos_token_id[0] == end_of_turn and tokenizer.eos_token_id in saved.eos_token_id
    with pytest.raises(ConfigError, match="end_of_turn_token"):
        stop_at_end_of_turn(model, tokenizer, "<|no_such_token|>")
