"""Qwen3.5 (transformers' ``qwen3_5``): hybrid token mixers and the published multimodal layout, on tiny checkpoints.

Three of four decoder layers are Gated DeltaNet linear attention (a recurrent state and a causal
conv1d, no attention mask): packed rows with restarting position ids would let each conversation
start from the previous one's state. The checkpoints are published as
``Qwen3_5ForConditionalGeneration`` (text model under ``model.language_model.*``, a vision tower,
``mtp.*`` weights); training runs the text model and the outputs go back into that layout. The
tiny checkpoints here are built from transformers' own classes in exactly that layout
(``tests/conftest.py: save_random_tiny_qwen3_5_model``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from llmtrain.config.arguments import FinetuneArguments, ModelArguments
from llmtrain.data.collate import (
    PACKED_FLAT_VARLEN,
    PACKED_ROWS,
    PADDED,
    FlatPackedCollator,
    PackedRowsCollator,
    PaddingCollator,
    SequenceLayout,
    check_layout_fits_model,
    choose_layout,
)
from llmtrain.data.token_store import token_dtype
from llmtrain.errors import ConfigError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.metrics import count_flop_params
from llmtrain.mixers import missing_varlen_kernels, recurrent_layer_counts, recurrent_mixers
from llmtrain.modeling import build_model, load_model_config, load_tokenizer_for
from llmtrain.multimodal import WEIGHTS_INDEX_FILE, MultimodalBase, checkpoint_tensor_names, text_training_config
from llmtrain.tools import chat, merge

from ..conftest import MTP_TENSORS, REPO_ROOT, save_random_tiny_qwen3_5_model

CONVERSATION_LENGTHS = (9, 14, 6, 11)
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1024, 3]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny published-layout checkpoint whose tie is declared at the top level only (as published configs may)."""
    return save_random_tiny_qwen3_5_model(tmp_path_factory.mktemp("qwen3_5") / "base")


def text_model(base: Path) -> torch.nn.Module:
    """The text model as training builds it, in train mode without dropout."""
    args = ModelArguments(model_name_or_path=str(base))
    model = build_model(args, load_model_config(args), load_tokenizer_for(args))
    return model.train()


