"""Qwen3 on this stack: the shipped model configs, and chunked loss, LoRA, partial, merge and chat on a tiny Qwen3.

Qwen3 differs from Qwen2 where code could silently depend on it: every attention block has an
RMSNorm over each query and key head (``q_norm``/``k_norm``), there are no q/k/v biases, and
``head_dim`` is set on its own (Qwen3-0.6B: 16 heads x 128 = 2048 query width on a 1024 hidden
size). The tiny model keeps that last trait (4 heads x 32 on a 64 hidden size), so code deriving
``head_dim`` from ``hidden_size // num_attention_heads`` fails here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from llmtrain.config.arguments import FinetuneArguments, ModelArguments
from llmtrain.errors import ConfigError
from llmtrain.finetuning import apply_finetuning_method
from llmtrain.loss import enable_memory_efficient_loss
from llmtrain.modeling import build_model, load_model_config, load_tokenizer_for
from llmtrain.paths import TINY_MODEL_DIR
from llmtrain.tiny_default import IM_END
from llmtrain.tools import chat, merge

from ..conftest import loss_and_grads, packed_batch, packed_rows_batch
from ..conftest import padded_batch as shared_padded_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_QWEN3_TOKENIZER = REPO_ROOT.parent / "shared" / "qwen3-tokenizer"
ENDOFTEXT_ID = 151643  # Qwen's <|endoftext|>: the EOS the pretraining data puts between documents

TINY_QWEN3: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 4096,  # the tiny tokenizer's size (checked in test_tiny_qwen3_builds_through_the_pipeline)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # 4 x 32 = 128 != hidden_size 64, like Qwen3-0.6B's 16 x 128 on 1024
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
}
ATTENTION_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_LINEARS = {"gate_proj", "up_proj", "down_proj"}
QUESTION = "What is 2+2?"
ANSWER = "Four."
OVERFIT_STEPS = 40  # greedy reproduces ANSWER after ~10 steps (seeds 2-4); the rest is margin
OVERFIT_LR = 1e-2


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3-config") / "tiny-qwen3.json"
    path.write_text(json.dumps(TINY_QWEN3), encoding="utf-8")
    return path


def tiny_qwen3(config_file: Path, seed: int = 0, tie: bool = True) -> Any:
    """A fresh tiny Qwen3 built the way pretraining builds one (config file + tiny tokenizer)."""
    args = ModelArguments(config_name=str(config_file), tokenizer_name_or_path=str(TINY_MODEL_DIR))
    config = load_model_config(args)
    config.tie_word_embeddings = tie
    return build_model(args, config, load_tokenizer_for(args), seed=seed)


def save_with_tokenizer(model: Any, directory: Path) -> Path:
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(directory)
    return directory


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@contextlib.contextmanager
def no_warnings_from_transformers() -> Iterator[list[str]]:
    """Collect Python warnings and transformers' logged warnings (its logger does not propagate)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(warning.message) for warning in caught)
    finally:
        library_logger.removeHandler(handler)


