"""The shipped DeepSpeed configs: the Trainer owns every shared setting, ZeRO-3 saves a loadable model.

A value the Trainer also has (batch sizes, accumulation, clipping, precision, the hidden-size-based
buckets) must be ``"auto"`` so the Trainer fills it; an optimizer block would replace the Trainer's
torch AdamW (and build DeepSpeed's C++ Adam), a scheduler block would silently replace
``lr_scheduler_type``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from llmtrain.config.arguments import ModelArguments, TrainArguments
from llmtrain.errors import ConfigError
from llmtrain.modeling import load_model_config
from llmtrain.tools.doctor.model import count_parameters

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(REPO_ROOT.glob("ds_config*.json"))
TRAINER_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.reduce_bucket_size",
)
TRAINER_OWNED_ZERO3 = (
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


@pytest.fixture(autouse=True)
def no_global_deepspeed_config() -> Iterator[None]:
    """TrainingArguments with ``deepspeed`` register the config globally (ZeRO-3 changes model building)."""
    yield
    unset_hf_deepspeed_config()


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
    return value


def autos(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys still set to ``"auto"``."""
    if isinstance(value, dict):
        return [key for name, item in value.items() for key in autos(item, f"{prefix}{name}.")]
    return [prefix.rstrip(".")] if value == "auto" else []


def test_the_four_configs_ship() -> None:
    assert [path.name for path in SHIPPED] == [
        "ds_config_zero2.json",
        "ds_config_zero2_offload.json",
        "ds_config_zero3.json",
        "ds_config_zero3_offload.json",
    ]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_the_trainer_owns_optimizer_scheduler_and_every_shared_key(path: Path) -> None:
    config = load(path)
    assert "optimizer" not in config and "scheduler" not in config
    stage = config["zero_optimization"]["stage"]
    owned = TRAINER_OWNED + (TRAINER_OWNED_ZERO3 if stage == 3 else ())
    assert {key: lookup(config, key) for key in owned} == dict.fromkeys(owned, "auto")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_zero3_gathers_the_weights_and_offload_goes_to_cpu_with_the_trainers_adamw(path: Path) -> None:
    config = load(path)
    zero = config["zero_optimization"]
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloads = {key: zero[key]["device"] for key in ("offload_optimizer", "offload_param") if key in zero}
    expected = {"offload_optimizer": "cpu", **({"offload_param": "cpu"} if zero["stage"] == 3 else {})}
    assert offloads == (expected if "offload" in path.name else {})
    # Without an optimizer block the Trainer's torch AdamW runs; DeepSpeed refuses it under offload
    # unless told to accept it (ZeRORuntimeException "You are using ZeRO-Offload with a client provided optimizer").
    assert config.get("zero_force_ds_cpu_optimizer", True) is (not offloads)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_each_config_is_filled_by_the_trainer_and_accepted_by_deepspeed(path: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    args = TrainArguments(
        output_dir=str(tmp_path), use_cpu=True, deepspeed=str(path), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=0.5,
    )  # fmt: skip
    hf_config = args.hf_deepspeed_config
    hf_config.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 100)
    filled = hf_config.config
    assert autos(filled) == []
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (4, 2)
    assert (filled["train_batch_size"], filled["gradient_clipping"]) == (8, 0.5)
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False  # CPU: fp32
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    stage = filled["zero_optimization"]["stage"]
    assert is_deepspeed_zero3_enabled() is (stage == 3)
    checked = DeepSpeedConfig(json.loads(json.dumps(filled)))  # DeepSpeed's own validation of every key
    assert checked.zero_optimization_stage == stage
    assert checked.zero_config.offload_optimizer is not None if "offload" in path.name else True


def test_a_zero3_config_that_would_save_no_model_is_refused(tmp_path: Path) -> None:
    config = load(REPO_ROOT / "ds_config_zero3.json")
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "zero3_no_gather.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="stage3_gather_16bit_weights_on_model_save"):
        TrainArguments(output_dir=str(tmp_path / "run"), use_cpu=True, deepspeed=str(path))


def test_the_doctor_counts_parameters_on_meta_under_a_zero3_config(tmp_path: Path) -> None:
    """Parsing a ZeRO-3 config makes transformers build models inside deepspeed.zero.Init, which in one
    process without a process group looks for mpi4py; the doctor's meta-device count must not."""
    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed=str(REPO_ROOT / "ds_config_zero3.json"))
    assert is_deepspeed_zero3_enabled()
    model_args = ModelArguments()
    counts = count_parameters(load_model_config(model_args), model_args)
    assert counts.unique > 1_000_000 and counts.trainable == counts.unique
    assert is_deepspeed_zero3_enabled() and args.hf_deepspeed_config.is_zero3()  # restored for training