def conversations(vocab_size: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in CONVERSATION_LENGTHS:
        ids = torch.randint(10, vocab_size, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def per_conversation_reference(model: torch.nn.Module, rows: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the token-weighted mean over ``rows``, each run alone (batch of one)."""
    supervised = [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    total = sum(supervised)
    loss, grads = 0.0, {}
    for row, count in zip(rows, supervised, strict=True):
        row_loss, row_grads = loss_and_grads(model, PaddingCollator(0)([row]))
        loss += row_loss * count / total
        for name, grad in row_grads.items():
            grads[name] = grads.get(name, 0) + grad * count / total
    return loss, grads


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- token mixers and the layout


def test_the_hybrid_layers_are_read_from_the_config_and_the_modules(published: Path) -> None:
    config = AutoConfig.from_pretrained(published)
    assert recurrent_layer_counts(config) == {"linear_attention": 3}
    mixers = recurrent_mixers(text_model(published))
    assert mixers == [f"model.layers.{index}.linear_attn" for index in range(3)]


def test_packing_a_hybrid_model_where_the_kernels_are_missing_trains_per_conversation_rows(published: Path) -> None:
    config = AutoConfig.from_pretrained(published)
    layout = choose_layout(True, "sdpa", config, missing_kernels=["flash-linear-attention", "causal-conv1d"])
    assert (layout.name, layout.packed, layout.fallback) == (PADDED, False, True)
    assert "3 of 4 layers are linear_attention" in layout.reason and "causal-conv1d" in layout.reason
    # on a GPU with every kernel: the flattened layout with each boundary passed to every mixer
    assert choose_layout(True, "flash_attention_2", config, missing_kernels=[]).name == PACKED_FLAT_VARLEN
    # flash-attention is part of it: sdpa cannot take the varlen boundaries
    assert choose_layout(True, "sdpa", config, missing_kernels=[]).name == PADDED
    unpacked = choose_layout(False, "flash_attention_2", config, missing_kernels=[])
    assert (unpacked.name, unpacked.reason) == (PADDED, "packing is off")


def test_per_conversation_rows_equal_each_conversation_alone_and_packed_rows_would_leak(published: Path) -> None:
    model = text_model(published)
    rows = conversations(model.config.vocab_size)
    reference_loss, reference_grads = per_conversation_reference(model, rows)
    loss, grads = loss_and_grads(model, PaddingCollator(0)(rows))
    assert relative_difference(loss, reference_loss) < 1e-5
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The same conversations packed into one row with restarting position ids: the linear-attention
    # state runs across the boundaries (what this layout choice prevents).
    packed = {key: [value for row in rows for value in row[key]] for key in ("input_ids", "labels")}
    packed["position_ids"] = [position for row in rows for position in range(len(row["input_ids"]))]
    leaked, _ = loss_and_grads(model, PackedRowsCollator(0)([packed]))
    assert relative_difference(leaked, reference_loss) > 1e-5


def test_a_packed_layout_is_refused_for_recurrent_mixers_the_config_does_not_declare(published: Path) -> None:
    mixers = recurrent_mixers(text_model(published))
    check_layout_fits_model(SequenceLayout(PADDED, ""), mixers)
    with pytest.raises(ConfigError, match=r"packing: the model has recurrent token mixers \(model.layers.0"):
        check_layout_fits_model(SequenceLayout(PACKED_ROWS, ""), mixers)


def test_flop_count_follows_the_layer_types(published: Path) -> None:
    model = text_model(published)
    assert count_flop_params(model.config) == sum(p.numel() for p in model.parameters())


def test_the_shipped_qwen3_5_config_is_the_published_text_config() -> None:
    """configs/model/qwen3.5-0.8b.json: Qwen3.5-0.8B's text_config (its source is named in the pretraining config)."""
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / "qwen3.5-0.8b.json")
    assert type(config).__name__ == "Qwen3_5TextConfig"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1024, 3584, 24)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 256)
    assert (config.linear_num_key_heads, config.linear_num_value_heads) == (16, 16)
    assert (config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim) == (128, 128, 4)
    assert recurrent_layer_counts(config) == {"linear_attention": 18}
    assert config.layer_types[3::4] == ["full_attention"] * 6
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (248_320, 262_144, True)
    assert config.rope_parameters["mrope_section"] == [11, 11, 10] and config.rope_parameters["rope_theta"] == 1e7
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    # The text model; the published 0.8B adds a ~0.1B vision tower.
    assert count_flop_params(config) == parameters == 752_393_024
    assert token_dtype(config.vocab_size).str == "<u4"  # its 248,320 ids need a uint32 token store


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu-without-kernels"])
def test_the_preflight_names_the_layers_the_kernels_and_the_layout(
    published: Path, on_gpu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtrain.tools.doctor.model import check_token_mixers
    from llmtrain.tools.doctor.report import OK, WARNING, Report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    report = Report()
    check_token_mixers(report, text_training_config(AutoConfig.from_pretrained(published)), "sdpa", True, False)
    kernels, layout = report.findings
    assert "3 of 4 layers are linear_attention" in kernels.message
    assert layout.message.startswith("SFT layout padded: ") and "causal-conv1d" in layout.message
    # on a GPU the missing kernels cost speed (fp32 reference path) and exact packing: both are warnings
    assert (kernels.status, layout.status) == ((WARNING, WARNING) if on_gpu else (OK, OK))
    assert ("about 2x slower" in kernels.message) == on_gpu


# --------------------------------------------------------------------------- published layout in


@pytest.mark.parametrize("tie_declared", ["top", "both"])
def test_the_published_layout_loads_its_text_model_with_nothing_reinitialised(
    tmp_path: Path, tie_declared: str, caplog: pytest.LogCaptureFixture
) -> None:
    base = save_random_tiny_qwen3_5_model(tmp_path / "base", tie_declared=tie_declared)
    with caplog.at_level(logging.WARNING):
        model = text_model(base).eval()
    assert "MISSING" not in caplog.text
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        published_logits = AutoModelForImageTextToText.from_pretrained(base).eval()(input_ids=IDS).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, published_logits)


# --------------------------------------------------------------------------- published layout out


def assert_published(output: Path, base: Path, live: torch.nn.Module) -> None:
    """``output`` has ``base``'s config and every tensor; vision and mtp bit-identical; both classes load it."""
    saved, original = json.loads((output / "config.json").read_text()), json.loads((base / "config.json").read_text())
    assert saved["architectures"] == original["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert saved["vision_config"] == original["vision_config"] and saved["model_type"] == "qwen3_5"
    assert saved["text_config"]["tie_word_embeddings"] is True
    tensors, base_tensors = checkpoint_tensor_names(output), checkpoint_tensor_names(base)
    assert set(tensors) == set(base_tensors)
    assert (output / WEIGHTS_INDEX_FILE).is_file()
    carried = [name for name in base_tensors if name.startswith(("model.visual.", "mtp."))]
    assert len(carried) > len(MTP_TENSORS)
    for name in carried:
        with safe_open(str(output / tensors[name]), "pt") as out, safe_open(str(base / base_tensors[name]), "pt") as b:
            assert torch.equal(out.get_tensor(name), b.get_tensor(name)), name
    live.eval()
    with torch.no_grad():
        expected = live(input_ids=IDS).logits
        for loader in (AutoModelForImageTextToText, AutoModelForCausalLM):
            with warnings.catch_warnings():
                loaded = loader.from_pretrained(output).eval()
            torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, msg=loader.__name__)


