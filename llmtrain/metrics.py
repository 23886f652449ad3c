"""Training speed in every log: token accounting, throughput and MFU arithmetic.

* **MFU.** :func:`flops_per_token` (6N plus the attention term), :data:`PEAK_BF16_TFLOPS`,
  :func:`device_peak_flops` and :func:`mfu`.
* **Throughput logging.** :class:`TokenCounter` counts real, padded and supervised tokens of every
  training batch without a device sync; :class:`ThroughputCallback` turns the counts into
  ``tokens_per_second``, ``supervised_tokens_per_second``, ``padding_share`` and ``mfu`` in every
  training log (console and trackers), summed over ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, TrainerCallback, TrainerControl, TrainerState
from transformers import TrainingArguments as HFTrainingArguments

from llmtrain.loss import IGNORE_INDEX
from llmtrain.mixers import SOFTMAX_LAYER_TYPES, layer_types

# A collated batch's count of padding positions, where no 2-D attention mask says which they are (packed rows
# kept as rows: a mask would switch off transformers' packed-sequence attention). Popped before the model call.
PADDED_POSITIONS = "padded_positions"
# Model types whose softmax attention gates its output (q_proj is twice as wide: queries, then the gate).
GATED_ATTENTION_MODEL_TYPES = ("qwen3_5", "qwen3_next")

logger = logging.getLogger(__name__)

# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets.
# Keys are matched as substrings of torch.cuda.get_device_name(), longest first, so "H100 PCIe"
# wins over "H100" and "L40S" over "L4".
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,  # H100 PCIe datasheet: 1,513 with sparsity
    "H100 NVL": 835.0,  # H100 NVL datasheet: 1,671 with sparsity
    "H100": 989.4,  # H100 SXM5 (torch names it "NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    "H200": 989.4,  # H200 SXM: same compute as H100 SXM
    "GH200": 989.4,  # Grace Hopper superchip: H100-SXM-class GPU
    "B200": 2250.0,  # DGX B200 datasheet, per GPU: 4,500 with sparsity
    "A100": 312.0,  # A100 SXM4 and PCIe alike: 624 with sparsity
    "L40S": 362.0,  # L40S datasheet: 733 with sparsity
    "A10G": 125.0,  # AWS's A10 variant, assumed equal to the A10 datasheet (250 with sparsity)
    "A10": 125.0,  # A10 datasheet: 250 with sparsity
    "L4": 121.0,  # L4 datasheet: 242 with sparsity
    "RTX 4090": 165.2,  # Ada whitepaper, bf16 with fp32 accumulate: 330.4 with sparsity
}


# --------------------------------------------------------------------------- MFU arithmetic


def count_flop_params(config: PretrainedConfig) -> int:
    """N of the 6N rule for a Qwen2/Qwen3/Qwen3.5-style config: every weight a token is multiplied by.

    Counted per layer, by the layer's mixer type (:func:`llmtrain.mixers.layer_types`):

    * softmax attention: q/k/v projections (k and v are ``num_key_value_heads * head_dim`` wide)
      with their biases where the model has them (Qwen2 always, others per ``attention_bias``),
      o_proj, Qwen3's q/k RMSNorms; a gated output (Qwen3.5) doubles the q projection, whose
      second half is the gate;
    * linear attention (Gated DeltaNet): ``in_proj_qkv``, ``in_proj_z``, the per-head ``in_proj_b``
      and ``in_proj_a``, the depthwise causal conv1d (``linear_conv_kernel_dim`` taps per channel),
      the gated RMSNorm, ``out_proj``, and the per-head ``A_log`` and ``dt_bias``;

    and in every layer the gate/up/down MLP and both RMSNorms; then the final norm and the output
    projection once (also when it is tied to the input embedding). Not counted: the input
    embedding table (a lookup, no multiply). For a tied model this equals the parameter count.

    >>> from transformers import Qwen2Config, Qwen3Config, Qwen3ForCausalLM, Qwen3_5TextConfig, Qwen3_5ForCausalLM
    >>> shape = dict(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...              num_key_value_heads=1)
    >>> count_flop_params(Qwen2Config(**shape))
    204
    >>> qwen3 = Qwen3Config(**shape, head_dim=4, tie_word_embeddings=True)
    >>> count_flop_params(qwen3) == sum(p.numel() for p in Qwen3ForCausalLM(qwen3).parameters())
    True

    A hybrid by hand: hidden 4, one linear-attention layer (2 key heads x 2, 2 value heads x 3,
    conv 4 taps) and one gated softmax layer (2 heads x 2, 1 kv head), MLP 8, vocab 10, tied.
    Linear: qkv 4x(4+4+6)=56, z 4x6=24, b and a 4x2 each=16, conv (4+4+6)x4=56, norm 3, out 6x4=24,
    A_log and dt_bias 2 each=4: 183. Softmax: q 4x(2x2x2)=32, k 4x2=8, v 8, o 4x4=16, q/k norms 2+2: 68.
    MLP 3x4x8=96 and norms 8 in each layer: 104. Final norm 4, output 10x4=40: 183+68+2x104+44 = 503.

    >>> hybrid = Qwen3_5TextConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
    ...     layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
    ...     head_dim=2, linear_num_key_heads=2, linear_key_head_dim=2, linear_num_value_heads=2,
    ...     linear_value_head_dim=3, linear_conv_kernel_dim=4, tie_word_embeddings=True)
    >>> count_flop_params(hybrid), sum(p.numel() for p in Qwen3_5ForCausalLM(hybrid).parameters())
    (503, 503)
    """
    hidden = config.hidden_size
    mlp = 3 * hidden * config.intermediate_size
    norms = 2 * hidden
    mixers = {"full_attention": _softmax_attention_params(config), "linear_attention": _linear_attention_params(config)}
    mixers["sliding_attention"] = mixers["chunked_attention"] = mixers["full_attention"]
    per_layer = [mixers[kind] + mlp + norms for kind in layer_types(config)]
    return sum(per_layer) + hidden + config.vocab_size * hidden


def _softmax_attention_params(config: PretrainedConfig) -> int:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    has_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    biases = q_width + 2 * kv_width if has_bias else 0
    qk_norms = 2 * head_dim if config.model_type.startswith("qwen3") else 0
    # transformers' Qwen3.5 / Qwen3-Next attention always gates its output (published configs: attn_output_gate).
    gated = getattr(config, "attn_output_gate", config.model_type.startswith(GATED_ATTENTION_MODEL_TYPES))
    q_projection = hidden * q_width * (2 if gated else 1)
    return q_projection + 2 * hidden * kv_width + biases + q_width * hidden + qk_norms


def _linear_attention_params(config: PretrainedConfig) -> int:
    """Gated DeltaNet's weights per layer (0 for a config without linear attention)."""
    value_heads = getattr(config, "linear_num_value_heads", None)
    if value_heads is None:
        return 0
    key_width = config.linear_num_key_heads * config.linear_key_head_dim
    value_width = value_heads * config.linear_value_head_dim
    conv_channels = 2 * key_width + value_width
    hidden = config.hidden_size
    projections = hidden * conv_channels + hidden * value_width + 2 * hidden * value_heads + value_width * hidden
    return projections + conv_channels * config.linear_conv_kernel_dim + config.linear_value_head_dim + 2 * value_heads


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): ``6 N`` plus each mixer's sequence term.

    ``N`` is :func:`count_flop_params`. Softmax attention layers add PaLM's term (Chowdhery et al.
    2022, appendix B), ``12 d_attn seq_len`` per layer: the ``QK^T`` and ``AV`` matmuls, 2 FLOPs
    per multiply-add, ×3 for forward plus backward, with ``d_attn = num_attention_heads *
    head_dim``, and **no causal halving** (the convention the published 40-45 % MFU figures use).
    For packed rows ``seq_len`` is the row length, an upper bound on the attention actually
    computed. Linear-attention (Gated DeltaNet) layers add their state work instead, independent of
    ``seq_len``: per value head a ``d_k x d_v`` state is read against the key, updated by an outer
    product and read against the query, 3 multiply-adds per state entry, so ``18 d_k d_v`` FLOPs per
    head forward plus backward (the recurrent form's count; the chunked kernel's intra-chunk
    products are not counted, as PaLM's term ignores how attention is computed).

    >>> from transformers import Qwen2Config, Qwen3_5TextConfig
    >>> c = Qwen2Config(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
    ...                 num_attention_heads=2, num_key_value_heads=1)
    >>> flops_per_token(c, seq_len=16)  # 6 * 204 + 12 * 1 * 4 * 16
    1992.0

    The hybrid of :func:`count_flop_params` (N = 503): its softmax layer adds 12 x (2 x 2) x 16, its
    linear-attention layer 18 x 2 heads x 2 x 3:

    >>> hybrid = Qwen3_5TextConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
    ...     layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
    ...     head_dim=2, linear_num_key_heads=2, linear_key_head_dim=2, linear_num_value_heads=2,
    ...     linear_value_head_dim=3, linear_conv_kernel_dim=4, tie_word_embeddings=True)
    >>> flops_per_token(hybrid, seq_len=16)  # 6 * 503 + 768 + 216
    4002.0
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kinds = layer_types(config)
    softmax_layers = sum(kind in SOFTMAX_LAYER_TYPES for kind in kinds)
    attention = 12 * softmax_layers * heads * head_dim * seq_len
    recurrent = 0
    if getattr(config, "linear_num_value_heads", None):
        per_layer = 18 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
        recurrent = per_layer * kinds.count("linear_attention")
    return float(6 * count_flop_params(config) + attention + recurrent)


