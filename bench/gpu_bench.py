"""GPU benchmark for one device: Qwen2.5-0.5B/1.5B from scratch and LoRA on a 7B shape.

    python -m bench.gpu_bench --out results/gpu.json          # one H100: ~8 minutes (--budget-s 480)
    python -m bench.gpu_bench --matrix --budget-s 1200 --out results/matrix.json   # eager/compiled x Liger
    python -m bench.gpu_bench --smoke --out /tmp/smoke.json   # tiny config, 2 steps, CPU is fine

Imports only torch, transformers, peft and the standard library (plus ``llmtrain.loss``,
``llmtrain.metrics``, ``llmtrain.mixers`` and the collators of ``llmtrain.data.collate``, which import
nothing else), so it runs on a bare GPU box without datasets, DeepSpeed or SwanLab.

Every run is a bare training step shaped like the Trainer's: forward with ``labels``, backward,
``clip_grad_norm_(1.0)``, fused AdamW, ``zero_grad``. Batches are full blocks of random token ids
(pretraining packing: no padding, plain causal mask, so sdpa takes its flash kernel). Reported per
run: tokens/s on this device, MFU (``llmtrain.metrics.flops_per_token`` and the device's dense bf16
peak), peak allocated memory. Precision ``amp`` is what the Trainer's bf16 path does (fp32 master
weights, bf16 autocast); ``bf16`` is pure bf16 weights and optimizer state.

Per model: a micro-batch sweep (doubling until out of memory) with the chunked loss, the same with
the standard loss, activation checkpointing at the largest micro-batches, the decoder under
``torch.compile`` (both losses; ``--no-compile`` skips it), and pure bf16 at the best micro-batch.
Then a "micro-batch that fits" table for sequence lengths 512-4096 (1.5B, amp, chunked loss, no
checkpointing) and LoRA SFT on the Qwen2.5-7B shape (bf16 base weights, LoRA r=16 on all linear
layers, activation checkpointing). A time budget skips what is left once spent. ``chunked`` is
always our chunked loss (``backend="chunked"``), also where Liger-Kernel is installed.

``--matrix`` runs instead, for each workload, the decoder eager and under ``torch.compile``, each
with Liger-Kernel off (our chunked loss, transformers' modules) and on (Liger's RMSNorm, RoPE and
SwiGLU patched into the model, as the Trainer's ``use_liger_kernel`` does, and Liger's fused linear
cross-entropy, as ``loss_implementation: auto`` picks on a GPU), all at one micro-batch
(``--matrix-micro-batch``, default 8). Workloads: pretraining of each ``--models`` model (amp,
full blocks); full SFT of Qwen2.5-1.5B on packed rows (amp, 8 rows of <= ``--seq-len`` tokens
with BELLE-like conversation lengths, in ``PackedRowsCollator``'s sdpa layout: restarting position
ids, one block-diagonal mask per row; tokens/s counts real tokens, not padding; ``--no-sft``
skips it); LoRA SFT on the Qwen2.5-7B shape as above (``--no-lora`` skips it). Liger's patches
replace Qwen2's modules for the whole process and cannot be undone, so every "off" cell runs
before the first "on" one (``--liger off|on|both``); where Liger cannot run (not installed, no
CUDA) the "on" cells are reported as not run, with the reason.

Last (both modes, ``--no-hybrid`` skips it): Qwen3.5-0.8B full SFT on the same BELLE-like packed rows,
in the exact packed layout for its Gated DeltaNet layers (``packed_flat_varlen``: flattened, with
``cu_seq_lens`` and ``seq_idx`` for every mixer; needs flash-attn, flash-linear-attention and
causal-conv1d) and in the per-conversation rows a machine without those kernels trains, with the
first loss of both compared (they must agree). Without the kernels both rows say what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import itertools
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from llmtrain.data.collate import FlatPackedCollator, PackedRowsCollator, PaddingCollator
from llmtrain.loss import enable_memory_efficient_loss, find_causal_lm, liger_kernels_problem
from llmtrain.metrics import PADDED_POSITIONS, count_flop_params, device_peak_flops, flops_per_token, mfu
from llmtrain.mixers import missing_varlen_kernels

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = {
    "qwen2.5-0.5b": REPO_ROOT / "configs/model/qwen2.5-0.5b.json",
    "qwen2.5-1.5b": REPO_ROOT / "configs/model/qwen2.5-1.5b.json",
}
TINY_CONFIG = REPO_ROOT / "llmtrain/assets/tiny/config.json"
HYBRID_CONFIG = REPO_ROOT / "configs/model/qwen3.5-0.8b.json"  # Qwen3.5-0.8B's published text_config
HYBRID_WORKLOADS = ("sft-packed-varlen", "sft-per-conversation")
# Qwen2.5-7B's shape (its config.json on the hub), written out so nothing is downloaded.
QWEN2_5_7B_SHAPE: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_GRAD_NORM = 1.0  # the shipped configs' max_grad_norm
LORA_NAME = "qwen2.5-7b-shape-lora"
SFT_MODEL = "qwen2.5-1.5b"  # the matrix's full-SFT workload
# The matrix's micro-batch: issue 15's 8 packed rows x 2048, and the largest micro-batch the 1.5B
# fits at 2048 tokens on an 80 GB H100 (amp, chunked loss; see docs/benchmarks.md).
MATRIX_MICRO_BATCH = 8
# BELLE conversation lengths in Qwen2.5 tokens and their supervised share: bench.sft_throughput's
# facts, repeated here because that module needs datasets, which a bare GPU box may lack.
BELLE_MEDIAN, BELLE_P90, BELLE_SUPERVISED_SHARE = 109, 261, 0.47
SHORTEST_CONVERSATION = 24
IGNORE_INDEX = -100


@dataclasses.dataclass
class Run:
    """One measured configuration; ``error`` set when it did not run (out of memory, budget)."""

    model: str
    seq_len: int
    micro_batch: int
    precision: str
    loss: str
    checkpointing: bool
    lora: bool = False
    compiled: bool = False
    liger: bool = False  # Liger's RMSNorm / RoPE / SwiGLU patched in (the matrix only)
    workload: str = "pretrain"  # pretrain, sft-packed, lora-sft, or Qwen3.5's sft-packed-varlen / sft-per-conversation
    real_tokens_per_step: int | None = None  # tokens that are not padding, where a batch has padding
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    step_seconds: float | None = None
    error: str | None = None


class BudgetSpent(Exception):
    """The time budget ran out; later runs are reported as skipped."""


@dataclasses.dataclass
class Bench:
    device: torch.device
    warmup: int
    steps: int
    deadline: float
    peak_flops: float | None

    def check_budget(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetSpent("time budget spent")


def load_config(path: Path, **overrides: Any) -> Qwen2Config:
    """A Qwen2 config from a JSON file, set up for training (no KV cache, sdpa)."""
    config = Qwen2Config(**{**json.loads(path.read_text()), **overrides})
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


def build_model(config: Qwen2Config, device: torch.device, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """Fresh weights created directly on ``device``."""
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.train()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(
    bench: Bench,
    model: torch.nn.Module,
    run: Run,
    vocab_size: int,
    fpt: float,
    quiet: bool = False,
    batch: dict[str, torch.Tensor] | None = None,
) -> Run:
    """Time ``bench.steps`` training steps after ``bench.warmup``; fill tokens/s, MFU and peak memory.

    ``batch``: the step's model inputs (tokens/s then counts ``run.real_tokens_per_step``); default
    full blocks of random ids, ``run.micro_batch`` x ``run.seq_len``.
    """
    bench.check_budget()
    free_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bench.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused)
    amp = run.precision == "amp"
    if batch is None:
        generator = torch.Generator(device=bench.device).manual_seed(0)
        ids = torch.randint(0, vocab_size, (run.micro_batch, run.seq_len), device=bench.device, generator=generator)
        batch = {"input_ids": ids, "labels": ids}
    tokens_per_step = run.real_tokens_per_step or run.micro_batch * run.seq_len
    times: list[float] = []
    try:
        for step in range(bench.warmup + bench.steps):
            start = time.perf_counter()
            autocast = torch.autocast(bench.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bench.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= bench.warmup:
                times.append(time.perf_counter() - start)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"non-finite loss {loss.item()}")
    except Exception as error:  # out of memory is a result here, not a failure
        if not is_oom(error):
            raise
        run.error = "OOM"
    finally:
        model.zero_grad(set_to_none=True)
        del optimizer
    if run.error is None:
        step_seconds = statistics.median(times)
        run.step_seconds = step_seconds
        run.tokens_per_second = tokens_per_step / step_seconds
        run.mfu = mfu(run.tokens_per_second, fpt, bench.peak_flops) if bench.peak_flops else None
        if bench.device.type == "cuda":
            run.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    if not quiet:
        log_run(run)
    return run


def log_run(run: Run) -> None:
    detail = run.error or f"{run.tokens_per_second:,.0f} tok/s" + (
        f", MFU {100 * run.mfu:.1f}%" if run.mfu is not None else ""
    ) + (f", peak {run.peak_memory_gib:.1f} GiB" if run.peak_memory_gib is not None else "")
    print(
        f"  {run.model} {run.workload} seq {run.seq_len} mb {run.micro_batch} {run.precision} loss={run.loss} "
        f"ckpt={'on' if run.checkpointing else 'off'}{' lora' if run.lora else ''}"
        f"{' compiled' if run.compiled else ''}{' liger' if run.liger else ''}: {detail}",
        flush=True,
    )


@contextlib.contextmanager
def loss_mode(model: Qwen2ForCausalLM, mode: str) -> Iterator[None]:
    """Run the block with our chunked loss (``chunked``), Liger's fused loss (``liger``) or the model's own."""
    original = model.__dict__.get("forward")
    marker = model.__dict__.get("_llmtrain_loss_backend")
    if mode != "standard":
        enable_memory_efficient_loss(model, backend=mode)
    try:
        yield
    finally:
        for key, value in (("forward", original), ("_llmtrain_loss_backend", marker)):
            if value is None:
                model.__dict__.pop(key, None)
            else:
                model.__dict__[key] = value


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing on or off (transformers 5 renamed the methods; older names still work)."""
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def sweep(
    bench: Bench,
    model: Qwen2ForCausalLM,
    name: str,
    seq_len: int,
    micro_batches: list[int],
    precision: str,
    loss: str,
    checkpointing: bool,
    fpt: float,
    compiled: bool = False,
) -> list[Run]:
    """Measure each micro-batch in order; stop after the first that does not fit."""
    runs = []
    set_checkpointing(model, checkpointing)
    with loss_mode(model, loss):
        for micro_batch in micro_batches:
            run = Run(name, seq_len, micro_batch, precision, loss, checkpointing, compiled=compiled)
            runs.append(measure(bench, model, run, model.config.vocab_size, fpt))
            if run.error:
                break
    set_checkpointing(model, False)
    return runs