# --- the shipped model configs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hidden", "intermediate", "parameters", "non_embedding"),
    [
        # per layer: q 1024x2048, k/v 1024x1024, o 2048x1024, q/k norms 2x128, MLP 3x1024x3072, 2 norms 2x1024
        # = 15,730,944; x 28 + final norm 1024 = 440,467,456; + embedding 151,936 x 1024 (tied) = 596,049,920
        ("qwen3-0.6b", 1024, 3072, 596_049_920, 440_467_456),
        # per layer: q 2048x2048, k/v 2048x1024, o 2048x2048, 256, MLP 3x2048x6144, 2x2048 = 50,336,000
        # x 28 + 2048 = 1,409,410,048; + 151,936 x 2048 = 1,720,574,976
        ("qwen3-1.7b", 2048, 6144, 1_720_574_976, 1_409_410_048),
    ],
)
def test_shipped_qwen3_config_has_the_published_shape(
    name: str, hidden: int, intermediate: int, parameters: int, non_embedding: int
) -> None:
    path = REPO_ROOT / "configs" / "model" / f"{name}.json"
    with no_warnings_from_transformers() as logged:
        config = AutoConfig.from_pretrained(path)
        direct = Qwen3Config(**json.loads(path.read_text(encoding="utf-8")))
    assert logged == []
    assert type(config) is Qwen3Config
    for loaded in (config, direct):
        assert (loaded.hidden_size, loaded.intermediate_size, loaded.head_dim) == (hidden, intermediate, 128)
        assert (loaded.num_hidden_layers, loaded.num_attention_heads, loaded.num_key_value_heads) == (28, 16, 8)
        # transformers 5 moves the file's top-level rope_theta into rope_parameters.
        assert loaded.rope_parameters == {"rope_theta": 1_000_000.0, "rope_type": "default"}
        assert loaded.vocab_size == 151_936 and loaded.tie_word_embeddings and not loaded.attention_bias
        assert loaded.bos_token_id == loaded.eos_token_id == ENDOFTEXT_ID
        assert loaded.max_position_embeddings == 32_768 and loaded.rms_norm_eps == 1e-6
        assert set(loaded.layer_types) == {"full_attention"} and loaded.sliding_window is None

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is Qwen3ForCausalLM
    for layer in model.model.layers:
        attention = layer.self_attn
        assert isinstance(attention.q_norm, Qwen3RMSNorm) and isinstance(attention.k_norm, Qwen3RMSNorm)
        assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (128,)
        assert attention.q_proj.out_features == 16 * 128 and attention.q_proj.bias is None
    assert sum(p.numel() for p in model.parameters()) == parameters  # the tied head counted once
    embedding = model.get_input_embeddings().weight.numel()
    assert sum(p.numel() for p in model.parameters()) - embedding == non_embedding
    billions = {"qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4)}[name]  # the model cards' figures
    assert (parameters / 1e9, non_embedding / 1e9) == pytest.approx(billions, abs=0.03)


@pytest.mark.skipif(not SHARED_QWEN3_TOKENIZER.is_dir(), reason="../shared/qwen3-tokenizer absent")
def test_shipped_qwen3_configs_fit_the_qwen3_vocabulary() -> None:
    """The configs' EOS is Qwen's <|endoftext|> and every Qwen3 token has an embedding row."""
    tokenizer = AutoTokenizer.from_pretrained(SHARED_QWEN3_TOKENIZER)
    assert len(tokenizer) == 151_669
    for name in ("qwen3-0.6b", "qwen3-1.7b"):
        config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "model" / f"{name}.json")
        assert tokenizer.convert_ids_to_tokens(config.eos_token_id) == "<|endoftext|>"
        assert len(tokenizer) <= config.vocab_size


def test_tiny_qwen3_builds_through_the_pipeline(
    tiny_config_file: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    assert len(tiny_tokenizer) == TINY_QWEN3["vocab_size"]
    model = tiny_qwen3(tiny_config_file)
    assert type(model) is Qwen3ForCausalLM and model.config.head_dim == 32
    assert model.config.eos_token_id == tiny_tokenizer.eos_token_id  # wired from the tokenizer
    assert model.config.use_cache is False  # packed rows would attend across samples otherwise
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 32


# --- chunked loss ----------------------------------------------------------------------------


def padded_batch() -> dict[str, torch.Tensor]:
    return shared_padded_batch(TINY_QWEN3["vocab_size"], length=12, padded_from=7)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch, packed_rows_batch])
def test_chunked_loss_equals_the_standard_loss_on_qwen3(tiny_config_file: Path, tie: bool, make_batch: Any) -> None:
    model = tiny_qwen3(tiny_config_file, tie=tie).train()
    reference = copy.deepcopy(model)
    assert enable_memory_efficient_loss(model, chunk_size=5, backend="chunked") == "chunked"
    expected, expected_grads = loss_and_grads(reference, make_batch())
    got, got_grads = loss_and_grads(model, make_batch())
    assert got.logits is None and expected.logits is not None  # the chunked path really ran
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    assert any(".q_norm." in name for name in got_grads) and any(".k_norm." in name for name in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_loss_through_a_qwen3_lora_wrapper(tiny_config_file: Path) -> None:
    args = FinetuneArguments(lora_target_modules="all-linear", lora_dropout=0.0)
    model = apply_finetuning_method(tiny_qwen3(tiny_config_file), args, False).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(parameter, std=0.1)
    reference = copy.deepcopy(model)
    assert enable_memory_efficient_loss(model, chunk_size=3, backend="chunked") == "chunked"
    expected, expected_grads = loss_and_grads(reference, packed_batch())
    got, got_grads = loss_and_grads(model, packed_batch())
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)
    assert got_grads.keys() == expected_grads.keys() and all("lora_" in name for name in got_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# --- LoRA presets and partial fine-tuning ----------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "modules"),
    [("qv", {"q_proj", "v_proj"}), ("qkvo", ATTENTION_LINEARS), ("all-linear", ATTENTION_LINEARS | MLP_LINEARS)],
)
def test_lora_presets_wrap_their_qwen3_projections_and_never_the_qk_norms(
    tiny_config_file: Path, preset: str, modules: set[str]
) -> None:
    model = apply_finetuning_method(tiny_qwen3(tiny_config_file), FinetuneArguments(lora_target_modules=preset), False)
    names = trainable_names(model)
    assert names and all("lora_" in name for name in names)
    wrapped = {name.split(".lora_")[0] for name in names}
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == modules
    assert len(wrapped) == len(modules) * TINY_QWEN3["num_hidden_layers"]  # in every layer
    for name, module in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):
            assert type(module) is Qwen3RMSNorm  # not wrapped
            assert not module.weight.requires_grad