def device_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak in FLOP/s for a GPU name (as ``torch.cuda.get_device_name`` gives it), or None.

    >>> device_peak_flops("NVIDIA H100 80GB HBM3")
    989400000000000.0
    >>> device_peak_flops("NVIDIA L40S") / 1e12, device_peak_flops("NVIDIA L4") / 1e12
    (362.0, 121.0)
    >>> device_peak_flops("cpu") is None
    True
    """
    if not device_name:
        return None
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def current_device_peak_flops() -> float | None:
    """:func:`device_peak_flops` of the current CUDA device; None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    return device_peak_flops(torch.cuda.get_device_name())


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (a fraction, not %).

    >>> mfu(10_000, 6e9, 989.4e12)  # 10k tokens/s of a 1B model on an H100
    0.06064281382656155
    """
    return tokens_per_second_per_device * flops_per_token / peak_flops


# --------------------------------------------------------------------------- throughput accounting


class TokenCounter:
    """Running counts of training positions, real tokens and supervised tokens; no device sync.

    A batch's positions are ``input_ids.numel()``; real tokens are ``attention_mask.sum()`` when
    there is a mask, else the positions less ``padded_positions`` (given, or the batch's
    :data:`PADDED_POSITIONS`; packed rows flattened into one sequence have none); supervised
    tokens are the labels the causal-LM loss counts: ``shift_labels`` when the batch has them,
    else ``labels[..., 1:] != -100``. Counts accumulate on the batch's device and are read (one
    sync) by :meth:`take`.

    >>> counter = TokenCounter()
    >>> counter.observe({"input_ids": torch.ones(2, 4, dtype=torch.long),
    ...                  "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    ...                  "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])})
    >>> counter.take()
    {'positions': 8, 'real_tokens': 5, 'supervised_tokens': 3}
    """

    def __init__(self) -> None:
        self._positions = 0
        self._real: torch.Tensor | int = 0
        self._supervised: torch.Tensor | int = 0

    def observe(self, batch: Mapping[str, Any], padded_positions: int | torch.Tensor | None = None) -> None:
        """Add one micro-batch (the dict the model is called with) to the counts."""
        input_ids = batch.get("input_ids")
        labels = batch.get("labels")
        reference = input_ids if input_ids is not None else labels
        if reference is None:
            return
        positions = reference.numel()
        self._positions += positions
        mask = batch.get("attention_mask")
        padded = padded_positions if padded_positions is not None else batch.get(PADDED_POSITIONS)
        if mask is not None and mask.dim() == 2:
            self._real = self._real + mask.sum()
        else:
            self._real = self._real + positions - (padded if padded is not None else 0)
        shift_labels = batch.get("shift_labels")
        if shift_labels is not None:
            self._supervised = self._supervised + (shift_labels != IGNORE_INDEX).sum()
        elif labels is not None:
            self._supervised = self._supervised + (labels[..., 1:] != IGNORE_INDEX).sum()

    def attach(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Observe every training-mode call of ``model`` (a forward pre-hook); returns the hook's handle.

        For Trainers that are not subclassed: the Trainer calls ``model(**inputs)``, so the hook
        sees the batch as keyword arguments. Calls in eval mode are not counted.
        """

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if module.training:
                self.observe(kwargs)

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def take(self) -> dict[str, int]:
        """Return the counts since the last call (one device sync) and reset them."""
        counts = self.take_tensor(device=None).tolist()
        return {"positions": int(counts[0]), "real_tokens": int(counts[1]), "supervised_tokens": int(counts[2])}

    def take_tensor(self, device: torch.device | None) -> torch.Tensor:
        """The counts since the last call as a float64 tensor ``[positions, real, supervised]``; resets them.

        ``device`` None keeps the tensor where the counts accumulated (CPU when nothing was seen).
        """
        parts = [self._real, self._supervised]
        where = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
        totals = torch.stack(
            [torch.as_tensor(value, device=where, dtype=torch.float64) for value in (self._positions, *parts)]
        )
        self._positions, self._real, self._supervised = 0, 0, 0
        return totals if device is None else totals.to(device)