def best(runs: list[Run]) -> Run | None:
    fitted = [r for r in runs if r.tokens_per_second]
    return max(fitted, key=lambda r: r.tokens_per_second or 0.0) if fitted else None


def bench_model(
    bench: Bench, name: str, config: Qwen2Config, seq_len: int, micro_batches: list[int], compile_decoder: bool
) -> list[Run]:
    """The sweeps of one from-scratch model (module docstring)."""
    print(f"{name}: {count_flop_params(config) / 1e9:.3f}B FLOP-counted params, seq {seq_len}", flush=True)
    fpt = flops_per_token(config, seq_len)
    model = build_model(config, bench.device, torch.float32)
    runs = sweep(bench, model, name, seq_len, micro_batches, "amp", "chunked", False, fpt)
    fitted = [r.micro_batch for r in runs if not r.error]
    runs += sweep(bench, model, name, seq_len, micro_batches, "amp", "standard", False, fpt)
    # Checkpointing trades ~1/3 more compute for memory: try it where the plain run stopped fitting.
    largest = fitted[-1] if fitted else 1
    ckpt_batches = sorted({largest, *(mb for mb in micro_batches if mb > largest)})[:2]
    runs += sweep(bench, model, name, seq_len, ckpt_batches, "amp", "chunked", True, fpt)
    top = best([r for r in runs if r.loss == "chunked" and not r.checkpointing])
    top_standard = best([r for r in runs if r.loss == "standard"])
    if compile_decoder and top_standard is not None:
        # The decoder compiled, the loss eager: both losses at the standard loss's best micro-batch, then
        # the chunked loss at the larger micro-batch it fits (one compilation per shape).
        compiled_runs = [("standard", top_standard.micro_batch), ("chunked", top_standard.micro_batch)]
        if top is not None and top.micro_batch != top_standard.micro_batch:
            compiled_runs.append(("chunked", top.micro_batch))
        decoder = model.model
        model.model = torch.compile(decoder)
        try:
            for loss, micro_batch in compiled_runs:
                runs += sweep(bench, model, name, seq_len, [micro_batch], "amp", loss, False, fpt, compiled=True)
        finally:
            model.model = decoder
    if top is not None:
        model.to(torch.bfloat16)
        free_memory()
        runs += sweep(bench, model, name, seq_len, [top.micro_batch], "bf16", "chunked", top.checkpointing, fpt)
    del model
    free_memory()
    return runs


