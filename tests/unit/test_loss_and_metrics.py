"""llmtrain.loss and llmtrain.metrics: the chunked loss equals transformers' loss, MFU arithmetic, token counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

from llmtrain.data.collate import FlatPackedCollator
from llmtrain.loss import chunked_causal_lm_loss, enable_memory_efficient_loss, resolve_loss_backend
from llmtrain.metrics import (
    ThroughputCallback,
    TokenCounter,
    count_flop_params,
    device_peak_flops,
    flops_per_token,
    mfu,
)

from ..conftest import loss_and_grads, packed_batch, packed_rows_batch
from ..conftest import padded_batch as shared_padded_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB, HIDDEN = 37, 16


def reference_loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' own causal-LM loss over full logits, and its gradients."""
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = ForCausalLMLoss(hidden @ weight.T, labels, VOCAB, num_items_in_batch=num_items)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad, weight.grad


def chunked_loss_and_grads(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: Any = None, chunk_size: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = chunked_causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items, chunk_size=chunk_size)
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    return loss.detach(), hidden.grad, weight.grad


def random_case(batch: int = 3, seq: int = 11, ignored_share: float = 0.4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignored_share] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 33, 10_000])  # 33 rows: 7 and 4 do not divide the counted tokens
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_chunked_loss_and_gradients_equal_transformers(chunk_size: int, num_items: Any) -> None:
    hidden, weight, labels = random_case()
    items = torch.tensor(17) if num_items == "tensor" else num_items
    expected = reference_loss_and_grads(hidden, weight, labels, items)
    got = chunked_loss_and_grads(hidden, weight, labels, items, chunk_size)
    for name, want, have in zip(("loss", "d hidden", "d weight"), expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_loss_equals_full_cross_entropy_written_out() -> None:
    """Against plain F.cross_entropy over the shifted rows (no transformers helper in between)."""
    hidden, weight, labels = random_case(batch=2, seq=9, ignored_share=0.0)
    flat_hidden = hidden[:, :-1].reshape(-1, HIDDEN)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(flat_hidden @ weight.T, targets)
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, weight, labels, chunk_size=3), expected)


def test_shift_labels_are_used_as_given() -> None:
    hidden, weight, labels = random_case()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    torch.testing.assert_close(
        chunked_causal_lm_loss(hidden, weight, None, shift_labels=shifted),
        chunked_causal_lm_loss(hidden, weight, labels),
    )


@pytest.mark.parametrize("num_items", [None, 0])
def test_all_labels_ignored_gives_nan_loss_and_zero_gradients_like_transformers(num_items: int | None) -> None:
    hidden, weight, _ = random_case()
    labels = torch.full(hidden.shape[:2], -100)
    expected = reference_loss_and_grads(hidden, weight, labels, num_items)
    got = chunked_loss_and_grads(hidden, weight, labels, num_items)
    assert torch.isnan(expected[0]) and torch.isnan(got[0])
    for want, have in zip(expected[1:], got[1:], strict=True):
        assert torch.equal(want, torch.zeros_like(want)) and torch.equal(have, want)


def test_all_labels_ignored_with_positive_num_items_is_zero() -> None:
    hidden, weight, _ = random_case()
    labels = torch.full(hidden.shape[:2], -100)
    loss, d_hidden, d_weight = chunked_loss_and_grads(hidden, weight, labels, num_items=8)
    assert loss.item() == 0.0 and not d_hidden.any() and not d_weight.any()


def test_bf16_hidden_states_match_bf16_logits_upcast() -> None:
    """bf16 operands: the same bf16 matmul as a bf16 lm_head, then fp32 log-softmax, like transformers."""
    hidden, weight, labels = random_case()
    hidden16, weight16 = hidden.bfloat16(), weight.bfloat16()
    expected = ForCausalLMLoss(hidden16 @ weight16.T, labels, VOCAB)
    got = chunked_causal_lm_loss(hidden16, weight16, labels, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_only_the_needed_gradients_are_computed() -> None:
    """A frozen head (LoRA) gets no gradient; the hidden states still do."""
    hidden, weight, labels = random_case()
    hidden.requires_grad_()
    chunked_causal_lm_loss(hidden, weight, labels).backward()
    assert hidden.grad is not None and weight.grad is None


def tiny_qwen2(tie: bool, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB * 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config)


def padded_batch() -> dict[str, torch.Tensor]:
    return shared_padded_batch(VOCAB * 3)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch, packed_rows_batch])