def test_lora_on_a_qk_norm_is_a_config_error(tiny_config_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"q_norm \(Qwen3RMSNorm\) cannot carry a LoRA adapter"):
        apply_finetuning_method(
            tiny_qwen3(tiny_config_file), FinetuneArguments(lora_target_modules="q_proj,q_norm"), False
        )


def test_partial_unfreezes_the_last_qwen3_layer_with_its_qk_norms(tiny_config_file: Path) -> None:
    model = tiny_qwen3(tiny_config_file)
    last = TINY_QWEN3["num_hidden_layers"] - 1
    expected = {name for name, _ in model.named_parameters() if name.startswith(f"model.layers.{last}.")}
    expected.add("model.norm.weight")
    args = FinetuneArguments(finetuning_type="partial", trainable_last_n_layers=1, train_final_norm=True)
    names = trainable_names(apply_finetuning_method(model, args, False))
    assert names == expected
    assert {f"model.layers.{last}.self_attn.q_norm.weight", f"model.layers.{last}.self_attn.k_norm.weight"} <= names
    with_head = FinetuneArguments(finetuning_type="partial", trainable_last_n_layers=1, train_lm_head=True)
    names = trainable_names(apply_finetuning_method(tiny_qwen3(tiny_config_file), with_head, False))
    assert "model.embed_tokens.weight" in names  # tied: training the head trains the embedding
    assert not any(name.startswith("model.layers.0.") for name in names)


# --- merge -----------------------------------------------------------------------------------


def test_merge_of_a_qwen3_lora_adapter_equals_the_peft_model(tiny_config_file: Path, tmp_path: Path) -> None:
    base_dir = save_with_tokenizer(tiny_qwen3(tiny_config_file, seed=0), tmp_path / "base")
    args = FinetuneArguments(lora_target_modules="all-linear", lora_r=4, lora_alpha=8)
    torch.manual_seed(1)
    peft_model = apply_finetuning_method(AutoModelForCausalLM.from_pretrained(base_dir), args, False)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero, where merging would change nothing
                parameter.normal_(std=0.1)
    adapter_dir = save_with_tokenizer(peft_model, tmp_path / "adapter")

    reported = merge.merge_adapter(adapter_dir, tmp_path / "merged")

    assert reported <= merge.DEFAULT_TOLERANCE
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    assert type(merged) is Qwen3ForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    probes = merge.probe_inputs(AutoTokenizer.from_pretrained(tmp_path / "merged"))
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    bare = merge.probe_logits(base, probes)
    with_adapter = merge.probe_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), probes)
    merged_logits = merge.probe_logits(merged, probes)
    assert merge.max_logit_difference(merged_logits, with_adapter) <= merge.DEFAULT_TOLERANCE
    assert merge.max_logit_difference(merged_logits, bare) > 1e-2  # the adapter really changed something


# --- chat ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_chat_dir(tiny_config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 overfitted on one exchange (loss on the answer and its ``<|im_end|>``)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    full = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    prompt = tokenizer.apply_chat_template(
        conversation[:1], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    input_ids = full["input_ids"]
    labels = input_ids.clone()
    labels[:, : len(prompt["input_ids"])] = -100
    model = tiny_qwen3(tiny_config_file, seed=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=OVERFIT_LR)
    for _ in range(OVERFIT_STEPS):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.01
    model.config.use_cache = True  # as the training run saves it
    return save_with_tokenizer(model.eval(), tmp_path_factory.mktemp("qwen3-chat") / "model")


def test_chat_with_a_qwen3_model_stops_at_end_of_turn(qwen3_chat_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(qwen3_chat_dir)
    assert type(model) is Qwen3ForCausalLM
    messages = [{"role": "user", "content": QUESTION}]
    assert chat.chat_reply(model, tokenizer, messages, max_new_tokens=16) == (ANSWER, True)
    ids = chat.generate_reply_ids(model, tokenizer, messages, max_new_tokens=16)
    assert tokenizer.decode(ids) == ANSWER + IM_END


def test_chat_with_a_qwen3_model_stops_at_max_new_tokens(qwen3_chat_dir: Path) -> None:
    model, tokenizer = chat.load_chat_model(qwen3_chat_dir)
    answer, stopped = chat.chat_reply(model, tokenizer, [{"role": "user", "content": QUESTION}], max_new_tokens=1)
    assert not stopped
    assert answer and ANSWER.startswith(answer) and answer != ANSWER
