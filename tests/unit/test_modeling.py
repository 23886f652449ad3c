"""Model construction: dtype honoured, special tokens wired, limits checked, cache off for training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as safetensors_load

from llmtrain.config.arguments import ModelArguments
from llmtrain.errors import ConfigError
from llmtrain.modeling import (
    build_model,
    check_sequence_length,
    load_model_config,
    load_tokenizer_for,
    resolve_attn_implementation,
)

from ..conftest import save_random_tiny_model


@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_from_scratch_honours_dtype_and_wires_special_tokens(dtype: str, expected: torch.dtype) -> None:
    args = ModelArguments(dtype=dtype)
    tokenizer = load_tokenizer_for(args)
    model = build_model(args, load_model_config(args), tokenizer)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.use_cache is False


def test_pretrained_weights_load_in_the_requested_dtype(tmp_path: Path) -> None:
    base = save_random_tiny_model(tmp_path / "base")
    args = ModelArguments(model_name_or_path=str(base), dtype="bfloat16")
    model = build_model(args, load_model_config(args), load_tokenizer_for(args))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert args.model_name_or_path == str(base.resolve())


def test_limits_and_mismatches_are_clear_errors(tmp_path: Path) -> None:
    args = ModelArguments()
    config = load_model_config(args)
    check_sequence_length(config.max_position_embeddings, config, "block_size")
    with pytest.raises(ConfigError, match="block_size=1025 exceeds the model's max_position_embeddings=1024"):
        check_sequence_length(1025, config, "block_size")
    config.vocab_size = 100
    with pytest.raises(ConfigError, match="the tokenizer has 4096 tokens but config_name's vocab_size is 100"):
        build_model(args, config, load_tokenizer_for(args))
    with pytest.raises(ConfigError, match=r"no such local directory"):
        load_model_config(ModelArguments(model_name_or_path=str(tmp_path / "missing")))


def test_auto_attention_is_sdpa_without_flash_attention_on_this_machine() -> None:
    assert resolve_attn_implementation("eager") == "eager"
    if not torch.cuda.is_available():
        assert resolve_attn_implementation("auto") == "sdpa"


@pytest.mark.parametrize(
    ("cuda", "flash_installed", "expected"),
    [(True, True, "flash_attention_2"), (True, False, "sdpa"), (False, True, "sdpa"), (False, False, "sdpa")],
)
def test_auto_attention_takes_flash_attention_only_where_it_can_run_and_packing_follows(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, flash_installed: bool, expected: str
) -> None:
    import importlib.util

    from transformers import Qwen2Config

    from llmtrain.data.collate import FlatPackedCollator, PackedRowsCollator, choose_layout, collator_for

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" and flash_installed else
        (None if name == "flash_attn" else real_find_spec(name, *a)),
    )  # fmt: skip
    assert resolve_attn_implementation("auto") == expected
    # flash-attention's varlen path takes one flattened sequence; sdpa and eager keep the rows (a mask per row)
    collator = collator_for(choose_layout(True, expected, Qwen2Config()), pad_token_id=0)
    flat = isinstance(collator, FlatPackedCollator) and not collator.boundaries
    assert flat if expected == "flash_attention_2" else isinstance(collator, PackedRowsCollator)


def test_pickle_weights_are_never_loaded(tmp_path: Path) -> None:
    """A model dir with only a pickled ``pytorch_model.bin`` (which can run code on load) is refused."""
    base = save_random_tiny_model(tmp_path / "base")
    weights = {name: tensor.clone() for name, tensor in safetensors_load(base / "model.safetensors").items()}
    torch.save(weights, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    args = ModelArguments(model_name_or_path=str(base))
    with pytest.raises((OSError, ConfigError), match=r"safetensors"):
        build_model(args, load_model_config(args), load_tokenizer_for(args))


def test_seed_decides_the_initial_weights() -> None:
    args = ModelArguments()
    tokenizer = load_tokenizer_for(args)
    first, again, other = (build_model(args, load_model_config(args), tokenizer, seed) for seed in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters(), strict=True))