@pytest.mark.parametrize("num_items", [None, 9])
def test_patched_model_has_the_same_loss_and_gradients(tie: bool, make_batch: Any, num_items: int | None) -> None:
    model = tiny_qwen2(tie)
    reference = copy.deepcopy(model)
    assert enable_memory_efficient_loss(model, chunk_size=4) == "chunked"
    batch = make_batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected, expected_grads = loss_and_grads(reference, batch, **kwargs)
    got, got_grads = loss_and_grads(model, batch, **kwargs)
    assert got.logits is None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_patched_model_without_labels_returns_logits_as_before() -> None:
    model = tiny_qwen2(tie=True)
    reference = copy.deepcopy(model)
    enable_memory_efficient_loss(model)
    assert enable_memory_efficient_loss(model) == "chunked"  # idempotent
    batch = {k: v for k, v in padded_batch().items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)


def test_lora_wrapped_model_has_the_same_loss_and_adapter_gradients() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny_qwen2(tie=True), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(model)
    assert enable_memory_efficient_loss(model, chunk_size=3) == "chunked"
    expected, expected_grads = loss_and_grads(reference, packed_batch())
    got, got_grads = loss_and_grads(model, packed_batch())
    assert got.logits is None and any("lora_A" in name for name in got_grads)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_lora_on_lm_head_falls_back_to_the_standard_loss() -> None:
    model = get_peft_model(tiny_qwen2(tie=False), LoraConfig(r=2, target_modules=["lm_head"]))
    reference = copy.deepcopy(model)
    enable_memory_efficient_loss(model)
    got = model(**padded_batch())
    assert got.logits is not None
    torch.testing.assert_close(got.loss, reference(**padded_batch()).loss)


# --------------------------------------------------------------------------- MFU arithmetic


def test_flops_per_token_matches_a_hand_computed_case() -> None:
    config = Qwen2Config(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    # head_dim 4, q width 2*4 = 8, k/v width 1*4 = 4. Per layer:
    #   q 8*8+8 = 72, k 8*4+4 = 36, v 36, o 8*8 = 64            -> attention 208
    #   gate/up/down 3*8*16 = 384, two RMSNorms 2*8 = 16        -> 608 per layer
    # 2 layers 1216 + final norm 8 + lm_head 100*8 = 800        -> N = 2024
    # 6N = 12144; attention 12 * 2 layers * 8 * seq 32 = 6144 -> 18288 FLOPs per token
    assert count_flop_params(config) == 2024
    assert flops_per_token(config, seq_len=32) == 18288
    # 1,000 tokens/s x 18,288 FLOPs = 18.288 MFLOP/s: 100 % of an 18.288e6 peak, 1 % of 1.8288e9.
    assert mfu(1_000, 18288, 18.288e6) == pytest.approx(1.0)
    assert mfu(1_000, 18288, 1.8288e9) == pytest.approx(0.01)


def test_flop_params_of_qwen2_5_0_5b_equal_its_published_parameter_count() -> None:
    """Tied embeddings: counting the output projection once and not the lookup gives the model's size."""
    config = Qwen2Config(**json.loads((REPO_ROOT / "configs/model/qwen2.5-0.5b.json").read_text()))
    assert count_flop_params(config) == 494_032_768
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    # 6N = 2,964,196,608; attention 12 * 24 * 896 * 2048 = 528,482,304
    assert flops_per_token(config, 2048) == 3_492_678_912
    # 40k tokens/s on an H100 SXM: 40,000 * 3,492,678,912 / 989.4e12 = 0.141204
    peak = device_peak_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989.4e12
    assert mfu(40_000, flops_per_token(config, 2048), peak) == pytest.approx(0.141204, abs=1e-6)


def test_flop_params_of_qwen2_5_1_5b_match_the_meta_model() -> None:
    config = Qwen2Config(**json.loads((REPO_ROOT / "configs/model/qwen2.5-1.5b.json").read_text()))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert count_flop_params(config) == sum(p.numel() for p in model.parameters()) == 1_543_714_304


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA B200", 2250.0),
        ("Tesla T4", None),
    ],
)
def test_device_peak_table(name: str, tflops: float | None) -> None:
    peak = device_peak_flops(name)
    assert (peak / 1e12 if peak else None) == (pytest.approx(tflops) if tflops else None)


# --------------------------------------------------------------------------- token accounting