def fit_table(bench: Bench, name: str, config: Qwen2Config, seq_lens: list[int], max_tokens: int) -> dict[int, int]:
    """Largest power-of-two micro-batch that trains (one step) at each sequence length."""
    model = build_model(config, bench.device, torch.float32)
    enable_memory_efficient_loss(model, backend="chunked")
    fits: dict[int, int] = {}
    saved = bench.warmup, bench.steps
    bench.warmup, bench.steps = 0, 1
    try:
        for seq_len in seq_lens:
            micro_batch, largest = 1, 0
            while micro_batch * seq_len <= max_tokens:
                run = Run(name, seq_len, micro_batch, "amp", "chunked", False)
                measure(bench, model, run, 1000, 1.0, quiet=True)
                if run.error:
                    break
                largest, micro_batch = micro_batch, micro_batch * 2
            fits[seq_len] = largest
            print(f"  {name} seq {seq_len}: micro-batch {largest} fits", flush=True)
    finally:
        bench.warmup, bench.steps = saved
        del model
        free_memory()
    return fits


def bench_lora(bench: Bench, config: Qwen2Config, seq_len: int, micro_batches: list[int]) -> list[Run]:
    """LoRA SFT on a big frozen bf16 base: activation checkpointing, chunked loss, micro-batch sweep."""
    from peft import LoraConfig, get_peft_model

    name = LORA_NAME
    print(f"{name}: {count_flop_params(config) / 1e9:.2f}B params, bf16 base", flush=True)
    try:
        base = build_model(config, bench.device, torch.bfloat16)
    except Exception as error:
        if not is_oom(error):
            raise
        free_memory()
        return [Run(name, seq_len, 0, "bf16", "chunked", True, lora=True, error="OOM building the base")]
    set_checkpointing(base, True)
    base.enable_input_require_grads()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    enable_memory_efficient_loss(model, backend="chunked")
    # Frozen base: forward 2N + activation gradients 2N, no weight gradients; attention as in training.
    fpt = flops_per_token(config, seq_len) - 2 * count_flop_params(config)
    runs = []
    for micro_batch in micro_batches:
        run = Run(name, seq_len, micro_batch, "bf16", "chunked", True, lora=True)
        runs.append(measure(bench, model, run, config.vocab_size, fpt))
        if run.error:
            break
    del model, base
    free_memory()
    return runs