def test_a_full_fine_tune_is_saved_in_the_published_layout(published: Path, tmp_path: Path) -> None:
    model = text_model(published)
    with torch.no_grad():  # stands in for training: the text weights move, the vision tower is not there to move
        model.model.layers[0].linear_attn.in_proj_qkv.weight.add_(0.01)
        model.model.layers[3].self_attn.q_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "out")
    MultimodalBase.find(str(published), AutoConfig.from_pretrained(published)).publish(tmp_path / "out", model)
    assert_published(tmp_path / "out", published, model)
    assert not torch.equal(
        AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers[0].linear_attn.in_proj_qkv.weight,
        AutoModelForCausalLM.from_pretrained(published, config=model.config)
        .model.layers[0]
        .linear_attn.in_proj_qkv.weight,
    )


@pytest.fixture(scope="module")
def adapter(published: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA adapter (all-linear) with non-zero B, saved and published; and its logits in training."""
    model = apply_finetuning_method(text_model(published), FinetuneArguments(finetuning_type="lora", lora_r=4), False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(directory)
    load_tokenizer_for(ModelArguments(model_name_or_path=str(published))).save_pretrained(directory)
    MultimodalBase.find(str(published), AutoConfig.from_pretrained(published)).publish(directory, model)
    with torch.no_grad():
        return directory, model.eval()(input_ids=IDS).logits


def test_all_linear_lora_adapts_every_projection_but_the_per_head_gates(adapter: tuple[Path, torch.Tensor]) -> None:
    config = json.loads((adapter[0] / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj",
        "down_proj",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("preset", "modules"),
    [("attention", {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj"}),
     ("qkvo", {"q_proj", "k_proj", "v_proj", "o_proj"}),
     ("in_proj_a,in_proj_b", {"in_proj_a", "in_proj_b"})],
)  # fmt: skip
def test_lora_presets_on_hybrid_layers(
    published: Path, preset: str, modules: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    args = FinetuneArguments(finetuning_type="lora", lora_target_modules=preset)
    with caplog.at_level(logging.WARNING):
        model = apply_finetuning_method(text_model(published), args, False)
    wrapped = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_" in name}
    assert wrapped == modules
    assert ("linear-attention layers get no adapter" in caplog.text) == (preset == "qkvo")


def test_the_adapter_applies_to_the_published_class_with_the_training_logits(
    published: Path, adapter: tuple[Path, torch.Tensor]
) -> None:
    directory, expected = adapter
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as weights:
        assert all(key.startswith("base_model.model.model.language_model.layers.") for key in weights.keys())  # noqa: SIM118
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(published), str(directory))
    assert not [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(input_ids=IDS).logits, expected)
        # transformers' own adapter loading, and this project's chat tool (the text class, names mapped)
        text_config = text_training_config(AutoConfig.from_pretrained(published))
        text_class = AutoModelForCausalLM.from_pretrained(published, config=text_config)
        text_class.load_adapter(str(directory))
        torch.testing.assert_close(text_class.eval()(input_ids=IDS).logits, expected)
        tool = chat.apply_adapter(chat.load_model(published), directory, chat.multimodal_base(published))
        torch.testing.assert_close(tool(input_ids=IDS).logits, expected)


def test_merging_the_adapter_writes_the_published_layout(
    published: Path, adapter: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    directory, expected = adapter
    merge.merge_adapter(directory, tmp_path / "merged", str(published))
    merged_live = chat.load_model(tmp_path / "merged", dtype=torch.float32)
    assert_published(tmp_path / "merged", published, merged_live)
    with torch.no_grad():
        torch.testing.assert_close(merged_live(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


MISSING_KERNELS = missing_varlen_kernels()


@pytest.mark.skipif(bool(MISSING_KERNELS), reason=f"the exact packed layout needs {', '.join(MISSING_KERNELS)}")
def test_on_a_gpu_with_the_kernels_packed_rows_equal_each_conversation_alone(published: Path) -> None:
    """The GPU path (CPU CI skips it; docs/benchmarks.md's Qwen3.5 row measures the same at 0.8B)."""
    args = ModelArguments(model_name_or_path=str(published), attn_implementation="flash_attention_2")
    model = build_model(args, load_model_config(args), load_tokenizer_for(args)).to("cuda").train()
    rows = conversations(model.config.vocab_size)
    packed = {key: [value for row in rows for value in row[key]] for key in ("input_ids", "labels")}
    packed["position_ids"] = [position for row in rows for position in range(len(row["input_ids"]))]

    def loss(batch: dict) -> float:
        cuda = {key: value.to("cuda") if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # flash-attention runs in bf16
            return model(**cuda).loss.item()

    reference = loss(PaddingCollator(0)(rows))
    exact = loss(FlatPackedCollator(boundaries=True)([packed]))
    leaked = loss(FlatPackedCollator()([packed]))  # boundaries for softmax attention only
    assert relative_difference(exact, reference) < 5e-3
    assert relative_difference(leaked, reference) > relative_difference(exact, reference)