def test_token_counter_on_a_padded_batch() -> None:
    counter = TokenCounter()
    batch = padded_batch()
    counter.observe(batch)
    counter.observe(batch)
    # 2 rows x 10 positions; row 1 has 4 padding; labels: row 0 positions 3..9, row 1 positions 3..5,
    # of which the loss counts those after the first position: 7 + 3.
    assert counter.take() == {"positions": 40, "real_tokens": 32, "supervised_tokens": 20}
    assert counter.take() == {"positions": 0, "real_tokens": 0, "supervised_tokens": 0}


def test_token_counter_on_a_packed_batch() -> None:
    counter = TokenCounter()
    counter.observe(packed_batch())
    # 11 flattened positions, no padding; labels 7,8,9,10,11 and 13,14 (the first position is never counted).
    assert counter.take() == {"positions": 11, "real_tokens": 11, "supervised_tokens": 7}


def test_token_counter_on_packed_rows_counts_their_padding() -> None:
    from llmtrain.data.collate import PackedRowsCollator
    from llmtrain.metrics import PADDED_POSITIONS

    from ..conftest import PACKED_ROWS

    counter = TokenCounter()
    batch = PackedRowsCollator(pad_token_id=0)(PACKED_ROWS)
    counter.observe(batch)
    # 2 rows x 7 positions, the second padded by 3; the same 7 supervised labels as flattened.
    assert counter.take() == {"positions": 14, "real_tokens": 11, "supervised_tokens": 7}
    popped = batch.pop(PADDED_POSITIONS)  # as LlmTrainer.compute_loss passes it
    counter.observe(batch, padded_positions=popped)
    assert counter.take()["real_tokens"] == 11


def test_token_counter_hook_counts_training_calls_only() -> None:
    model = tiny_qwen2(tie=True)
    counter = TokenCounter()
    handle = counter.attach(model)
    model.train()
    model(**packed_batch())
    model.eval()
    model(**packed_batch())
    handle.remove()
    assert counter.take()["positions"] == 11


def test_throughput_callback_adds_its_keys_to_every_training_log(tmp_path: Path) -> None:
    model = tiny_qwen2(tie=True)
    enable_memory_efficient_loss(model)
    counter = TokenCounter()
    counter.attach(model)
    rows = [{k: v[0].tolist() for k, v in packed_batch().items()} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    callback = ThroughputCallback(counter, model.config, seq_len=11, peak_flops=1e12)
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=FlatPackedCollator(), callbacks=[callback]
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["padding_share"] == 0.0
        assert entry["tokens_per_second"] > entry["supervised_tokens_per_second"] > 0
        assert entry["supervised_tokens_per_second"] == pytest.approx(entry["tokens_per_second"] * 14 / 22)
        assert 0 < entry["mfu"] < 1


@pytest.mark.parametrize(
    ("requested", "installed", "cuda", "expected", "warned"),
    [
        ("auto", True, True, "liger", False), ("auto", False, True, "chunked", False),
        ("auto", True, False, "chunked", False), ("liger", True, True, "liger", False),
        ("liger", False, True, "chunked", True), ("liger", True, False, "chunked", True),
        ("chunked", True, True, "chunked", False),
    ],
)  # fmt: skip
def test_the_loss_backend_is_liger_only_where_it_can_run(
    requested: str, installed: bool, cuda: bool, expected: str, warned: bool
) -> None:
    backend, warning = resolve_loss_backend(requested, installed, cuda)
    assert backend == expected and (warning is not None) == warned


def test_a_liger_loss_that_cannot_run_here_is_the_chunked_one_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_qwen2(tie=True)
    with caplog.at_level("WARNING"):
        backend = enable_memory_efficient_loss(model, backend="liger")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run Liger")
    assert backend == "chunked" and "loss_implementation: liger needs" in caplog.text
    batch = packed_batch()
    model.train()
    assert torch.isfinite(model(**batch).loss)


def test_use_liger_kernel_is_switched_off_with_a_warning_where_it_cannot_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtrain.config.arguments import TrainArguments
    from llmtrain.run import trainer as run_trainer

    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, use_liger_kernel=True, report_to="none")
    with caplog.at_level("WARNING"):
        run_trainer.use_liger_kernels(args)
    assert args.use_liger_kernel is False and "use_liger_kernel:" in caplog.text
    # Where it can run, Liger patches the layers and leaves the loss to loss_implementation.
    monkeypatch.setattr(run_trainer, "liger_kernels_problem", lambda use_cpu: None)
    args = TrainArguments(output_dir=str(tmp_path), use_cpu=True, use_liger_kernel=True, report_to="none")
    run_trainer.use_liger_kernels(args)
    assert args.use_liger_kernel is True
    assert args.liger_kernel_config == {"fused_linear_cross_entropy": False, "cross_entropy": False}