def belle_packed_rows(rows: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``rows`` packed SFT rows of random ids, as ``pack_batch`` writes them (restarting position ids).

    Conversation lengths are BELLE-like (lognormal through median 109 and p90 261 tokens, clipped to
    [24, ``seq_len``]), packed next-fit into rows of <= ``seq_len``; the last 47 % of each
    conversation is supervised, the rest (its first token included) -100.
    """
    rng = random.Random(seed)
    mu = math.log(BELLE_MEDIAN)
    sigma = (math.log(BELLE_P90) - mu) / statistics.NormalDist().inv_cdf(0.9)
    shortest = min(SHORTEST_CONVERSATION, seq_len)
    lengths: list[list[int]] = [[]]  # per row
    room = seq_len
    while True:
        length = min(seq_len, max(shortest, round(rng.lognormvariate(mu, sigma))))
        if length > room:
            if len(lengths) == rows:
                break
            lengths.append([])
            room = seq_len
        lengths[-1].append(length)
        room -= length
    generator = torch.Generator().manual_seed(seed)
    packed = []
    for row in lengths:
        input_ids = torch.randint(0, vocab_size, (sum(row),), generator=generator).tolist()
        labels, position_ids, start = [IGNORE_INDEX] * len(input_ids), [], 0
        for length in row:
            answer = start + length - max(1, round(length * BELLE_SUPERVISED_SHARE))
            labels[answer : start + length] = input_ids[answer : start + length]
            position_ids += list(range(length))
            start += length
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed


def conversations_of(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The conversations of packed rows, one each (split where the position ids restart)."""
    found = []
    for row in rows:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
        for start, end in itertools.pairwise(starts):
            found.append({key: row[key][start:end] for key in ("input_ids", "labels")})
    return found


def packed_sft_batch(
    rows: int, seq_len: int, vocab_size: int, device: torch.device, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """:func:`belle_packed_rows` through ``PackedRowsCollator`` (sdpa's layout), and their real tokens."""
    packed = belle_packed_rows(rows, seq_len, vocab_size, seed)
    batch = PackedRowsCollator(pad_token_id=0)(packed)
    batch.pop(PADDED_POSITIONS)
    return {key: value.to(device) for key, value in batch.items()}, sum(len(row["input_ids"]) for row in packed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def bench_hybrid_sft(bench: Bench, seq_len: int, micro_batch: int) -> list[Run]:
    """Qwen3.5-0.8B full SFT on packed rows: exact varlen packing vs the per-conversation fallback, and their losses.

    ``packed_flat_varlen`` (flash-attention + flash-linear-attention + causal-conv1d, each boundary passed
    to every mixer) against ``padded`` (the same conversations one per row, what a machine without the
    kernels trains); both amp, chunked loss. The first step's loss of the two must agree (one step's
    relative difference is recorded in the varlen run's ``error`` field only when it exceeds 1e-2).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    name = "qwen3.5-0.8b"
    missing = missing_varlen_kernels()
    cells = [Run(name, seq_len, micro_batch, "amp", "chunked", True, workload=w) for w in HYBRID_WORKLOADS]
    if missing:
        for cell in cells:
            cell.error = f"not run: {', '.join(missing)} missing"
            log_run(cell)
        return cells
    config = AutoConfig.from_pretrained(HYBRID_CONFIG)
    config.use_cache = False
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="flash_attention_2")
    model.train()
    set_checkpointing(model, True)
    enable_memory_efficient_loss(model, backend="chunked")
    rows = belle_packed_rows(micro_batch, seq_len, config.vocab_size)
    conversations = conversations_of(rows)
    batches = {
        "sft-packed-varlen": to_device(FlatPackedCollator(boundaries=True)(rows), bench.device),
        "sft-per-conversation": to_device(PaddingCollator(pad_token_id=0)(conversations), bench.device),
    }
    real_tokens = sum(len(row["input_ids"]) for row in rows)
    losses = {}
    for workload, batch in batches.items():
        with torch.no_grad(), torch.autocast(bench.device.type, dtype=torch.bfloat16):
            losses[workload] = model(**batch).loss.item()
    fpt = flops_per_token(config, seq_len)
    for cell in cells:
        cell.real_tokens_per_step = real_tokens
        measure(bench, model, cell, config.vocab_size, fpt, batch=batches[cell.workload])
    difference = abs(losses["sft-packed-varlen"] - losses["sft-per-conversation"]) / losses["sft-per-conversation"]
    print(f"  {name}: packed (varlen) vs per-conversation first loss, relative difference {difference:.2e}", flush=True)
    if difference > 1e-2:
        cells[0].error = f"packed loss differs from the per-conversation loss by {difference:.1e} (relative)"
    del model
    free_memory()
    return cells


def apply_liger_kernels(model: Qwen2ForCausalLM) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU in this model, as the Trainer's ``use_liger_kernel`` applies them.

    Its loss patches stay off (the loss is ``enable_memory_efficient_loss``'s, as in training).
    The module-level patches (Qwen2's RMSNorm and MLP classes, ``apply_rotary_pos_emb``) stay for
    the rest of the process.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    apply_liger_kernel_to_qwen2(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def matrix_workload(bench: Bench, config: Qwen2Config, cells: list[Run]) -> None:
    """Fill ``cells`` (one workload, one Liger state; eager first, then compiled) on one freshly built model."""
    first = cells[0]
    lora = first.workload == "lora-sft"
    print(f"{first.model} {first.workload}, Liger {'on' if first.liger else 'off'}", flush=True)
    try:
        base = build_model(config, bench.device, torch.bfloat16 if lora else torch.float32)
    except Exception as error:
        if not is_oom(error):
            raise
        free_memory()
        for cell in cells:
            cell.error = "OOM building the model"
            log_run(cell)
        return
    if first.liger:
        apply_liger_kernels(base)
    model: torch.nn.Module = base
    fpt = flops_per_token(config, first.seq_len)
    if lora:
        from peft import LoraConfig, get_peft_model

        set_checkpointing(base, True)
        base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
        fpt -= 2 * count_flop_params(config)  # a frozen base has no weight gradients (bench_lora)
    enable_memory_efficient_loss(model, backend=first.loss)
    batch = None
    if first.workload == "sft-packed":
        batch, real_tokens = packed_sft_batch(first.micro_batch, first.seq_len, config.vocab_size, bench.device)
        for cell in cells:
            cell.real_tokens_per_step = real_tokens
    causal_lm = find_causal_lm(model)
    decoder = causal_lm.model
    try:
        for cell in cells:
            if cell.compiled:
                torch._dynamo.reset()  # a fresh cache: the matrix compiles more models than the recompile limit
                causal_lm.model = torch.compile(decoder)
            try:
                measure(bench, model, cell, config.vocab_size, fpt, batch=batch)
            except BudgetSpent:
                raise
            except Exception as error:  # a cell that cannot run (a compile failure) is a result, not the end
                first_line = (str(error).splitlines() or [""])[0][:160]
                cell.error = f"failed: {type(error).__name__}: {first_line}"
                log_run(cell)
            finally:
                causal_lm.model = decoder
    finally:
        del model, base, causal_lm, decoder, batch
        free_memory()


def bench_matrix(
    bench: Bench,
    workloads: list[tuple[str, str, Qwen2Config]],
    seq_len: int,
    micro_batch: int,
    liger_states: list[bool],
    compile_decoder: bool,
) -> list[Run]:
    """Eager / compiled x Liger off / on for each ``(name, workload, config)`` (module docstring)."""
    runs: list[Run] = []
    for liger in sorted(liger_states):  # off first: Liger's patches stay in Qwen2's module for good
        problem = liger_kernels_problem(use_cpu=bench.device.type != "cuda") if liger else None
        for name, workload, config in workloads:
            lora = workload == "lora-sft"
            cells = [
                Run(
                    name,
                    seq_len,
                    micro_batch,
                    "bf16" if lora else "amp",
                    "liger" if liger else "chunked",
                    checkpointing=lora,
                    lora=lora,
                    compiled=compiled,
                    liger=liger,
                    workload=workload,
                )
                for compiled in ((False, True) if compile_decoder else (False,))
            ]
            runs += cells
            if problem is not None:
                for cell in cells:
                    cell.error = f"not run: {problem}"
                    log_run(cell)
                continue
            try:
                bench.check_budget()
                matrix_workload(bench, config, cells)
            except BudgetSpent:
                for cell in cells:
                    if cell.tokens_per_second is None and cell.error is None:
                        cell.error = "not run: time budget spent"
    return runs


def markdown(runs: list[Run]) -> str:
    lines = [
        "| model | workload | seq | micro-batch | precision | loss | act. ckpt | compiled | Liger kernels "
        "| tokens/s | MFU | peak mem (GiB) |",
        "|---|---|---:|---:|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in runs:
        if r.error:
            figures = f"{r.error} | | "
        else:
            figures = (
                f"{r.tokens_per_second:,.0f} | {'' if r.mfu is None else f'{100 * r.mfu:.1f}%'} | "
                f"{'' if r.peak_memory_gib is None else f'{r.peak_memory_gib:.1f}'}"
            )
        lines.append(
            f"| {r.model} | {r.workload} | {r.seq_len} | {r.micro_batch} | {r.precision} | {r.loss} | "
            f"{'on' if r.checkpointing else 'off'} | {'yes' if r.compiled else 'no'} | {'on' if r.liger else 'off'} | "
            f"{figures} |"
        )
    return "\n".join(lines)


def liger_version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny config, short sequences, 2 steps (CPU is fine)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what is left after this many seconds")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (compilation included)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (median step time)")
    parser.add_argument(
        "--models", default="qwen2.5-0.5b,qwen2.5-1.5b", help="comma-separated: " + ",".join(MODEL_CONFIGS)
    )
    parser.add_argument("--micro-batches", default="1,2,4,8,16")
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decoder runs")
    parser.add_argument("--no-fit-table", action="store_true")
    parser.add_argument("--matrix", action="store_true", help="eager/compiled x Liger off/on instead of the sweeps")
    parser.add_argument("--matrix-micro-batch", type=int, default=MATRIX_MICRO_BATCH, help="rows per step, every cell")
    parser.add_argument("--liger", choices=("off", "on", "both"), default="both", help="the matrix's Liger states")
    parser.add_argument("--no-sft", action="store_true", help="the matrix without its 1.5B packed-SFT workload")
    parser.add_argument("--no-hybrid", action="store_true", help="skip Qwen3.5 packed SFT (varlen vs per-conversation)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    micro_batches = [int(mb) for mb in args.micro_batches.split(",")]
    seq_len, fit_seq_lens, max_fit_tokens = args.seq_len, [512, 1024, 2048, 4096], 2**17
    matrix_micro_batch = args.matrix_micro_batch
    if args.smoke:
        args.warmup, args.steps, seq_len, micro_batches = 1, 2, 64, [1, 2]
        fit_seq_lens, max_fit_tokens, args.no_compile = [32, 64], 128, True
        models = {"tiny": load_config(TINY_CONFIG)}
        lora_config = load_config(TINY_CONFIG, tie_word_embeddings=False)
        sft_name, sft_config, matrix_micro_batch = "tiny", models["tiny"], 2
    else:
        models = {name: load_config(MODEL_CONFIGS[name]) for name in args.models.split(",") if name}
        lora_config = Qwen2Config(**QWEN2_5_7B_SHAPE, use_cache=False)
        sft_name, sft_config = SFT_MODEL, load_config(MODEL_CONFIGS[SFT_MODEL])
    bench = Bench(
        device=device,
        warmup=args.warmup,
        steps=args.steps,
        deadline=time.monotonic() + args.budget_s,
        peak_flops=device_peak_flops(device_name) if device.type == "cuda" else None,
    )
    print(f"device: {device_name}; dense bf16 peak: {bench.peak_flops}", flush=True)

    runs: list[Run] = []
    fits: dict[int, int] = {}
    skipped: list[str] = []
    if args.matrix:
        workloads = [(name, "pretrain", config) for name, config in models.items()]
        workloads += [] if args.no_sft else [(sft_name, "sft-packed", sft_config)]
        workloads += [] if args.no_lora else [(LORA_NAME, "lora-sft", lora_config)]
        liger_states = {"off": [False], "on": [True], "both": [False, True]}[args.liger]
        runs = bench_matrix(bench, workloads, seq_len, matrix_micro_batch, liger_states, not args.no_compile)
        args.no_fit_table, models, args.no_lora = True, {}, True  # the matrix replaces the sweeps
    for name, config in models.items():
        try:
            runs += bench_model(bench, name, config, seq_len, micro_batches, not args.no_compile)
        except BudgetSpent:
            skipped.append(name)
    if not args.no_fit_table:
        fit_name, fit_config = (
            ("tiny", models["tiny"]) if args.smoke else ("qwen2.5-1.5b", load_config(MODEL_CONFIGS["qwen2.5-1.5b"]))
        )
        try:
            fits = fit_table(bench, fit_name, fit_config, fit_seq_lens, max_fit_tokens)
        except BudgetSpent:
            skipped.append("fit table")
    if not args.no_lora:
        try:
            runs += bench_lora(bench, lora_config, seq_len, micro_batches[:4])
        except BudgetSpent:
            skipped.append("lora")
    if not args.no_hybrid:
        try:
            runs += bench_hybrid_sft(bench, seq_len, matrix_micro_batch)
        except BudgetSpent:
            skipped.append("qwen3.5 packed sft")

    table = markdown(runs)
    print("\n" + table)
    if fits:
        print("\nlargest micro-batch that fits (amp, chunked loss, no activation checkpointing):")
        print("| seq len | " + " | ".join(str(s) for s in fits) + " |")
        print("|---|" + "---:|" * len(fits))
        print("| micro-batch | " + " | ".join(str(mb) for mb in fits.values()) + " |")
    if skipped:
        print(f"\nskipped (time budget): {', '.join(skipped)}")
    result = {
        "device": device_name,
        "peak_bf16_flops": bench.peak_flops,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.gpu_bench", *(argv or sys.argv[1:])]),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "liger_kernel": liger_version(),
        },
        "runs": [dataclasses.asdict(r) for r in runs],
        "fit_table": {str(k): v for k, v in fits.items()},
        "skipped": skipped,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