class ThroughputCallback(TrainerCallback):
    """Adds throughput to every training log: tokens/s (real and supervised), padding share, MFU.

    Keys (world totals over the interval since the previous training log, evaluation and
    checkpoint-saving time excluded): ``tokens_per_second``, ``supervised_tokens_per_second``,
    ``padding_share`` (padded positions / all positions) and, when ``model_config`` and
    ``seq_len`` are given and the device's bf16 peak is known, ``mfu`` (per-device tokens/s ×
    :func:`flops_per_token` / peak). The counts come from ``counter`` (:class:`TokenCounter`),
    which the training step feeds. ``on_log`` runs on every rank in transformers' Trainer, so the
    counts are summed with one ``all_reduce`` per log. List this callback before any tracker's
    callback (SwanLab's) so they see the added keys; they are also added to ``state.log_history``.
    """

    def __init__(
        self,
        counter: TokenCounter,
        model_config: PretrainedConfig | None = None,
        seq_len: int | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.counter = counter
        self.flops_per_token = flops_per_token(model_config, seq_len) if model_config and seq_len else None
        self.peak_flops = peak_flops
        self._interval_start = time.perf_counter()
        self._mark = self._interval_start
        self._excluded = 0.0

    def on_train_begin(
        self, args: HFTrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.peak_flops is None:
            self.peak_flops = current_device_peak_flops()
        self.counter.take_tensor(device=None)  # drop anything counted before training
        self._interval_start = self._mark = time.perf_counter()
        self._excluded = 0.0

    def on_step_end(
        self, args: HFTrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._mark = time.perf_counter()

    def _exclude_since_mark(self) -> None:
        now = time.perf_counter()
        self._excluded += now - self._mark
        self._mark = now

    def on_evaluate(
        self, args: HFTrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exclude_since_mark()

    def on_save(self, args: HFTrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._exclude_since_mark()

    def on_log(
        self,
        args: HFTrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:  # evaluation and end-of-training summaries
            return
        now = time.perf_counter()
        elapsed = max(now - self._interval_start - self._excluded, 1e-9)
        self._interval_start = self._mark = now
        self._excluded = 0.0
        totals, world_size = self._world_totals()
        positions, real, supervised = totals.tolist()
        added = {
            "tokens_per_second": real / elapsed,
            "supervised_tokens_per_second": supervised / elapsed,
            "padding_share": (positions - real) / positions if positions else 0.0,
        }
        if self.flops_per_token is not None and self.peak_flops:
            added["mfu"] = mfu(real / elapsed / world_size, self.flops_per_token, self.peak_flops)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(added)

    def _world_totals(self) -> tuple[torch.Tensor, int]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.counter.take_tensor(device=torch.device("cpu")), 1
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        totals = self.counter.take_tensor(device=device)
        if device is None:
            totals = totals.cpu()
        dist.all_reduce(totals)
        return totals.cpu(), dist.get_world_size()
